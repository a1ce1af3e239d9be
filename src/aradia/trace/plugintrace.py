"""Syscall tracing inside QEMU: aradia's TCG plugin writes the events, the VM never stops.

Where the VM's QEMU runs aradia's plugin (``-plugin …/counter-*.so,shm=PATH``) and its plugin API reads
registers and guest memory (QEMU >= 9.2, :attr:`~aradia.trace.pluginshm.PluginStatus.syscall_args`),
:class:`PluginSyscallTrace` points plugin target slots at the ``__x64_sys_NAME`` entries as *event*
targets: at every call the plugin reads the current task (pid, tgid, uid, comm; field offsets from
BTF), applies the filter (pids/tgids, uids, comms) and writes one record with the six arguments and
the guest memory behind the pointer arguments (the path, the argv array and its strings, the first
bytes of a buffer or sockaddr, each bounded) to its vCPU's ring in the shared file. Here each record
is decoded by the same :func:`aradia.trace.syscalls.decode` the stop path uses, reading from the
captured regions instead of guest memory, into the same :class:`~aradia.trace.events.Event`.

A ring that overflows loses the oldest records; :attr:`PluginSyscallTrace.lost` counts them exactly
(records written = read + lost). :func:`plugin_path_problem` says why a trace cannot take this path
(then the stop path, :class:`~aradia.trace.tracer.Tracer`, serves it).
"""

from __future__ import annotations

import contextlib
import struct
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import drgn

from aradia.errors import AradiaError, GuestDataCorrupt
from aradia.linux.kernel import LinuxVM
from aradia.trace import syscalls
from aradia.trace.events import Event
from aradia.trace.pluginload import plugin_shm_path, retranslate
from aradia.trace.pluginshm import FILTER_MAX, ArgCapture, PluginShm
from aradia.trace.probes import Filter
from aradia.trace.tracer import SYSCALL_EXITS, gone_reason

#: Pointer arguments whose memory a record carries: (argument, bytes (0: a NUL-terminated string),
#: argv argument or None) by syscall; other syscalls carry their six numbers only.
MEMORY = {"execve": (0, 0, 1), "execveat": (1, 0, 2), "openat": (1, 0, None), "openat2": (1, 0, None),
          "open": (0, 0, None), "connect": (1, 64, None), "bind": (1, 64, None), "write": (1, 64, None),
          "pwrite64": (1, 64, None)}
#: Syscalls whose results exist only at their return (the stop path breaks there): not served here.
NEEDS_RETURN = frozenset(SYSCALL_EXITS)

#: Where a vCPU's current task, or its comm, pid (exec) or credentials change: while plugin targets
#: mark all of them, each vCPU keeps its task's identity and the filter's verdict between them.
SWITCH_HOOKS = ("__switch_to", "__set_task_comm", "commit_creds")

_RECORD = struct.Struct("<QQIIiiII16s6Q")  # counter.c struct event up to data
_REGION = struct.Struct("<QH")
_EV_ARGS, _EV_TASK, _EV_TRUNC = 1, 2, 4
_POLL = 0.02


class CapturedMemory:
    """Guest memory as the plugin captured it with one event: (address, bytes) regions.

    ``read(addr, n)`` serves reads that start inside a region, with at most what the region holds
    from there (a string's reader looks for the NUL); anything else is unreadable (GuestDataCorrupt),
    as an unmapped page is to the stop path.
    """

    def __init__(self, regions: Sequence[tuple[int, bytes]]) -> None:
        self.regions = list(regions)

    def read(self, addr: int, size: int) -> bytes:
        """Up to ``size`` captured bytes at ``addr``; GuestDataCorrupt if none were captured there."""
        for start, data in self.regions:
            if start <= addr < start + len(data):
                return data[addr - start:addr - start + size]
        raise GuestDataCorrupt(f"{addr:#x} was not captured with the event")


def parse_record(raw: bytes) -> tuple[dict[str, Any], CapturedMemory]:
    """The fields of one event record (see ``counter.c``, ``struct event``) and its captured memory."""
    (time_ns, seq, target, status, pid, tgid, uid, data_len, comm, *args) = _RECORD.unpack_from(raw)
    regions = []
    at, end = _RECORD.size, _RECORD.size + min(data_len, len(raw) - _RECORD.size)
    while at + _REGION.size <= end:
        addr, n = _REGION.unpack_from(raw, at)
        at += _REGION.size
        if at + n > end:
            raise GuestDataCorrupt(f"event record {seq}: a region runs past the record's data")
        regions.append((addr, raw[at:at + n]))
        at += n
    fields = {"time_ns": time_ns, "seq": seq, "target": target, "status": status, "pid": pid, "tgid": tgid,
              "uid": -1 if uid == 0xFFFFFFFF else uid, "args": args,
              "comm": comm.split(b"\0", 1)[0].decode(errors="replace")}
    return fields, CapturedMemory(regions)


def current_task_offset(vm: LinuxVM) -> int | None:
    """Per-CPU offset of the current task pointer (``current_task``, or in ``pcpu_hot`` from 6.2)."""
    prof = vm.linux.profile
    off = prof.symbol("current_task")
    if off is None:
        base = prof.symbol("pcpu_hot")
        if base is None:
            return None
        off = base + drgn.offsetof(vm.linux.prog.type("struct pcpu_hot"), "current_task")
    return int(off)


def plugin_path_problem(vm: LinuxVM, names: Sequence[str], flt: Filter | None = None) -> str | None:
    """Why syscalls ``names`` (filter ``flt``) cannot be traced inside this VM's QEMU; None if they can."""
    if vm.machine is None or not vm.machine.pid:
        return "not a live local QEMU"
    try:
        path = plugin_shm_path(vm.machine.pid)
    except AradiaError as exc:
        return str(exc)
    if path is None:
        return "this QEMU was started without aradia's plugin (-plugin …/counter-*.so,shm=…)"
    returns = sorted(set(names) & NEEDS_RETURN)
    if returns:
        return f"{', '.join(returns)} report results at their return, which only the stop path sees"
    if flt is not None:
        for what, values in (("pids", flt.pids), ("uids", flt.uids), ("comms", flt.comms)):
            if values and len(values) > FILTER_MAX:
                return f"the plugin's filter holds at most {FILTER_MAX} {what}"
        if flt.comms and any(len(c.encode()) > 15 for c in flt.comms):
            return "a comm longer than 15 bytes never matches a task"
    try:
        shm = PluginShm.open(path)
    except AradiaError as exc:
        return str(exc)
    try:
        status = shm.status()
        if status.pid == 0:
            return f"the plugin has not mapped {path} (not loaded?)"
        if not status.syscall_args:
            return (f"this QEMU's plugin API (version {status.qemu_api}) cannot read registers and guest "
                    "memory (QEMU >= 9.2 can)")
        if not status.task:
            return "the plugin found no gs_base register: it cannot tell an event's task"
        if shm.event_slots():
            return "another syscall trace holds the plugin's event filter"
        if len([t for t in shm.targets() if t is None]) < len(set(names)) + len(SWITCH_HOOKS):
            return "too few free plugin target slots"
    finally:
        shm.close()
    return None


@dataclass
class PluginSyscallTrace:
    """Syscalls with decoded arguments, written by the plugin inside QEMU (no VM stop per event)."""

    vm: LinuxVM
    names: list[str]
    shm: PluginShm
    slots: dict[int, str] = field(default_factory=dict)
    addresses: dict[str, int] = field(default_factory=dict)
    switch_slots: list[int] = field(default_factory=list)
    _lost_reported: int = 0
    _pending: deque[Event] = field(default_factory=deque)
    _on_loss: Callable[[int], object] | None = None
    _gone: str | None = None  # why the traced guest is gone (reset, shutdown)

    @classmethod
    def open(cls, vm: LinuxVM, names: Sequence[str], flt: Filter | None = None) -> PluginSyscallTrace:
        """Arm ``names`` as plugin event targets with ``flt`` applied inside QEMU; AradiaError with the
        reason when this VM's QEMU cannot serve them (see :func:`plugin_path_problem`)."""
        names = list(dict.fromkeys(names))
        if not names:
            raise AradiaError("nothing to trace: give at least one syscall")
        vm.load_kernel()
        problem = plugin_path_problem(vm, names, flt)
        if problem is not None:
            raise AradiaError(f"the plugin path cannot serve this trace: {problem}")
        assert vm.machine is not None
        path = plugin_shm_path(vm.machine.pid)
        assert path is not None
        prog = vm.linux.prog
        addresses = {}
        for name in names:
            addr = vm.linux.profile.symbol(f"__x64_sys_{name}")
            if addr is None:
                raise AradiaError(f"no syscall entry __x64_sys_{name} in this kernel")
            addresses[name] = int(addr)
        current = current_task_offset(vm)
        if current is None:
            raise AradiaError("the kernel has neither current_task nor pcpu_hot: no task for events")
        task, cred = prog.type("struct task_struct"), prog.type("struct cred")
        self = cls(vm, names, PluginShm.open(path), addresses=addresses)
        vm.machine.qmp.on_event(self._on_qmp_event)
        try:
            self.shm.set_event_task(current, drgn.offsetof(task, "pid"), drgn.offsetof(task, "tgid"),
                                    drgn.offsetof(task, "comm"), drgn.offsetof(task, "real_cred"),
                                    drgn.offsetof(cred, "uid"))
            flt = flt or Filter()
            self.shm.set_event_filter(sorted(flt.pids or ()), sorted(flt.uids or ()), sorted(flt.comms or ()))
            free = [i for i, t in enumerate(self.shm.targets()) if t is None]
            changed: set[int] = set()
            hooks = [int(a) for a in map(vm.linux.profile.symbol, SWITCH_HOOKS) if a is not None]
            cache = len(hooks) == len(SWITCH_HOOKS)
            for addr in hooks if cache else []:
                slot = free.pop(0)
                self.switch_slots.append(slot)
                changed.update(self.shm.set_target(slot, addr, log=False, switch=True))
            for name, slot in zip(names, free, strict=False):
                data_arg, data_len, argv_arg = MEMORY.get(name, (None, 1, None))
                capture = ArgCapture.syscall(prog, data_arg=data_arg, data_len=data_len, argv_arg=argv_arg)
                self.slots[slot] = name
                changed.update(self.shm.set_target(slot, addresses[name], args=capture, event=True))
            retranslate(vm.machine, changed)
            if cache:  # the switch targets are in every translation from here on
                self.shm.set_event_filter(sorted(flt.pids or ()), sorted(flt.uids or ()),
                                          sorted(flt.comms or ()), cache_task=True)
        except BaseException:
            self.close()
            raise
        return self

    def _on_qmp_event(self, ev: Any) -> None:
        self._gone = gone_reason(ev) or self._gone  # the stop path's words

    @property
    def lost(self) -> int:
        """Events the plugin wrote that its ring overwrote before aradia read them (exact)."""
        return self.shm.lost_events

    def calls(self) -> int:
        """Calls of the traced syscalls the plugin saw (before its filter) since the trace began."""
        return sum(self.shm.count(slot) for slot in self.slots)

    def _decode(self, vcpu: int, raw: bytes) -> Event | None:
        fields, memory = parse_record(raw)
        name = self.slots.get(fields["target"])
        if name is None:
            return None  # a slot this trace does not own (freed meanwhile)
        ev = Event(fields["time_ns"] / 1e9, vcpu, "syscall", name)
        if fields["status"] & _EV_TASK:
            ev.pid, ev.tgid, ev.comm, ev.uid = fields["pid"], fields["tgid"], fields["comm"], fields["uid"]
        if fields["status"] & _EV_ARGS:
            ev.args = syscalls.decode(name, list(fields["args"]), memory.read)
            if fields["status"] & _EV_TRUNC:
                ev.args["truncated"] = True  # a bound of the plugin's capture cut a string or argv
        return ev

    def _fetch(self) -> None:
        """Move the records written since the last fetch into the pending events (host-time order),
        and report new losses to the ``on_loss`` callback, before any of these events is handed out."""
        events = [ev for vcpu, raw in self.shm.drain_events() if (ev := self._decode(vcpu, raw)) is not None]
        events.sort(key=lambda e: e.time)
        self._pending.extend(events)
        if self._on_loss is not None and self.lost > self._lost_reported:
            self._on_loss(self.lost - self._lost_reported)
        self._lost_reported = self.lost

    def drain(self) -> list[Event]:
        """The events not handed out yet (also those :meth:`events` fetched but had not yielded when
        its consumer stopped, e.g. at Ctrl-C), in host-time order."""
        self._fetch()
        out = list(self._pending)
        self._pending.clear()
        return out

    def events(self, duration: float | None = None, until: Callable[[], bool] | None = None,
               on_loss: Callable[[int], object] | None = None) -> Iterator[Event]:
        """Yield events for ``duration`` seconds, until ``until()`` says stop, or forever.
        ``on_loss(n)`` is called with each new number of events lost to ring overflow (also by a
        later :meth:`drain`)."""
        qemu = self.vm.machine
        assert qemu is not None
        self._on_loss = on_loss
        end = None if duration is None else time.monotonic() + duration
        while True:
            stop = (end is not None and time.monotonic() >= end) or (until is not None and until())
            self._fetch()
            while self._pending:
                yield self._pending.popleft()
            if stop:
                return
            if self._gone is not None:
                raise AradiaError(self._gone)
            if not qemu.qmp.alive:
                raise AradiaError("QEMU exited while tracing")
            time.sleep(_POLL)

    def close(self) -> None:
        """Free the plugin slots (and re-translate them), clear the filter and unmap."""
        if self.vm.machine is not None:
            self.vm.machine.qmp.off_event(self._on_qmp_event)
        changed: set[int] = set()
        with contextlib.suppress(AradiaError):
            self.shm.set_event_filter()  # no cached task first: the switch targets go next
        for slot in [*self.slots, *self.switch_slots]:
            with contextlib.suppress(AradiaError):
                changed.update(self.shm.set_target(slot, None))
        self.slots.clear()
        self.switch_slots.clear()
        if changed and self.vm.machine is not None:
            with contextlib.suppress(AradiaError):
                retranslate(self.vm.machine, changed)
        self.shm.close()

    def __enter__(self) -> PluginSyscallTrace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["MEMORY", "NEEDS_RETURN", "SWITCH_HOOKS", "CapturedMemory", "PluginSyscallTrace",
           "current_task_offset", "parse_record", "plugin_path_problem"]
