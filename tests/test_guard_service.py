"""The insider guard as an app of ``aradia serve``: started with ``aradia guard --server``, its alerts
in the store, on the live WebSocket stream and on the dashboard, armed again when the service restarts.

The insider acts as root over ssh (the session's own ``$SSH_CLIENT`` is the client address); the
guest's own ``sha256sum``/``ls -li`` of the protected tree and its error messages are the truth. The
service owns ``web1`` (the guest) for tenant alice (views, trace, guard).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import sync_playwright

from aradia.client import Client, LiveStream
from aradia.lab.launcher import Guest
from cli_runner import cli_argv, run_cli
from dashboard_env import launch_chromium, screenshot, sign_in
from guard_setup import TRUTH, attempt, set_scene, write_policy
from service_env import ServiceProcess, VMEntry, api, principal, serving
from test_guard import DENIED, UPDATE, check_alert
from waiting import wait_until

OPERATOR = principal("operator")
ALICE = principal("alice", ["views", "trace", "guard"])
#: a handful of the attempts test_guard.py makes one by one (each costs an ssh login under the guard)
ATTEMPTS = [
    ("append", "echo evil >> /srv/app/config", "/srv/app/config"),
    ("rm", "rm -f /srv/app/config", "/srv/app/config"),
    ("chmod", "chmod 777 /srv/app/config", "/srv/app/config"),
    ("hard link made before", "echo evil >> /root/hardlink", "/root/hardlink"),
    ("new file in bin/", "echo new > /srv/app/bin/new", "/srv/app/bin/new"),
]
APPEND = "echo evil >> /srv/app/config"


@dataclass
class Scene:
    """The guest, the service, alice's client and the block policy file."""

    guest: Guest
    svc: ServiceProcess
    client: Client
    policy: Path


@pytest.fixture(scope="module")
def scene(launch_guest: Callable[..., Guest]) -> Iterator[Scene]:
    guest = launch_guest("6.1", smp=2, gdb=True, shared_memory=True)
    with (serving(OPERATOR, [ALICE], lambda _: [VMEntry("web1", str(guest.qmp_path), "alice")],
                  "aradia-guard-svc-") as svc, Client(svc.url, ALICE.token) as client):
        yield Scene(guest, svc, client, write_policy(svc.workdir / "policy.toml", "block"))


def _keep_guard(sc: Scene, *extra: str) -> str:
    """``aradia guard --server … --keep``: the guard left on the service; its trace id."""
    r = run_cli("guard", "--server", sc.svc.url, "--token", ALICE.token, "--vm", "web1", "--policy",
                str(sc.policy), "--keep", *extra)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert "guarding web1 at" in r.stderr and "until the trace is stopped" in r.stderr, r.stderr
    return r.stdout.strip()


def _alerts(stream: LiveStream, n: int, timeout: float = 60) -> list[dict[str, Any]]:
    """The next ``n`` live records (each must be an alert), waiting at most ``timeout`` s in all."""
    out: list[dict[str, Any]] = []
    end = time.monotonic() + timeout
    for rec in stream.events(timeout):
        assert "dropped" not in rec, rec
        out.append(rec)
        if len(out) == n or time.monotonic() > end:
            break
    return out


def _stored(sc: Scene) -> list[dict[str, Any]]:
    return list(sc.client.events(vm="web1", kind="guard"))


@pytest.mark.timeout(900)
def test_guard_on_the_service_blocks_and_reports_to_store_and_live_stream(scene: Scene) -> None:
    sc = scene
    before = set_scene(sc.guest)
    with sc.client.live("web1", kind=["guard"]) as stream:  # subscribed before the guard starts
        trace_id = _keep_guard(sc)
        traces = sc.client.traces()
        assert [(t["id"], t["spec"]["kind"], t["spec"]["dry_run"]) for t in traces] == [(trace_id, "guard", False)]
        results = [(obj, *attempt(sc.guest, cmd)) for _what, cmd, obj in ATTEMPTS]
        during = sc.guest.run(TRUTH)
        live = _alerts(stream, len(ATTEMPTS))
        # the allowed updater changes the file and raises no alert: the next alert is the sentinel's
        _c, rc_u, out_u = attempt(sc.guest, UPDATE)
        updated = sc.guest.run("cat /srv/app/config")
        sentinel_client, rc_s, out_s = attempt(sc.guest, APPEND)
        after_update = _alerts(stream, 1)
    for obj, _client, rc, out in results:
        assert rc != 0 and DENIED in out, (obj, rc, out)
    assert during == before
    assert len(live) == len(ATTEMPTS), [(r["name"], r["args"]["object"]) for r in live]
    for (obj, client, _rc, _out), rec in zip(results, live, strict=True):
        check_alert(rec, client, "blocked", obj)
        assert rec["vm"] == "web1" and rec["host"] == "hv1", rec
    assert rc_u == 0 and out_u == "" and updated == "listen=8080\nsecret=s3cr3t\nupdated=1\n"
    assert rc_s != 0 and DENIED in out_s
    assert len(after_update) == 1
    check_alert(after_update[0], sentinel_client, "blocked", "/srv/app/config")
    # the store holds exactly what the live stream carried, in order
    wait_until(lambda: len(_stored(sc)) >= len(ATTEMPTS) + 1, 30, "alerts stored")
    assert [r["id"] for r in _stored(sc)] == [r["id"] for r in [*live, *after_update]]
    assert sc.client.trace(trace_id)["events"] == len(ATTEMPTS) + 1
    # stopped: the same write goes through (and the scene is rebuilt for the next test)
    sc.client.stop_trace(trace_id)
    _c, rc, out = attempt(sc.guest, APPEND)
    assert rc == 0 and out == "", (rc, out)
    assert len(_stored(sc)) == len(ATTEMPTS) + 1


@pytest.mark.timeout(900)
def test_the_service_arms_its_guard_again_after_a_kill(scene: Scene) -> None:
    sc = scene
    set_scene(sc.guest)
    trace_id = _keep_guard(sc)
    _c, rc, out = attempt(sc.guest, APPEND)
    assert rc != 0 and DENIED in out, (rc, out)
    sc.svc.kill()  # kill -9: the guardian lets the guest run with nothing armed
    _c, rc, out = attempt(sc.guest, APPEND)
    assert rc == 0 and out == "", ("the protection is gone with the service", rc, out)
    assert sc.guest.run("grep -c evil /srv/app/config").strip() == "1"
    sc.svc.start(OPERATOR.token)  # the stored guard is armed again
    wait_until(lambda: any(v["tracing"] for v in sc.client.vms()), 60, "the guard armed again")
    with sc.client.live("web1", kind=["guard"]) as stream:
        client, rc, out = attempt(sc.guest, APPEND)
        alerts = _alerts(stream, 1)
    assert rc != 0 and DENIED in out, (rc, out)
    assert sc.guest.run("grep -c evil /srv/app/config").strip() == "1"  # still the one line from before
    assert len(alerts) == 1, alerts
    check_alert(alerts[0], client, "blocked", "/srv/app/config")
    assert [t["id"] for t in sc.client.traces()] == [trace_id]
    sc.client.stop_trace(trace_id)


@pytest.mark.timeout(900)
def test_guard_followed_from_the_cli_in_dry_run_reports_and_stops_at_the_end(scene: Scene) -> None:
    sc = scene
    set_scene(sc.guest)
    p = subprocess.Popen(cli_argv("guard", "--server", sc.svc.url, "--token", ALICE.token, "--vm", "web1",
                                  "--policy", str(sc.policy), "--dry-run", "--json", "--duration", "40"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stderr is not None
    line = p.stderr.readline()
    assert line.startswith("guarding web1 at") and "dry run" in line, line
    client, rc, out = attempt(sc.guest, APPEND)
    # the policy file rewritten (alert only): the CLI hands it to the service, which takes it in place
    policy = write_policy(sc.policy.with_name("alert.toml"), "alert")
    sc.policy.write_text(policy.read_text())
    try:
        reloaded = p.stderr.readline()
        client2, rc2, out2 = attempt(sc.guest, "echo evil2 >> /srv/app/config")
        out_json, err = p.communicate(timeout=120)
    finally:
        write_policy(sc.policy, "block")
    assert p.returncode == 0, err
    assert reloaded == f"guard: policy reloaded (file changed): {sc.policy}\n", reloaded + err
    assert (rc, out, rc2, out2) == (0, "", 0, "")  # dry run, then alert only: nothing blocked
    assert sc.guest.run("grep -c evil /srv/app/config").strip() == "2"
    alerts = [json.loads(x) for x in out_json.splitlines()]
    assert len(alerts) == 2, alerts
    check_alert(alerts[0], client, "would-block", "/srv/app/config")
    check_alert(alerts[1], client2, "alerted", "/srv/app/config")
    assert sc.client.traces() == []  # stopped at the end


@pytest.mark.timeout(900)
def test_a_new_policy_is_taken_in_place_and_a_bad_one_keeps_the_old(scene: Scene) -> None:
    sc = scene
    set_scene(sc.guest)
    alert_policy = write_policy(sc.policy.with_name("alert.toml"), "alert").read_text()
    block_policy = sc.policy.read_text()
    with sc.client.live("web1", kind=["guard"]) as stream:
        trace = sc.client.start_trace("web1", {"kind": "guard", "policy": alert_policy})
        # one guard per VM: another policy is a clash (409), nothing more armed
        clash = api(sc.svc.url, ALICE.token, "POST", "/vms/web1/traces", json={"kind": "guard", "policy": block_policy})
        assert clash.status_code == 409 and "already" in clash.json()["error"], clash.text
        assert [t["id"] for t in sc.client.traces()] == [trace["id"]]
        c1, rc1, out1 = attempt(sc.guest, APPEND)
        updated = sc.client.update_trace(trace["id"], {"kind": "guard", "policy": block_policy})
        c2, rc2, out2 = attempt(sc.guest, "echo evil2 >> /srv/app/config")
        bad = [api(sc.svc.url, ALICE.token, "PUT", f"/traces/{trace['id']}", json=body) for body in ({"kind": "guard", "policy": '[[protect]]\npath = "/no/such"\n'},
                            {"kind": "syscalls", "syscalls": ["execve"]})]
        c3, rc3, out3 = attempt(sc.guest, "echo evil3 >> /srv/app/config")
        alerts = _alerts(stream, 3)
    sc.client.stop_trace(trace["id"])
    assert (rc1, out1) == (0, "") and rc2 != 0 and DENIED in out2 and rc3 != 0 and DENIED in out3
    assert updated["id"] == trace["id"] and updated["spec"]["policy"] == block_policy
    assert [r.status_code for r in bad] == [422, 400], [r.text for r in bad]  # 422: valid, not in this guest
    assert "/no/such" in bad[0].json()["error"] and "only an app's spec" in bad[1].json()["error"]
    assert [a["args"]["action"] for a in alerts] == ["alerted", "blocked", "blocked"]
    for client, rec in zip((c1, c2, c3), alerts, strict=True):
        check_alert(rec, client, rec["args"]["action"], "/srv/app/config")


@pytest.mark.timeout(900)
def test_dashboard_starts_a_guard_and_shows_its_alerts(scene: Scene) -> None:
    sc = scene
    set_scene(sc.guest)
    with sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            page = sign_in(browser, sc.svc.url, ALICE.token, "#/vm/web1/events")
            page.wait_for_selector("#live-status:text('live')", timeout=30_000)
            page.select_option("#trace-kind", "guard")
            assert page.is_visible("#trace-policy") and page.is_disabled("#trace-what")
            page.fill("#trace-policy", sc.policy.read_text())
            page.click("#trace-start")
            page.wait_for_selector("#trace-status:has-text('started')", timeout=60_000)
            trace_id = page.get_attribute("#trace-status", "data-trace")
            assert [t["id"] for t in sc.client.traces()] == [trace_id]
            client, rc, out = attempt(sc.guest, APPEND)
            assert rc != 0 and DENIED in out, (rc, out)
            page.wait_for_selector("#live-rows tr.alert-blocked", timeout=60_000)
            rows = page.eval_on_selector_all("#live-rows tr", "rs => rs.map(r => [r.className, r.innerText])")
            ip, port = client.split()
            assert len(rows) == 1, rows
            assert rows[0][0] == "alert alert-blocked", rows
            assert ("BLOCKED write /srv/app/config" in rows[0][1]
                    and f"session root from {ip}:{port}" in rows[0][1]), rows[0][1]
            screenshot(page, "dashboard-guard-alert")
        finally:
            browser.close()
    sc.client.stop_trace(str(trace_id))
