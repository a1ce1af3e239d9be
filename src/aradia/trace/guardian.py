"""The guardian: a child process that owns a VM's GDB stub, so the guest is never left broken.

QEMU keeps breakpoints armed after an abrupt client disconnect and freezes the guest at the next hit.
So the tracer never holds the stub itself: it spawns this guardian, which connects to the stub and
serves the tracer's requests over a private socketpair. When that socket reaches end-of-file — the
tracer detached, raised, was interrupted or was killed with SIGKILL (the kernel closes its end) —
the guardian removes every breakpoint, detaches with ``D;1`` (QEMU resumes the guest; not after a
migration, below) and exits. The guardian ignores SIGINT so a Ctrl-C in the tracer's terminal does
not kill it before the cleanup; a Ctrl-C that interrupts the tracer between a request and its reply
retires the channel (:meth:`GuardedStub.close` then ends it by end-of-file: the same cleanup).

Live migration (measured on QEMU 7.2). Its GDB stub resumes the VM on ``c``, ``s``/``vCont;s`` and
``D`` without looking at the run state: a ``c`` or ``D;1`` to a source in ``postmigrate`` sets it
``running`` while the destination runs the same guest, and ``D;1`` to a destination still in
``inmigrate`` starts it before its state arrived. And a source held at a breakpoint (run state
``debug``) when the migration completes makes the destination abort (``invalid runstate transition:
'inmigrate' -> 'debug'``: the source's run state travels with the guest). So the guardian asks QEMU
through the stub it already holds (HMP through ``qRcmd``; no QMP needed, so this works whoever holds
QMP, and after the tracer's death):

* ``info status`` (0.06-0.2 ms) before every continue and single step of the stopped VM: in
  ``finish-migrate`` or ``postmigrate`` (the guest lives on the destination now; once seen, this
  guardian never resumes the VM again) and in ``inmigrate`` it refuses with
  :class:`~aradia.errors.Migrated`. A ``T18`` (SIGXCPU) stop, which the stub reports when a
  migration completes on a running VM, turns into that error at once.
* ``info migrate`` at a stop, at most every :data:`MIGRATION_CHECK_INTERVAL`: while a migration is
  under way the guardian steps aside — removes every breakpoint, detaches with ``D;1`` so the guest
  runs and the migration completes from ``running`` — and the request fails with ``Migrated``.
* Leaving (detach, or the tracer's end) asks ``info status`` first: a migrated VM gets its
  breakpoints removed and the connection closed *without* ``D`` (closing leaves the run state
  alone); any other VM gets ``D;1`` as above. If QEMU cannot say (no answer to ``info status``), the
  guardian keeps the old behaviour, ``D;1``.

A migration aradia drives itself (:mod:`aradia.trace.migration`) tells the guardian first
(``{"op": "driven", "on": true}``, :meth:`GuardedStub.drive_migration`): it then does not step aside
at ``info migrate`` (the driver stops the source between hits instead); the run-state checks stay.

What stays open: the instant between a check and the ``c``/``D`` after it (a migration completing
exactly then is not caught; only QEMU's stub could close that), and a migration that starts and
completes between two ``info migrate`` checks while the VM sits at a breakpoint.

QEMU gone. When the stub connection breaks (QEMU exited: QMP ``quit``, a signal, a guest power-off)
the request in progress fails with :class:`~aradia.errors.NotAttached` saying so, and the guardian
exits right after that reply; the tracer's later calls repeat the same error.

Protocol: one JSON object per line each way. Requests ``{"op": ..., ...}``; replies ``{"ok": value}``
or ``{"error": text, "kind": class name}`` (plus ``"fatal": true`` when the guardian exits after it).
Each request is bounded in time (``wait_stop`` takes a timeout of at most :data:`MAX_WAIT`), so the
guardian notices a vanished tracer within that time.
"""

from __future__ import annotations

import contextlib
import json
import os
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

MAX_WAIT = 0.5
MAX_LINE = 16 << 20
START_TIMEOUT = 15.0
#: Run states of a migration source whose guest already lives (or is about to live) on the destination.
MIGRATED_STATES = frozenset({"finish-migrate", "postmigrate"})
#: Run state of a migration destination that has not received its guest yet.
INCOMING_STATES = frozenset({"inmigrate"})
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


def parse_info_status(text: str) -> str:
    """QEMU's run state from HMP ``info status`` (``VM status: paused (postmigrate)`` -> ``postmigrate``).

    ``running`` and plain ``paused`` come back as such; ``(single step mode)`` is not a run state.
    """
    line = text.partition("VM status:")[2].strip().splitlines()
    words = line[0] if line else text.strip()
    state = "running" if words.startswith("running") else "paused" if words.startswith("paused") else ""
    for part in words.split("(")[1:]:
        inner = part.partition(")")[0].strip()
        if inner and inner != "single step mode":
            state = inner
    if not state:
        raise ProtocolError(f"cannot parse QEMU's 'info status' output {text.strip()[:80]!r}")
    return state


# --- the guardian process -------------------------------------------------------------------------------
class _Guard:
    """Keeps a migrated VM from being resumed through the stub (see the module docstring)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.migrated_state: str | None = None
        self.migration_checked = 0.0
        self.left = False
        #: aradia itself drives a migration of this VM (:mod:`aradia.trace.migration`): do not step aside
        self.driven = False

    def run_state(self) -> str | None:
        """QEMU's run state, asked through the stub's monitor; None if QEMU cannot say.

        :class:`NotAttached` (the stub connection is gone) propagates.
        """
        try:
            state = parse_info_status(self.client.monitor("info status"))
        except NotAttached:
            raise
        except AradiaError:
            return None
        if state in MIGRATED_STATES:
            self.migrated_state = state  # a source stays migrated for this guardian: never resume it
        return state

    def check(self, what: str) -> None:
        """Raise :class:`Migrated` if ``what`` (a continue, a step) would resume a guest living elsewhere."""
        state = self.migrated_state or self.run_state()
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

    def watch_migration(self) -> None:
        """At a stop: if a migration is under way, step aside (disarm, ``D;1``) and raise :class:`Migrated`.

        Checks at most every :data:`MIGRATION_CHECK_INTERVAL`.
        """
        now = time.monotonic()
        if self.driven or now - self.migration_checked < MIGRATION_CHECK_INTERVAL:
            return
        self.migration_checked = now
        status = self.migration_status()
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


def _send(ctl: socket.socket, msg: dict[str, Any]) -> None:
    ctl.sendall(json.dumps(msg).encode() + b"\n")


def _gone(e: NotAttached) -> NotAttached:
    """The error for a broken stub connection, saying what most likely happened."""
    if "QEMU exited" in str(e):
        return NotAttached(f"lost the VM: {e}")
    if "has ended" in str(e):  # the stub's W/X packet: QEMU is exiting (quit, a signal, power-off)
        return NotAttached(f"lost the VM: QEMU exited ({e})")
    return NotAttached(f"lost the VM: QEMU exited or closed its GDB stub ({e})")


def _serve(ctl: socket.socket, address: str, was_running: bool | None) -> None:
    from aradia.proto.gdbrsp import GdbClient

    reader = ctl.makefile("rb")
    try:
        client = GdbClient(address, was_running=was_running)
    except AradiaError as e:
        _send(ctl, {"error": str(e), "kind": type(e).__name__})
        return
    guard = _Guard(client)
    try:
        threads = client.threads()
        with contextlib.suppress(Migrated):
            guard.check("resume")
            client.restore_run_state()  # connecting paused a running guest (QEMU does); let it run on
        _send(ctl, {"ok": {"pid": os.getpid(), "threads": threads}})
        while True:
            line = reader.readline(MAX_LINE)
            if not line:
                return  # the tracer is gone: clean up in finally
            fatal = False
            try:
                req = json.loads(line)
                if req.get("op") == "detach":
                    guard.leave()
                    _send(ctl, {"ok": None})
                    return
                reply: dict[str, Any] = {"ok": _handle(client, guard, req)}
            except NotAttached as e:
                fatal = True  # the GdbClient drops the stub connection with every NotAttached
                reply = {"error": str(_gone(e)), "kind": "NotAttached", "fatal": True}
            except AradiaError as e:
                reply = {"error": str(e), "kind": type(e).__name__}
                fatal = guard.left  # it stepped aside for a migration: nothing left to serve
                if fatal:
                    reply["fatal"] = True
            except (ValueError, KeyError, TypeError) as e:
                reply = {"error": f"bad request: {e}", "kind": "ProtocolError"}
            _send(ctl, reply)
            if fatal:
                return
    except OSError:
        return
    except AradiaError as e:
        with contextlib.suppress(OSError):
            _send(ctl, {"error": str(e), "kind": type(e).__name__, "fatal": True})
    finally:
        with contextlib.suppress(AradiaError, OSError):
            guard.leave()  # removes our breakpoints; resumes the guest unless it migrated away


def _handle(client: Any, guard: _Guard, req: dict[str, Any]) -> Any:
    op = req["op"]
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
    if op == "interrupt":
        ev = client.interrupt()
        return None if ev is None else _event(ev)
    if op == "wait":
        ev = client.wait_stop(min(float(req.get("timeout", MAX_WAIT)), MAX_WAIT))
        if ev is not None and ev.kind == "signal" and ev.signal == SIGXCPU:
            guard.check("go on")  # QEMU stopped the VM to complete a migration
        if ev is not None:
            guard.watch_migration()
        return None if ev is None else _event(ev)
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
        return _event(client.step(req.get("thread"), timeout=None if timeout is None else float(timeout),
                                  until_pc_changes=bool(req.get("until_pc_changes")),
                                  max_attempts=int(req.get("max_attempts", 8))))
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


def _event(ev: StopEvent) -> dict[str, Any]:
    """A stop as JSON for the pipe (:func:`_stop_event` rebuilds it on the tracer's side)."""
    return {"kind": ev.kind, "signal": ev.signal, "thread": ev.thread, "info": ev.info, "raw": ev.raw}


def _stop_event(msg: dict[str, Any]) -> StopEvent:
    """The :class:`StopEvent` that :func:`_event` sent."""
    return StopEvent(str(msg["kind"]), int(msg["signal"]), msg["thread"],
                     {str(k): str(v) for k, v in msg["info"].items()}, str(msg["raw"]))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the guardian process: ``python -m aradia.trace.guardian FD ADDRESS [running]``."""
    args = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctl = socket.socket(fileno=int(args[0]))
    was_running = {"1": True, "0": False}.get(args[2]) if len(args) > 2 else None
    try:
        _serve(ctl, args[1], was_running)
    finally:
        ctl.close()
    return 0


# --- the tracer's side -------------------------------------------------------------------------------------
class GuardedStub:
    """A VM's GDB stub reached through a guardian process (see the module docstring).

    Only one thread may use a GuardedStub at a time. ``close()`` (or the end of this process, however
    it ends) makes the guardian remove every breakpoint and let the guest run. It satisfies
    :class:`aradia.proto.gdbstub_api.GdbStub`, as :class:`aradia.proto.gdbrsp.GdbClient` does.
    """

    def __init__(self, address: str, *, was_running: bool | None = None) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        running = {True: "1", False: "0"}.get(was_running, "?")  # type: ignore[call-overload]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aradia.trace.guardian", str(child.fileno()), address, running],
            pass_fds=[child.fileno()], stdin=subprocess.DEVNULL, start_new_session=True)
        child.close()
        self._sock = parent
        self._reader = parent.makefile("rb")
        self._dead: AradiaError | None = None  # the error the guardian exited with
        parent.settimeout(START_TIMEOUT)
        hello = self._reply("connect")
        parent.settimeout(None)
        self.guardian_pid = int(hello["pid"])

    def _reply(self, what: str) -> Any:
        try:
            line = self._reader.readline(MAX_LINE)
        except (OSError, TimeoutError) as e:
            raise NotAttached(f"the GDB guardian did not answer {what}: {e}") from e
        if not line:
            code = self.proc.poll()
            status = f" (status {code})" if code else ""
            raise NotAttached(f"the GDB guardian exited during {what}{status}")
        msg = json.loads(line)
        if "error" in msg:
            err = _ERRORS.get(msg.get("kind", ""), AradiaError)(msg["error"])
            if msg.get("fatal"):
                self._dead = err  # the guardian exits after this reply: later calls say the same
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=5)  # reap it (no zombie while the tracer lives on)
            raise err
        return msg["ok"]

    def call(self, op: str, **kw: Any) -> Any:
        """Send one request to the guardian and return its result."""
        if self._dead is not None:
            raise type(self._dead)(*self._dead.args)
        try:
            self._sock.sendall(json.dumps({"op": op, **kw}).encode() + b"\n")
        except OSError as e:
            raise NotAttached(f"the GDB guardian is gone: {e}") from e
        try:
            return self._reply(op)
        except AradiaError:
            raise
        except BaseException:
            # Interrupted (Ctrl-C) between request and reply: the reply still comes and would answer
            # the next request. Nothing more goes over this channel; close() ends it by EOF, and the
            # guardian cleans up as when the tracer dies.
            self._dead = NotAttached(f"a request to the GDB guardian ({op}) was interrupted")
            raise

    def set_breakpoint(self, addr: int, kind: int = BP_SOFTWARE, length: int = 1) -> None:
        """Arm a breakpoint (kind 0/1) or watchpoint (2 write, 3 read, 4 access) at guest-virtual ``addr``."""
        self.call("break", addr=addr, kind=kind, length=length)

    def remove_breakpoint(self, addr: int, kind: int = BP_SOFTWARE, length: int = 1) -> None:
        """Disarm one breakpoint or watchpoint."""
        self.call("unbreak", addr=addr, kind=kind, length=length)

    def cont(self) -> None:
        """Let the guest run."""
        self.call("cont")

    def wait_stop(self, timeout: float) -> StopEvent | None:
        """The next stop or None after ``timeout``."""
        end = time.monotonic() + timeout
        while True:
            ev = self.call("wait", timeout=max(0.0, min(MAX_WAIT, end - time.monotonic())))
            if ev is not None or time.monotonic() >= end:
                return None if ev is None else _stop_event(ev)

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
        return _stop_event(self.call("step", thread=thread, timeout=timeout,
                                     until_pc_changes=until_pc_changes, max_attempts=max_attempts))

    def interrupt(self) -> StopEvent | None:
        """Stop the guest; the stop it reported, or None if it was not running."""
        ev = self.call("interrupt")
        return None if ev is None else _stop_event(ev)

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
        """Disarm everything and let the guest run (unless it migrated away); waits for the guardian.

        Safe to call twice, and after any error (the guardian cleans up on end-of-file regardless).
        """
        if self._dead is None:
            with contextlib.suppress(AradiaError, OSError):
                self.call("detach")
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # end-of-file for the guardian, whatever else holds the fd
        with contextlib.suppress(OSError):
            self._reader.close()
            self._sock.close()
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
