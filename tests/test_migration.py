"""Live migration under a guarded GDB stub: the source is never resumed, the destination lives.

Real migrations between two QEMUs from the same guest image (the destination started with
``-incoming unix:PATH``). Ground truth: QEMU's run state and migration status by QMP, polled without a
break on the source from before the migration starts until the test ends (the poller must see the
migration in progress; a poller that dies or stalls fails the test), the destination's run state, and
the destination's guest answering a command.

Measured on QEMU 7.2 (these tests rely on it): the stub resumes the VM on ``c``/``s``/``D`` whatever
the run state (a ``c`` or ``D;1`` turns a ``postmigrate`` source ``running``; ``D;1`` starts an
``inmigrate`` destination), and a source held at a breakpoint (``debug``) when the migration
completes makes the destination abort ("invalid runstate transition: 'inmigrate' -> 'debug'").
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

from aradia.errors import Migrated
from aradia.lab.launcher import Guest
from aradia.proto.qmp import QMPClient
from aradia.trace.guardian import GuardedStub
from aradia.vm import attach
from guest_programs import build_loop, install_program

HOT = "__x64_sys_getppid"  # the loop calls it without a pause
COLD = "__x64_sys_reboot"  # nothing calls it while the test runs
GUEST = {"smp": 2, "gdb": True}  # source and destination must be started alike
BootGuest = Callable[..., contextlib.AbstractContextManager[Guest]]

TRACER = textwrap.dedent("""
    import sys, time
    from aradia.errors import AradiaError
    from aradia.trace.guardian import GuardedStub
    address, target, ending = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    stub = GuardedStub(address, was_running=True)
    stub.set_breakpoint(target)
    stub.cont()
    print("armed", stub.guardian_pid, flush=True)
    hits = 0
    try:
        while True:
            ev = stub.wait_stop(0.5)
            if ev is None:
                continue
            if ev.kind == "signal" and stub.registers(ev.thread)["rip"] == target:
                hits += 1
                if hits % 20 == 0:
                    print("hits", hits, flush=True)
                stub.step(ev.thread, until_pc_changes=True)
            stub.cont()
    except AradiaError as e:
        print("error", type(e).__name__, str(e).replace("\\n", " "), flush=True)
    try:
        stub.cont()  # the stale continue
        print("cont ok", flush=True)
    except AradiaError as e:
        print("cont", type(e).__name__, str(e).replace("\\n", " "), flush=True)
    if ending == "close":
        stub.close()
        print("closed", flush=True)
    time.sleep(600)
""")


@dataclass
class Pair:
    source: Guest
    destination: Guest
    uri: str
    hot: int
    cold: int


@pytest.fixture(scope="module")
def loop_binary(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return build_loop(tmp_path_factory.mktemp("loop"))


@pytest.fixture
def pair(boot_guest: BootGuest, loop_binary: bytes) -> Iterator[Pair]:
    """A booted source with ``/tmp/loop`` and a destination waiting for it (both stopped afterwards)."""
    sock = f"/tmp/aradia-mig-{os.getpid()}-{secrets.token_hex(4)}.sock"
    try:
        with boot_guest("6.1", **GUEST) as source, \
                boot_guest("6.1", **GUEST, incoming=f"unix:{sock}") as destination:
            install_program(source, "loop", loop_binary)
            with attach(f"qmp:{source.qmp_path}") as vm:
                hot, cold = vm.linux.profile.symbol(HOT), vm.linux.profile.symbol(COLD)
            assert hot is not None and cold is not None
            yield Pair(source, destination, f"unix:{sock}", int(hot), int(cold))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)


def _status(qmp: QMPClient) -> str:
    return str(qmp.execute("query-status")["status"])


MIGRATION_BANDWIDTH = 64 << 20  # bytes/s: the migration lasts long enough for the poller to watch it


def _migrate(qmp: QMPClient, uri: str, timeout: float = 60) -> dict[str, object]:
    qmp.execute("migrate-set-parameters", {"max-bandwidth": MIGRATION_BANDWIDTH})
    qmp.execute("migrate", {"uri": uri})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = qmp.execute("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            return dict(info)
        time.sleep(0.02)
    raise AssertionError(f"migration did not finish within {timeout} s: {qmp.execute('query-migrate')}")


IN_PROGRESS = ("setup", "active", "pre-switchover", "device")  # query-migrate's status while it runs
MAX_GAP = 2.0  # seconds between two samples at most: "without a break", on a loaded machine


class StatePoller:
    """Polls a QEMU's run state and migration status every 20 ms in its own thread (through the test's
    QMP client, which serialises commands); ``samples`` holds (time, run state, migration status).

    Start it before ``migrate``. :meth:`stop` fails the test if the poller raised, hung, or left a
    gap of more than :data:`MAX_GAP` seconds between two samples.
    """

    def __init__(self, qmp: QMPClient) -> None:
        self.qmp = qmp
        self.samples: list[tuple[float, str, str]] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                state = _status(self.qmp)
                migration = str(self.qmp.execute("query-migrate").get("status", "none"))
                self.samples.append((time.monotonic(), state, migration))
                time.sleep(0.02)
        except BaseException as e:  # reported by stop(), in the test's thread
            self.error = e

    def stop(self) -> list[tuple[float, str, str]]:
        self._stop.set()
        self._thread.join(timeout=10)
        assert not self._thread.is_alive(), "the state poller hung"
        assert self.error is None, f"the state poller died: {self.error!r}"
        assert self.samples, "the state poller took no sample"
        times = [t for t, _, _ in self.samples]
        gap = max((b - a for a, b in itertools.pairwise(times)), default=0.0)
        assert gap < MAX_GAP, f"the state poller paused for {gap:.2f} s"
        return self.samples


def _expect(out: IO[str], prefix: str, timeout: float) -> str:
    """The tracer's next output line that starts with ``prefix`` (other lines are skipped)."""
    result: list[str] = []

    def read() -> None:
        for line in out:
            if line.startswith(prefix):
                result.append(line.strip())
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    assert result, f"the tracer printed no {prefix!r} line within {timeout} s"
    return result[0]


def _start_tracer(tmp_path: Path, address: str, target: int, ending: str) -> tuple[subprocess.Popen[str], int]:
    script = tmp_path / "tracer.py"
    script.write_text(TRACER)
    tracer = subprocess.Popen([sys.executable, str(script), address, str(target), ending],
                              stdout=subprocess.PIPE, text=True)
    assert tracer.stdout is not None
    guardian_pid = int(_expect(tracer.stdout, "armed", 30).split()[1])
    return tracer, guardian_pid


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    return not os.path.exists(f"/proc/{pid}")


def _refused(stdout: IO[str]) -> tuple[str, str]:
    """The tracer's error after the migration and its refused stale continue: both ``Migrated``."""
    error = _expect(stdout, "error", 10)
    print(error)
    cont = _expect(stdout, "cont", 10)
    assert error.startswith("error Migrated "), error
    assert cont.startswith("cont Migrated "), cont
    return error, cont


def _source_never_resumed(qmp: QMPClient, poller: StatePoller, guardian_pid: int) -> None:
    """The guardian is gone; the poller watched the migration run and complete, and from the moment
    the source left its running states it never came back to them (polled all along)."""
    assert _gone(guardian_pid, 5), "the guardian outlived its tracer"
    time.sleep(1.5)
    samples = poller.stop()
    migrations = [m for _, _, m in samples]
    assert any(m in IN_PROGRESS for m in migrations), f"the poller never saw the migration run: {set(migrations)}"
    assert migrations[-1] == "completed", migrations[-1]
    ended = next((i for i, (_, state, _) in enumerate(samples) if state in ("finish-migrate", "postmigrate")),
                 None)
    assert ended is not None and ended > 0, "the poller did not see the source before and after the switch"
    assert {state for _, state, _ in samples[:ended]} <= {"running", "debug"}, samples[:ended]
    after = {state for _, state, _ in samples[ended:]}
    assert after <= {"finish-migrate", "postmigrate"}, f"the source left postmigrate: {after}"
    print(f"poller: {len(samples)} samples, migration {migrations.count('active')} active, states "
          f"{[s for i, (_, s, _) in enumerate(samples) if i == 0 or s != samples[i - 1][1]]}")
    assert _status(qmp) == "postmigrate"


def _stop(tracer: subprocess.Popen[str]) -> None:
    if tracer.poll() is None:
        tracer.kill()
        tracer.wait()


def _destination_runs_the_guest(destination: Guest) -> None:
    with QMPClient(destination.qmp_path) as qmp:
        state = _status(qmp)
    assert destination.alive and state == "running", f"destination {state}: {destination.qemu_log.read_text()[-500:]}"
    out = destination.run("pkill -f 'loop 100000000'; echo dest-guest-alive; cat /proc/uptime", timeout=30)
    assert "dest-guest-alive" in out


@pytest.mark.timeout(240)
def test_hot_probe_steps_aside_and_the_source_is_never_resumed(pair: Pair, tmp_path: Path) -> None:
    """A tracer servicing a hot breakpoint when the migration starts: it gets Migrated, the migration
    completes with the guest running (so the destination lives), and nothing resumes the source,
    not the tracer's stale continue, not its kill -9."""
    source, address = pair.source, f"127.0.0.1:{pair.source.gdb_port}"
    source.send_console(b"/tmp/loop 100000000 > /dev/null &\n")
    tracer, guardian_pid = _start_tracer(tmp_path, address, pair.hot, "sleep")
    assert tracer.stdout is not None
    try:
        _expect(tracer.stdout, "hits", 30)  # the probe is hot: the guest stops at it all the time
        with QMPClient(source.qmp_path) as qmp:
            poller = StatePoller(qmp)
            info = _migrate(qmp, pair.uri)
            assert info["status"] == "completed", info
            _error, cont = _refused(tracer.stdout)
            assert "migrat" in cont
            _destination_runs_the_guest(pair.destination)
            os.kill(tracer.pid, signal.SIGKILL)
            tracer.wait()
            _source_never_resumed(qmp, poller, guardian_pid)
    finally:
        _stop(tracer)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("ending", ["close", "kill9"])
def test_probe_held_through_a_migration_refuses_to_continue(pair: Pair, tmp_path: Path, ending: str) -> None:
    """A tracer whose (cold) probe stays armed through the migration: QEMU's T18 turns into Migrated,
    the stale continue is refused, and neither an explicit detach nor kill -9 resumes the source."""
    destination = pair.destination
    # A destination still waiting for its guest: no continue, and leaving must not start it (D;1 would).
    with GuardedStub(f"127.0.0.1:{destination.gdb_port}", was_running=False) as stub:
        assert stub.run_state() == "inmigrate"
        with pytest.raises(Migrated, match="incoming migration"):
            stub.cont()
    with QMPClient(destination.qmp_path) as qmp:
        assert _status(qmp) == "inmigrate"

    tracer, guardian_pid = _start_tracer(tmp_path, f"127.0.0.1:{pair.source.gdb_port}", pair.cold,
                                         "close" if ending == "close" else "sleep")
    assert tracer.stdout is not None
    try:
        with QMPClient(pair.source.qmp_path) as qmp:
            assert _status(qmp) == "running"
            poller = StatePoller(qmp)
            info = _migrate(qmp, pair.uri)
            assert info["status"] == "completed", info
            error, cont = _refused(tracer.stdout)
            assert "live-migrated away" in error, error
            assert "live-migrated away" in cont, cont
            _destination_runs_the_guest(destination)
            if ending == "close":
                _expect(tracer.stdout, "closed", 10)
            else:
                os.kill(tracer.pid, signal.SIGKILL)
                tracer.wait()
            _source_never_resumed(qmp, poller, guardian_pid)
    finally:
        _stop(tracer)
