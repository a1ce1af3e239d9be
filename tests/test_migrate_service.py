"""``POST /api/v1/vms/{vm}/migrate`` on ``aradia serve``: a traced VM moves into another VM slot of the
service, and its WebSocket subscriber, the SQLite store and JetStream see one event sequence.

Two real QEMUs (2 vCPUs), a real nats-server, real HTTP and WebSocket clients. Ground truth: the
numbers the guest's command loop wrote, and QEMU's run states.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from aradia.client import Client, ServiceError
from bus_helpers import read_stream
from migration_env import MARK, BootGuest, guest_pair, marks_in_guest, start_command_loop
from nats_server import NatsServer
from service_env import ServiceProcess, VMEntry, api, config_text, principal
from waiting import wait_until

OPERATOR = principal("operator")


def numbers(records: list[dict[str, Any]], tag: str) -> list[int]:
    """The loop's numbers in record order."""
    prefix = f"{MARK}{tag}-"
    out = []
    for r in records:
        argv = r["args"].get("argv") or []
        if r["kind"] == "syscall" and len(argv) > 1 and str(argv[1]).startswith(prefix):
            out.append(int(str(argv[1])[len(prefix):]))
    return out


def relevant(records: list[dict[str, Any]], tag: str) -> list[dict[str, Any]]:
    """The loop's exec records and the migration marker, in record order."""
    prefix = f"{MARK}{tag}-"
    return [r for r in records if r["kind"] == "migrated"
            or any(str(a).startswith(prefix) for a in (r["args"].get("argv") or []))]


@pytest.mark.timeout(900)
def test_service_migrates_a_traced_vm_and_every_sink_sees_one_sequence(boot_guest: BootGuest,
                                                                       tmp_path: Path) -> None:
    tag = "svc"
    with guest_pair(boot_guest, 2) as pair:
        src, dst = pair.source, pair.destination
        broker = NatsServer(tmp_path / "jetstream").start()
        try:
            home = tmp_path / "hv1"
            home.mkdir()
            cfg = home / "serve.toml"
            cfg.write_text(config_text(host="hv1", store=home / "events.db", operator=OPERATOR,
                                       vms=[VMEntry("web1", str(src.qmp_path)),
                                            VMEntry("web1-next", str(dst.qmp_path))], nats=broker.url))
            svc = ServiceProcess(cfg, home)
            svc.start(OPERATOR.token)
            try:
                # bad requests: clear statuses, nothing touched
                r = api(svc.url, OPERATOR.token, "POST", "/vms/web1/migrate", json={})
                assert r.status_code == 400 and "needs to" in r.text, r.text
                r = api(svc.url, OPERATOR.token, "POST", "/vms/web1/migrate", json={"to": "nowhere"})
                assert r.status_code == 404, r.text
                r = api(svc.url, OPERATOR.token, "POST", "/vms/web1/migrate", json={"to": "web1"})
                assert r.status_code == 422 and "into itself" in r.text, r.text
                live: list[dict[str, Any]] = []
                with Client(svc.url, OPERATOR.token) as c, c.live("web1") as stream:
                    trace = c.start_trace("web1", {"kind": "syscalls", "syscalls": ["execve"]})
                    done = threading.Event()

                    def collect() -> None:
                        try:
                            for rec in stream.events(duration=800):
                                live.append(rec)
                                if done.is_set():
                                    return
                        except ServiceError:
                            if not done.is_set():  # closed before the test was done: a failure
                                raise

                    reader = threading.Thread(target=collect, daemon=True)
                    reader.start()
                    out = start_command_loop(src, tag)
                    wait_until(lambda: 20 in numbers(live, tag), 300, "mark 20 on the WebSocket", step=0.1)
                    r = api(svc.url, OPERATOR.token, "POST", "/vms/web1/migrate", json={"to": "web1-next"})
                    assert r.status_code == 200, r.text + dst.qemu_log.read_text()[-1500:]
                    result = r.json()
                    assert result["status"] == "completed" and result["destination"] == "web1"
                    assert str(src.qmp_path) not in r.text and str(dst.qmp_path) not in r.text
                    assert marks_in_guest(dst, out) == list(range(200))
                    wait_until(lambda: 199 in numbers(live, tag), 120, "mark 199 on the WebSocket", step=0.1)
                    done.set()
                    c.stop_trace(trace["id"])
                    assert api(svc.url, OPERATOR.token, "GET", "/vms/web1").json()["owner"]["state"] == "running"
                    assert api(svc.url, OPERATOR.token, "GET",
                               "/vms/web1-next").json()["owner"]["state"] == "postmigrate"
                ws = relevant(live, tag)
                assert numbers(ws, tag) == list(range(200))
                markers = [x for x in ws if x["kind"] == "migrated"]
                assert len(markers) == 1 and markers[0]["args"]["to"] == "hv1/web1-next"
                assert not any("dropped" in x for x in live)

                def stored() -> list[dict[str, Any]]:
                    with Client(svc.url, OPERATOR.token) as c:
                        return relevant(list(c.events(vm="web1", limit=1000)), tag)

                wait_until(lambda: len(stored()) >= len(ws), 60, "the store", step=0.3)
                db = stored()

                def streamed() -> list[dict[str, Any]]:
                    msgs = asyncio.run(read_stream(broker.url, subject="aradia.events.hv1.web1.>"))
                    return relevant([m[2] for m in msgs], tag)

                wait_until(lambda: len(streamed()) >= len(ws), 60, "JetStream", step=0.5)
                js = streamed()
                ids = [x["id"] for x in ws]
                assert len(set(ids)) == len(ids) == 201
                assert [x["id"] for x in db] == ids and db == ws
                assert sorted(x["id"] for x in js) == sorted(ids)
            finally:
                svc.stop()
        finally:
            broker.kill()
