"""Live migration of a traced VM, driven by aradia, with no guest instruction run unmonitored.

:class:`Migration` moves a VM that a :class:`~aradia.trace.tracer.Tracer` traces from its QEMU (the
source) to a QEMU the operator started with ``-incoming URI`` (or ``-incoming defer``; ``-S`` is
advised) and goes on tracing it there. Measured on QEMU 7.2, and why each step is as it is:

1. **Pre-copy with the probes armed.** The migration runs while the tracer keeps serving hits on the
   source (the driver holds the tracer's lock and runs the hit loop itself; the events it sees are
   queued and yielded, in order, by :meth:`Tracer.events` afterwards). The guardian is told not to step
   aside (:meth:`GuardedStub.drive_migration`).
2. **aradia chooses the switch-over.** QEMU stores the source's run state when the migration thread
   decides to complete, and a source held at a breakpoint then (``debug``) makes the destination abort
   (``invalid runstate transition: 'inmigrate' -> 'debug'``). QEMU completes once what is left to send
   is under its threshold (``downtime-limit`` times the measured bandwidth), which it checks after a
   dirty sync it makes whenever what is left of a pass is under that threshold. While the guest runs
   the driver sets ``downtime-limit`` 0: QEMU then makes no sync at all during the first pass and
   could complete on its own only once the pass has sent everything (it then stops the guest first,
   sends nothing in between, and syncs with the guest stopped). The driver stops the source itself
   *before the first pass ends*, once at most :data:`SLOW_REMAINING` is left in it (slowed down to
   :data:`SLOW_BANDWIDTH` meanwhile, so the stop can get through between hits). No dirty sync with
   the guest running after the one at the setup is what keeps the destination's RAM exact under TCG
   (see :data:`SLOW_REMAINING`); should QEMU have made one all the same, the driver cancels the
   migration rather than risk a stale page. The rest of the first pass and what the guest dirtied
   meanwhile are then sent at full speed with the guest paused. The stop is a QMP ``stop``
   *between* hits: if a hit was
   already pending, the stub reports it instead of the ``stop`` (the VM is in ``debug``), so the
   driver handles that hit (reports it, steps off, resumes) and stops again, until the stub reports
   the ``stop`` itself. A vCPU that raced to a breakpoint meanwhile has not run the instruction: it
   hits again on the destination, once. The ``pause-before-switchover`` capability holds the source
   in ``pre-switchover`` until the driver sends ``migrate-continue``. The stored run state is then
   ``paused``, so the destination stays paused after the migration whether or not it was started
   with ``-S``.
3. **Every probe on the destination before its first instruction.** Same kernel, same KASLR: the
   tracer's addresses hold there. A second guardian holds the destination's stub from before the
   switch-over; once the stop is final the driver arms every probe, every pending return (keyed by
   task and stack pointer: they fire on the destination) and every watchpoint there, waits for the
   migration to complete, swaps the tracer over to the destination (stub, QMP, memory; the kernel
   profile moves with it: nothing is searched again) and only then lets the destination run. The
   source is never resumed; its guardian closes without ``D`` (run state ``postmigrate``), and its QMP
   connection is released.
4. A ``migrated`` marker event (``args``: from, to, paused seconds, QEMU's downtime) goes into the
   event stream between the last event of the source and the first of the destination.

Failure: a migration that fails, is cancelled (:meth:`Migration.cancel`), times out, or whose
destination never comes up raises :class:`~aradia.errors.MigrationFailed` with the source running
and traced as before (resumed if the driver had stopped it; a source QEMU already marked
``postmigrate`` is resumed, under a fresh guardian, only when its destination cannot have the guest:
it died, or never got past ``pre-switchover``); events seen meanwhile are still yielded, in order.

What stays open: should the first pass end before the driver's stop (its tail all zero pages, say),
QEMU completes on its own; if a hit is being handled just then (``debug``), the destination aborts
and the driver resumes the source. Only a change to QEMU (a pause *before* it stores the run state)
would close that. And QEMU's sync at the setup races with the TLB flush that follows it (a vCPU may
refill an entry between the flush and the sync, and write through it after its page was sent): a
window of microseconds, which plain QEMU migrations have too.

Solved (2026-12-05): the destination guests that crashed after a traced migration (slab corruption)
had received a few stale pages: the driver used to stop the source only after QEMU's first pass, so
QEMU had resynchronised its dirty bitmap with the guest running and sent pages that the guest then
wrote again unmarked (TCG; see :data:`SLOW_REMAINING`). The GDB stub, the probe hits and the
single steps were not involved: a QMP-only migration with the same late stop lost pages too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aradia.errors import AradiaError, Migrated, MigrationFailed
from aradia.linux.usersyms import UserSymbols
from aradia.machine.qemu import Qemu
from aradia.proto.qmp import QMPCommandError
from aradia.trace.events import Event
from aradia.trace.guardian import GuardedStub
from aradia.trace.tracer import Tracer
from aradia.vm import VM

#: Bytes/s while the guest runs (QEMU's completion threshold is bandwidth x downtime-limit).
PRECOPY_BANDWIDTH = 64 << 20
#: Bytes/s once the source is stopped: as fast as the channel goes.
FINAL_BANDWIDTH = 64 << 30
#: Stop the source once at most this much RAM is left in the first pass, before it ends. QEMU 7.2's
#: TCG marks a page dirty only on the first write through a TLB entry made while the page was clean;
#: a dirty sync clears the bitmap but not the vCPUs' TLB entries, so after a sync with the guest
#: running, a page sent and then written again through such an entry stays clean: the destination
#: gets it stale (measured: a cred's label word, slab freelist pointers; the guest crashed there).
#: The sync at the setup is followed by a TLB flush; with ``downtime-limit`` 0 QEMU makes no other
#: sync until it completes, and it completes with the guest stopped (by the driver here, or by
#: itself at the end of the first pass). So every page written after it was sent is still marked
#: when QEMU syncs with the guest stopped. (The tail of the first pass may be all zero pages, which
#: QEMU sends in a few ms whatever the bandwidth: the driver may be too late, but then QEMU stops.)
SLOW_REMAINING = 16 << 20
#: Bytes/s from then until the driver's stop is through (4 s for the rest of the first pass).
SLOW_BANDWIDTH = 4 << 20
#: Seconds a hit-loop slice lasts while the driver watches the migration.
POLL = 0.01
#: Seconds to wait for the destination's QMP socket to appear and answer.
DESTINATION_TIMEOUT = 30.0
#: SIGINT: the stop reply QEMU's stub sends when QMP ``stop`` paused a running VM.
SIGINT = 2
_DONE = ("completed", "failed", "cancelled")


@dataclass
class MigrationResult:
    """What a migration did: where to, how long, and how long the guest did not run."""

    source: str
    destination: str
    uri: str
    status: str
    total: float  # seconds from ``migrate`` to the destination running
    paused: float  # seconds from the source's stop to the destination's resume (host clock)
    qemu_downtime_ms: int | None  # QEMU's own figure (``query-migrate`` ``downtime``)
    events_during: int  # events the source reported while the migration ran
    source_registers: dict[int, dict[str, int]] = field(default_factory=dict)  # right after the stop
    stopped_by: str = "aradia"  # "aradia" (QMP stop between hits) or "qemu" (it converged by itself)

    def as_dict(self) -> dict[str, Any]:
        """As JSON-able data (the CLI's and the service's answer)."""
        out = dataclasses.asdict(self)
        del out["source_registers"]
        return out


def qmp_path(spec: str) -> str:
    """The QMP socket path of ``qmp:PATH`` (or a bare path)."""
    return spec[4:] if spec.startswith("qmp:") else spec


def open_destination(spec: str, timeout: float = DESTINATION_TIMEOUT) -> Qemu:
    """Connect to the destination QEMU's QMP socket, waiting up to ``timeout`` for it to come up; it
    must be waiting for an incoming migration (run state ``inmigrate``)."""
    path = qmp_path(spec)
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        try:
            dst = Qemu(path)
            break
        except (AradiaError, OSError) as e:
            last = e
        if time.monotonic() >= deadline:
            raise MigrationFailed(f"the destination {spec} did not come up within {timeout:.0f} s ({last}); "
                                  "the source was not touched")
        time.sleep(0.1)
    state = dst.status()
    if state != "inmigrate":
        dst.close()
        raise MigrationFailed(f"the destination {spec} is not waiting for an incoming migration (run state "
                              f"{state}); start it with the source's options plus -incoming URI (and -S)")
    return dst


def incoming_uri(dst: Qemu) -> str:
    """The URI a destination QEMU listens on (its ``-incoming`` argument, unless ``defer``)."""
    args = dst.cmdline()
    uri = next((b for a, b in itertools.pairwise(args) if a == "-incoming"), None)
    if uri is None or uri == "defer":
        raise MigrationFailed("give the migration URI: the destination's command line does not say "
                              "where it listens" + (" (-incoming defer)" if uri == "defer" else ""))
    return uri


def _deferred(dst: Qemu) -> bool:
    """Whether the destination was started with ``-incoming defer`` (it waits for ``migrate-incoming``)."""
    args = dst.cmdline()
    return any(a == "-incoming" and b == "defer" for a, b in itertools.pairwise(args))


class Migration:
    """One live migration of the VM ``tracer`` traces to the QEMU at ``destination`` (``qmp:PATH``),
    over ``uri`` (``unix:PATH``, ``tcp:HOST:PORT``). :meth:`run` drives it (see the module docstring).

    ``timeout`` bounds the whole migration; :meth:`cancel` (from any thread) cancels it mid-way.
    ``uri`` None takes the destination's own ``-incoming`` argument.
    """

    def __init__(self, tracer: Tracer, destination: str, uri: str | None, *, timeout: float = 120.0,
                 bandwidth: int = PRECOPY_BANDWIDTH, destination_timeout: float = DESTINATION_TIMEOUT,
                 keep_vm: bool = False, labels: tuple[str, str] | None = None,
                 before_resume: Callable[[VM], object] | None = None) -> None:
        if tracer.vm.machine is None:
            raise AradiaError("only a live VM can be migrated")
        self.tracer = tracer
        self.destination = destination
        self.uri = uri
        self.timeout = timeout
        self.bandwidth = bandwidth
        self.destination_timeout = destination_timeout
        #: the caller takes over the destination's VM handle (else the tracer closes it when it closes)
        self.keep_vm = keep_vm
        #: what the ``migrated`` marker calls source and destination (default: host:QMP path)
        self.labels = labels
        #: called with the destination's VM after the switch-over, before its first instruction
        self.before_resume = before_resume
        self._cancel = threading.Event()
        self._events: list[Event] = []
        self._stopped_at: float | None = None
        self._stopped_by = "aradia"
        self._destination_gone = False
        self._continued = False  # migrate-continue sent: the destination may have the whole guest
        self._unsafe_sync = False  # QEMU resynchronised its dirty bitmap while the source ran
        self._regs: dict[int, dict[str, int]] = {}
        self.status = "none"  # QEMU's migration status, as last seen
        self.info: dict[str, Any] = {}  # QEMU's last query-migrate answer

    def cancel(self) -> None:
        """Cancel the migration (QMP ``migrate_cancel``) if it has not switched over yet."""
        self._cancel.set()

    # --- the hit loop, run by the driver -----------------------------------------------------------
    def _serve(self, timeout: float) -> None:
        """Serve probe hits on the source for up to ``timeout``; their events are kept in order."""
        tr = self.tracer
        ev = tr._next(timeout)
        if ev is not None:
            self._events.append(ev)
        self._events.extend(tr._queued)
        tr._queued = []

    def _handle_stop(self, stop: Any) -> None:
        """A stop reply that is a probe hit: handled as the tracer's loop would (reported, stepped off,
        resumed)."""
        tr = self.tracer
        thread = stop.thread
        tr._stopped = True
        regs = tr.stub.registers(thread)
        try:
            ev = (tr._watch_event(stop, thread, regs) if stop.watch_address is not None
                  else tr._handle(thread, regs))
        finally:
            tr._resume(thread, regs)
        if ev is not None:
            self._events.append(ev)
        self._events.extend(tr._queued)
        tr._queued = []

    def _stop_source(self, src: Qemu) -> None:
        """QMP ``stop`` between hits: until QEMU's stub says the ``stop`` (not a hit) stopped the VM."""
        tr = self.tracer
        for _attempt in range(1000):
            src.pause()
            stop = tr.stub.wait_stop(5.0)
            if stop is None:
                raise MigrationFailed("the source's GDB stub reported no stop after QMP stop")
            if stop.kind == "signal" and stop.signal == SIGINT and stop.watch_address is None:
                regs = tr.stub.registers(stop.thread)
                if tr.probes.get(regs.get("rip", -1)) is None and regs.get("rip") not in tr._returns:
                    tr._stopped = True
                    return
            self._handle_stop(stop)  # a hit came first: report it, step off, resume; stop again
        raise MigrationFailed("could not stop the source between two probe hits")

    # --- driving ------------------------------------------------------------------------------------
    def run(self) -> MigrationResult:
        """Drive the migration to its end: the tracer then traces the destination. Raises
        :class:`MigrationFailed` (the source running and traced as before) when it does not complete."""
        tr = self.tracer
        src = tr.vm.machine
        assert src is not None
        dst = open_destination(self.destination, self.destination_timeout)
        try:
            if self.uri is None:
                self.uri = incoming_uri(dst)
            new_vm = self._destination_vm(dst)
        except BaseException:
            dst.close()
            raise
        try:
            dst_stub = GuardedStub(dst.gdb_address(), was_running=False)
        except BaseException:
            new_vm.close()
            raise
        started = time.monotonic()
        try:
            with tr._lock:
                try:
                    return self._drive(src, new_vm, dst_stub, started)
                finally:
                    # still under the lock: the event loop yields these before anything it sees next
                    tr._queued = [*self._events, *tr._queued]
                    self._events = []
        except BaseException:
            dst_stub.close()
            new_vm.close()
            raise

    def _destination_vm(self, dst: Qemu) -> VM:
        """The destination as a VM handle with the source's kernel profile (same kernel, same KASLR),
        made before the switch-over so none of it counts as downtime."""
        try:
            memory = dst.memory()
        except AradiaError as e:
            raise MigrationFailed(f"cannot read the destination's RAM: {e}") from e
        vm = VM(memory, machine=dst, spec=f"qmp:{dst.path}")
        vm.load_kernel(profile=self.tracer.vm.linux.profile)
        return vm

    def _drive(self, src: Qemu, new_vm: VM, dst_stub: GuardedStub, started: float) -> MigrationResult:
        tr = self.tracer
        uri = str(self.uri)
        dst = new_vm.machine
        assert dst is not None
        qmp = src.qmp
        qmp.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "pause-before-switchover", "state": True},
            {"capability": "events", "state": True}]})
        # downtime-limit 0: no dirty sync while the guest runs (see SLOW_REMAINING)
        qmp.execute("migrate-set-parameters", {"downtime-limit": 0, "max-bandwidth": self.bandwidth})
        if _deferred(dst):
            dst.qmp.execute("migrate-incoming", {"uri": uri})
        tr.stub.drive_migration(True)
        try:
            try:
                qmp.execute("migrate", {"uri": uri})
            except QMPCommandError as e:
                raise MigrationFailed(f"QEMU refused the migration to {uri}: {e}") from e
            self._precopy(src, started)
            self._arm(dst_stub)
            info = self._switch_over(src, started)
            state = self._destination_loaded(dst)
            if state not in ("paused", "prelaunch"):
                raise MigrationFailed(f"the destination is in run state {state} after the migration, "
                                      "not paused: it was not started with -S and QEMU completed on its own")
        except MigrationFailed:
            self._restore(src)
            raise
        except BaseException:
            with contextlib.suppress(AradiaError, OSError):
                self._restore(src)
            raise
        return self._swap(src, new_vm, dst_stub, started, info)

    def _destination_loaded(self, dst: Qemu) -> str:
        """The destination's run state once it loaded the guest (the source says ``completed`` a little
        earlier); MigrationFailed if it exits or stays ``inmigrate``."""
        end = time.monotonic() + self.destination_timeout
        while True:
            try:
                state = dst.status()
            except AradiaError as e:
                self._destination_gone = True
                raise MigrationFailed(f"the destination QEMU was lost at the switch-over ({e}); "
                                      "the source runs on, traced") from e
            if state != "inmigrate":
                return state
            if time.monotonic() > end:
                raise MigrationFailed(f"the destination did not load the guest within "
                                      f"{self.destination_timeout:.0f} s")
            time.sleep(0.0005)

    def _query(self, src: Qemu) -> dict[str, Any]:
        info = dict(src.qmp.execute("query-migrate"))
        self.status = str(info.get("status", "none"))
        self.info = info
        return info

    def _precopy(self, src: Qemu, started: float) -> None:
        """Serve hits while QEMU copies RAM; stop the source at a safe point before the first pass ends
        (see :data:`SLOW_REMAINING`: QEMU must not resynchronise its dirty bitmap while the guest runs)."""
        while True:
            try:
                self._serve(POLL)
            except Migrated:
                self._stopped_by = "qemu"  # it converged by itself with the guest running (T18)
                self._stopped_at = time.monotonic()
                self._converged(src, started)
                return
            info = self._query(src)
            self._check(src, info, started)
            if self.status == "pre-switchover":
                self._stopped_by = "qemu"
                self._stopped_at = time.monotonic()
                self._converged(src, started)
                return
            if self.status != "active":
                continue
            ram = info.get("ram") or {}
            if _syncs(info) >= 2:
                self._unsafe(src, started)
            if int(ram.get("remaining", 1 << 62)) <= SLOW_REMAINING:
                src.qmp.execute("migrate-set-parameters", {"max-bandwidth": SLOW_BANDWIDTH})
                self._stop_source(src)
                self._stopped_at = time.monotonic()
                if _syncs(self._query(src)) >= 2 and self.status == "active":
                    self._unsafe(src, started)  # the first pass ended while the driver was stopping it
                self._regs = src.registers()
                src.qmp.execute("migrate-set-parameters", {"max-bandwidth": FINAL_BANDWIDTH,
                                                           "downtime-limit": 60000})
                return

    def _converged(self, src: Qemu, started: float) -> None:
        """QEMU stopped the guest itself (the first pass sent everything before the driver's stop).
        It made no dirty sync with the guest running, or one at most right before it stopped it
        (nothing sent in between): safe. After more, pages went out with the guest running after a
        sync: cancel (see :meth:`_unsafe`)."""
        if _syncs(self._query(src)) > 2:
            self._unsafe(src, started)

    def _unsafe(self, src: Qemu, started: float) -> None:
        """QEMU resynchronised its dirty bitmap while the source ran (its first pass ended before the
        driver could stop the guest): under TCG, pages it sends from then on may be written again
        without being marked dirty (see :data:`SLOW_REMAINING`), so the destination could get stale
        pages. Cancel: the source runs on, traced."""
        self._cancel.set()
        self._unsafe_sync = True
        self._check(src, self.info, started)

    def _check(self, src: Qemu, info: dict[str, Any], started: float) -> None:
        """Raise MigrationFailed for a failed, cancelled (by QEMU or :meth:`cancel`) or overdue migration."""
        if self.status in ("failed", "cancelled"):
            why = info.get("error-desc", "no reason given")
            raise MigrationFailed(f"the migration {self.status}: {why}; the source runs on, traced")
        why = ("cancelled: QEMU's first pass over RAM ended before the source could be stopped, and "
               "pages sent after that with the guest running could reach the destination stale"
               if self._unsafe_sync else
               "cancelled" if self._cancel.is_set() else
               f"timed out after {self.timeout:.0f} s" if time.monotonic() - started > self.timeout else None)
        if why is not None:
            with contextlib.suppress(QMPCommandError):
                src.qmp.execute("migrate_cancel")
            end = time.monotonic() + 30
            while self._query(src)["status"] not in _DONE and time.monotonic() < end:
                with contextlib.suppress(Migrated):
                    if self._stopped_at is None:
                        self._serve(POLL)
                    else:
                        time.sleep(POLL)
            raise MigrationFailed(f"the migration was {why} (status {self.status}); "
                                  "the source runs on, traced")

    def _arm(self, dst_stub: GuardedStub) -> None:
        """Arm every probe, pending return and watchpoint of the tracer on the destination's stub."""
        tr = self.tracer
        for address in {*tr.probes, *tr._returns}:
            dst_stub.set_breakpoint(address)
        for w in tr.watches.values():
            dst_stub.set_breakpoint(w.address, kind=w.gdb_kind, length=w.length)

    def _switch_over(self, src: Qemu, started: float) -> dict[str, Any]:
        """Wait for ``pre-switchover``, send ``migrate-continue``, wait for ``completed``. A cancel
        counts until ``migrate-continue``; after it the switch-over is ms away and goes through."""
        while True:
            info = self._query(src)
            if self.status == "completed":
                return info
            if self.status in ("failed", "cancelled") or (self._cancel.is_set() and not self._continued):
                self._check(src, info, started)
            if self.status == "pre-switchover" and not self._continued:
                self._continued = True
                src.qmp.execute("migrate-continue", {"state": "pre-switchover"})
            elif time.monotonic() - started > self.timeout:
                self._check(src, info, started)
            time.sleep(0.001)

    def _restore(self, src: Qemu) -> None:
        """After a failed migration: the guardian guards as before, and a source the driver (or QEMU)
        stopped runs again, traced. A source QEMU already marked migrated (``postmigrate``) is resumed
        only when the destination cannot run the guest (it is gone, or never got past
        ``pre-switchover``): the source is then the only copy."""
        tr = self.tracer
        with contextlib.suppress(AradiaError):
            tr.stub.drive_migration(False)
        if self._stopped_at is None:
            return  # never stopped: it runs, traced
        state = src.status()
        if state == "paused":
            tr.stub.cont()
            tr._stopped = False
        elif state in ("postmigrate", "finish-migrate") and (self._destination_gone or not self._continued):
            self._rehome(src)  # (before migrate-continue the destination never got the device state)

    def _rehome(self, src: Qemu) -> None:
        """Resume a ``postmigrate`` source whose destination died, under a fresh guardian (the old one
        refuses, rightly, to resume a migrated VM) with every probe armed again."""
        tr = self.tracer
        with contextlib.suppress(AradiaError):
            tr.stub.close()  # postmigrate: disarms and closes without D
        src.resume()  # QMP cont: postmigrate -> running
        stub = GuardedStub(src.gdb_address(), was_running=True)
        tr.stub = stub
        self._arm(stub)
        tr._stopped = False

    def _swap(self, src: Qemu, new_vm: VM, dst_stub: GuardedStub, started: float,
              info: dict[str, Any]) -> MigrationResult:
        """The tracer moves to the destination (stub, QMP, memory, same kernel profile); it runs."""
        tr = self.tracer
        dst = new_vm.machine
        assert dst is not None
        old_vm, old_stub = tr.vm, tr.stub
        with contextlib.suppress(AttributeError):
            old_vm.machine.qmp.off_event(tr._on_qmp_event)
        tr.vm, tr.stub = new_vm, dst_stub
        if tr._userspace is not None:
            tr._userspace.prog = new_vm.linux.prog
            tr._userspace.syms = UserSymbols(new_vm.linux.prog)
        dst.qmp.on_event(tr._on_qmp_event)
        if not self.keep_vm:
            tr._closers.append(new_vm.close)
        now = time.monotonic()
        paused = now - (self._stopped_at or now)
        host = socket.gethostname()
        frm, to = self.labels or (f"{host}:{src.path}", f"{host}:{dst.path}")
        marker = Event(now, -1, "migrated", "migrated", args={
            "from": frm, "to": to, "from_host": host, "to_host": host,
            "paused": round(paused, 6), "qemu_downtime_ms": info.get("downtime")})
        self._events.append(marker)
        if self.before_resume is not None:
            self.before_resume(new_vm)  # (its errors propagate: the destination stays paused, the source too)
        dst_stub.cont()  # the destination's first instruction, with every probe armed
        tr._stopped = False
        resumed = time.monotonic()
        old_stub.close()  # postmigrate: the guardian disarms and closes without D
        with contextlib.suppress(Exception):
            old_vm.close()  # releases the source's QMP socket
        return MigrationResult(f"qmp:{src.path}", f"qmp:{dst.path}", str(self.uri), "completed",
                               resumed - started,
                               resumed - (self._stopped_at or resumed), _int(info.get("downtime")),
                               len(self._events) - 1, self._regs, self._stopped_by)


def _syncs(info: dict[str, Any]) -> int:
    """QEMU's dirty-bitmap synchronisations so far (``ram.dirty-sync-count``; the first is at setup)."""
    return int((info.get("ram") or {}).get("dirty-sync-count", 0))


def _int(v: object) -> int | None:
    return int(v) if isinstance(v, int | float) else None


def migrate(tracer: Tracer, destination: str, uri: str | None, **kw: Any) -> MigrationResult:
    """Migrate the VM ``tracer`` traces to ``destination`` (``qmp:PATH``) over ``uri`` and go on tracing
    it there (see :class:`Migration`); :class:`MigrationFailed` leaves it traced on the source."""
    return Migration(tracer, destination, uri, **kw).run()


__all__ = ["Migration", "MigrationResult", "incoming_uri", "migrate", "open_destination", "qmp_path"]
