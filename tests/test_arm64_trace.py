"""Tracing arm64 guests (Debian 6.1 and 6.12 under qemu-system-aarch64 -M virt -cpu max, TCG) against
what the guest really did: syscalls with decoded arguments, process lifecycle, kernel entry and
return probes, and the guardian's guarantee when the tracer is killed.

Ground truth comes from inside the guest: the work script's known commands (the same script as the
x86 tests, ``tests/test_trace.py``), and the ``a64calls`` program's own report of its pid, session id
and failed opens.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from aradia.lab.launcher import Guest
from aradia.machine.qemu import Qemu
from aradia.proto.gdbrsp import BP_SOFTWARE, GdbClient
from aradia.trace.tracer import Tracer
from aradia.vm import attach
from guest_programs import (
    A64_NOISY_SYMBOL,
    A64_QUIET_NR,
    A64_QUIET_SYMBOL,
    build_a64calls,
    build_a64loop,
    install_program,
)
from guest_workload import ssh_typed
from test_guardian import TRACER, _gone
from test_trace import N_EXEC, check_lifecycle_exact, check_syscalls_exact, cli_trace_work, run_traced
from tracing import trace_while

MASK64 = (1 << 64) - 1
# 6.12 on one vCPU adds nothing 6.1 on one vCPU and 6.12 on two do not cover (and ~2 min of TCG guest time)
GUESTS = [("6.1", 1), ("6.1", 2), ("6.12", 2)]


@dataclass
class Rig:
    """A booted arm64 guest and how it was booted."""

    guest: Guest
    series: str
    smp: int


@pytest.fixture(scope="module", params=GUESTS, ids=[f"{s}-{n}cpu" for s, n in GUESTS])
def rig(request: pytest.FixtureRequest, launch_guest: Callable[..., Guest],
        tmp_path_factory: pytest.TempPathFactory) -> Rig:
    """One arm64 guest per kernel series and vCPU count, with the arm64 test programs installed."""
    series, smp = request.param
    g = launch_guest(series, arch="arm64", smp=smp, gdb=True, shared_memory=True, memory="256M",
                     boot_timeout=180)
    tmp = tmp_path_factory.mktemp("a64")
    gcc = g.image.guest_arch.gcc
    install_program(g, "a64loop", build_a64loop(tmp, gcc))
    install_program(g, "a64calls", build_a64calls(tmp, gcc))
    return Rig(g, series, smp)


@pytest.fixture
def guest(rig: Rig) -> Guest:
    """The rig's guest."""
    return rig.guest


@pytest.mark.timeout(300)
def test_syscalls_exact(rig: Rig, guest: Guest) -> None:
    """execve with path and argv, openat with its path, connect with its address: each of the
    script's commands exactly once, in order, with exactly its arguments."""
    assert guest.run("uname -m").strip() == "aarch64"
    events = run_traced(guest, ["execve", "openat", "connect"], limit=200)
    execs = check_syscalls_exact(events)  # the x86 test's assertions, then arm64's stricter ones
    assert all(e.comm == "bash" for e in execs)
    cats = [e.args["argv"] for e in events if e.name == "execve" and e.args["path"] == "/bin/cat"]
    assert cats == [["/bin/cat", f"/tmp/aradia-f{i}"] for i in range(1, 6)]
    opens = [e for e in events if e.name == "openat" and (e.args["path"] or "").startswith("/tmp/aradia-f")]
    assert all(e.args["flags"] & 0o3 == 0o1 for e in opens if e.comm != "cat")  # O_WRONLY
    assert all(e.args["flags"] & 0o3 == 0 for e in opens if e.comm == "cat")  # O_RDONLY
    if rig.smp > 1:
        assert len({e.vcpu for e in events}) == 2, "every event was seen on one vCPU"  # both vCPUs served


@pytest.mark.timeout(300)
def test_lifecycle_exact(guest: Guest) -> None:
    """fork, exec and exit of each of the script's commands, exactly once each, in that order."""
    events = run_traced(guest, [], lifecycle=True, limit=200)
    execs = check_lifecycle_exact(events)  # the x86 test's assertions, then arm64's own
    for ex in execs:
        assert (ex.pid, ex.comm) == (ex.args["pid"], "true")  # the event's own task: the exec'd one
    nc_exit = [e.args["status"] for e in events if e.kind == "exit" and e.args["comm"] == "nc"]
    assert nc_exit == [1]  # nothing listens on port 7: nc fails, and its exit says so


@pytest.mark.timeout(300)
def test_entry_and_return_probes_exact(guest: Guest) -> None:
    """Kernel function entry (arguments in x0..) and return (x0, the link register's target) probes:
    every call of the guest program seen exactly once, with the values the program itself got."""
    n = 40

    def arm(tracer: Tracer) -> None:
        tracer.add_kprobe(A64_QUIET_SYMBOL, ret=True)  # getsid's return value: the session id
        tracer.add_kprobe("do_sys_openat2")  # entry: dfd, filename, how
        tracer.add_kprobe("__arm64_sys_openat", ret=True)  # -ENOENT for every path
        tracer.filter.comms = {"a64calls"}

    events, out = trace_while(guest, arm, lambda: guest.run(f"/tmp/a64calls {n}", timeout=200), limit=220)
    m = re.fullmatch(r"pid (\d+) sid (-?\d+) enoent (\d+) calls (\d+)\n", out)
    assert m is not None, out
    pid, sid, enoent = int(m[1]), int(m[2]), int(m[3])
    assert sid > 0 and enoent == n, out
    sids = [e for e in events if e.name == A64_QUIET_SYMBOL]
    assert [(e.kind, e.tgid, e.args["ret"]) for e in sids] == [("kretprobe", pid, sid)] * n
    entries = [e for e in events if e.name == "do_sys_openat2"]
    assert [(e.kind, e.tgid, e.args["x0"]) for e in entries] == [("kprobe", pid, -100 & MASK64)] * n
    assert len({e.args["x1"] for e in entries}) == 1 and entries[0].args["x1"] >> 63 == 0  # one user buffer
    rets = [e for e in events if e.name == "__arm64_sys_openat"]
    assert [(e.kind, e.tgid, e.args["ret"]) for e in rets] == [("kretprobe", pid, -2 & MASK64)] * n
    assert all(e.args["latency"] > 0 for e in sids + rets)
    # in time order: the getsid calls first, then each openat's entry before its return
    order = [e.name for e in events if e.name != A64_QUIET_SYMBOL]
    assert order == ["do_sys_openat2", "__arm64_sys_openat"] * n
    assert max(e.time for e in sids) < min(e.time for e in entries)


@pytest.mark.timeout(300)
def test_crypt_sees_the_password_of_an_ssh_login(guest: Guest) -> None:
    """``libcrypt.so.1:crypt`` in dropbear (an aarch64 ELF; a breakpoint hit at EL0, where the task
    comes from SP_EL1): the password the client typed and the hash of the guest's /etc/shadow."""
    shadow = guest.ssh("cat /etc/shadow")
    root_hash = next(line.split(":")[1] for line in shadow.splitlines() if line.startswith("root:"))

    def arm(tracer: Tracer) -> None:
        tracer.add_uprobe("libcrypt.so.1:crypt", process="dropbear")

    events, out = trace_while(guest, arm, lambda: guest.ssh("echo session=$PPID", password=True, timeout=120),
                              limit=200)
    session = int(str(out).split("session=")[1].split()[0])  # dropbear's process for this login
    crypts = [e for e in events if e.name == "libcrypt.so.1:crypt"]
    assert [(e.kind, e.comm, e.tgid) for e in crypts] == [("uprobe", "dropbear", session)], \
        [e.line() for e in events]
    assert crypts[0].args == {"phrase": guest.image.root_password, "setting": root_hash}


@pytest.mark.timeout(300)
def test_readline_return_is_each_typed_command_line(guest: Guest) -> None:
    """``bash:readline`` returns (the link register's target at EL0): each line typed into an
    interactive shell over ssh, in order, in the shell that reports its own pid."""
    commands = ["echo typed-$((6*7))", "uname -m", "echo shell=$$"]

    def arm(tracer: Tracer) -> None:
        tracer.add_uprobe("bash:readline", ret=True)

    events, out = trace_while(guest, arm, lambda: ssh_typed(guest, commands), limit=200)
    text = str(out)
    assert "typed-42" in text and "aarch64" in text, text
    shell = int(text.split("shell=")[-1].split()[0])
    lines = [e.args["ret"] for e in events if e.kind == "uretprobe" and e.tgid == shell]
    assert lines == [*commands, "exit"], [e.line() for e in events]
    assert all(e.comm == "bash" for e in events if e.tgid == shell)


@pytest.mark.timeout(180)
def test_kill_9_of_the_tracer_leaves_the_guest_running(guest: Guest, tmp_path: Path) -> None:
    """A tracer killed with SIGKILL while a hot probe holds the guest: within 5 s the guest runs again
    and nothing is left armed."""
    with attach(f"qmp:{guest.qmp_path}") as vm:
        target = vm.linux.profile.symbol(A64_NOISY_SYMBOL)
        quiet = vm.linux.profile.symbol(A64_QUIET_SYMBOL)
    assert target is not None and quiet is not None
    address = f"127.0.0.1:{guest.gdb_port}"
    script = tmp_path / "tracer.py"
    script.write_text(TRACER)
    tracer = subprocess.Popen([sys.executable, str(script), address, str(target)], stdout=subprocess.PIPE,
                              text=True)
    assert tracer.stdout is not None
    guardian_pid = int(tracer.stdout.readline())
    guest.send_console(b"/tmp/a64loop 100000000 > /dev/null &\n")
    qemu = Qemu(guest.qmp_path)
    try:
        deadline = time.monotonic() + 20
        while qemu.status() != "debug" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert qemu.status() == "debug", "the guest never stopped at the armed breakpoint"
        os.kill(tracer.pid, signal.SIGKILL)
        tracer.wait()
        killed = time.monotonic()
        while qemu.status() != "running" and time.monotonic() - killed < 5:
            time.sleep(0.02)
        assert qemu.status() == "running", "the guest is still held 5 s after the tracer died"
        assert _gone(guardian_pid, 5), "the guardian outlived its cleanup"
    finally:
        qemu.close()
    try:
        # the hot loop runs on: nothing holds getppid any more (a bash calls it as it starts, too)
        out = guest.run("/tmp/a64loop 1000", timeout=60)
        assert out.startswith("calls 1000 ns "), out
        # a quiet syscall armed and hit 1000 times would freeze the guest at once if anything were armed
        out = guest.run(f"/tmp/a64loop 1000 {A64_QUIET_NR}", timeout=60)
        assert out.startswith("calls 1000 ns "), out
        client = GdbClient(address, was_running=True)  # the stub is free and the address can be armed
        try:
            client.set_breakpoint(target, BP_SOFTWARE)
            client.remove_breakpoint(target, BP_SOFTWARE)
        finally:
            client.close()
    finally:
        guest.run("pkill -f 'a64loop 100000000'; true", check=False, timeout=60)


def _cli_work(guest: Guest, *args: str) -> list[dict[str, Any]]:
    """``aradia trace --vm ... --json ARGS`` while the guest runs the work script
    (:func:`test_trace.cli_trace_work`): the event records; the guest still answers afterwards."""
    ready, events = cli_trace_work(guest, "--json", "--duration", "120", *args, wait=100)
    assert ready.startswith("tracing ") and f"qmp:{guest.qmp_path}" in ready, ready
    assert guest.run("echo still-alive").strip() == "still-alive"
    return events


@pytest.mark.timeout(240)
def test_cli_trace_syscalls_json(guest: Guest) -> None:
    """``aradia trace ... syscalls -e execve``: the script's execs with their argv, in order."""
    events = _cli_work(guest, "--comm", "bash", "syscalls", "-e", "execve")
    assert events and all((e["name"], e["comm"]) == ("execve", "bash") for e in events), events[:3]
    got = [e["args"]["argv"] for e in events if any("aradia-t" in a for a in e["args"]["argv"] or [])]
    assert got == [["/bin/true", f"aradia-t{i}", f"arg-{i * 7}"] for i in range(N_EXEC)]


@pytest.mark.timeout(240)
def test_cli_trace_procs_json(guest: Guest) -> None:
    """``aradia trace ... procs``: fork, exec and exit of each of the script's commands."""
    events = _cli_work(guest, "procs")
    execs = [e for e in events if e["kind"] == "exec" and any("aradia-t" in a for a in e["args"]["argv"])]
    assert [e["args"]["argv"] for e in execs] == [["/bin/true", f"aradia-t{i}", f"arg-{i * 7}"]
                                                  for i in range(N_EXEC)]
    for ex in execs:
        assert [e["kind"] for e in events if e["args"].get("pid") == ex["args"]["pid"]] == ["fork", "exec", "exit"]
