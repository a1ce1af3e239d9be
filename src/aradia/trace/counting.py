"""Counting calls of kernel functions: inside the hypervisor when possible, through breakpoints when not.

A count needs no arguments and no stop, so it is the case for the fast path: when the VM's QEMU was
started with aradia's TCG plugin (``-plugin …/counter-*.so,shm=PATH``, see
:mod:`aradia.trace.pluginload` and ``launch(plugins=…)``), :class:`CallCounter` maps that shared file
(:mod:`aradia.trace.pluginshm`), points free target slots at the functions and makes TCG re-translate
them; the guest never stops. Otherwise (an unpatched QEMU, or KVM) it falls back to GDB-stub
breakpoints through the guardian: exact too, but every call stops all vCPUs. :attr:`CallCounter.path`
says which one is in use.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from aradia.errors import AradiaError
from aradia.linux.kernel import LinuxVM


@dataclass
class Count:
    """Calls of one function since counting began."""

    symbol: str
    address: int
    count: int


@dataclass
class CallCounter:
    """Counts calls of kernel functions on a live VM (``vm`` from :func:`aradia.attach`)."""

    vm: LinuxVM
    symbols: list[str]
    path: str = ""  # "plugin" or "gdb"
    addresses: dict[str, int] = field(default_factory=dict)
    _shm: Any = None
    _slots: dict[str, int] = field(default_factory=dict)
    _tracer: Any = None
    _counts: dict[str, int] = field(default_factory=dict)
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _error: BaseException | None = None
    #: calls counted by the QEMUs this count has migrated away from (plugin path)
    carried: dict[str, int] = field(default_factory=dict)
    _owned_vm: Any = None  # the VM handle of a migration's destination, closed with the counter

    @classmethod
    def open(cls, vm: LinuxVM, symbols: list[str], *, fast: bool | None = None) -> CallCounter:
        """Start counting ``symbols``; ``fast`` True requires the plugin, False forces breakpoints,
        None (default) takes the plugin when the VM's QEMU has it."""
        from aradia.trace.pluginload import plugin_shm_path

        if vm.machine is None:
            raise AradiaError("counting calls needs a live VM (qmp:PATH), not a dump")
        if not symbols:
            raise AradiaError("nothing to count: give at least one kernel function")
        linux = vm.load_kernel()
        self = cls(vm, list(dict.fromkeys(symbols)))
        for sym in self.symbols:
            addr = linux.profile.symbol(sym)
            if addr is None:
                raise AradiaError(f"no kernel symbol {sym!r}")
            self.addresses[sym] = int(addr)
        shm_path = plugin_shm_path(vm.machine.pid) if fast is not False and vm.machine.pid else None
        if shm_path is None and fast:
            raise AradiaError("the fast path needs a QEMU started with aradia's plugin (launch(plugins=...))")
        if shm_path is not None:
            self._start_plugin(shm_path)
        else:
            self._start_gdb()
        return self

    # --- the plugin --------------------------------------------------------------------------------
    def _start_plugin(self, shm_path: Any) -> None:
        from aradia.trace.pluginshm import PluginShm

        shm = PluginShm.open(shm_path)
        try:
            if not shm.loaded:
                raise AradiaError(f"the plugin of this QEMU has not mapped {shm_path} (not loaded?)")
            free = [i for i, t in enumerate(shm.targets()) if t is None]
            if len(free) < len(self.symbols):
                raise AradiaError(f"the plugin has {len(free)} free target slots, {len(self.symbols)} needed")
            changed: set[int] = set()
            for sym, slot in zip(self.symbols, free, strict=False):
                self._slots[sym] = slot
                # the callback counter, per vCPU: QEMU 7.2's inline counter is one non-atomic add
                # shared by all vCPUs, inexact with several
                changed.update(shm.set_target(slot, self.addresses[sym], log=False))
            self._shm = shm
            self._retranslate(changed)
        except BaseException:
            for slot in self._slots.values():
                with contextlib.suppress(AradiaError):
                    shm.set_target(slot, None)
            shm.close()
            self._shm = None
            raise
        self.path = "plugin"

    def _retranslate(self, addresses: set[int]) -> None:
        """TCG instruments code when it translates it: redo the translations of ``addresses``."""
        from aradia.trace.pluginload import retranslate

        assert self.vm.machine is not None  # open() refuses a dump
        retranslate(self.vm.machine, addresses)

    # --- breakpoints -------------------------------------------------------------------------------
    def _start_gdb(self) -> None:
        from aradia.trace.tracer import Tracer

        tracer = Tracer.open(self.vm)
        try:
            for sym in self.symbols:
                tracer.add_kprobe(sym, count_only=True)
                self._counts[sym] = 0
        except BaseException:
            tracer.close()
            raise
        self._tracer = tracer
        self._thread = threading.Thread(target=self._run_gdb, name="aradia-count", daemon=True)
        self._thread.start()
        self.path = "gdb"

    def _run_gdb(self) -> None:
        try:
            for ev in self._tracer.events(until=self._stop.is_set):
                self._counts[ev.name] = self._counts.get(ev.name, 0) + 1
        except BaseException as e:  # reported by counts()/close()
            self._error = e

    # --- results -----------------------------------------------------------------------------------
    def counts(self) -> list[Count]:
        """Calls of each function so far."""
        if self._error is not None:
            raise AradiaError(f"counting stopped: {self._error}") from self._error
        if self._shm is not None:
            return [Count(s, self.addresses[s], self.carried.get(s, 0) + self._shm.count(self._slots[s]))
                    for s in self.symbols]
        return [Count(s, self.addresses[s], self._counts.get(s, 0)) for s in self.symbols]

    def run(self, duration: float | None) -> list[Count]:
        """Count for ``duration`` seconds (None: until KeyboardInterrupt) and return the counts: every
        call the guest made before the end is in them."""
        end = None if duration is None else time.monotonic() + duration
        with contextlib.suppress(KeyboardInterrupt):
            while end is None or time.monotonic() < end:
                time.sleep(0.1 if end is None else max(0.0, min(0.1, end - time.monotonic())))
                if self._error is not None:
                    break
        self._stop_gdb_loop()
        return self.counts()

    def _stop_gdb_loop(self) -> None:
        """Stop taking breakpoint hits and wait for the hit in hand to be tallied.

        The event loop lets the guest go on before it hands the hit over, so a call the guest has
        already returned from may not be counted yet: reading the counts at that moment lost the last
        call of a burst that ended just before Ctrl-C. A hit after this waits (the VM stays at the
        breakpoint) until :meth:`close` disarms.
        """
        if self._thread is not None:
            self._stop.set()
            self._thread.join(10)

    # --- live migration ------------------------------------------------------------------------------
    def migrate(self, destination: str, uri: str | None, **kw: Any) -> Any:
        """Live-migrate the VM to ``destination`` (``qmp:PATH``; see
        :class:`aradia.trace.migration.Migration`) and count on there: the counts go on from where the
        source left them (source + destination = total). On the plugin path the destination must have
        been started with aradia's plugin too: its targets are set before its first instruction (a
        fresh QEMU has translated nothing yet, so no re-translation is needed). Returns the
        :class:`~aradia.trace.migration.MigrationResult`."""
        from aradia.trace.migration import Migration

        if self._tracer is not None:  # breakpoints: the tracer's own migration carries them over
            result = Migration(self._tracer, destination, uri, **kw).run()
            self.vm = self._tracer.vm
            return result
        if self._shm is None:
            raise AradiaError("the counter is closed")
        from aradia.trace.migration import open_destination
        from aradia.trace.pluginload import plugin_shm_path
        from aradia.trace.pluginshm import PluginShm
        from aradia.trace.tracer import Tracer

        probe = open_destination(destination, kw.get("destination_timeout", 30.0))
        try:
            dst_shm = plugin_shm_path(probe.pid) if probe.pid else None
        finally:
            probe.close()
        if dst_shm is None:
            raise AradiaError("the destination QEMU has no aradia plugin: the count could not go on there "
                              "(start it with the same -plugin as the source)")
        new_shm = PluginShm.open(dst_shm)
        hand_over: dict[str, int] = {}

        def before_resume(_vm: Any) -> None:  # the source is stopped: its counts are final
            for sym in self.symbols:
                hand_over[sym] = self.carried.get(sym, 0) + self._shm.count(self._slots[sym])
            free = [i for i, t in enumerate(new_shm.targets()) if t is None]
            if len(free) < len(self.symbols):
                raise AradiaError(f"the destination's plugin has {len(free)} free target slots, "
                                  f"{len(self.symbols)} needed")
            for sym, slot in zip(self.symbols, free, strict=False):
                new_shm.set_target(slot, self.addresses[sym], log=False)
                hand_over[f"slot:{sym}"] = slot

        tracer = Tracer.open(self.vm)  # nothing armed: the safe stop and hand-over of any migration
        try:
            result = Migration(tracer, destination, uri, keep_vm=True, before_resume=before_resume,
                               **kw).run()
        except BaseException:
            tracer.close()
            new_shm.close()
            raise
        tracer.close()
        old_shm, self._shm = self._shm, new_shm
        with contextlib.suppress(AradiaError):
            old_shm.close()
        self.carried = {s: hand_over[s] for s in self.symbols}
        self._slots = {s: hand_over[f"slot:{s}"] for s in self.symbols}
        if self._owned_vm is not None:
            with contextlib.suppress(Exception):
                self._owned_vm.close()
        self.vm = self._owned_vm = tracer.vm
        return result

    def close(self) -> None:
        """Stop counting: free the plugin slots (and re-translate), or disarm the breakpoints."""
        if self._shm is not None:
            changed: set[int] = set()
            for slot in self._slots.values():
                with contextlib.suppress(AradiaError):
                    changed.update(self._shm.set_target(slot, None))
            with contextlib.suppress(AradiaError):
                self._retranslate(changed)
            self._shm.close()
            self._shm = None
        if self._tracer is not None:
            self._stop_gdb_loop()
            self._tracer.close()
            self._tracer = None
        if self._owned_vm is not None:
            with contextlib.suppress(Exception):
                self._owned_vm.close()
            self._owned_vm = None

    def __enter__(self) -> CallCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
