"""``aradia serve`` against real guests, a real nats-server and real HTTP, WebSocket and NATS clients.

Two guests; service ``hv1`` owns ``web1`` (tenant alice) and runs as an unprivileged user (setpriv,
no capabilities) that can open only web1's QMP socket and RAM file; service ``hv2`` owns ``web2``
(tenant bob); both publish into one nats-server; an ``--aggregate`` service reads that stream.
Ground truth is the guest's own ``/proc`` and the commands it ran.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest

import waiting
from aradia.client import Client
from aradia.lab.launcher import Guest
from aradia.service.bus import request
from cli_runner import assert_one_line_error, cli_argv, run_cli
from guest_truth import proc_processes
from nats_server import NatsServer
from service_env import ServiceProcess, VMEntry, api, config_text, principal

OPERATOR = principal("operator")
ALICE = principal("alice", ["views", "read", "trace"])
BOB = principal("bob", ["views", "trace"])
#: an id that is no user of this machine: the service runs as it (files shared through the group)
SERVICE_ID = 61_234
N_EXEC = 50
STREAM = "ARADIA_EVENTS"


def exec_script(tag: str, n: int = N_EXEC) -> str:
    """A guest script: ``n`` execs of /bin/true with known arguments, then a marker line."""
    return "\n".join([f"/bin/true {tag}{i} arg-{i * 7}" for i in range(n)] + [f"echo {tag}-DONE"])


def run_execs(guest: Guest, tag: str, n: int = N_EXEC) -> None:
    """Run the exec script in the guest (traced: each exec stops the guest, hence the long timeout)."""
    guest.run(f"cat > /tmp/{tag}.sh <<'EOF'\n{exec_script(tag, n)}\nEOF")
    out = guest.run(f"bash /tmp/{tag}.sh", timeout=300)
    assert f"{tag}-DONE" in out


def tagged(records: list[dict[str, Any]], tag: str) -> list[dict[str, Any]]:
    """The execve records of the exec script ``tag``."""
    return [r for r in records if r.get("name") == "execve"
            and any(str(a).startswith(tag) for a in (r["args"].get("argv") or []))]


def expected_argv(tag: str, n: int = N_EXEC) -> list[list[str]]:
    return [["/bin/true", f"{tag}{i}", f"arg-{i * 7}"] for i in range(n)]


def stream_records(url: str, subject: str) -> list[dict[str, Any]]:
    """Every record JetStream holds on ``subject`` (wildcards allowed), read message by message."""
    async def read() -> list[dict[str, Any]]:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            info = await js.stream_info(STREAM)
            out = []
            sub = await js.pull_subscribe(subject, stream=STREAM)
            while len(out) < info.state.messages:
                try:
                    msgs = await sub.fetch(500, timeout=2)
                except (TimeoutError, nats.errors.TimeoutError):
                    break
                for m in msgs:
                    out.append(json.loads(m.data))
                    await m.ack()
            await sub.unsubscribe()
            return out
        finally:
            await nc.close()

    return asyncio.run(read())


def share_with_group(guest: Guest, gid: int) -> None:
    """Give group ``gid`` exactly what the service needs: the VM's directory (search), its QMP socket
    and its RAM file (read/write). Nothing else of the guest's is shared."""
    wd = guest.qmp_path.parent
    os.chown(wd, -1, gid)
    os.chmod(wd, 0o710)
    for path in (guest.qmp_path, guest.shm_path):
        assert path is not None
        os.chown(path, -1, gid)
        os.chmod(path, 0o660)


@dataclass
class Fleet:
    """Guests, broker and the three services."""

    g1: Guest
    g2: Guest
    nats: NatsServer
    hv1: ServiceProcess
    hv2: ServiceProcess
    agg: ServiceProcess
    tmp: Path

    def client(self, who: Any = ALICE, svc: ServiceProcess | None = None) -> Client:
        return Client((svc or self.hv1).url, who.token)


@pytest.fixture(scope="module")
def fleet(launch_guest: Callable[..., Guest]) -> Iterator[Fleet]:
    # not under pytest's own temp dir: that is root's alone (0700), and hv1's user must reach its home
    tmp = Path(tempfile.mkdtemp(prefix="aradia-fleet-"))
    os.chmod(tmp, 0o755)
    g1 = launch_guest("6.1", smp=2, gdb=True, shared_memory=True)
    g2 = launch_guest("6.1", smp=2, gdb=True, shared_memory=True)
    share_with_group(g1, SERVICE_ID)
    broker = NatsServer(tmp / "jetstream").start()
    services = []
    for host, vm, guest, user in (("hv1", "web1", g1, (SERVICE_ID, SERVICE_ID)), ("hv2", "web2", g2, None)):
        home = tmp / host
        home.mkdir()
        if user:
            os.chown(home, *user)
        cfg = home / "serve.toml"
        cfg.write_text(config_text(host=host, store=home / "events.db", operator=OPERATOR,
                                   tenants=[ALICE, BOB],
                                   vms=[VMEntry(vm, str(guest.qmp_path), "alice" if vm == "web1" else "bob")],
                                   nats=broker.url))
        os.chmod(cfg, 0o644)
        svc = ServiceProcess(cfg, home, user=user, env={"ARADIA_CACHE": str(home / "cache")})
        svc.start(OPERATOR.token)
        services.append(svc)
    agg_home = tmp / "agg"
    agg_home.mkdir()
    cfg = agg_home / "serve.toml"
    cfg.write_text(config_text(host="fleet", store=agg_home / "events.db", operator=OPERATOR,
                               nats=broker.url, aggregate=True))
    agg = ServiceProcess(cfg, agg_home)
    agg.start(OPERATOR.token)
    f = Fleet(g1, g2, broker, services[0], services[1], agg, tmp)
    try:
        yield f
    finally:
        for s in (agg, *services):
            s.stop()
        broker.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    """:func:`waiting.wait_until`, polling every 0.3 s: each poll here is HTTP queries to a service."""
    waiting.wait_until(cond, timeout, what, step=0.3)


def stored(svc: ServiceProcess, **filters: Any) -> list[dict[str, Any]]:
    with Client(svc.url, OPERATOR.token) as c:
        return list(c.events(limit=1000, **filters))


@pytest.mark.timeout(300)
def test_service_runs_unprivileged_and_reads_ram_through_the_shared_file(fleet: Fleet) -> None:
    status = Path(f"/proc/{fleet.hv1.proc.pid}/status").read_text()  # type: ignore[union-attr]
    fields = dict(line.split(":", 1) for line in status.splitlines())
    assert fields["Uid"].split()[:2] == [str(SERVICE_ID)] * 2 and fields["Gid"].split()[0] == str(SERVICE_ID)
    assert int(fields["CapEff"], 16) == 0 and int(fields["CapBnd"], 16) == 0
    with fleet.client() as c:
        info = c.info("web1")
    assert info["memory_path"] == "shared-file"  # no ptrace: /proc/PID/mem is not an option for it
    assert info["spec"] == "web1" and info["kernel"].startswith("Linux version 6.1")
    assert str(fleet.g1.qmp_path) not in json.dumps(info)


@pytest.mark.timeout(300)
def test_api_processes_equal_the_guests_proc(fleet: Fleet) -> None:
    truth = proc_processes(fleet.g1)
    with fleet.client() as c:
        doc = c.view("web1", "processes")
    procs = {p["pid"]: p for p in doc["items"]}
    stable = [pid for pid, t in truth.items() if t.ppid in (0, 1, 2)]
    assert len(stable) > 30
    for pid in stable:
        t, p = truth[pid], procs.get(pid)
        assert p is not None, f"pid {pid} ({t.comm}) missing"
        if p["name"].startswith("kworker/"):  # a worker's name carries its current work: may change
            continue
        assert (p["pid"], p["ppid"], p["name"]) == (pid, t.ppid, t.comm)
    # the same JSON items as the CLI's --json (one code path: Kernel.view)
    assert set(doc) == {"items", "warnings"} and {"pid", "ppid", "comm", "cmdline"} <= set(doc["items"][0])


@pytest.mark.timeout(900)
def test_trace_over_http_delivers_every_exec_to_websocket_sqlite_and_jetstream(fleet: Fleet) -> None:
    tag = "aradia-ws"
    live: list[dict[str, Any]] = []
    sse: list[dict[str, Any]] = []
    subscribed = threading.Event()

    def read_sse() -> None:  # the SSE twin, same filters
        with httpx.stream("GET", f"{fleet.hv1.url}/api/v1/vms/web1/events/sse",
                          params={"kind": "syscall", "name": "execve"},
                          headers={"Authorization": f"Bearer {ALICE.token}"}, timeout=600) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            subscribed.set()
            for line in r.iter_lines():
                if line.startswith("data: "):
                    sse.append(json.loads(line[6:]))
                    if len(tagged(sse, tag)) >= N_EXEC:
                        return

    sse_reader = threading.Thread(target=read_sse, daemon=True)
    sse_reader.start()
    assert subscribed.wait(30)
    with fleet.client() as c, c.live("web1", kind=["syscall"], name=["execve"]) as stream:
        trace = c.start_trace("web1", {"kind": "syscalls", "syscalls": ["execve"]})
        done = threading.Event()

        def collect() -> None:
            for rec in stream.events(duration=600):
                live.append(rec)
                if len(tagged(live, tag)) >= N_EXEC or done.is_set():
                    return

        reader = threading.Thread(target=collect, daemon=True)
        reader.start()
        run_execs(fleet.g1, tag)
        reader.join(timeout=60)
        done.set()
        c.stop_trace(trace["id"])
    ws = tagged(live, tag)
    assert [r["args"]["argv"] for r in ws] == expected_argv(tag)
    sse_reader.join(timeout=30)
    assert tagged(sse, tag) == ws
    assert not any("dropped" in r for r in live)
    wait_until(lambda: len(tagged(stored(fleet.hv1, vm="web1", q=tag), tag)) >= N_EXEC, 30, "the store")
    db = tagged(stored(fleet.hv1, vm="web1", q=tag), tag)
    wait_until(lambda: len(tagged(stream_records(fleet.nats.url, "aradia.events.hv1.web1.syscall"), tag))
             >= N_EXEC, 60, "JetStream")
    js = tagged(stream_records(fleet.nats.url, "aradia.events.hv1.web1.syscall"), tag)
    ids = [r["id"] for r in ws]
    assert len(set(ids)) == N_EXEC  # no duplicates
    assert [r["id"] for r in db] == ids and sorted(r["id"] for r in js) == sorted(ids)
    assert db == ws  # the store keeps the record as it was streamed
    assert all(r["host"] == "hv1" and r["vm"] == "web1" and r["schema"] == 1 for r in ws)


@pytest.mark.timeout(300)
def test_tenants_on_real_vms(fleet: Fleet) -> None:
    assert api(fleet.hv1.url, ALICE.token, "GET", "/vms/web1/modules").status_code == 200
    assert api(fleet.hv1.url, BOB.token, "GET", "/vms/web1/modules").status_code == 403
    assert api(fleet.hv2.url, ALICE.token, "GET", "/vms/web2/modules").status_code == 403
    assert api(fleet.hv2.url, BOB.token, "GET", "/vms/web2/modules").status_code == 200
    # bob lacks "read" on hv2
    assert api(fleet.hv2.url, BOB.token, "GET", "/vms/web2/memory", params={"phys": 4096, "size": 16}) \
        .status_code == 403
    r = api(fleet.hv1.url, ALICE.token, "GET", "/vms/web1/memory", params={"phys": "0x1000", "size": 64})
    assert r.status_code == 200 and len(r.content) == 64
    rows = api(fleet.hv2.url, OPERATOR.token, "GET", "/audit", params={"allowed": False}).json()["items"]
    assert [(x["tenant"], x["operation"], x["vm"], x["status"]) for x in rows][-2:] == [
        ("alice", "view", "web2", 403), ("bob", "memory", "web2", 403)]


def _command(fleet: Fleet, message: dict[str, Any], host: str = "hv1", vm: str = "web1") -> dict[str, Any]:
    return asyncio.run(request(fleet.nats.url, host, vm, message, timeout=120))


@pytest.mark.timeout(600)
def test_commands_over_nats(fleet: Fleet) -> None:
    reply = _command(fleet, {"token": ALICE.token, "op": "view", "params": {"name": "processes"}})
    assert reply["ok"] and any(p["pid"] == 1 for p in reply["result"]["items"])
    bad = _command(fleet, {"token": "aradia_wrong", "op": "view", "params": {"name": "processes"}})
    assert (bad["ok"], bad["status"]) == (False, 401)
    other = _command(fleet, {"token": BOB.token, "op": "view", "params": {"name": "processes"}})
    assert (other["ok"], other["status"]) == (False, 403)
    started = _command(fleet, {"token": ALICE.token, "op": "trace.start",
                               "params": {"spec": {"kind": "syscalls", "syscalls": ["execve"]}}})
    assert started["ok"], started
    trace_id = started["result"]["id"]
    run_execs(fleet.g1, "aradia-nc", 5)
    seen = _command(fleet, {"token": ALICE.token, "op": "trace.get", "params": {"id": trace_id}})
    assert seen["ok"] and seen["result"]["events"] >= 5
    refused = _command(fleet, {"token": "aradia_wrong", "op": "trace.stop", "params": {"id": trace_id}})
    assert refused["status"] == 401
    stopped = _command(fleet, {"token": ALICE.token, "op": "trace.stop", "params": {"id": trace_id}})
    assert stopped["ok"] and api(fleet.hv1.url, ALICE.token, "GET", f"/traces/{trace_id}").status_code == 404
    rows = api(fleet.hv1.url, OPERATOR.token, "GET", "/audit", params={"limit": 10000}).json()["items"]
    nats_rows = [(x["tenant"], x["operation"], x["status"]) for x in rows if x["client"] == "nats"]
    assert nats_rows[-7:] == [("alice", "view", 200), ("-", "view", 401), ("bob", "view", 403),
                              ("alice", "trace.start", 200), ("alice", "trace.get", 200),
                              ("-", "trace.stop", 401), ("alice", "trace.stop", 200)]


@pytest.mark.timeout(900)
def test_fleet_aggregate_holds_both_hosts(fleet: Fleet) -> None:
    tag = "aradia-fl"
    traces = []
    for svc, who, vm in ((fleet.hv1, ALICE, "web1"), (fleet.hv2, BOB, "web2")):
        with Client(svc.url, who.token) as c:
            traces.append((svc, who, c.start_trace(vm, {"kind": "syscalls", "syscalls": ["execve"]})))
    threads = [threading.Thread(target=run_execs, args=(g, tag, 20)) for g in (fleet.g1, fleet.g2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for svc, who, tr in traces:
        with Client(svc.url, who.token) as c:
            c.stop_trace(tr["id"])
    own = {"hv1": tagged(stored(fleet.hv1, q=tag), tag), "hv2": tagged(stored(fleet.hv2, q=tag), tag)}
    assert len(own["hv1"]) == 20 and len(own["hv2"]) == 20
    wait_until(lambda: len(tagged(stored(fleet.agg, q=tag), tag)) >= 40, 60, "the aggregate")
    agg = tagged(stored(fleet.agg, q=tag), tag)
    for host in ("hv1", "hv2"):
        assert sorted(r["id"] for r in agg if r["host"] == host) == sorted(r["id"] for r in own[host])
    assert len(agg) == 40

    def sources() -> dict[tuple[str, str], int]:
        return {(v["host"], v["name"]): v["events"] for v in api(fleet.agg.url, OPERATOR.token, "GET", "/vms").json()}

    own_counts = {("hv1", "web1"): len(stored(fleet.hv1)), ("hv2", "web2"): len(stored(fleet.hv2))}
    wait_until(lambda: sources() == own_counts, 60, "the aggregate's VM list")  # every event, not only ours
    # read-only: the aggregate refuses a trace
    r = api(fleet.agg.url, OPERATOR.token, "POST", "/vms/web1/traces", json={"kind": "syscalls",
                                                                            "syscalls": ["execve"]})
    assert r.status_code == 405


@pytest.mark.timeout(900)
def test_nats_restart_mid_trace_loses_nothing(fleet: Fleet) -> None:
    tag = "aradia-nr"
    with fleet.client() as c:
        trace = c.start_trace("web1", {"kind": "syscalls", "syscalls": ["execve"]})
        worker = threading.Thread(target=run_execs, args=(fleet.g1, tag, 30))
        worker.start()
        wait_until(lambda: len(tagged(stored(fleet.hv1, q=tag), tag)) >= 5, 120, "the first events")
        fleet.nats.kill()
        time.sleep(2)
        fleet.nats.start()
        worker.join()
        c.stop_trace(trace["id"])
    db = tagged(stored(fleet.hv1, q=tag), tag)
    assert len(db) == 30
    wait_until(lambda: len(tagged(stream_records(fleet.nats.url, "aradia.events.hv1.web1.>"), tag)) >= 30,
             120, "the spool to drain")
    js = tagged(stream_records(fleet.nats.url, "aradia.events.hv1.web1.>"), tag)
    assert sorted(r["id"] for r in js) == sorted(r["id"] for r in db)  # none lost, none twice
    health = api(fleet.hv1.url, OPERATOR.token, "GET", "/health").json()
    assert health["bus"]["dropped"] == 0 and health["bus"]["connected"]


@pytest.mark.timeout(900)
def test_kill_9_mid_trace_keeps_the_guest_running_and_the_trace(fleet: Fleet) -> None:
    tag = "aradia-k9"
    with fleet.client() as c:
        trace = c.start_trace("web1", {"kind": "syscalls", "syscalls": ["execve"]})
    run_execs(fleet.g1, tag, 10)
    wait_until(lambda: len(tagged(stored(fleet.hv1, q=tag), tag)) >= 10, 30, "the store")
    acknowledged = {r["id"] for r in tagged(stored(fleet.hv1, q=tag), tag)}
    fleet.hv1.kill()
    # the guardian disarmed everything: the guest runs (an exec storm would stall if a probe stayed)
    t0 = time.monotonic()
    run_execs(fleet.g1, "aradia-free", 50)
    assert time.monotonic() - t0 < 60
    fleet.hv1.start(OPERATOR.token)
    assert acknowledged <= {r["id"] for r in tagged(stored(fleet.hv1, q=tag), tag)}
    with fleet.client() as c:
        assert [t["id"] for t in c.traces()] == [trace["id"]]
        # armed again by itself: new execs are traced without anyone asking
        wait_until(lambda: c.trace(trace["id"])["events"] >= 0 and any(
            v["tracing"] for v in c.vms()), 120, "the trace to be armed again")
        run_execs(fleet.g1, "aradia-re", 5)
        wait_until(lambda: len(tagged(stored(fleet.hv1, q="aradia-re"), "aradia-re")) >= 5, 60, "new events")
        assert len(tagged(stored(fleet.hv1, q="aradia-re"), "aradia-re")) == 5
        c.stop_trace(trace["id"])
    assert not tagged(stored(fleet.hv1, q="aradia-free"), "aradia-free")  # untraced while down


@pytest.mark.timeout(600)
def test_cli_over_server(fleet: Fleet) -> None:
    """``aradia ps --server … --vm NAME`` and ``aradia trace --server …`` as a user runs them: the same
    output as locally, from the service (which owns the VM: a local attach would be refused)."""
    r = run_cli("ps", "--server", fleet.hv1.url, "--token", ALICE.token, "--vm", "web1", "--json")
    assert r.returncode == 0, r.stderr
    remote = {p["pid"]: (p["ppid"], p["comm"]) for p in json.loads(r.stdout)["items"]}
    truth = proc_processes(fleet.g1)
    stable = [pid for pid, t in truth.items() if t.ppid in (0, 1, 2) and not t.comm.startswith("kworker/")]
    assert all(remote[pid] == (truth[pid].ppid, truth[pid].comm[:15]) for pid in stable)
    table = run_cli("ps", "--server", fleet.hv1.url, "--vm", "web1", env_token=ALICE.token)
    assert table.returncode == 0 and table.stdout.splitlines()[0].split()[:3] == ["PID", "PPID", "UID"]
    assert any(line.split()[:2] == ["1", "0"] for line in table.stdout.splitlines()[1:])
    denied = run_cli("ps", "--server", fleet.hv1.url, "--token", BOB.token, "--vm", "web1")
    assert_one_line_error(denied, "HTTP 403")
    raw = fleet.tmp / "web1.raw"
    r = run_cli("dump", "--server", fleet.hv1.url, "--token", OPERATOR.token, "--vm", "web1", "-o", str(raw),
                "--format", "raw")
    assert r.returncode == 0 and "guest paused meanwhile" in r.stdout, r.stderr
    assert raw.stat().st_size == fleet.g1.memory_size  # a raw image of all RAM (256 MiB below 3 GiB)
    raw.unlink()
    tag = "aradia-cli"
    argv = cli_argv("trace", "--server", fleet.hv1.url, "--token", ALICE.token, "--vm", "web1",
                    "--duration", "240", "--json", "syscalls", "-e", "execve")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None and "tracing syscalls on web1" in proc.stderr.readline()
        run_execs(fleet.g1, tag, 5)
        lines: list[dict[str, Any]] = []
        assert proc.stdout is not None
        while len(tagged(lines, tag)) < 5:
            line = proc.stdout.readline()
            assert line, "the trace ended early"
            lines.append(json.loads(line))
        assert [r["args"]["argv"] for r in tagged(lines, tag)] == expected_argv(tag, 5)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    assert proc.returncode == 0
    with fleet.client() as c:
        assert c.traces() == []  # Ctrl-C stopped the trace on the service


@pytest.mark.timeout(600)
def test_traces_share_one_tracer_and_each_keeps_its_filter(fleet: Fleet) -> None:
    """Two traces of execve on one VM (one only for comm "bash", whose forked child execs): the probe is
    armed once, each trace counts its own events, an event both want is stored once, and stopping one
    leaves the other running."""
    with fleet.client() as c:
        every = c.start_trace("web1", {"kind": "syscalls", "syscalls": ["execve"]})
        shells = c.start_trace("web1", {"kind": "syscalls", "syscalls": ["execve"], "comm": ["bash"]})
        nobody = c.start_trace("web1", {"kind": "syscalls", "syscalls": ["execve"], "comm": ["nosuchcomm"]})
        run_execs(fleet.g1, "aradia-sh1", 5)
        wait_until(lambda: len(tagged(stored(fleet.hv1, q="aradia-sh1"), "aradia-sh1")) >= 5, 60, "events")
        first = {t["id"]: t["events"] for t in c.traces()}
        assert first[nobody["id"]] == 0
        assert first[shells["id"]] >= 5 and first[every["id"]] >= first[shells["id"]]
        c.stop_trace(shells["id"])
        c.stop_trace(nobody["id"])
        run_execs(fleet.g1, "aradia-sh2", 5)
        wait_until(lambda: len(tagged(stored(fleet.hv1, q="aradia-sh2"), "aradia-sh2")) >= 5, 60, "events")
        assert [t["id"] for t in c.traces()] == [every["id"]]
        assert c.trace(every["id"])["events"] >= first[every["id"]] + 5
        c.stop_trace(every["id"])
    for tag in ("aradia-sh1", "aradia-sh2"):
        got = tagged(stored(fleet.hv1, q=tag), tag)
        assert [r["args"]["argv"] for r in got] == expected_argv(tag, 5)  # once each, though two traces matched


@pytest.mark.timeout(600)
def test_memory_write_and_dump_need_their_permissions(fleet: Fleet, tmp_path: Path) -> None:
    """``write`` and ``dump`` are operations of their own: alice (views, read, trace) is refused; the
    operator's write is what a guest process then reads (and nothing else changes); its dump is the
    guest's RAM of one instant, which aradia reads back as a dump."""
    hold = fleet.g1.start_memhold(seed=0x5EED, size=1 << 16)
    try:
        data = b"written over HTTP by the operator"
        r = api(fleet.hv1.url, ALICE.token, "PUT", "/vms/web1/memory", params={"phys": hold.pages[3]},
                content=data)
        assert r.status_code == 403
        assert api(fleet.hv1.url, ALICE.token, "GET", "/vms/web1/dump").status_code == 403
        assert hold.check() == (0, -1)
        with Client(fleet.hv1.url, OPERATOR.token) as c:
            assert c.write_memory("web1", data, phys=hold.pages[3] + 0x123) == len(data)
            assert hold.dump(3 * 4096 + 0x123, len(data)) == data
            words = range((3 * 4096 + 0x123) // 8, (3 * 4096 + 0x123 + len(data) + 7) // 8)
            assert hold.check() == (len(words), words[0] * 8)
            hold.poke(3 * 4096 + 0x123, hold.expected(3 * 4096 + 0x123, len(data)))
            # the same through the process's own page tables (virt + pid)
            assert c.write_memory("web1", data, virt=hold.vaddr + 5 * 4096 + 7, pid=hold.pid) == len(data)
            assert hold.dump(5 * 4096 + 7, len(data)) == data
            assert c.memory("web1", len(data), virt=hold.vaddr + 5 * 4096 + 7, pid=hold.pid) == data
            hold.poke(5 * 4096 + 7, hold.expected(5 * 4096 + 7, len(data)))
            assert hold.check() == (0, -1)
            size = c.dump("web1", str(tmp_path / "web1.elf"))
        assert size == os.path.getsize(tmp_path / "web1.elf") and size > fleet.g1.memory_size
        from aradia.vm import open_dump

        with open_dump(str(tmp_path / "web1.elf")) as d:
            pids = {p.pid for p in d.linux.processes()}
            assert 1 in pids and hold.pid in pids
            assert d.read(hold.pages[7], 64) == hold.expected(7 * 4096, 64)
        assert not list((fleet.tmp / "hv1" / "dumps").iterdir())  # removed once streamed
    finally:
        hold.stop()
