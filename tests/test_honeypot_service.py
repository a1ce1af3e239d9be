"""The SSH honeypot monitor as an app of ``aradia serve``: started over the API, its records in the
store and on the live stream, its transcripts beside the store. The attacker is paramiko from the host;
truth is the attacker's own record (its socket's port, the passwords it tried, what it received) and
what the guest says inside the session."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from aradia.apps.honeypot.cast import read_cast
from aradia.client import Client, LiveStream
from aradia.lab.launcher import Guest
from honeypot_setup import interactive, login, run
from service_env import ServiceProcess, VMEntry, api, principal, serving
from waiting import wait_until

OPERATOR = principal("operator")
ALICE = principal("alice", ["views", "trace", "honeypot"])
BOB = principal("bob", ["views", "trace"])  # may trace, not run the honeypot


@dataclass
class Scene:
    """The guest, the service and its directory, alice's client."""

    guest: Guest
    svc: ServiceProcess
    tmp: Path
    client: Client


@pytest.fixture(scope="module")
def scene(launch_guest: Callable[..., Guest]) -> Iterator[Scene]:
    guest = launch_guest("6.1", gdb=True, shared_memory=True)
    vms = lambda tmp: [VMEntry("web1", str(guest.qmp_path), "alice"),  # noqa: E731
                       VMEntry("web2", str(tmp / "absent.sock"), "bob")]
    with serving(OPERATOR, [ALICE, BOB], vms, "aradia-hp-svc-") as svc, Client(svc.url, ALICE.token) as client:
        yield Scene(guest, svc, svc.workdir, client)


def _records(stream: LiveStream, until: Callable[[list[dict[str, Any]]], bool],
             timeout: float = 120) -> list[dict[str, Any]]:
    """Live records until ``until(records)`` holds (or ``timeout`` s)."""
    out: list[dict[str, Any]] = []
    end = time.monotonic() + timeout
    for rec in stream.events(timeout):
        assert "dropped" not in rec, rec
        out.append(rec)
        if until(out) or time.monotonic() > end:
            break
    return out


@pytest.mark.timeout(60)
def test_the_honeypot_needs_its_permission(scene: Scene) -> None:
    spec = {"kind": "honeypot"}
    r = api(scene.svc.url, BOB.token, "POST", "/vms/web2/traces", json=spec)
    assert r.status_code == 403 and "may not use 'honeypot'" in r.json()["error"], r.text
    r = api(scene.svc.url, ALICE.token, "POST", "/vms/web1/traces", json={**spec, "accept_any_password": ["a b"]})
    assert r.status_code == 400 and "accept_any_password" in r.json()["error"], r.text


@pytest.mark.timeout(900)
def test_served_honeypot_records_sessions_to_store_live_and_transcripts(scene: Scene) -> None:
    sc = scene
    pw = sc.guest.image.root_password
    random_pw = secrets.token_hex(8)
    with sc.client.live("web1", kind=["honeypot"]) as stream:
        trace = sc.client.start_trace("web1", {"kind": "honeypot", "accept_any_password": ["root"]})
        lg = login(sc.guest, [random_pw])  # let in: any password for root
        assert lg.ok
        # (the shell first: a `bash -c` before it on the same connection makes the shell's readline
        # probe miss in about 2 runs of 5 -- a known fault of the monitor, see the note of stop 9)
        got = interactive(lg, ["cd /tmp", "/bin/busybox echo typed-here"])
        rc, out = run(lg, "echo client=$SSH_CLIENT")
        lg.transport.close()

        def ended(recs: list[dict[str, Any]]) -> bool:
            return any(r["name"] == "session.end" and r["args"].get("daemon_pid") for r in recs)

        live = _records(stream, ended)
    assert rc == 0 and out.split("=")[1].split()[1] == str(lg.port), out
    sessions = {r["args"]["session"] for r in live}
    assert len(sessions) == 1, sessions
    start = next(r for r in live if r["name"] == "session.start")
    assert start["args"]["client_port"] == lg.port and start["args"]["daemon"] == "dropbear", start
    auth = [(r["args"]["user"], r["args"]["password"], r["args"]["accepted"], r["args"]["forced"])
            for r in live if r["name"] == "auth"]
    assert auth == [("root", random_pw, True, True)], auth
    argv = [r["args"]["argv"] for r in live if r["name"] == "exec"]
    assert ["/bin/busybox", "echo", "typed-here"] in argv, argv
    lines = [r["args"]["line"] for r in live if r["name"] == "line"]
    assert lines == ["cd /tmp", "/bin/busybox echo typed-here", "exit"], lines
    assert {r["kind"] for r in live} == {"honeypot"} and {r["vm"] for r in live} == {"web1"}
    # the store holds exactly what the live stream carried
    wait_until(lambda: len(list(sc.client.events(vm="web1", kind="honeypot"))) >= len(live), 30, "stored")
    assert [r["id"] for r in sc.client.events(vm="web1", kind="honeypot")] == [r["id"] for r in live]
    assert sc.client.trace(trace["id"])["events"] == len(live)
    # the transcript beside the store: what the attacker's client received, byte for byte
    app_dir = sc.tmp / "apps" / f"web1-{trace['id']}"
    casts = list((app_dir / "sessions").glob("*.cast"))
    assert len(casts) == 1, list(app_dir.rglob("*"))
    _header, events = read_cast(casts[0])
    assert "".join(t for _t, d, t in events if d == "o").encode() == got
    # stopped: nothing armed, a login with a random password fails again
    sc.client.stop_trace(trace["id"])
    assert not login(sc.guest, [secrets.token_hex(8)]).ok
    assert login(sc.guest, [pw]).ok
