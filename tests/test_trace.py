"""Syscall and kernel-function tracing against what a guest script really did.

The script runs known commands with known arguments, opens known files and connects to a known
address; the trace must hold exactly those events with exactly those decoded arguments.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from aradia.lab.launcher import Guest
from aradia.service.schema import check_record
from aradia.trace.events import Event
from aradia.trace.tracer import Tracer
from aradia.vm import attach
from cli_runner import cli_argv
from guest_programs import build_acceptpair, build_loop, install_program
from tracing import trace_while

N_EXEC = 50
WORK = "\n".join(
    ["cd /tmp", "for i in 1 2 3 4 5; do echo $i > /tmp/aradia-f$i; done"]
    + [f"/bin/true aradia-t{i} arg-{i * 7}" for i in range(N_EXEC)]
    + [f"/bin/cat /tmp/aradia-f{i} > /dev/null" for i in range(1, 6)]
    + ["nc 127.0.0.1 7 < /dev/null 2>/dev/null", "echo WORK-DONE"]
)


def run_traced(guest: Guest, syscalls: list[str], kprobes: tuple[str, ...] = (), ret: bool = False,
               limit: float = 120, lifecycle: bool = False) -> list[Event]:
    guest.run(f"cat > /tmp/work.sh <<'EOF'\n{WORK}\nEOF")
    events: list[Event] = []
    with attach(f"qmp:{guest.qmp_path}") as vm, Tracer.open(vm) as tracer:
        for s in syscalls:
            tracer.add_syscall(s)
        for k in kprobes:
            tracer.add_kprobe(k, ret=ret)
        if lifecycle:
            tracer.add_lifecycle()
        marker = len(guest.console_text())
        threading.Timer(0.5, lambda: guest.send_console(b"bash /tmp/work.sh\n")).start()
        events.extend(tracer.events(duration=limit, until=lambda: "WORK-DONE" in guest.console_text()[marker:]))
        assert "WORK-DONE" in guest.console_text()[marker:], "the script did not finish while traced"
    return events


@pytest.fixture(scope="module", params=[("6.1", 1), ("6.1", 2), ("6.1", 4), ("5.10", 2), ("6.12", 2)],
                ids=["6.1-1cpu", "6.1-2cpu", "6.1-4cpu", "5.10-2cpu", "6.12-2cpu"])
def guest(request: pytest.FixtureRequest, launch_guest: Callable[..., Guest]) -> Guest:
    series, smp = request.param
    return launch_guest(series, smp=smp, gdb=True, shared_memory=True)


def check_syscalls_exact(events: list[Event]) -> list[Event]:
    """The work script's syscalls, exactly: each exec (path, argv), the cats' and the shell's opens of
    /tmp/aradia-fN, the one inet connect, nothing twice; the execve events."""
    execs = [e for e in events if e.name == "execve" and any("aradia-t" in a for a in e.args["argv"] or [])]
    assert [e.args for e in execs] == [{"path": "/bin/true", "argv": ["/bin/true", f"aradia-t{i}", f"arg-{i * 7}"]}
                                       for i in range(N_EXEC)]
    # Each exec is its own process: the event's pid is the child's, its comm the shell's until exec.
    assert len({e.pid for e in execs}) == N_EXEC and all(e.uid == 0 for e in execs)
    opens = [e for e in events if e.name == "openat" and (e.args["path"] or "").startswith("/tmp/aradia-f")]
    assert [(e.args["path"], e.comm) for e in opens if e.comm == "cat"] == \
        [(f"/tmp/aradia-f{i}", "cat") for i in range(1, 6)]
    assert all(e.args["dfd"] == -100 for e in opens)
    writes = [e for e in opens if e.comm != "cat"]  # the shell's "> /tmp/aradia-fN" redirections
    assert [e.args["path"] for e in writes] == [f"/tmp/aradia-f{i}" for i in range(1, 6)]
    assert all(e.args["flags"] & 0o1 for e in writes)  # O_WRONLY
    # (bash also connects to nscd's unix socket when it looks up users: a real event, not ours)
    conns = [e for e in events if e.name == "connect" and e.args["addr"]["family"] != "unix"]
    assert [(e.comm, e.args["addr"]) for e in conns] == [("nc", {"family": "inet", "address": "127.0.0.1",
                                                                  "port": 7})]
    assert len(events) == len({(e.time, e.vcpu) for e in events})  # no duplicates
    return execs


def check_lifecycle_exact(events: list[Event]) -> list[Event]:
    """fork, exec and exit of each of the work script's commands, exactly once each and in that order,
    each exit with status 0; the exec events."""
    execs = [e for e in events if e.kind == "exec" and any("aradia-t" in a for a in e.args["argv"])]
    assert [e.args["argv"] for e in execs] == [["/bin/true", f"aradia-t{i}", f"arg-{i * 7}"] for i in range(N_EXEC)]
    for ex in execs:
        pid = ex.args["pid"]
        mine = [e.kind for e in events if e.args.get("pid") == pid]
        assert mine == ["fork", "exec", "exit"], (pid, mine)
        assert ex.args["comm"] == "true" and ex.args["exe"] in ("/bin/busybox", "/bin/true"), ex.args
    exits = [e for e in events if e.kind == "exit" and e.args["pid"] in {x.args["pid"] for x in execs}]
    assert [(e.args["status"], e.args["signal"]) for e in exits] == [(0, 0)] * N_EXEC
    return execs


@pytest.mark.timeout(240)
def test_syscalls_exact(guest: Guest) -> None:
    check_syscalls_exact(run_traced(guest, ["execve", "openat", "connect"]))


@pytest.mark.timeout(240)
def test_lifecycle_exact(guest: Guest) -> None:
    check_lifecycle_exact(run_traced(guest, [], lifecycle=True))


@pytest.mark.timeout(300)
def test_concurrent_hits_exact(guest: Guest, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Four processes hit one breakpoint at once (all-stop parks the other vCPUs on it): every call of
    every process is one event, none lost, none twice."""
    install_program(guest, "loop", build_loop(tmp_path_factory.mktemp("loop")))
    n, procs = 150, 4

    def arm(tracer: Tracer) -> None:
        tracer.add_syscall("getppid")

    events, out = trace_while(guest, arm, lambda: guest.run(" & ".join([f"/tmp/loop {n}"] * procs) + "; wait",
                                                            timeout=240), limit=240)
    assert out.count(f"calls {n} ") == procs, out
    per_process: dict[int, int] = {}
    for e in events:
        if e.comm == "loop":
            per_process[e.tgid] = per_process.get(e.tgid, 0) + 1
    assert sorted(per_process.values()) == [n] * procs, per_process


@pytest.mark.timeout(240)
def test_accept_and_read_results(guest: Guest, tmp_path_factory: pytest.TempPathFactory) -> None:
    """accept's peer address and read's bytes exist only when the syscall is done: the trace reports
    them then, equal to what the guest program itself saw (its own ports, the bytes it read)."""
    install_program(guest, "acceptpair", build_acceptpair(tmp_path_factory.mktemp("accept")))

    def arm(tracer: Tracer) -> None:
        tracer.add_syscall("accept")
        tracer.add_syscall("read")
        tracer.filter.comms = {"acceptpair"}

    events, out = trace_while(guest, arm, lambda: guest.run("/tmp/acceptpair", timeout=120), limit=150)
    truth = re.findall(r"family (\d+) listen (\d+) client (\d+) accepted (\d+) read (\S+)", out)
    assert len(truth) == 2, out
    accepts = [e for e in events if e.name == "accept"]
    reads = [e for e in events if e.name == "read" and e.args["data"] and e.args["data"].startswith(b"ping-")]
    assert len(accepts) == 2 and len(reads) == 2, [e.line() for e in events]
    for (family, _listen, client, fd, data), acc, rd in zip(truth, accepts, reads, strict=True):
        want = {"family": "inet", "address": "127.0.0.1"} if family == "2" else {"family": "inet6",
                                                                                  "address": "::1"}
        assert acc.args["addr"] == {**want, "port": int(client)} and acc.args["error"] is None, acc.args
        assert rd.args["fd"] == int(fd) and rd.args["data"] == data.encode() and rd.args["ret"] == len(data)


@pytest.mark.timeout(240)
def test_kernel_function_entry_and_return(guest: Guest) -> None:
    events = run_traced(guest, [], kprobes=("do_sys_openat2",), ret=True)
    rets = [e for e in events if e.kind == "kretprobe" and e.comm == "cat"]
    # Each cat opens its file (fd 3) plus whatever the loader opens; every return is paired.
    assert len(rets) >= 5 and all(e.args["ret"] < 1 << 31 for e in rets)
    assert sum(1 for e in rets if e.args["ret"] == 3) >= 5


def cli_trace_work(guest: Guest, *args: str, wait: float = 60) -> tuple[str, list[dict[str, Any]]]:
    """``aradia trace --vm ... ARGS`` while the guest runs the work script (``wait`` seconds at most),
    ended with Ctrl-C (SIGINT) once the script is done: its ready line (stderr) and the JSON lines it
    printed. It must exit 0 having said nothing else on stderr."""
    guest.run(f"cat > /tmp/work.sh <<'EOF'\n{WORK}\nEOF")
    p = subprocess.Popen(cli_argv("trace", "--vm", f"qmp:{guest.qmp_path}", *args),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stderr is not None
        ready = p.stderr.readline()  # printed once the probes are armed
        marker = len(guest.console_text())
        guest.send_console(b"bash /tmp/work.sh\n")
        deadline = time.monotonic() + wait
        while "WORK-DONE" not in guest.console_text()[marker:] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "WORK-DONE" in guest.console_text()[marker:], "the script did not finish while traced"
        p.send_signal(signal.SIGINT)  # Ctrl-C: the tracer detaches and the guest runs on
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0 and err == "", (p.returncode, ready, err)
    return ready, [json.loads(x) for x in out.splitlines()]


def _cli_trace_work(guest: Guest, *args: str) -> list[dict[str, Any]]:
    """:func:`cli_trace_work` on a guest whose QEMU runs no plugin: the ready line names the stop
    path and why."""
    ready, events = cli_trace_work(guest, *args)
    assert re.fullmatch(rf"tracing syscalls on qmp:{re.escape(str(guest.qmp_path))} via gdb \(every event "
                        r"stops the VM; no plugin path: this QEMU was started without aradia's plugin "
                        r"\(-plugin …/counter-\*\.so,shm=…\)\), for 60 s\n", ready), ready
    return events


@pytest.mark.timeout(300)
def test_cli_trace_json_comm_filter(guest: Guest) -> None:
    """``--comm`` keeps exactly the calls made under that name: execve runs in the shell's forked
    child, still named "bash" until the exec, so ``--comm bash`` yields every exec of the script in
    order and ``--comm true`` (the name only after the exec) yields none."""
    events = _cli_trace_work(guest, "--json", "--comm", "bash", "--duration", "60", "syscalls", "-e", "execve")
    assert events and all((e["name"], e["comm"]) == ("execve", "bash") for e in events), events[:3]
    # each line is the one event record the service stores (schema checked, ids unique, wall time)
    assert all(check_record(e) is e for e in events)
    assert len({e["id"] for e in events}) == len(events)
    assert {e["vm"] for e in events} == {"qmp"} and abs(events[-1]["time"] - time.time()) < 120
    got = [e["args"]["argv"] for e in events if any("aradia-t" in a for a in e["args"]["argv"] or [])]
    assert got == [["/bin/true", f"aradia-t{i}", f"arg-{i * 7}"] for i in range(N_EXEC)]
    cats = [e["args"]["argv"] for e in events if e["args"]["path"] == "/bin/cat"]
    assert cats == [["/bin/cat", f"/tmp/aradia-f{i}"] for i in range(1, 6)]

    events = _cli_trace_work(guest, "--json", "--comm", "true", "--duration", "60", "syscalls", "-e", "execve")
    assert events == []
    assert guest.run("echo still-alive").strip() == "still-alive"
