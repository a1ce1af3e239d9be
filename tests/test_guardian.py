"""The guardian keeps the guest alive: breakpoints through it, and none left after the tracer dies.

Ground truth is the guest's own progress: a getppid() loop in the guest finishes (or not), and
another GDB client can arm the same address afterwards.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from aradia.machine.launcher import Guest
from aradia.machine.qemu import Qemu
from aradia.proto.gdbrsp import GdbClient
from aradia.trace.guardian import GuardedStub
from aradia.vm import attach
from guest_programs import build_loop

SYMBOL = "__x64_sys_getppid"


@dataclass
class Rig:
    guest: Guest
    address: str
    target: int


@pytest.fixture(scope="module")
def rig(launch_guest: Callable[..., Guest], tmp_path_factory: pytest.TempPathFactory) -> Rig:
    guest = launch_guest("6.1", smp=2, gdb=True)
    loop = build_loop(tmp_path_factory.mktemp("loop"))
    guest.run(f"echo {base64.b64encode(loop).decode()} | base64 -d > /tmp/loop; chmod +x /tmp/loop")
    with attach(f"qmp:{guest.qmp_path}") as vm:
        target = vm.linux.profile.symbol(SYMBOL)
    assert target is not None
    return Rig(guest, f"127.0.0.1:{guest.gdb_port}", target)


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
        result.append(rig.guest.run(f"/tmp/loop {n}", timeout=90))
        done.set()

    with GuardedStub(rig.address, was_running=True) as stub:
        stub.set_breakpoint(rig.target)
        worker = threading.Thread(target=run_loop, daemon=True)
        worker.start()
        deadline = time.monotonic() + 90
        while not done.is_set() and time.monotonic() < deadline:
            ev = stub.wait_stop(0.3)
            if ev is None:
                continue
            regs = stub.registers(ev["thread"])
            if regs["rip"] == rig.target:
                hits += 1
                stub.step(ev["thread"])  # step off the breakpoint, or the continue re-hits it
            stub.cont()
        worker.join(timeout=5)
    assert result and f"calls {n} " in result[0]
    # The loop's calls, plus the few getppid() calls of the shell that ran it.
    assert n <= hits <= n + 10, hits
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
    client = GdbClient(rig.address, was_running=True)
    try:
        client.set_breakpoint(0, rig.target)
        client.remove_breakpoint(0, rig.target)
    finally:
        client.close()
    rig.guest.run("kill %1 2>/dev/null; pkill -f 'loop 100000000'; true", check=False)
    assert _loop_finishes(rig.guest, 1000, timeout=30)
