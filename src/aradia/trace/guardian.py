"""The guardian: the GDB stub of a VM used so that the guest is never left broken.

QEMU keeps breakpoints armed after an abrupt client disconnect and freezes the guest at the next hit.
:class:`GuardedStub` connects to the stub from the tracer's own process (a breakpoint hit costs no
hop to another process: the stop, the registers and the resume go straight between the tracer and
QEMU, as for any bare client) and hands a second descriptor of the same connection to a watchdog
child process (:mod:`aradia.trace.watchdog`), which sleeps on a private socketpair. The tracer tells
it each breakpoint before arming it, and ``done`` once it left the stub clean (breakpoints removed,
detached). When that socketpair reaches end-of-file without ``done`` — the tracer was killed with
SIGKILL, crashed, or a Ctrl-C interrupted an exchange with the stub — the watchdog resynchronises
the connection, removes every breakpoint and detaches with ``D;1`` (QEMU resumes the guest; not
after a migration, below, nor when someone else paused it) and exits. The watchdog ignores SIGINT,
so a Ctrl-C in the tracer's terminal does not kill it before the cleanup.

Live migration (measured on QEMU 7.2). Its GDB stub resumes the VM on ``c``, ``s``/``vCont;s`` and
``D`` without looking at the run state: a ``c`` or ``D;1`` to a source in ``postmigrate`` sets it
``running`` while the destination runs the same guest, and ``D;1`` to a destination still in
``inmigrate`` starts it before its state arrived. And a source held at a breakpoint (run state
``debug``) when the migration completes makes the destination abort (``invalid runstate transition:
'inmigrate' -> 'debug'``: the source's run state travels with the guest). So the guardian asks QEMU
through the stub it already holds (HMP through ``qRcmd``; no QMP needed, so this works whoever holds
QMP, and for the watchdog after the tracer's death):

* ``info status`` (0.06-0.2 ms) before every continue and single step of the stopped VM: in
  ``finish-migrate`` or ``postmigrate`` (the guest lives on the destination now; once seen, this
  guardian never resumes the VM again) and in ``inmigrate`` it refuses with
  :class:`~aradia.errors.Migrated`. A ``T18`` (SIGXCPU) stop, which the stub reports when a
  migration completes on a running VM, turns into that error at once. On the hot path (a
  breakpoint hit: ``wait`` with ``registers``, then ``resume``) the ``qRcmd`` rides in the same
  exchange as the ``g`` that reads the stop's registers, and the ``resume`` checks what it said, so
  the check costs no round trip of its own; that reading holds only while the VM stays stopped (any
  request that may let it run forgets it, and the next continue asks again). No QMP event could
  replace the check: in QEMU's source a VM stopped at a breakpoint changes to ``finish-migrate``
  without a ``STOP`` event (``vm_stop_force_state`` only sets the state), and ``MIGRATION`` events
  exist only when the migrating party turned them on.
* ``info migrate`` at a stop, at most every :data:`MIGRATION_CHECK_INTERVAL` (on the hot path in
  the same exchange as the registers): while a migration is under way the guardian steps aside —
  removes every breakpoint, detaches with ``D;1`` so the guest runs and the migration completes
  from ``running`` — and the request fails with ``Migrated``.
* Leaving (detach, or the tracer's end) asks ``info status`` first: a migrated VM gets its
  breakpoints removed and the connection closed *without* ``D`` (closing leaves the run state
  alone); any other VM gets ``D;1`` as above. If QEMU cannot say (no answer to ``info status``), the
  guardian keeps the old behaviour, ``D;1``.

A migration aradia drives itself (:mod:`aradia.trace.migration`) tells the guardian first
(``driven``, :meth:`GuardedStub.drive_migration`): it then does not step aside at ``info migrate``
(the driver stops the source between hits instead); the run-state checks stay.

What stays open: the time between a check and the ``c``/``D`` after it (a migration completing
exactly then is not caught; only QEMU's stub could close that) — on the hot path that is the
tracer's handling of the hit (0.08-0.25 ms measured for a syscall probe, milliseconds on a loaded
host), where it used to be one round trip to the stub
— and a migration that starts and completes between two ``info migrate`` checks while the VM sits
at a breakpoint.

QEMU gone. When the stub connection breaks (QEMU exited: QMP ``quit``, a signal, a guest power-off)
the request in progress fails with :class:`~aradia.errors.NotAttached` saying so; later calls repeat
the same error.

Per breakpoint hit the tracer makes two requests, in its own process: ``wait`` with
``registers`` (the stop comes back with the stopped vCPU's registers, read with ``g`` as soon as the
stop reply arrived, together with the run-state check) and ``resume`` (a PC-only write is one
``c ADDR`` packet to the stub). Requests go through :func:`_handle`, as they did when a guardian
process served them over a pipe (one hop there and back per request, a third of a hit's time).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from aradia.errors import AradiaError, Busy, Migrated, NotAttached, PageFault, ProtocolError
from aradia.proto.gdbstub_api import BP_SOFTWARE
from aradia.proto.gdbwire import StopEvent
from aradia.trace.runstate import INCOMING_STATES, MIGRATED_STATES, parse_info_status

MAX_WAIT = 0.5
MAX_LINE = 16 << 20
START_TIMEOUT = 15.0
#: Migration states (``info migrate``) of a migration under way: the guardian steps aside.
MIGRATION_ACTIVE = frozenset({"setup", "active", "pre-switchover", "device", "wait-unplug", "postcopy-active",
                              "postcopy-paused", "postcopy-recover"})
#: Seconds between two ``info migrate`` checks at breakpoint stops (each costs ~0.1-0.4 ms).
MIGRATION_CHECK_INTERVAL = 0.02
#: The stop signal QEMU's stub reports when a migration completes (RUN_STATE_FINISH_MIGRATE).
SIGXCPU = 0x18
_MIGRATION_STATUS = re.compile(r"^Migration status:\s*([\w-]+)", re.MULTILINE)
_ERRORS: dict[str, type[AradiaError]] = {c.__name__: c for c in (AradiaError, Busy, Migrated, NotAttached,
                                                                 PageFault, ProtocolError)}




# --- the guardian process -------------------------------------------------------------------------------
class _Guard:
    """Keeps a migrated VM from being resumed through the stub (see the module docstring)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.migrated_state: str | None = None
        self.migration_checked = 0.0
        self.left = False
        #: ``info status`` (and, when due, ``info migrate``) output read with the registers at the
        #: current breakpoint stop; the ``resume`` that ends the stop checks it. None: not read.
        self.said_at_stop: str | None = None
        #: aradia itself drives a migration of this VM (:mod:`aradia.trace.migration`): do not step aside
        self.driven = False

    def migration_due(self) -> bool:
        """Whether a stop should look at the migration status now (every :data:`MIGRATION_CHECK_INTERVAL`)."""
        return time.monotonic() - self.migration_checked >= MIGRATION_CHECK_INTERVAL

    def run_state(self, said: str | None = None) -> str | None:
        """QEMU's run state, asked through the stub's monitor (or read from ``said``, the output of an
        ``info status`` the caller sent along with other packets); None if QEMU cannot say.

        :class:`NotAttached` (the stub connection is gone) propagates.
        """
        try:
            state = parse_info_status(self.client.monitor("info status") if said is None else said)
        except NotAttached:
            raise
        except AradiaError:
            return None
        if state in MIGRATED_STATES:
            self.migrated_state = state  # a source stays migrated for this guardian: never resume it
        return state

    def check(self, what: str, said: str | None = None) -> None:
        """Raise :class:`Migrated` if ``what`` (a continue, a step) would resume a guest living elsewhere.

        ``said``: the output of an ``info status`` sent just now (with the hit's register writes).
        """
        state = self.migrated_state or self.run_state(said)
        if self.migrated_state:
            raise Migrated(f"refusing to {what}: the VM was live-migrated away (run state "
                           f"{self.migrated_state}); resuming it here would run the guest twice. "
                           "Trace the destination instead")
        if state in INCOMING_STATES:
            raise Migrated(f"refusing to {what}: the VM waits for an incoming migration (run state {state})")

    def may_resume(self) -> bool:
        """Whether leaving may resume the VM (``D``); True when QEMU cannot tell (the old behaviour)."""
        if self.migrated_state:
            return False
        try:
            state = self.run_state()
        except AradiaError:
            return True
        return state not in MIGRATED_STATES and state not in INCOMING_STATES

    def migration_status(self) -> str | None:
        """Status of the current or last migration (``none``: never migrated); None if QEMU cannot say."""
        try:
            text = self.client.monitor("info migrate")
        except NotAttached:
            raise
        except AradiaError:
            return None
        m = _MIGRATION_STATUS.search(text)
        return m[1] if m else "none"

    def watch_migration(self, said: str | None = None) -> None:
        """At a stop: if a migration is under way, step aside (disarm, ``D;1``) and raise :class:`Migrated`.

        Checks at most every :data:`MIGRATION_CHECK_INTERVAL`; ``said`` is the output of an ``info
        migrate`` the caller sent along with the stop's other packets (then nothing is asked here).
        """
        if self.driven or (said is None and not self.migration_due()):
            return
        self.migration_checked = time.monotonic()
        if said is None:
            status = self.migration_status()
        else:
            m = _MIGRATION_STATUS.search(said)
            status = m[1] if m else "none"
        if status not in MIGRATION_ACTIVE:
            return
        self.leave()
        raise Migrated(f"a live migration of the VM is under way (status {status}): removed every breakpoint "
                       "and let the guest run, since a source held at a breakpoint when the migration "
                       "completes makes QEMU's destination abort. Trace the destination once it completed")

    def leave(self) -> None:
        """Remove every breakpoint and detach: with ``D;1`` (QEMU resumes the guest) unless migrated."""
        if self.left:
            return
        self.left = True
        if self.may_resume():
            self.client.detach()
        else:
            self.client.close(resume=False)  # no D: closing the connection leaves the run state alone


def _gone(e: NotAttached) -> NotAttached:
    """The error for a broken stub connection, saying what most likely happened."""
    if "QEMU exited" in str(e):
        return NotAttached(f"lost the VM: {e}")
    if "has ended" in str(e):  # the stub's W/X packet: QEMU is exiting (quit, a signal, power-off)
        return NotAttached(f"lost the VM: QEMU exited ({e})")
    return NotAttached(f"lost the VM: QEMU exited or closed its GDB stub ({e})")


def _handle(client: Any, guard: _Guard, req: dict[str, Any]) -> Any:
    op = req["op"]
    # the run state read at a stop holds until something may have let the VM run
    said, guard.said_at_stop = guard.said_at_stop, (guard.said_at_stop if op in _KEEP_STOP else None)
    if op == "break":
        client.set_breakpoint(int(req["addr"]), int(req.get("kind", 0)), int(req.get("length", 1)))
        return None
    if op == "unbreak":
        client.remove_breakpoint(int(req["addr"]), int(req.get("kind", 0)), int(req.get("length", 1)))
        return None
    if op == "cont":
        if not client.running:  # (asking a running VM would stop it, and a hit could slip by)
            guard.check("continue the VM")
        client.cont()
        return None
    if op == "resume":
        if not client.running:  # (asking a running VM would stop it, and a hit could slip by)
            # the run state read with this stop's registers; asked now if the stop was not read so
            guard.check("continue the VM", said)
        client.resume({str(k): int(v) for k, v in (req.get("registers") or {}).items()}, req.get("thread"))
        return None
    if op == "interrupt":
        return client.interrupt()
    if op == "wait":
        ev = client.wait_stop(min(float(req.get("timeout", MAX_WAIT)), MAX_WAIT))
        if ev is not None and ev.kind == "signal" and ev.signal == SIGXCPU:
            guard.check("go on")  # QEMU stopped the VM to complete a migration
        if ev is not None and not ev.ended and req.get("registers"):
            # the hot path: registers, run state and (when due) migration status in one round trip
            migrate = guard.migration_due()
            asks = ["info status", *(["info migrate"] * migrate)]
            regs, text = client.registers_and_monitor(ev.thread, asks)
            guard.said_at_stop = text
            if migrate:
                guard.watch_migration(text if text is not None else "")
            ev = dataclasses.replace(ev, registers=regs)
        elif ev is not None:
            guard.watch_migration()
        return ev
    if op == "regs":
        return client.registers(req.get("thread"))
    if op == "reg":
        return client.read_register(str(req["name"]), req.get("thread"))
    if op == "set_reg":
        client.write_register(str(req["name"]), int(req["value"]), req.get("thread"))
        return None
    if op == "read":
        data = client.read_memory(int(req["addr"]), int(req["size"]), physical=bool(req.get("physical")))
        return data.hex()
    if op == "write":
        client.write_memory(int(req["addr"]), bytes.fromhex(req["data"]), physical=bool(req.get("physical")))
        return None
    if op == "step":
        if not client.running:  # (a running VM cannot be stepped: the client says so)
            guard.check("single-step the VM")  # a step resumes the VM too (vm_start), for one instruction
        timeout = req.get("timeout")
        return client.step(req.get("thread"), timeout=None if timeout is None else float(timeout),
                           until_pc_changes=bool(req.get("until_pc_changes")),
                           max_attempts=int(req.get("max_attempts", 8)))
    if op == "threads":
        return client.threads()
    if op == "running":
        return bool(client.running)
    if op == "status":
        return guard.run_state()
    if op == "driven":
        guard.driven = bool(req["on"])
        return None
    if op == "monitor":
        timeout = req.get("timeout")
        return client.monitor(str(req["command"]), None if timeout is None else float(timeout))
    raise ProtocolError(f"unknown guardian request {op!r}")


#: Requests that leave the VM stopped where it is: the run state read at the stop stays good for them.
_KEEP_STOP = frozenset({"break", "unbreak", "regs", "reg", "set_reg", "read", "write", "threads", "running",
                        "status", "driven"})


def main(argv: list[str] | None = None) -> int:
    """Entry point of the guardian's watchdog: ``python -m aradia.trace.guardian CTL_FD STUB_FD``."""
    from aradia.trace.watchdog import serve

    args = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return serve(int(args[0]), int(args[1]))


# --- the tracer's side -------------------------------------------------------------------------------------
class GuardedStub:
    """A VM's GDB stub, used from this process, with the guardian's checks and a watchdog behind it
    (see the module docstring).

    Only one thread may use a GuardedStub at a time. ``close()`` (or the end of this process, however
    it ends: the watchdog cleans up then) removes every breakpoint and lets the guest run. It satisfies
    :class:`aradia.proto.gdbstub_api.GdbStub`, as :class:`aradia.proto.gdbrsp.GdbClient` does.
    """

    def __init__(self, address: str, *, was_running: bool | None = None) -> None:
        from aradia.proto.gdbrsp import GdbClient

        client = GdbClient(address, was_running=was_running)
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            stub_fd = client.fileno()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "aradia.trace.guardian", str(child.fileno()), str(stub_fd)],
                pass_fds=[child.fileno(), stub_fd], stdin=subprocess.DEVNULL, start_new_session=True)
            child.close()
            parent.settimeout(START_TIMEOUT)
            hello = parent.makefile("rb").readline(MAX_LINE)
            parent.settimeout(None)
            if not hello:
                raise NotAttached("the GDB guardian's watchdog did not start")
            self.guardian_pid = int(json.loads(hello)["pid"])
        except BaseException:
            client.close()
            parent.close()
            raise
        self._ctl = parent
        self._client = client
        self._guard = _Guard(client)
        self._dead: AradiaError | None = None  # why this stub is unusable (the same error is raised again)
        self._done = False  # the watchdog was told the stub is clean
        try:
            client.threads()
            with contextlib.suppress(Migrated):
                self._guard.check("resume")
                client.restore_run_state()  # connecting paused a running guest (QEMU does); let it run on
        except BaseException:
            self.close()
            raise

    def _note(self, op: str, bp: tuple[int, int, int] | None = None) -> None:
        """Tell the watchdog a breakpoint about to be armed, one removed, or that the stub is clean."""
        with contextlib.suppress(OSError):
            self._ctl.sendall(json.dumps({"op": op, "bp": list(bp or ())}).encode() + b"\n")
        if op == "done":
            self._done = True

    def call(self, op: str, **kw: Any) -> Any:
        """Do one guardian request (see :func:`_handle`) on the stub and return its result."""
        if self._dead is not None:
            raise type(self._dead)(*self._dead.args)
        try:
            if op == "detach":
                self._guard.leave()
                self._note("done")
                return None
            return _handle(self._client, self._guard, {"op": op, **kw})
        except NotAttached as e:
            self._dead = _gone(e)  # the GdbClient drops the stub connection with every NotAttached
            self._note("done")  # nothing left to clean
            raise self._dead from None
        except AradiaError as e:
            if self._guard.left:  # it stepped aside for a migration: nothing left to serve
                self._dead = e
                self._note("done")
            raise
        except (ValueError, KeyError, TypeError) as e:
            raise ProtocolError(f"bad request to the GDB guardian: {e}") from e
        except BaseException:
            # Interrupted (Ctrl-C) in the middle of an exchange: the stream's state is unknown. Nothing
            # more goes over this connection here; close() leaves it to the watchdog's rescue.
            self._dead = NotAttached(f"a request to the GDB stub ({op}) was interrupted")
            raise

    def set_breakpoint(self, addr: int, kind: int = BP_SOFTWARE, length: int = 1) -> None:
        """Arm a breakpoint (kind 0/1) or watchpoint (2 write, 3 read, 4 access) at guest-virtual ``addr``."""
        if self._dead is None:
            self._note("break", (addr, kind, length))  # first: armed or not, the watchdog may remove it
        self.call("break", addr=addr, kind=kind, length=length)

    def remove_breakpoint(self, addr: int, kind: int = BP_SOFTWARE, length: int = 1) -> None:
        """Disarm one breakpoint or watchpoint."""
        self.call("unbreak", addr=addr, kind=kind, length=length)
        self._note("unbreak", (addr, kind, length))

    def cont(self) -> None:
        """Let the guest run."""
        self.call("cont")

    def resume(self, registers: dict[str, int] | None = None, thread: str | None = None) -> None:
        """Write ``registers`` of the stopped vCPU and let the guest run: one request, and one round
        trip to the stub for the writes and the guardian's run-state check together."""
        self.call("resume", registers=registers, thread=thread)

    def wait_stop(self, timeout: float, *, registers: bool = False) -> StopEvent | None:
        """The next stop or None after ``timeout``; with ``registers`` it carries the stopped vCPU's
        registers (the guardian reads them at the stop, in the same request)."""
        end = time.monotonic() + timeout
        while True:
            ev = self.call("wait", timeout=max(0.0, min(MAX_WAIT, end - time.monotonic())),
                           registers=registers)
            if ev is not None or time.monotonic() >= end:
                return ev  # type: ignore[no-any-return]

    def limit_registers(self, names: tuple[str, ...] | None) -> None:
        """Read only ``names`` of the registers the ``g`` packet lacks at each stop and in
        :meth:`registers` (None: all of them; arm64's SVE and system registers cost ~2 ms a stop)."""
        self._client.extra_registers = None if names is None else frozenset(names)

    def registers(self, thread: str | None = None) -> dict[str, int]:
        """Registers of one vCPU (thread id as the stub names it)."""
        return {k: int(v) for k, v in self.call("regs", thread=thread).items()}

    def read_register(self, name: str, thread: str | None = None) -> int:
        """One register of one vCPU."""
        return int(self.call("reg", name=name, thread=thread))

    def write_register(self, name: str, value: int, thread: str | None = None) -> None:
        """Write one register of one vCPU."""
        self.call("set_reg", name=name, value=value, thread=thread)

    def threads(self) -> list[str]:
        """The vCPU thread ids (``p01.01``, ``p01.02``, ...)."""
        return [str(t) for t in self.call("threads")]

    def read_memory(self, addr: int, size: int, *, physical: bool = False) -> bytes:
        """Read guest memory through the stub (virtual in the stopped vCPU's view, or physical)."""
        return bytes.fromhex(self.call("read", addr=addr, size=size, physical=physical))

    def write_memory(self, addr: int, data: bytes, *, physical: bool = False) -> None:
        """Write guest memory through the stub (virtual in the stopped vCPU's view, or physical)."""
        self.call("write", addr=addr, data=data.hex(), physical=physical)

    def step(self, thread: str | None = None, *, timeout: float | None = None,
             until_pc_changes: bool = False, max_attempts: int = 8) -> StopEvent:
        """Single-step one vCPU; ``until_pc_changes`` repeats a step that left the PC unchanged."""
        return self.call("step", thread=thread, timeout=timeout,  # type: ignore[no-any-return]
                         until_pc_changes=until_pc_changes, max_attempts=max_attempts)

    def interrupt(self) -> StopEvent | None:
        """Stop the guest; the stop it reported, or None if it was not running."""
        return self.call("interrupt")  # type: ignore[no-any-return]

    def monitor(self, command: str, timeout: float | None = None) -> str:
        """Run a QEMU monitor (HMP) command through the stub and return its output."""
        return str(self.call("monitor", command=command, timeout=timeout))

    def run_state(self) -> str | None:
        """QEMU's run state (``running``, ``debug``, ``paused``, ``postmigrate``...) through the stub;
        None if QEMU cannot say."""
        state = self.call("status")
        return None if state is None else str(state)

    def drive_migration(self, on: bool) -> None:
        """Tell the guardian that aradia itself drives a migration of this VM (``on``) or no longer
        does: while on, it does not step aside when ``info migrate`` shows one under way (the driver,
        :mod:`aradia.trace.migration`, stops the source at a safe point instead)."""
        self.call("driven", on=on)

    def close(self) -> None:
        """Disarm everything and let the guest run (unless it migrated away); waits for the watchdog.

        Safe to call twice, and after any error: when this process cannot leave the stub clean itself
        (an exchange was interrupted, the detach failed) the watchdog's rescue does.
        """
        if self._dead is None:
            with contextlib.suppress(AradiaError, OSError):
                self.call("detach")
        if not self._done:
            self._client.abandon()  # (the watchdog's descriptor keeps the connection for its rescue)
        with contextlib.suppress(OSError):
            self._ctl.close()  # end-of-file for the watchdog: done, or rescue
        self._dead = self._dead or NotAttached("the GDB guardian was closed")
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> GuardedStub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    sys.exit(main())
