"""The guardian keeps the guest alive: breakpoints through it, and none left after the tracer dies.

Ground truth is the guest's own progress: a getppid() loop in the guest finishes (or not), and
another GDB client can arm the same address afterwards.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from aradia.errors import AradiaError, NotAttached
from aradia.lab.launcher import Guest
from aradia.machine.qemu import Qemu
from aradia.proto.gdbrsp import BP_SOFTWARE, GdbClient
from aradia.trace.guardian import GuardedStub
from aradia.trace.tracer import Tracer
from aradia.vm import attach
from cli_runner import cli_argv
from guest_programs import QUIET_NR, QUIET_SYMBOL, build_loop, install_program

SYMBOL = "__x64_sys_getppid"


@dataclass
class Rig:
    guest: Guest
    address: str
    target: int
    quiet: int  # QUIET_SYMBOL: only ``loop N QUIET_NR`` calls it


@pytest.fixture(scope="module")
def rig(launch_guest: Callable[..., Guest], tmp_path_factory: pytest.TempPathFactory) -> Rig:
    guest = launch_guest("6.1", smp=2, gdb=True)
    install_program(guest, "loop", build_loop(tmp_path_factory.mktemp("loop")))
    with attach(f"qmp:{guest.qmp_path}") as vm:
        target, quiet = vm.linux.profile.symbol(SYMBOL), vm.linux.profile.symbol(QUIET_SYMBOL)
    assert target is not None and quiet is not None
    return Rig(guest, f"127.0.0.1:{guest.gdb_port}", target, quiet)


def _loop_finishes(guest: Guest, n: int, timeout: float) -> bool:
    try:
        out = guest.run(f"/tmp/loop {n}", timeout=timeout)
    except Exception:
        return False
    return f"calls {n} " in out


@pytest.mark.timeout(120)
def test_breakpoint_hits_counted_exactly_then_clean_close(rig: Rig) -> None:
    n = 50
    hits = 0
    done = threading.Event()
    result: list[str] = []

    def run_loop() -> None:
        result.append(rig.guest.run(f"/tmp/loop {n} {QUIET_NR}", timeout=90))
        done.set()

    with GuardedStub(rig.address, was_running=True) as stub:
        stub.set_breakpoint(rig.quiet)
        worker = threading.Thread(target=run_loop, daemon=True)
        worker.start()
        deadline = time.monotonic() + 90
        while not done.is_set() and time.monotonic() < deadline:
            ev = stub.wait_stop(0.3)
            if ev is None:
                continue
            regs = stub.registers(ev.thread)
            if regs["rip"] == rig.quiet:
                hits += 1
                stub.step(ev.thread, until_pc_changes=True)  # step off the breakpoint, or the continue re-hits it
            stub.cont()
        worker.join(timeout=5)
    assert result and f"calls {n} " in result[0]
    # Exactly the loop's calls: nothing else in the guest calls getsid (getppid would also count the
    # bash that runs the loop).
    assert hits == n, hits
    assert _loop_finishes(rig.guest, 200_000, timeout=30), "a breakpoint was left armed"


TRACER = textwrap.dedent("""
    import sys, time
    from aradia.trace.guardian import GuardedStub
    stub = GuardedStub(sys.argv[1], was_running=True)
    stub.set_breakpoint(int(sys.argv[2]))
    stub.cont()
    print(stub.guardian_pid, flush=True)
    time.sleep(600)  # never services a hit: the guest freezes at the first one
""")


@pytest.mark.timeout(120)
def test_kill_9_of_the_tracer_leaves_the_guest_running(rig: Rig, tmp_path: Path) -> None:
    script = tmp_path / "tracer.py"
    script.write_text(TRACER)
    tracer = subprocess.Popen([sys.executable, str(script), rig.address, str(rig.target)],
                              stdout=subprocess.PIPE, text=True)
    assert tracer.stdout is not None
    guardian_pid = int(tracer.stdout.readline())
    # The hot loop hits the armed breakpoint at once: the guest is frozen while the tracer lives.
    rig.guest.send_console(b"/tmp/loop 100000000 > /dev/null &\n")
    qemu = Qemu(rig.guest.qmp_path)
    try:
        deadline = time.monotonic() + 10
        while qemu.status() != "debug" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert qemu.status() == "debug", "the guest never stopped at the armed breakpoint"
    finally:
        qemu.close()
    os.kill(tracer.pid, signal.SIGKILL)
    tracer.wait()
    killed = time.monotonic()
    # Within 5 s: the guardian has disarmed everything and gone, and the guest runs again.
    while os.path.exists(f"/proc/{guardian_pid}") and time.monotonic() - killed < 5:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{guardian_pid}"), "the guardian outlived its cleanup"
    assert _loop_finishes(rig.guest, 100_000, timeout=30), "the guest is still frozen"
    assert time.monotonic() - killed < 30
    # No breakpoint remains: a new client can arm (and disarm) the very same address.
    _arm_again(rig)
    rig.guest.run("kill %1 2>/dev/null; pkill -f 'loop 100000000'; true", check=False)
    assert _loop_finishes(rig.guest, 1000, timeout=30)


@pytest.mark.timeout(120)
def test_kill_9_while_the_guest_runs_leaves_nothing_armed(rig: Rig, tmp_path: Path) -> None:
    """The tracer dies with its breakpoint armed and the guest running (not held at a hit): the
    watchdog stops the guest to resynchronise, disarms, and lets it run on."""
    script = tmp_path / "tracer.py"
    script.write_text(TRACER)
    tracer = subprocess.Popen([sys.executable, str(script), rig.address, str(rig.quiet)],
                              stdout=subprocess.PIPE, text=True)
    assert tracer.stdout is not None
    guardian_pid = int(tracer.stdout.readline())
    qemu = Qemu(rig.guest.qmp_path)
    try:
        assert qemu.status() == "running"  # armed, nothing calls the quiet syscall: no hit yet
        os.kill(tracer.pid, signal.SIGKILL)
        tracer.wait()
        assert _gone(guardian_pid, 5), "the guardian outlived its cleanup"
        assert qemu.status() == "running"
    finally:
        qemu.close()
    # the armed syscall, called 1000 times: a breakpoint left behind would freeze the guest at the first
    out = rig.guest.run(f"/tmp/loop 1000 {QUIET_NR}", timeout=30)
    assert "calls 1000 " in out, out
    _arm_again(rig)


def _arm_again(rig: Rig) -> None:
    """A new client can arm (and disarm) the probe's address: the stub is free, nothing is left armed."""
    client = GdbClient(rig.address, was_running=True)
    try:
        client.set_breakpoint(rig.target, BP_SOFTWARE)
        client.remove_breakpoint(rig.target, BP_SOFTWARE)
    finally:
        client.close()


def _alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (exited, waiting for its parent to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _alive(pid)


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out |= {int(c) for c in (task / "children").read_text().split()}
    return out


@pytest.mark.timeout(120)
def test_ctrl_c_of_the_cli_tracer_leaves_the_guest_running(rig: Rig, tmp_path: Path) -> None:
    rig.guest.send_console(b"/tmp/loop 100000000 > /dev/null &\n")
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with open(out, "w") as fout, open(err, "w") as ferr:
        cli = subprocess.Popen(cli_argv("trace", "--vm", f"qmp:{rig.guest.qmp_path}", "syscalls", "-e", "getppid"),
                               stdout=fout, stderr=ferr, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while out.read_text().count("getppid") < 20 and cli.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert out.read_text().count("getppid") >= 20, f"no hot events: {err.read_text()[-2000:]}"
        guardians = [p for p in _children(cli.pid) if "aradia.trace.guardian" in
                     Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]
        assert len(guardians) == 1, guardians
        cli.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        status = cli.wait(timeout=15)
        stopped = time.monotonic()
        assert stopped - interrupted < 5, "the CLI took too long to stop"
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    print(f"CLI exit status {status} after {stopped - interrupted:.2f} s; stderr {err.read_text()[-300:]!r}")
    # Ctrl-C while events stream ends the trace normally (cli.py: the tracer disarms, exit 0); 130 is
    # only for a Ctrl-C before the trace started.
    assert status == 0, (status, err.read_text()[-2000:])
    assert "Traceback" not in err.read_text(), err.read_text()[-2000:]
    assert _gone(guardians[0], 5), "the guardian outlived the CLI"
    # The guest's hot loop runs on (nothing armed, nothing holding the VM) and the stub is free.
    assert _loop_finishes(rig.guest, 100_000, timeout=30), "the guest is frozen after Ctrl-C"
    _arm_again(rig)
    rig.guest.run("pkill -f 'loop 100000000'; true", check=False)
    assert _loop_finishes(rig.guest, 1000, timeout=30)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["qmp-quit", "kill-9"])
def test_qemu_exiting_mid_trace_is_a_clear_error(boot_guest: Callable[..., contextlib.AbstractContextManager[Guest]],
                                                 how: str) -> None:
    with boot_guest("6.1", gdb=True) as guest, attach(f"qmp:{guest.qmp_path}") as vm, Tracer.open(vm) as tracer:
        tracer.add_syscall("getppid")  # nothing in the idle guest calls it: the tracer waits for events
        guardian = tracer.stub.guardian_pid
        ended: list[float] = []

        def end_qemu() -> None:
            ended.append(time.monotonic())
            if how == "qmp-quit":
                vm.machine.qmp.execute("quit")
            else:
                os.kill(guest.pid, signal.SIGKILL)

        timer = threading.Timer(1.0, end_qemu)
        timer.start()
        with pytest.raises(AradiaError) as info:
            for _ in tracer.events(duration=60):
                pass
        took = time.monotonic() - ended[0]
        timer.join()
        assert took < 3, f"the tracer noticed QEMU's end only after {took:.1f} s"
        assert isinstance(info.value, NotAttached)
        assert "QEMU exited" in str(info.value), str(info.value)
        assert _gone(guardian, 5), "the guardian outlived QEMU"
        with pytest.raises(NotAttached, match="QEMU exited"):
            tracer.stub.cont()  # later calls say the same, at once
    assert not guest.alive


@pytest.mark.timeout(120)
def test_qemu_killed_while_the_tracer_idles_ends_the_guardian(
        boot_guest: Callable[..., contextlib.AbstractContextManager[Guest]]) -> None:
    """The watchdog ends with its QEMU even when the tracer asks the stub nothing (CI once saw it
    outlive QEMU when the tracer learnt of the exit from QMP, between two reads of the stub)."""
    with boot_guest("6.1", gdb=True) as guest, attach(f"qmp:{guest.qmp_path}") as vm, Tracer.open(vm) as tracer:
        tracer.add_syscall("getppid")
        guardian = tracer.stub.guardian_pid
        assert not _gone(guardian, 1)  # with QEMU alive it stays
        os.kill(guest.pid, signal.SIGKILL)
        assert _gone(guardian, 5), "the guardian outlived QEMU"
        with pytest.raises(NotAttached, match="QEMU exited"):
            for _ in tracer.events(duration=10):
                pass


@pytest.mark.timeout(30)
def test_watchdog_ends_on_done_or_when_the_stub_closes() -> None:
    """:func:`watchdog.watch` on socket pairs: ``done`` ends it; the stub's peer closing ends it
    though the tracer's side stays open; a note alone does not."""
    from aradia.trace.watchdog import watch

    ctl, tracer_end = socket.socketpair()
    stub, qemu_end = socket.socketpair()
    result: list[str] = []
    th = threading.Thread(target=lambda: result.append(watch(ctl, stub)), daemon=True)
    th.start()
    tracer_end.sendall(b'{"op": "break", "bp": [4096, 0, 1]}\n')
    th.join(0.5)
    assert th.is_alive()  # a note does not end it
    qemu_end.close()
    th.join(5)
    assert result == ["QEMU closed the stub connection: nothing left to clean"]
    for s in (ctl, tracer_end, stub):
        s.close()

    ctl, tracer_end = socket.socketpair()
    stub, qemu_end = socket.socketpair()
    tracer_end.sendall(b'{"op": "break", "bp": [4096, 0, 1]}\n{"op": "do')
    th = threading.Thread(target=lambda: result.append(watch(ctl, stub)), daemon=True)
    th.start()
    th.join(0.3)
    assert th.is_alive()
    tracer_end.sendall(b'ne", "bp": []}\n')  # a note split across reads
    th.join(5)
    assert result[1:] == ["the tracer left the stub clean"]
    with pytest.raises(BlockingIOError):  # after done nothing went to the stub (no rescue)
        qemu_end.recv(100, socket.MSG_DONTWAIT)
    for s in (ctl, tracer_end, stub, qemu_end):
        s.close()
