"""The insider guard on the other Debian kernels of the test lab (5.10, 6.12): the hooks' arguments
and the structures the decisions read differ between releases (``security_inode_setattr`` lost and
gained parameters), so a handful of the attempts of ``test_guard.py`` run on each, with the same
truth: the guest's own error messages, hashes, ``ls`` and attributes, and one alert per attempt."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from aradia.lab.launcher import Guest
from guard_setup import TRUTH, alerts_of, attempt, guarding, set_scene, write_policy
from guest_programs import build_xattr, install_program
from test_guard import DENIED, NC, UPDATE, check_alert

ATTEMPTS = [
    ("append", "echo evil >> /srv/app/config", "/srv/app/config"),
    ("touch", "touch -d 2001-01-01 /srv/app/config", "/srv/app/config"),
    ("setxattr", "/tmp/xattr set /srv/app/config trusted.evil 1", "/srv/app/config"),
    ("hard link made before", "echo evil >> /root/hardlink", "/root/hardlink"),
    ("rename /srv/app", "mv /srv/app /srv/app-moved", "/srv/app"),
    ("new file in bin/", "echo new > /srv/app/bin/new", "/srv/app/bin/new"),
]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("series", ["5.10", "6.12"])
def test_guard_blocks_on_other_kernels(series: str, launch_guest: Callable[..., Guest], tmp_path: Path) -> None:
    guest = launch_guest(series, gdb=True, shared_memory=True)
    install_program(guest, "xattr", build_xattr(tmp_path))
    before = set_scene(guest)
    assert "trusted.keep" in before
    with guarding(guest, write_policy(tmp_path / "p.toml", "block")) as p:
        results = [(obj, *attempt(guest, cmd)) for _what, cmd, obj in ATTEMPTS]
        nc = attempt(guest, NC)
        during = guest.run(TRUTH)
        _c, rc_u, _out = attempt(guest, UPDATE)
    alerts, err = alerts_of(p)
    for obj, _client, rc, out in results:
        assert rc != 0 and DENIED in out, (series, obj, rc, out)
    assert DENIED in nc[2], nc
    assert during == before
    assert rc_u == 0 and guest.run("tail -n 1 /srv/app/config") == "updated=1\n"
    assert len(alerts) == len(ATTEMPTS) + 1, [(r["name"], r["args"]["object"]) for r in alerts]
    for (obj, client, _rc, _out), rec in zip(results, alerts, strict=False):
        check_alert(rec, client, "blocked", obj)
    check_alert(alerts[-1], nc[0], "blocked", "/usr/local/bin/nc")
    assert "is not in this kernel's BTF" not in err, err
    guest.stop()
