"""Breakpoint probes on a live VM: kernel function entry and return, and syscalls with decoded arguments.

All probes go through one :class:`~aradia.trace.guardian.GuardedStub` per VM (QEMU's stub serves one
client), so whatever happens to the tracing process the guest is left running with nothing armed.
A hit stops every vCPU (all-stop); the tracer reads the registers, identifies the task from the
vCPU's per-CPU ``current_task``, decodes arguments from guest memory, steps the vCPU off the
breakpoint and lets the guest run again.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import drgn

from aradia.errors import AradiaError
from aradia.trace import syscalls
from aradia.trace.events import Event
from aradia.trace.guardian import GuardedStub

ARG_REGS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")
NOP5 = bytes.fromhex("0f1f440000")
ENDBR64 = bytes.fromhex("f30f1efa")


@dataclass
class Probe:
    """One armed probe."""

    kind: str  # "kprobe" or "syscall"
    name: str
    address: int
    ret: bool = False
    #: Bytes to skip instead of single-stepping (the 5-byte ftrace NOP at function entry).
    skip: int = 0


@dataclass
class Filter:
    """Which events to keep (None: any)."""

    pids: set[int] | None = None
    comms: set[str] | None = None
    uids: set[int] | None = None

    def keep(self, ev: Event) -> bool:
        """Whether ``ev`` passes."""
        return ((self.pids is None or ev.tgid in self.pids or ev.pid in self.pids)
                and (self.comms is None or ev.comm in self.comms)
                and (self.uids is None or ev.uid in self.uids))


@dataclass
class _Pending:
    """A return we wait for: the probe, the task and the stack pointer the return will leave.

    Keyed by task, not vCPU: a task may sleep in the function and return on another vCPU.
    """

    probe: Probe
    task: int
    rsp_after: int
    entry_time: float


@dataclass
class Tracer:
    """Probes on one live VM (``vm`` from :func:`aradia.attach`), events through :meth:`events`."""

    vm: Any
    stub: GuardedStub
    probes: dict[int, Probe] = field(default_factory=dict)
    filter: Filter = field(default_factory=Filter)
    _returns: dict[int, list[_Pending]] = field(default_factory=dict)

    @classmethod
    def open(cls, vm: Any) -> Tracer:
        """A tracer on a live VM: finds (or starts) its GDB stub and puts a guardian in front of it."""
        from aradia.machine.gdbstub import gdb_address

        if vm.machine is None:
            raise AradiaError("tracing needs a live VM (qmp:PATH), not a dump")
        vm.load_kernel()
        stub = GuardedStub(gdb_address(vm.machine), was_running=vm.machine.status() == "running")
        return cls(vm, stub)

    # --- probes ------------------------------------------------------------------------------------
    def _symbol(self, name: str) -> int:
        addr = self.vm.linux.profile.symbol(name)
        if addr is None:
            raise AradiaError(f"no kernel symbol {name!r}")
        return int(addr)

    def add_kprobe(self, symbol: str, *, ret: bool = False) -> Probe:
        """Probe kernel function ``symbol`` at entry (argument registers), or at return (``ret``)."""
        return self._arm(Probe("kprobe", symbol, self._symbol(symbol), ret))

    def add_syscall(self, name: str) -> Probe:
        """Probe syscall ``name`` (``execve``, ``openat``, ``connect``...) with decoded arguments."""
        for sym in (f"__x64_sys_{name}", f"__do_sys_{name}", f"sys_{name}"):
            addr = self.vm.linux.profile.symbol(sym)
            if addr is not None:
                return self._arm(Probe("syscall", name, int(addr)))
        raise AradiaError(f"no syscall entry for {name!r} in this kernel")

    def _arm(self, probe: Probe) -> Probe:
        if probe.address in self.probes:
            raise AradiaError(f"{probe.name} is already probed")
        # Single-stepping makes TCG flush all translated code (slow); when the function starts
        # with the 5-byte NOP ftrace leaves there (after ENDBR64 with IBT), break on the NOP and
        # move RIP past it instead: skipping a NOP is exactly executing it.
        with contextlib.suppress(AradiaError):
            head = self.vm.read_virt(probe.address, 9, *self._kernel_root())
            if head[:4] == ENDBR64:
                probe.address += 4
                head = head[4:]
            if head[:5] == NOP5:
                probe.skip = 5
        self.stub.set_breakpoint(probe.address)
        self.probes[probe.address] = probe
        return probe

    def remove(self, probe: Probe) -> None:
        """Disarm one probe (returns already pending still report)."""
        if self.probes.pop(probe.address, None) is not None and probe.address not in self._returns:
            self.stub.remove_breakpoint(probe.address)

    def _kernel_root(self) -> tuple[int, bool]:
        prof = self.vm.linux.profile
        return prof.kernel_root, prof.la57

    # --- the task on a vCPU ------------------------------------------------------------------------
    def _current(self, regs: dict[str, int]) -> drgn.Object | None:
        prog = self.vm.linux.prog
        gs = regs.get("gs_base", 0)
        if not gs:
            return None
        prof = self.vm.linux.profile
        off = prof.symbol("current_task")
        if off is None:
            base = prof.symbol("pcpu_hot")
            if base is None:
                return None
            off = base + drgn.offsetof(prog.type("struct pcpu_hot"), "current_task")
        ptr = int.from_bytes(prog.read(gs + off, 8, False), "little")
        return drgn.Object(prog, "struct task_struct *", value=ptr)

    def _task_address(self, regs: dict[str, int]) -> int:
        try:
            task = self._current(regs)
        except (drgn.FaultError, ValueError, LookupError, AradiaError):
            return 0
        return 0 if task is None else task.value_()

    def _event(self, kind: str, name: str, thread: str, regs: dict[str, int], args: dict[str, Any]) -> Event:
        ev = Event(time.monotonic(), _vcpu(thread), kind, name, args=args)
        try:
            task = self._current(regs)
            if task is not None:
                ev.pid, ev.tgid = int(task.pid), int(task.tgid)
                ev.comm = task.comm.string_().decode(errors="replace")
                ev.uid = int(task.real_cred.uid.val)
        except (drgn.FaultError, ValueError, LookupError, AradiaError):
            pass
        return ev

    def _user_reader(self, regs: dict[str, int]) -> Callable[[int, int], bytes]:
        cr3, la57 = regs.get("cr3", 0), bool(regs.get("cr4", 0) & (1 << 12))

        def read(addr: int, size: int) -> bytes:
            return self.vm.read_virt(addr, size, cr3=cr3, la57=la57)

        return read

    # --- the event loop ----------------------------------------------------------------------------
    def _handle(self, thread: str, regs: dict[str, int]) -> Event | None:
        rip = regs.get("rip", 0)
        out: Event | None = None
        probe = self.probes.get(rip)
        if probe is not None and not probe.ret:
            if probe.kind == "syscall":
                ptregs = drgn.Object(self.vm.linux.prog, "struct pt_regs *", value=regs["rdi"])
                raw = [int(getattr(ptregs, r)) for r in syscalls.ARG_REGS]
                args = syscalls.decode(probe.name, raw, self._user_reader(regs))
                out = self._event("syscall", probe.name, thread, regs, args)
            else:
                args = {r: regs.get(r, 0) for r in ARG_REGS}
                out = self._event("kprobe", probe.name, thread, regs, args)
        if probe is not None and probe.ret:
            ret_addr = int.from_bytes(self._user_reader(regs)(regs["rsp"], 8), "little")
            pend = _Pending(probe, self._task_address(regs), regs["rsp"] + 8, time.monotonic())
            if ret_addr not in self._returns:
                self._returns[ret_addr] = []
                if ret_addr not in self.probes:
                    self.stub.set_breakpoint(ret_addr)
            self._returns[ret_addr].append(pend)
        if rip in self._returns:
            waiting = self._returns[rip]
            task = self._task_address(regs)
            for i, p in enumerate(waiting):
                if p.task == task and p.rsp_after == regs["rsp"]:
                    del waiting[i]
                    out = self._event("kretprobe", p.probe.name, thread, regs,
                                      {"ret": regs.get("rax", 0), "latency": time.monotonic() - p.entry_time})
                    break
            if not waiting:
                del self._returns[rip]
                if rip not in self.probes:
                    self.stub.remove_breakpoint(rip)  # gone: the vCPU continues with no step
        return out

    def events(self, duration: float | None = None,
               until: Callable[[], bool] | None = None) -> Iterator[Event]:
        """Run the guest and yield events as probes hit, for ``duration`` seconds, or until ``until()``
        (checked at least four times a second) says stop, or forever."""
        end = None if duration is None else time.monotonic() + duration
        self.stub.cont()
        while (end is None or time.monotonic() < end) and not (until is not None and until()):
            stop = self.stub.wait_stop(0.25 if end is None else max(0.0, min(0.25, end - time.monotonic())))
            if stop is None:
                continue
            if stop["kind"] != "signal":
                raise AradiaError(f"the VM ended while tracing ({stop['kind']})")
            thread = stop["thread"]
            regs = self.stub.registers(thread)
            rip = regs.get("rip", 0)
            try:
                ev = self._handle(thread, regs)
            finally:
                probe = self.probes.get(rip)
                if probe is not None and probe.skip:
                    self.stub.set_register("rip", rip + probe.skip, thread)
                elif probe is not None or rip in self._returns:
                    self.stub.step(thread)  # off the breakpoint, or the continue would re-hit it
                self.stub.cont()
            if ev is not None and self.filter.keep(ev):
                yield ev

    def close(self) -> None:
        """Disarm everything and let the guest run."""
        self.stub.close()

    def __enter__(self) -> Tracer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _vcpu(thread: str | None) -> int:
    """vCPU index from a stub thread id (``p01.02`` -> 1)."""
    try:
        return int((thread or "").rsplit(".", 1)[-1], 16) - 1
    except ValueError:
        return -1
