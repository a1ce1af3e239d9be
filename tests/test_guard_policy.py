"""The guard's policy file: what it accepts, and one clear error for everything else (no guest)."""

from __future__ import annotations

from pathlib import Path

import pytest

from aradia.apps.guard.objects import user_dev
from aradia.apps.guard.policy import Allow, Forbid, PolicyError, Protect, load_policy, parse_policy
from aradia.apps.guard.resolve import parse_passwd

GOOD = """
[[protect]]
path = "/srv/app/"
action = "block"
allow = [{ comm = "deployer" }, { exe = "/usr/local/bin/deploy" }, { uid = 1001 }]
[[protect]]
path = "/etc/shadow"
action = "alert"
[[forbid]]
exe = "/usr/bin/nc"
allow = [{ parent_comm = "appd", parent_exe = "/usr/sbin/appd" }]
"""


@pytest.mark.timeout(10)
def test_good_policy() -> None:
    p = parse_policy(GOOD, "g.toml")
    assert p.protect == (Protect("/srv/app", "block", (Allow(comm="deployer"), Allow(exe="/usr/local/bin/deploy"),
                                                        Allow(uid=1001))),
                         Protect("/etc/shadow", "alert", ()))
    assert p.forbid == (Forbid("/usr/bin/nc", "block", (Allow(parent_comm="appd", parent_exe="/usr/sbin/appd"),)),)
    assert p.programs() == {"/usr/bin/nc", "/usr/local/bin/deploy", "/usr/sbin/appd"}
    assert Allow(comm="x", uid=3).describe() == "comm=x,uid=3"


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("text", "message"), [
    ('[[protect]]\npath = "/a"\nmode = "block"', "g.toml: protect[0]: unknown key mode"),
    ('[[protect]]\naction = "block"', "g.toml: protect[0]: missing path"),
    ('[[protect]]\npath = "a/b"', "g.toml: protect[0]: path must be an absolute path"),
    ('[[protect]]\npath = "/a"\naction = "deny"', "action must be one of block, alert, not 'deny'"),
    ('[[protect]]\npath = "/a"\nallow = [{ user = "bob" }]', "protect[0].allow[0]: unknown key user"),
    ('[[protect]]\npath = "/a"\nallow = [{ uid = "0" }]', "protect[0].allow[0]: uid must be an integer"),
    ('[[protect]]\npath = "/a"\nallow = [{ uid = true }]', "protect[0].allow[0]: uid must be an integer"),
    ('[[protect]]\npath = "/a"\nallow = [{}]', "an allow rule is a table with at least one of"),
    ('[[forbid]]\nexe = "/bin/nc"\nallow = [{ exe = "nc" }]', "forbid[0].allow[0]: exe must be an absolute path"),
    ('[[forbid]]\npath = "/bin/nc"', "forbid[0]: unknown key path"),
    ('[guard]\nx = 1', "g.toml: unknown key guard"),
    ("", "g.toml: protects nothing and forbids nothing"),
    ("[[protect]\n", "g.toml: "),
])
def test_bad_policy(text: str, message: str) -> None:
    with pytest.raises(PolicyError) as e:
        parse_policy(text, "g.toml")
    assert message in str(e.value), str(e.value)
    parse_policy('[[protect]]\npath = "/a"', "g.toml")  # beside each: the smallest good one


@pytest.mark.timeout(10)
def test_load_policy(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text(GOOD)
    assert load_policy(f).source == str(f)
    with pytest.raises(PolicyError, match=r"cannot read policy .*missing\.toml: No such file"):
        load_policy(tmp_path / "missing.toml")


@pytest.mark.timeout(10)
def test_passwd_and_dev() -> None:
    assert parse_passwd("root:x:0:0:root:/root:/bin/bash\nbad line\nbob:x:1001:1001::/home/bob:/bin/sh\n"
                        "root2:x:0:0::/:/bin/sh\n") == {0: "root", 1001: "bob"}
    assert user_dev((8 << 20) | 1) == 0x801  # sda1 as stat shows it
    assert user_dev((259 << 20) | 300) == (300 & 0xFF) | (259 << 8) | ((300 & ~0xFF) << 12)
