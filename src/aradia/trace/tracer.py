"""Breakpoint probes on a live VM: kernel and user-space function entry and return, syscalls with
decoded arguments, process lifecycle events and watchpoints.

One module past 500 lines on purpose: it is one :class:`Tracer` whose arming, hit loop and task
lookup share one lock and one guarded stub, so the state they change together stays in one place.

All probes go through one :class:`~aradia.trace.guardian.GuardedStub` per VM (QEMU's stub serves one
client), so whatever happens to the tracing process the guest is left running with nothing armed.
A hit stops every vCPU (all-stop); the tracer reads the registers, identifies the task from the
vCPU's per-CPU ``current_task``, decodes arguments from guest memory, steps the vCPU off the
breakpoint and lets the guest run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import drgn

from aradia.errors import AradiaError, NotAttached, ProbeClash
from aradia.linux.bounds import GUEST_ERRORS
from aradia.linux.kernel import LinuxVM
from aradia.linux.net import socket_info
from aradia.proto.gdbwire import StopEvent
from aradia.trace import syscalls
from aradia.trace.abi import ENDBR64, KernelABI, kernel_abi
from aradia.trace.events import Event
from aradia.trace.guardian import GuardedStub
from aradia.trace.hooks import Decide, HookContext, return_now
from aradia.trace.probes import Filter, Pending, Probe, Watch
from aradia.trace.taskread import TaskIdentity
from aradia.trace.uprobes import UserSpace, UserTarget

LIFECYCLE = {"fork": "proc_fork_connector", "exec": "proc_exec_connector", "exit": "proc_exit_connector"}
"""The kernel's process-event connector hooks: called with the task once a fork, exec or exit is done."""
MMAP_HOOK = "perf_event_mmap"
"""Called with every new ``struct vm_area_struct`` (mmap and exec): finds libraries mapped later."""
SYSCALL_EXITS = {"accept": "do_accept", "accept4": "do_accept", "read": "vfs_read", "pread64": "vfs_read"}
"""Syscalls whose results (the peer's address, the bytes read) exist only when they return, and the
kernel function after whose return the results are in user memory. A return breakpoint there is hit
only by these syscalls, unlike the syscall's own return address (shared by every syscall), which
would stop the guest at every syscall while a server waits in ``accept``."""


class HandOffLock:
    """A re-entrant lock that the event loop hands over to waiting threads between its waits.

    The loop releases the lock after each wait slice and takes it again at once; a plain lock gives no
    turn to a thread blocked on it (measured: an ``add_syscall`` from another thread waited 0.15-0.9 s
    on an idle 2-core host, unboundedly long under load while hits keep the loop busy). The loop calls
    :meth:`yield_to_waiters` between slices, so a waiting thread gets the next turn.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._cond = threading.Condition(threading.Lock())
        self._waiting = 0

    def __enter__(self) -> HandOffLock:
        if not self._lock.acquire(blocking=False):
            with self._cond:
                self._waiting += 1
            try:
                self._lock.acquire()
            finally:
                with self._cond:
                    self._waiting -= 1
                    self._cond.notify_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def yield_to_waiters(self, timeout: float = 5.0) -> None:
        """Wait (lock not held) until every thread waiting for the lock has had it, or ``timeout``."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._waiting and (left := end - time.monotonic()) > 0:
                self._cond.wait(left)


#: SHUTDOWN reasons that mean QEMU exits (quit over QMP, a signal, its window closed, an error)
QEMU_EXITING = frozenset({"host-qmp-quit", "host-signal", "host-ui", "host-error"})


def gone_reason(ev: Any) -> str | None:
    """Why a trace cannot go on after QMP event ``ev`` (a reset or a shutdown of the guest), or None."""
    if ev.name == "RESET":
        return ("the guest was reset (rebooted) while tracing: its kernel was loaded anew at new "
                "addresses (KASLR), so every armed probe is stale; trace again once it has booted")
    if ev.name == "SHUTDOWN":
        reason = ev.data.get("reason", "no reason given")
        if reason in QEMU_EXITING:
            return None  # QEMU itself is going away: its end is reported as such (NotAttached)
        return f"the guest shut down while tracing ({reason})"
    return None


@dataclass
class Tracer:
    """Probes on one live VM (``vm`` from :func:`aradia.attach`), events through :meth:`events`."""

    vm: LinuxVM
    stub: GuardedStub
    probes: dict[int, Probe] = field(default_factory=dict)
    watches: dict[int, Watch] = field(default_factory=dict)
    filter: Filter = field(default_factory=Filter)
    _returns: dict[int, list[Pending]] = field(default_factory=dict)
    _userspace: UserSpace | None = None
    _stopped: bool = False
    _refault: dict[tuple[int, int], int] = field(default_factory=dict)  # (task, rip) -> rsp
    _gone: str | None = None  # why the traced guest is gone (reset, shutdown, QEMU exit)
    #: one thread at a time talks to the stub: the event loop between waits, or a thread adding probes
    _lock: HandOffLock = field(default_factory=HandOffLock)
    _entry_stubs: tuple[int, int] | None = None
    _abi: KernelABI | None = None
    _in_syscall: dict[int, tuple[str, list[int]]] = field(default_factory=dict)  # task -> (name, args)
    _return_now: dict[str, int] | None = None  # registers that make the hooked function return at once
    _queued: list[Event] = field(default_factory=list)  # a hit's events beyond the first
    _identity: TaskIdentity | bool | None = None  # where an event's task fields are (False: unknown)
    #: called by close() (a live migration's destination VM, :mod:`aradia.trace.migration`)
    _closers: list[Callable[[], object]] = field(default_factory=list)

    @classmethod
    def open(cls, vm: LinuxVM) -> Tracer:
        """A tracer on a live VM: finds (or starts) its GDB stub and puts a guardian in front of it."""

        if vm.machine is None:
            raise AradiaError("tracing needs a live VM (qmp:PATH), not a dump")
        vm.load_kernel()
        stub = GuardedStub(vm.machine.gdb_address(), was_running=vm.machine.status() == "running")
        tracer = cls(vm, stub)
        stub.limit_registers(tracer.abi.hit_registers)
        vm.machine.qmp.on_event(tracer._on_qmp_event)
        return tracer

    @property
    def abi(self) -> KernelABI:
        """The traced kernel's ABI on its architecture (syscall entries, ``current``, returns)."""
        if self._abi is None:
            self._abi = kernel_abi(self.vm.arch, self.vm.linux.profile.symbol)
        return self._abi

    @property
    def warnings(self) -> list[str]:
        """Where a user-space probe is not armed though its library is mapped: one line per library
        file whose symbols could not be read (not yet paged in, not an ELF file, corrupt), with why."""
        if self._userspace is None:
            return []
        return [f"{path}: symbols unreadable, user-space probes on it not armed there: {why}"
                for path, why in dict(self._userspace.syms.unreadable).items()]  # a copy: hits add to it

    def _on_qmp_event(self, ev: Any) -> None:
        self._gone = gone_reason(ev) or self._gone

    def _check_alive(self) -> None:
        """Raise the clear error when the guest rebooted, shut down or its QEMU exited."""
        if self._gone is None and not self.vm.machine.qmp.alive:
            raise NotAttached("QEMU exited while tracing")
        if self._gone is not None:
            raise AradiaError(self._gone)

    # --- probes ------------------------------------------------------------------------------------
    def _symbol(self, name: str) -> int:
        addr = self.vm.linux.profile.symbol(name)
        if addr is None:
            raise AradiaError(f"no kernel symbol {name!r}")
        return int(addr)

    def add_kprobe(self, symbol: str, *, ret: bool = False, count_only: bool = False) -> Probe:
        """Probe kernel function ``symbol`` at entry (argument registers), or at return (``ret``);
        ``count_only`` events carry only the name and vCPU (no task lookup: for counting)."""
        return self._arm(Probe("count" if count_only else "kprobe", symbol, self._symbol(symbol), ret))

    def add_hook(self, symbol: str, decide: Decide) -> Probe:
        """A decision hook at kernel function ``symbol``'s entry: at each call, with the vCPU stopped,
        ``decide(ctx)`` (see :mod:`aradia.trace.hooks`) returns None (the function runs) or an errno
        (the function is skipped and returns ``-errno``); events it emits are yielded by :meth:`events`."""
        return self._arm(Probe("hook", symbol, self._symbol(symbol), decide=decide))

    def add_syscall(self, name: str) -> Probe:
        """Probe syscall ``name`` (``execve``, ``openat``, ``connect``...) with decoded arguments."""
        for sym in self.abi.syscall_symbols(name):
            addr = self.vm.linux.profile.symbol(sym)
            if addr is not None:
                break
        else:
            raise AradiaError(f"no syscall entry for {name!r} in this kernel")
        with self._lock:
            if name in SYSCALL_EXITS:
                self._arm_hook("sysexit", SYSCALL_EXITS[name])
            return self._arm(Probe("syscall", name, int(addr)))

    def add_lifecycle(self, kinds: tuple[str, ...] = ("fork", "exec", "exit")) -> list[Probe]:
        """Process lifecycle events: ``fork`` (the new task), ``exec`` (its new program and argv),
        ``exit`` (its exit code), each reported once the kernel has done it."""
        out = []
        for kind in kinds:
            if kind not in LIFECYCLE:
                raise AradiaError(f"unknown lifecycle event {kind!r} (one of {', '.join(LIFECYCLE)})")
            out.append(self._arm(Probe("lifecycle", kind, self._symbol(LIFECYCLE[kind]))))
        return out

    def add_uprobe(self, spec: str, *, process: str | None = None, pid: int | None = None,
                   ret: bool = False, args: str | None = None, keep_args: bool = False,
                   decide: Decide | None = None, follow: bool = True) -> UserTarget:
        """Probe user-space function ``LIB:SYMBOL`` (``libcrypt.so.1:crypt``, ``bash:readline``).

        In process ``pid``, or in processes named ``process`` (comm or executable name), or in
        every process that maps LIB — now or later. Arguments are decoded by ``args`` (see
        :func:`aradia.trace.uprobes.parse_signature`) or the built-in signature of well-known
        functions; ``ret`` reports the return value instead of the arguments (``keep_args``: with
        the arguments decoded at entry, as ``args``). ``decide(ctx)`` runs at each entry instead of
        the entry event (see :mod:`aradia.trace.hooks`); a return value it sets skips the function.
        ``follow=False`` arms it in no process now and follows no new mapping (no stop at every mmap
        in the guest): the caller arms it in the address spaces it chooses with :meth:`arm_uprobe_in`.
        """
        target = UserTarget.make(spec, ret=ret, process=process, pid=pid, args=args, keep_args=keep_args,
                                 decide=decide)
        if not follow:
            return target
        with self._lock, self._halted():
            self._arm_hook("mmap", MMAP_HOOK)
            user = self._user()
            user.targets.append(target)
            for mm in user.address_spaces(target):
                for us in user.syms.resolve(mm, target.lib, target.symbol):
                    self._arm_user(target, us.address, us.file.mm)
        return target

    def arm_uprobe_in(self, target: UserTarget, mm: drgn.Object) -> int:
        """Arm ``target`` (from :meth:`add_uprobe`) in one more address space, ``mm`` (a
        ``struct mm_struct *``), if it maps the target's library; how many addresses were armed.
        Called from a hook's decision it costs no extra stop (the guest is stopped already)."""
        n = 0
        with self._lock, self._halted():
            try:
                found = self._user().syms.resolve(mm, target.lib, target.symbol)
            except GUEST_ERRORS:
                return 0
            for us in found:
                self._arm_user(target, us.address, int(mm.value_()))
                n += 1
        return n

    def add_watch(self, address: int, length: int, access: str = "w", *, pid: int | None = None) -> Watch:
        """Watch ``length`` bytes at guest-virtual ``address`` for writes (``w``), reads (``r``) or
        both (``rw``); a user address is watched in process ``pid`` (other processes' accesses to the
        same address are not reported)."""
        if access not in ("w", "r", "rw"):
            raise AradiaError(f"watch access {access!r}: one of w, r, rw")
        if not 0 < length <= 1 << 20 or not 0 <= address < 1 << 64:
            raise AradiaError(f"watch range {address:#x}+{length} is out of range")
        if address in self.watches:
            raise ProbeClash(f"{address:#x} is already watched")
        w = Watch(address, length, access, pid)
        with self._lock:
            self.stub.set_breakpoint(address, kind=w.gdb_kind, length=length)
            self.watches[address] = w
        return w

    def _arm(self, probe: Probe) -> Probe:
        with self._lock:
            return self._arm_locked(probe)

    def _arm_locked(self, probe: Probe) -> Probe:
        if probe.address in self.probes:
            raise ProbeClash(f"{probe.name} is already probed")
        # Single-stepping makes TCG flush all translated code (slow); when the function starts
        # with the NOP ftrace leaves there (x86: 5 bytes after ENDBR64 with IBT; arm64: after the
        # ``mov x9, x30`` slot), break on the NOP and move the PC past it instead: skipping a NOP is
        # exactly executing it. (Read before the breakpoint is armed: never a planted int3/brk.)
        if probe.kind != "uprobe":
            with contextlib.suppress(AradiaError):
                head = self.vm.read_virt(probe.address, 12, *self._kernel_root())
                at, probe.skip = self.abi.kernel_entry(head)
                probe.address += at
        self.stub.set_breakpoint(probe.address)
        self.probes[probe.address] = probe
        return probe

    def _arm_hook(self, kind: str, symbol: str) -> None:
        """Arm one of aradia's own hooks on kernel function ``symbol``, once however many probes need it."""
        if not any(p.kind == kind and p.name == symbol for p in self.probes.values()):
            self._arm(Probe(kind, symbol, self._symbol(symbol)))

    def _arm_user(self, target: UserTarget, address: int, mm: int) -> None:
        target.addresses.setdefault(address, set()).add(mm)
        self._user().accepted[(mm, address)] = True
        have = self.probes.get(address)
        if have is None:
            self._arm(Probe("uprobe", target.spec, address, target.ret, target=target))
        elif have.target is not target:
            raise ProbeClash(f"{target.spec} is at {address:#x}, which {have.name} already probes")

    def remove(self, probe: Probe) -> None:
        """Disarm one probe (returns already pending still report)."""
        with self._lock:
            if self.probes.pop(probe.address, None) is not None and probe.address not in self._returns:
                self.stub.remove_breakpoint(probe.address)

    def remove_uprobe(self, target: UserTarget) -> None:
        """Disarm a user-space probe at all its addresses."""
        with self._lock:
            self._remove_uprobe(target)

    def _remove_uprobe(self, target: UserTarget) -> None:
        if target in self._user().targets:
            self._user().targets.remove(target)
        for address in target.addresses:
            probe = self.probes.get(address)
            if probe is not None and probe.target is target:
                self.remove(probe)
        target.addresses.clear()

    def remove_watch(self, watch: Watch) -> None:
        """Disarm one watchpoint."""
        with self._lock:
            if self.watches.pop(watch.address, None) is not None:
                self.stub.remove_breakpoint(watch.address, kind=watch.gdb_kind, length=watch.length)

    def _kernel_root(self) -> tuple[int, bool]:
        prof = self.vm.linux.profile
        return prof.kernel_root, prof.la57

    @contextlib.contextmanager
    def _halted(self) -> Iterator[None]:
        """Stop the guest through the stub for the block, unless a hit already stopped it."""
        with self._lock:
            if self._stopped:
                yield
                return
            self.stub.interrupt()
            self._stopped = True
            try:
                yield
            finally:
                self._stopped = False
                self.stub.cont()

    def _user(self) -> UserSpace:
        if self._userspace is None:
            self._userspace = UserSpace(self.vm.linux.prog)
        return self._userspace

    def _on_mmap(self, regs: dict[str, int]) -> None:
        """A new mapping: arm the targets whose library it maps (at their address in that process)."""
        for target, address, mm in self._user().new_mapping(regs[self.abi.call_args[0]]):
            self._arm_user(target, address, mm)

    def _user_hit_ok(self, probe: Probe, regs: dict[str, int]) -> bool:
        """Whether a user-space breakpoint hit is the target's: right process, symbol mapped there."""
        assert probe.target is not None
        try:
            task = self._current(regs)
        except GUEST_ERRORS:
            return False
        return task is not None and self._user().hit_ok(probe.target, probe.address, task)

    # --- the task on a vCPU ------------------------------------------------------------------------
    def _current_pointer(self, regs: dict[str, int]) -> int | None:
        """Address of the task running on the stopped vCPU (see :meth:`KernelABI.current`)."""
        return self.abi.current(self.vm.linux.prog, regs)

    def _current(self, regs: dict[str, int]) -> drgn.Object | None:
        ptr = self._current_pointer(regs)
        return None if ptr is None else drgn.Object(self.vm.linux.prog, "struct task_struct *", value=ptr)

    def _task_address(self, regs: dict[str, int]) -> int:
        try:
            return self._current_pointer(regs) or 0
        except GUEST_ERRORS:
            return 0

    def _event(self, kind: str, name: str, thread: str | None, regs: dict[str, int],
               args: dict[str, Any]) -> Event:
        ev = Event(time.monotonic(), _vcpu(thread), kind, name, args=args)
        if self._identity is None:
            self._identity = TaskIdentity.of(self.vm.linux.prog) or False
        ident = self._identity
        try:
            if isinstance(ident, TaskIdentity):  # the fields in two reads (through drgn: one a field)
                ptr = self._current_pointer(regs)
                if ptr:
                    prog = self.vm.linux.prog
                    ev.pid, ev.tgid, ev.comm, ev.uid = ident.read(lambda a, n: prog.read(a, n, False), ptr)
                return ev
            task = self._current(regs)
            if task is not None:
                ev.pid, ev.tgid = int(task.pid), int(task.tgid)
                ev.comm = task.comm.string_().decode(errors="replace")
                ev.uid = int(task.real_cred.uid.val)
        except GUEST_ERRORS:
            pass
        return ev

    def _user_reader(self, regs: dict[str, int]) -> Callable[[int, int], bytes]:
        cr3, la57 = self.abi.user_root(regs)
        if self.abi.split_roots:  # kernel addresses go through the kernel's own root (arm64: TTBR1)
            kroot, kla57 = self._kernel_root()
            canon = self.vm.arch.canonical

            def read_split(addr: int, size: int) -> bytes:
                if canon(addr) >> 63:
                    return self.vm.read_virt(addr, size, cr3=kroot, la57=kla57)
                return self.vm.read_virt(addr, size, cr3=cr3, la57=la57)

            return read_split

        def read(addr: int, size: int) -> bytes:
            return self.vm.read_virt(addr, size, cr3=cr3, la57=la57)

        return read

    def _lifecycle_args(self, kind: str, regs: dict[str, int]) -> dict[str, Any]:
        from aradia.linux.bounds import Warnings
        from aradia.linux.processes import task_info

        task = drgn.Object(self.vm.linux.prog, "struct task_struct *", value=regs[self.abi.call_args[0]])
        info = task_info(task, Warnings())
        args: dict[str, Any] = {"pid": info.pid, "tgid": info.tgid, "comm": info.comm}
        if kind == "fork":
            args["ppid"] = info.ppid
            args["thread"] = info.pid != info.tgid
        elif kind == "exec":
            args["exe"], args["argv"] = info.exe, info.cmdline
        else:
            code = int(task.exit_code)
            args["status"], args["signal"] = (code >> 8) & 0xFF, code & 0x7F
        return args

    # --- the event loop ----------------------------------------------------------------------------
    def _handle(self, thread: str | None, regs: dict[str, int]) -> Event | None:
        rip = regs.get(self.abi.pc, 0)
        out: Event | None = None
        probe = self.probes.get(rip)
        if probe is not None and probe.kind == "uprobe" and not self._user_hit_ok(probe, regs):
            probe = None  # another process runs code at this address
        if self._refault and probe is not None:
            key = (self._task_address(regs), rip)
            if self._refault.get(key) == regs.get(self.abi.sp):
                del self._refault[key]
                return None  # the faulted instruction running again: reported already
        if probe is not None and probe.kind == "mmap":
            self._on_mmap(regs)
        elif probe is not None and probe.kind == "hook":
            out = self._decide(probe, thread, regs)
        elif probe is not None and probe.target is not None and probe.target.decide is not None:
            out = self._decide(probe, thread, regs)
            if probe.ret and self._return_now is None:
                kept = (probe.target.entry_args(regs, self._user_reader(regs), self.abi.call_args)
                        if probe.target.keep_args else None)
                self._await_return(probe, regs, entry=kept)
        elif probe is not None and not probe.ret:
            if probe.kind == "syscall":
                raw = self.abi.syscall_args(self.vm.linux.prog, regs)  # one read of the struct
                if probe.name in SYSCALL_EXITS:
                    self._in_syscall[self._task_address(regs)] = (probe.name, raw)  # reported at its end
                else:
                    args = syscalls.decode(probe.name, raw, self._user_reader(regs))
                    out = self._event("syscall", probe.name, thread, regs, args)
            elif probe.kind == "sysexit":
                entry = self._in_syscall.get(self._task_address(regs))
                if entry is not None and SYSCALL_EXITS.get(entry[0]) == probe.name:
                    self._await_return(probe, regs, syscall=entry)
            elif probe.kind == "count":
                out = Event(time.monotonic(), _vcpu(thread), "count", probe.name)
            elif probe.kind == "lifecycle":
                args = self._lifecycle_args(probe.name, regs)
                out = self._event(probe.name, probe.name, thread, regs, args)
            elif probe.target is not None:
                args = probe.target.entry_args(regs, self._user_reader(regs), self.abi.call_args)
                out = self._event("uprobe", probe.name, thread, regs, args)
            else:
                args = {r: regs.get(r, 0) for r in self.abi.call_args}
                out = self._event("kprobe", probe.name, thread, regs, args)
        elif probe is not None and probe.ret:
            kept = None
            if probe.target is not None and probe.target.keep_args:
                kept = probe.target.entry_args(regs, self._user_reader(regs), self.abi.call_args)
            self._await_return(probe, regs, entry=kept)
        if rip in self._returns:
            waiting = self._returns[rip]
            task = self._task_address(regs)
            for i, p in enumerate(waiting):
                if p.task == task and p.rsp_after == regs[self.abi.sp]:
                    del waiting[i]
                    rax = regs.get(self.abi.ret, 0)
                    if p.syscall is not None:
                        self._in_syscall.pop(task, None)
                        name, raw = p.syscall
                        args = syscalls.decode_exit(name, raw, rax, self._user_reader(regs))
                        if name in ("accept", "accept4") and args["error"] is None and args["addr"] is None:
                            args["addr"] = self._accepted_peer(rax)  # the caller asked for no address
                        out = self._event("syscall", name, thread, regs, args)
                        break
                    ret_val = (p.probe.target.return_value(rax, self._user_reader(regs))
                               if p.probe.target is not None else rax)
                    kind = "uretprobe" if p.probe.kind == "uprobe" else "kretprobe"
                    ret_args = {"ret": ret_val, "latency": time.monotonic() - p.entry_time}
                    if p.entry is not None:
                        ret_args["args"] = p.entry
                    out = self._event(kind, p.probe.name, thread, regs, ret_args)
                    break
            if not waiting:
                del self._returns[rip]
                if rip not in self.probes:
                    self.stub.remove_breakpoint(rip)  # gone: the vCPU continues with no step
        return out

    def _accepted_peer(self, file_address: int) -> dict[str, Any] | None:
        """The peer of the socket ``do_accept`` returned (a ``struct file *``), as a decoded address."""
        with contextlib.suppress(*GUEST_ERRORS):
            s = socket_info(drgn.Object(self.vm.linux.prog, "struct file *", value=file_address), 0, 0)
            if s is not None and s.family in ("inet", "inet6"):
                return {"family": s.family, "address": s.remote_address, "port": s.remote_port}
        return None

    def _decide(self, probe: Probe, thread: str | None, regs: dict[str, int]) -> Event | None:
        """Run a hook's decision; an errno arranges the immediate return (done in :meth:`_resume`)."""
        decide = probe.decide or (probe.target.decide if probe.target is not None else None)
        assert decide is not None
        try:
            task = self._current(regs)
        except GUEST_ERRORS:
            task = None
        ctx = HookContext(probe.name, regs, self.vm.linux.prog, task, self._user_reader(regs), _vcpu(thread),
                          _make_event=lambda kind, name, args: self._event(kind, name, thread, regs, args),
                          arg_regs=self.abi.call_args)
        errno = decide(ctx)
        if errno or ctx.returns is not None:
            ret_addr = self.abi.return_address(regs, self._user_reader(regs))
            self._return_now = return_now(regs, ret_addr, errno or None, ctx.returns or 0, self.abi)
        self._queued.extend(ctx.events[1:])
        return ctx.events[0] if ctx.events else None

    def _await_return(self, probe: Probe, regs: dict[str, int],
                      syscall: tuple[str, list[int]] | None = None,
                      entry: dict[str, Any] | None = None) -> None:
        """Break at the return address on the stack (keyed by task and stack pointer)."""
        ret_addr = self.abi.return_address(regs, self._user_reader(regs))
        pend = Pending(probe, self._task_address(regs), self.abi.sp_after_return(regs), time.monotonic(),
                       syscall, entry)
        if ret_addr not in self._returns:
            self._returns[ret_addr] = []
            if ret_addr not in self.probes:
                self.stub.set_breakpoint(ret_addr)
        self._returns[ret_addr].append(pend)

    def _check_step(self, thread: str | None, before: dict[str, int]) -> None:
        """After stepping off a breakpoint: if the vCPU entered an exception or interrupt handler
        instead (the probed instruction faulted — e.g. the first touch of a code page — and will run
        again), the next hit of this task at this address is that re-run, not a new call."""
        pc = self.stub.registers(thread).get(self.abi.pc, 0)
        if self._in_entry_stubs(pc):
            self._refault[(self._task_address(before), before[self.abi.pc])] = before[self.abi.sp]

    def _in_entry_stubs(self, pc: int) -> bool:
        """Whether ``pc`` is in the kernel's exception and interrupt entry code (``.entry.text``)."""
        if self._entry_stubs is None:
            prof = self.vm.linux.profile
            start, end = prof.symbol("__entry_text_start"), prof.symbol("__entry_text_end")
            self._entry_stubs = (int(start), int(end)) if start and end else (0, 0)
        lo, hi = self._entry_stubs
        return lo <= pc < hi

    def _watch_event(self, stop: StopEvent, thread: str | None, regs: dict[str, int]) -> Event | None:
        addr = stop.watch_address
        if addr is None:
            return None
        w = self.watches.get(addr) or next((w for w in self.watches.values()
                                            if w.address <= addr < w.address + w.length), None)
        if w is None:
            return None
        # QEMU reports the watchpoint (its start), not the byte accessed; rip is the accessing
        # instruction (x86 reports after it ran) and value the range as it is now
        ev = self._event("watch", f"{w.address:#x}", thread, regs,
                         {"address": addr, "access": {"watch": "w", "rwatch": "r", "awatch": "rw"}.get(
                             stop.watch_kind or "", w.access), self.abi.pc: regs.get(self.abi.pc, 0)})
        if w.pid is not None and ev.tgid != w.pid:
            return None
        read = self._user_reader(regs)
        with contextlib.suppress(*GUEST_ERRORS):
            ev.args["value"] = read(w.address, min(w.length, 64))
        return ev

    def events(self, duration: float | None = None,
               until: Callable[[], bool] | None = None) -> Iterator[Event]:
        """Run the guest and yield events as probes hit, for ``duration`` seconds, or until ``until()``
        (checked at least four times a second) says stop, or forever.

        Other threads may add and remove probes meanwhile: the lock is handed to them after the current
        wait slice (a quarter second) and the hit being handled, if any.
        """
        end = None if duration is None else time.monotonic() + duration
        with self._lock:
            self.stub.cont()
        while (end is None or time.monotonic() < end) and not (until is not None and until()):
            with self._lock:
                # events queued by another holder of the lock (a migration driver) come first
                ev = None if self._queued else self._next(
                    0.25 if end is None else max(0.0, min(0.25, end - time.monotonic())))
                more, self._queued = self._queued, []
            self._lock.yield_to_waiters()
            for e in [ev, *more] if ev is not None else more:
                if self.filter.keep(e):
                    yield e

    def _next(self, timeout: float) -> Event | None:
        """Wait up to ``timeout`` for one stop and handle it; the event it makes, if any."""
        self._check_alive()
        stop = self.stub.wait_stop(timeout, registers=True)  # the registers come with the stop
        if stop is None:
            return None
        self._check_alive()
        if stop.kind != "signal":
            raise AradiaError(f"the VM ended while tracing ({stop.kind})")
        thread = stop.thread
        self._stopped = True
        regs = stop.registers if stop.registers is not None else self.stub.registers(thread)
        try:
            if stop.watch_address is not None:
                ev = self._watch_event(stop, thread, regs)
            else:
                ev = self._handle(thread, regs)
        except Exception:
            self._resume(thread, regs)
            raise
        # (a KeyboardInterrupt goes up as it is: close() has the guardian disarm and resume)
        self._resume(thread, regs)
        return ev

    def _resume(self, thread: str | None, regs: dict[str, int]) -> None:
        """Move the stopped vCPU off the breakpoint it stopped at (if any) and let the guest run: one
        request (register writes and continue together) unless a single step is needed."""
        pc = self.abi.pc
        rip = regs.get(pc, 0)
        probe = self.probes.get(rip)
        now, self._return_now = self._return_now, None
        writes: dict[str, int] = {}
        if now is not None:  # a hook decided: the function returns at once, its body never runs
            writes = now
        elif probe is not None and probe.skip:
            writes = {pc: rip + probe.skip}
        elif probe is not None and probe.kind == "uprobe" and (skip := self._user_skip(regs)):
            # a user function compiled with CET starts with ENDBR64 (a NOP here): skipping it is
            # running it, and spares the single-step (which makes TCG flush all translated code)
            writes = {pc: rip + skip}
        elif probe is not None or rip in self._returns:
            # off the breakpoint, or the continue would re-hit it
            self.stub.step(thread, until_pc_changes=True)
            self._check_step(thread, regs)
        self._stopped = False
        self.stub.resume(writes, thread)

    def _user_skip(self, regs: dict[str, int]) -> int:
        """Bytes at the stopped task's user PC that may be skipped (x86: ENDBR64; read in its own
        address space: another process may run other code at a user probe's address)."""
        try:
            return self.abi.user_entry_skip(self._user_reader(regs)(regs.get(self.abi.pc, 0), len(ENDBR64)))
        except GUEST_ERRORS:
            return 0

    def run(self, callback: Callable[[Event], object], duration: float | None = None,
            until: Callable[[], bool] | None = None) -> int:
        """Call ``callback(event)`` for each event (see :meth:`events`); returns how many there were."""
        n = 0
        for ev in self.events(duration, until):
            callback(ev)
            n += 1
        return n

    async def stream(self, duration: float | None = None,
                     until: Callable[[], bool] | None = None) -> AsyncIterator[Event]:
        """:meth:`events` as an async iterator: the loop runs in a worker thread, so the event loop
        (and probes added from it, e.g. through ``asyncio.to_thread``) stays responsive."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event | BaseException | None] = asyncio.Queue()
        stop = threading.Event()

        def work() -> None:
            try:
                for ev in self.events(duration, lambda: stop.is_set() or (until is not None and until())):
                    loop.call_soon_threadsafe(queue.put_nowait, ev)
                loop.call_soon_threadsafe(queue.put_nowait, None)
            except BaseException as e:  # handed to the consumer
                loop.call_soon_threadsafe(queue.put_nowait, e)

        worker = threading.Thread(target=work, name="aradia-trace", daemon=True)
        worker.start()
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            await asyncio.to_thread(worker.join)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Keep the event loop out for the block (it waits between hits): for another thread that
        uses the VM's drgn Program meanwhile (a view), since a Program is not for two threads at once."""
        with self._lock:
            yield

    def close(self) -> None:
        """Disarm everything and let the guest run."""
        with contextlib.suppress(AttributeError):
            self.vm.machine.qmp.off_event(self._on_qmp_event)
        self.stub.close()
        for closer in self._closers:
            with contextlib.suppress(Exception):
                closer()

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
