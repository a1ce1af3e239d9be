"""The insider guard against a real guest: the insider acts as root over ssh; the guest's own
sha256sum, ls -li and error messages are the truth, the session's own $SSH_CLIENT the client address."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from aradia.lab.launcher import Guest
from guard_setup import TRUTH, alerts_of, attempt, guarding, set_scene, write_policy
from guest_programs import build_xattr, install_program

GUEST_SERIES = "6.1"
GUEST_OPTIONS = {"gdb": True, "shared_memory": True, "smp": 2}
DENIED = "Operation not permitted"

#: (what, command, the protected object the alert names: path as the guest resolves it)
ATTEMPTS = [
    ("append", "echo evil >> /srv/app/config", "/srv/app/config"),
    ("sed -i", "sed -i s/listen=8080/listen=31337/ /srv/app/config", None),
    ("cp over", "echo evil > /root/evil && cp /root/evil /srv/app/config", "/srv/app/config"),
    ("mv away", "mv /srv/app/config /root/stolen", "/srv/app/config"),
    ("mv onto", "echo evil > /root/evil && mv /root/evil /srv/app/config", "/srv/app/config"),
    ("rm", "rm -f /srv/app/config", "/srv/app/config"),
    ("truncate", "truncate -s 0 /srv/app/config", "/srv/app/config"),
    ("chmod", "chmod 777 /srv/app/config", "/srv/app/config"),
    ("chown", "chown 1000:1000 /srv/app/config", "/srv/app/config"),
    ("touch", "touch -d 2001-01-01 /srv/app/config", "/srv/app/config"),
    ("setxattr", "/tmp/xattr set /srv/app/config trusted.evil 1", "/srv/app/config"),
    ("removexattr", "/tmp/xattr rm /srv/app/config trusted.keep", "/srv/app/config"),
    ("dd", "echo evil | dd of=/srv/app/config", "/srv/app/config"),
    ("symlink made in /tmp", "ln -sf /srv/app/config /tmp/cfglink && echo evil >> /tmp/cfglink", "/srv/app/config"),
    ("hard link made before", "echo evil >> /root/hardlink", "/root/hardlink"),
    ("/proc/self/fd re-open", "exec 3</srv/app/config && echo evil >> /proc/self/fd/3", "/srv/app/config"),
    ("relative ..", "cd /srv/app/bin && echo evil >> ../config", "/srv/app/config"),
    ("bind mount", "echo evil >> /mnt/app-bind/config", "/mnt/app-bind/config"),
    ("rename /srv/app", "mv /srv/app /srv/app-moved", "/srv/app"),
    ("new file in bin/", "echo new > /srv/app/bin/new", "/srv/app/bin/new"),
    ("write bin/run", "echo evil >> /srv/app/bin/run", "/srv/app/bin/run"),
    ("rm bin/run", "rm -f /srv/app/bin/run", "/srv/app/bin/run"),
]
@pytest.fixture(scope="module", autouse=True)
def xattr_tool(guest: Guest, tmp_path_factory: pytest.TempPathFactory) -> None:
    """/tmp/xattr in the guest (set_scene gives the config an attribute ``trusted.keep`` with it)."""
    install_program(guest, "xattr", build_xattr(tmp_path_factory.mktemp("xattr")))


UPDATE = "/usr/local/bin/deploy -c 'echo updated=1 >> /srv/app/config'"
NC = "/usr/local/bin/nc -w 2 127.0.0.1 22 </dev/null | head -c 16"


def check_alert(rec: dict[str, Any], client: str, action: str, op_path: str | None) -> None:
    """One alert record against the session that made the attempt."""
    a = rec["args"]
    assert rec["kind"] == "guard" and rec["schema"] == 1 and a["action"] == action, rec
    ip, port = client.split()
    assert a["session"] == {"user": "root", "uid": 0, "client": ip, "client_port": int(port),
                            "daemon_pid": a["session"]["daemon_pid"]}, a["session"]
    assert [p["comm"] for p in a["ancestry"]][-3:] == ["dropbear", "dropbear", "init"], a["ancestry"]
    assert a["ancestry"][-3]["pid"] == a["session"]["daemon_pid"]
    if op_path is not None:
        assert a["object"]["path"] == op_path, (op_path, a["object"])


@pytest.mark.timeout(600)
def test_block_protected_tree(guest: Guest, tmp_path: Path) -> None:
    before = set_scene(guest)
    config_ino = int(guest.run("stat -c %i /srv/app/config"))
    results = []
    with guarding(guest, write_policy(tmp_path / "p.toml", "block")) as p:
        for what, cmd, obj in ATTEMPTS:
            results.append((what, obj, *attempt(guest, cmd)))
        during = guest.run(TRUTH)
        _client, rc_u, out_u = attempt(guest, UPDATE)
        updated = guest.run("cat /srv/app/config")
    alerts, err = alerts_of(p)
    for what, _obj, _client, rc, out in results:
        assert rc != 0 and DENIED in out, (what, rc, out)
    assert during == before
    assert len(alerts) == len(ATTEMPTS), [(r["name"], r["args"]["object"]) for r in alerts]
    for (what, obj, client, _rc, _out), rec in zip(results, alerts, strict=True):
        check_alert(rec, client, "blocked", obj)
        if obj in ("/srv/app/config", "/root/hardlink", "/mnt/app-bind/config"):
            assert rec["args"]["object"]["ino"] == config_ino, what
    # the allowed updater: the same file changed, no alert
    assert rc_u == 0 and out_u == "" and updated == "listen=8080\nsecret=s3cr3t\nupdated=1\n", (rc_u, out_u, updated)
    assert "error" not in err and "Traceback" not in err, err


@pytest.mark.timeout(300)
def test_a_file_open_for_writing_before_the_guard_is_named_at_start(guest: Guest, tmp_path: Path) -> None:
    """The guard decides at open: a descriptor opened for writing before it started is out of its reach,
    so it says so at start, naming the process (and is silent when none is)."""
    set_scene(guest)
    pid = guest.run("sleep 600 3>>/srv/app/config & echo $!").strip()
    held: list[str] = []
    try:
        with guarding(guest, write_policy(tmp_path / "p.toml", "block"), warnings=held):
            pass
    finally:
        guest.run(f"kill {pid}")
    clean: list[str] = []
    with guarding(guest, write_policy(tmp_path / "p.toml", "block"), warnings=clean):
        pass
    assert held == [f"aradia: warning: pid {pid} (sleep) holds /srv/app/config open for writing (fd 3) since "
                    "before the guard: writes through it are not seen"], held
    assert clean == [], clean


@pytest.mark.timeout(300)
def test_forbidden_program(guest: Guest, tmp_path: Path) -> None:
    set_scene(guest)
    with guarding(guest, write_policy(tmp_path / "p.toml", "block")) as p:
        client, _rc, out = attempt(guest, NC)
        service = guest.run("/usr/local/bin/appd")  # the allowed service (started from the console)
        again = attempt(guest, "/usr/local/bin/appd")[1:]  # the session runs it through the service: allowed
    alerts, _err = alerts_of(p)
    assert DENIED in out and "SSH-2.0" not in out, out
    assert service == "SSH-2.0-dropbear\nappd-nc=0\n", service
    assert again == (0, "SSH-2.0-dropbear\nappd-nc=0\n"), again
    assert [(r["name"], r["args"]["object"]["path"]) for r in alerts] == [("exec", "/usr/local/bin/nc")]
    check_alert(alerts[0], client, "blocked", "/usr/local/bin/nc")


#: The attempts in an order in which each one works when nothing blocks (the tree is moved last; the
#: attribute is removed before sed -i replaces the file by a new one without it).
ALERT_ORDER = ["append", "setxattr", "removexattr", "sed -i", "cp over", "truncate", "chmod", "chown", "touch", "dd", "symlink made in /tmp",
               "hard link made before", "/proc/self/fd re-open", "relative ..", "bind mount", "new file in bin/",
               "write bin/run", "rm bin/run", "mv away", "mv onto", "rm", "rename /srv/app"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", ["alert", "dry-run"])
def test_alert_only(guest: Guest, tmp_path: Path, mode: str) -> None:
    """``alert`` rules (and ``--dry-run`` of ``block`` rules): every attempt works, each is reported once."""
    before = set_scene(guest)
    by_name = {what: (cmd, obj) for what, cmd, obj in ATTEMPTS}
    policy = write_policy(tmp_path / "p.toml", "alert" if mode == "alert" else "block")
    results = []
    with guarding(guest, policy, *(["--dry-run"] if mode == "dry-run" else [])) as p:
        for what in ALERT_ORDER:
            cmd, obj = by_name[what]
            results.append((what, obj, *attempt(guest, cmd)))
        nc = attempt(guest, NC)
    alerts, _err = alerts_of(p)
    for what, _obj, _client, rc, out in results:
        assert rc == 0 and DENIED not in out, (what, rc, out)
    assert nc[1:] == (0, "SSH-2.0-dropbear"), nc
    assert guest.run("ls /srv/app-moved; cat /srv/app-moved/bin/new; ls /root/stolen /srv/app 2>&1",
                     check=False) == "bin\nnew\nls: /srv/app: No such file or directory\n/root/stolen\n"
    assert guest.run(TRUTH.replace("/srv/app", "/srv/app-moved"), check=False) != before
    action = "alerted" if mode == "alert" else "would-block"
    assert len(alerts) == len(ALERT_ORDER) + 1, [(r["name"], r["args"]["object"]) for r in alerts]
    for (what, obj, client, _rc, _out), rec in zip(results, alerts, strict=False):
        check_alert(rec, client, action, None if what in ("sed -i", "truncate") else obj)
    assert alerts[-1]["name"] == "exec"
    check_alert(alerts[-1], nc[0], action, "/usr/local/bin/nc")


@pytest.mark.timeout(300)
def test_kill_9_leaves_guest_unguarded(guest: Guest, tmp_path: Path) -> None:
    """``kill -9`` of the guard: its guardian disarms every hook; the guest runs on, unprotected."""
    set_scene(guest)
    with guarding(guest, write_policy(tmp_path / "p.toml", "block")) as p:
        blocked = attempt(guest, "echo evil >> /srv/app/config")
        p.send_signal(signal.SIGKILL)
        p.wait(30)
        # the guardian saw its tracer vanish (end of file on their socket): hooks removed, guest resumed
        after = attempt(guest, "echo after-kill >> /srv/app/config")
    assert blocked[1] != 0 and DENIED in blocked[2], blocked
    assert after[1:] == (0, ""), after
    assert guest.run("cat /srv/app/config") == "listen=8080\nsecret=s3cr3t\nafter-kill\n"
    assert guest.run("echo still-alive") == "still-alive\n"


@pytest.mark.timeout(300)
def test_policy_reload(guest: Guest, tmp_path: Path) -> None:
    """Rewriting the policy file (alert -> block) takes effect without a restart; SIGHUP reloads too."""
    set_scene(guest)
    policy = write_policy(tmp_path / "p.toml", "alert")
    with guarding(guest, policy) as p:
        first = attempt(guest, "echo one >> /srv/app/config")
        write_policy(policy, "block")
        assert p.stderr is not None
        line = p.stderr.readline()
        second = attempt(guest, "echo two >> /srv/app/config")
        p.send_signal(signal.SIGHUP)
        hup = p.stderr.readline()
    alerts, _err = alerts_of(p)
    assert line == f"guard: policy reloaded (file changed): {policy}\n", line
    assert hup == f"guard: policy reloaded (SIGHUP): {policy}\n", hup
    assert first[1:] == (0, "") and second[1] != 0 and DENIED in second[2], (first, second)
    assert [r["args"]["action"] for r in alerts] == ["alerted", "blocked"]
    assert guest.run("cat /srv/app/config") == "listen=8080\nsecret=s3cr3t\none\n"


@pytest.mark.timeout(300)
def test_pause_holds_the_vm_until_resumed(guest: Guest, tmp_path: Path) -> None:
    """``--pause``: at an alert the VM stays stopped (the insider's command waits) until SIGUSR1."""
    set_scene(guest)
    result: dict[str, Any] = {}

    def act() -> None:
        result["value"] = attempt(guest, "echo evil >> /srv/app/config")

    with guarding(guest, write_policy(tmp_path / "p.toml", "block"), "--pause") as p:
        worker = threading.Thread(target=act)
        worker.start()
        assert p.stderr is not None
        line = p.stderr.readline()
        assert line == f"guard: VM paused at the hit; kill -USR1 {p.pid} lets it run\n", line
        worker.join(5)
        held = worker.is_alive()  # 5 s: an ssh command takes ~1 s when the guest runs
        p.send_signal(signal.SIGUSR1)
        worker.join(60)
    alerts, _err = alerts_of(p)
    assert held and not worker.is_alive()
    client, rc, out = result["value"]
    assert rc == 1 and DENIED in out, out
    assert len(alerts) == 1
    check_alert(alerts[0], client, "blocked", "/srv/app/config")
    assert guest.run("cat /srv/app/config") == "listen=8080\nsecret=s3cr3t\n"
