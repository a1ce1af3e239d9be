"""What a tracer needs to know of the Linux kernel's ABI on each architecture.

The CPU facts (register names, the link register, privilege levels) are the machine layer's
(:mod:`aradia.machine.arch`); this module adds the *Linux* facts a breakpoint hit is read with, one
:class:`KernelABI` per architecture, so the tracer asks instead of assuming x86-64:

* syscall entries: x86-64 ``__x64_sys_NAME(const struct pt_regs *regs)`` with the pointer in
  ``rdi`` and the user's arguments in ``di, si, dx, r10, r8, r9``; arm64
  ``__arm64_sys_NAME(const struct pt_regs *regs)`` with the pointer in ``x0`` and the arguments in
  ``regs[0..5]`` (offsets from BTF). aradia names a syscall by its entry symbol on both (no number
  table: the kernel's own wrapper names are the table).
* ``current``: x86-64 reads the per-CPU ``current_task`` (``pcpu_hot.current_task`` from 6.2) at the
  GS base (the one ``swapgs`` put aside while the vCPU is in user mode); arm64 keeps it in ``SP_EL0``
  while the vCPU is at EL1, a system register QEMU's stub reads with one ``p`` packet. At EL0,
  ``SP_EL0`` is the user's stack pointer and ``SP_EL1`` the top of the task's kernel stack, which
  names the task through ``task_struct.stack``.
* a function's entry: x86-64 kernels start functions with ``ENDBR64`` (IBT) and the 5-byte NOP that
  ftrace leaves; arm64 kernels built with ``-fpatchable-function-entry=2`` start with ``mov x9, x30``
  (the first patch slot, which ftrace fills at boot) and a NOP (the second: ``bl ftrace_caller`` when
  ftrace traces the function), possibly after a ``bti c`` landing pad, and only then ``paciasp``. A
  probe breaks on that NOP and skips it instead of single-stepping (skipping a NOP is executing it);
  ``paciasp`` is never skipped (the function's ``autiasp`` would then fail), and the link register is
  still unsigned at the NOP: it *is* the return address.
* the return: x86-64 finds the return address at ``[rsp]`` at entry and the caller's stack pointer
  8 bytes above; arm64 in ``x30`` and the stack pointer unchanged.

The head of a function is read before its breakpoint is armed, so a breakpoint instruction planted in
guest memory (``int3``, ``brk``: QEMU does so under KVM, not under TCG) is never taken for the code.
"""

from __future__ import annotations

import abc
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import drgn

from aradia.errors import AradiaError
from aradia.machine.arch.base import Architecture

#: Reads guest-virtual memory in the kernel's address space: (address, size) -> bytes.
ReadKernel = Callable[[int, int], bytes]

NOP5 = bytes.fromhex("0f1f440000")
ENDBR64 = bytes.fromhex("f30f1efa")
CPL_MASK = 3
MASK64 = (1 << 64) - 1

A64_NOP = 0xD503201F
A64_MOV_X9_LR = 0xAA1E03E9  # mov x9, x30: the first ftrace patch slot once initialised
A64_BTI = frozenset({0xD503241F, 0xD503245F, 0xD503249F, 0xD50324DF})  # bti, bti c, bti j, bti jc
#: arm64's THREAD_SIZE: 16 KiB, 32 KiB with KASAN, 64 KiB with 64 KiB pages. At EL0, SP_EL1 is exactly
#: the top of the current task's kernel stack (``kernel_exit`` popped its ``struct pt_regs``, which
#: sits at the top): ``task->stack + THREAD_SIZE``. (Vmapped stacks lie a guard page apart, so a looser
#: test would take a neighbour's stack.)
A64_THREAD_SIZES = (16 << 10, 32 << 10, 64 << 10)


@dataclass
class KernelABI(abc.ABC):
    """The Linux facts of one architecture a tracer reads a breakpoint hit with (see the module docstring)."""

    arch: Architecture

    name: str = field(init=False, default="")
    #: registers a hit needs beyond what the stub's ``g`` packet carries (None: every one it has)
    hit_registers: tuple[str, ...] | None = field(init=False, default=None)

    @property
    def pc(self) -> str:
        """The program counter register."""
        return self.arch.pc

    @property
    def sp(self) -> str:
        """The stack pointer register."""
        return self.arch.sp

    @property
    def ret(self) -> str:
        """The integer return-value register."""
        return self.arch.ret

    @property
    def call_args(self) -> tuple[str, ...]:
        """The integer argument registers of a C function call, in order (six are reported)."""
        return self.arch.args[:6]

    @abc.abstractmethod
    def syscall_symbols(self, name: str) -> tuple[str, ...]:
        """Kernel symbols that may be syscall ``name``'s entry, most likely first."""

    @abc.abstractmethod
    def syscall_args(self, prog: drgn.Program, regs: dict[str, int]) -> list[int]:
        """The six raw arguments of the syscall whose entry the vCPU with ``regs`` stopped at."""

    @abc.abstractmethod
    def current(self, prog: drgn.Program, regs: dict[str, int]) -> int | None:
        """Address of the task running on the stopped vCPU (None: cannot tell)."""

    @abc.abstractmethod
    def kernel_entry(self, head: bytes) -> tuple[int, int]:
        """Where to break in a kernel function whose first bytes are ``head`` (read before arming),
        as an offset from its start, and how many bytes there may be skipped instead of single-stepped
        (0: step)."""

    @abc.abstractmethod
    def user_root(self, regs: dict[str, int]) -> tuple[int, bool]:
        """The page-table root (and LA57) of the stopped task's user address space."""

    #: whether kernel addresses translate through another root than the user's (arm64: TTBR1)
    split_roots: bool = field(init=False, default=False)

    @abc.abstractmethod
    def return_address(self, regs: dict[str, int], read: ReadKernel) -> int:
        """At a function's entry: the address it returns to."""

    @abc.abstractmethod
    def sp_after_return(self, regs: dict[str, int]) -> int:
        """At a function's entry: the stack pointer its caller has once it returned."""

    def return_now(self, regs: dict[str, int], ret_addr: int, value: int) -> dict[str, int]:
        """Registers to write at a function's entry so it returns ``value`` (64-bit) to ``ret_addr``
        at once (as a ``return value;`` as its first statement would)."""
        return {self.ret: value & MASK64, self.pc: ret_addr, self.sp: self.sp_after_return(regs)}

    def user_entry_skip(self, head: bytes) -> int:
        """Bytes at a user-space function's entry that may be skipped instead of stepped (0: step)."""
        return 0


@dataclass
class X86_64ABI(KernelABI):
    """Linux on x86-64."""

    _current_off: int | None = field(init=False, default=None)
    _profile_symbol: Callable[[str], int | None] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.name = "x86_64"

    def bind(self, symbol: Callable[[str], int | None]) -> None:
        """Where kernel symbols are looked up (the profile's :meth:`~aradia.linux.profile.Profile.symbol`)."""
        self._profile_symbol = symbol

    def syscall_symbols(self, name: str) -> tuple[str, ...]:
        """``__x64_sys_NAME``, then ``__do_sys_NAME`` and ``sys_NAME``."""
        return (f"__x64_sys_{name}", f"__do_sys_{name}", f"sys_{name}")

    def syscall_args(self, prog: drgn.Program, regs: dict[str, int]) -> list[int]:
        """``di, si, dx, r10, r8, r9`` of the ``struct pt_regs`` at ``rdi`` (one read of the struct)."""
        from aradia.trace.syscalls import SYSCALL_ARG_REGS

        ptregs = drgn.Object(prog, "struct pt_regs", address=regs["rdi"]).read_()
        return [int(getattr(ptregs, r)) for r in SYSCALL_ARG_REGS]

    def _current_offset(self, prog: drgn.Program) -> int | None:
        """Offset of the current task pointer in a CPU's per-CPU area (``current_task``, or in
        ``pcpu_hot`` from 6.2); looked up once, not at every hit."""
        if self._current_off is None:
            assert self._profile_symbol is not None
            off = self._profile_symbol("current_task")
            if off is None:
                base = self._profile_symbol("pcpu_hot")
                if base is None:
                    return None
                off = base + drgn.offsetof(prog.type("struct pcpu_hot"), "current_task")
            self._current_off = int(off)
        return self._current_off

    def current(self, prog: drgn.Program, regs: dict[str, int]) -> int | None:
        """The per-CPU current task pointer at the kernel's GS base (in user mode: the one ``swapgs``
        put aside)."""
        gs = regs.get("k_gs_base", 0) if regs.get("cs", 0) & CPL_MASK else regs.get("gs_base", 0)
        off = self._current_offset(prog)
        if not gs or off is None:
            return None
        return int.from_bytes(prog.read(gs + off, 8, False), "little")

    def kernel_entry(self, head: bytes) -> tuple[int, int]:
        """After ``ENDBR64`` (IBT); the 5-byte ftrace NOP there is skipped."""
        at = 0
        if head[:4] == ENDBR64:
            at, head = 4, head[4:]
        return at, 5 if head[:5] == NOP5 else 0

    def user_root(self, regs: dict[str, int]) -> tuple[int, bool]:
        """CR3 and CR4.LA57."""
        return regs.get("cr3", 0), bool(regs.get("cr4", 0) & (1 << 12))

    def return_address(self, regs: dict[str, int], read: ReadKernel) -> int:
        """The word at ``[rsp]`` (the call pushed it)."""
        return int.from_bytes(read(regs["rsp"], 8), "little")

    def sp_after_return(self, regs: dict[str, int]) -> int:
        """``rsp + 8`` (``ret`` pops the return address)."""
        return regs["rsp"] + 8

    def user_entry_skip(self, head: bytes) -> int:
        """``ENDBR64`` (a NOP outside CET) is skipped."""
        return len(ENDBR64) if head[:4] == ENDBR64 else 0


@dataclass
class Arm64ABI(KernelABI):
    """Linux on arm64 (AArch64)."""

    _stack_off: int | None = field(init=False, default=None)
    _exit_state_off: int | None = field(init=False, default=None)
    #: SP_EL1 at EL0 -> the task whose kernel stack it is (checked again at every use)
    _by_stack: dict[int, int] = field(init=False, default_factory=dict)
    _regs_off: int | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.name = "arm64"
        self.split_roots = True
        # SP_EL0 (current at EL1), SP_EL1 (the task's kernel stack at EL0), TTBR0 and TCR (user memory)
        self.hit_registers = ("sp_el0", "sp_el1", "ttbr0_el1", "ttbr1_el1", "tcr_el1")

    def syscall_symbols(self, name: str) -> tuple[str, ...]:
        """``__arm64_sys_NAME`` (arm64 has no unwrapped ``sys_NAME`` entries since 4.19)."""
        return (f"__arm64_sys_{name}",)

    def syscall_args(self, prog: drgn.Program, regs: dict[str, int]) -> list[int]:
        """``regs[0..5]`` of the ``struct pt_regs`` at ``x0`` (one 48-byte read)."""
        if self._regs_off is None:
            self._regs_off = drgn.offsetof(prog.type("struct pt_regs"), "regs")
        return list(struct.unpack("<6Q", prog.read(regs["x0"] + self._regs_off, 48, False)))

    def current(self, prog: drgn.Program, regs: dict[str, int]) -> int | None:
        """``SP_EL0`` at EL1; at EL0 the task whose kernel stack ``SP_EL1`` points into."""
        if self.arch.privilege(regs):
            return regs.get("sp_el0") or None
        top = regs.get("sp_el1", 0)
        if not top:
            return None
        if self._stack_off is None or self._exit_state_off is None:
            task_type = prog.type("struct task_struct")
            self._stack_off = drgn.offsetof(task_type, "stack")
            self._exit_state_off = drgn.offsetof(task_type, "exit_state")
        task = self._by_stack.get(top)
        if task is not None and self._owns(prog, task, top):
            return task
        from aradia.linux.bounds import GUEST_ERRORS, Warnings
        from aradia.linux.walks import each_task

        self._by_stack.clear()
        found = None
        for t in each_task(prog, Warnings()):
            try:
                addr = int(t.value_())
                if self._owns(prog, addr, top):
                    found = addr
                    break
            except GUEST_ERRORS:
                continue
        if found is not None:
            self._by_stack[top] = found
        return found

    def _owns(self, prog: drgn.Program, task: int, top: int) -> bool:
        """Whether ``top`` (SP_EL1 at EL0) is the top of the kernel stack of the live task at ``task``
        (a task that exited keeps its old ``stack`` value in freed memory: ``exit_state`` says so)."""
        assert self._stack_off is not None and self._exit_state_off is not None
        stack = int.from_bytes(prog.read(task + self._stack_off, 8, False), "little")
        if top - stack not in A64_THREAD_SIZES:
            return False
        return int.from_bytes(prog.read(task + self._exit_state_off, 4, False), "little") == 0

    def kernel_entry(self, head: bytes) -> tuple[int, int]:
        """On the NOP after a ``bti`` landing pad and the ``mov x9, x30`` ftrace slot (then skipped);
        at the first instruction (stepped) when the function has no patchable entry or ftrace traces it."""
        words = [w for (w,) in struct.iter_unpack("<I", head[: len(head) // 4 * 4])]
        i = 0
        while i < min(len(words), 2) and (words[i] in A64_BTI or words[i] == A64_MOV_X9_LR):
            i += 1
        if i < len(words) and words[i] == A64_NOP:
            return 4 * i, 4
        return 0, 0

    def user_root(self, regs: dict[str, int]) -> tuple[int, bool]:
        """TTBR0_EL1 (the user half's tables; the walk masks the ASID off)."""
        return regs.get("ttbr0_el1", 0), False

    def return_address(self, regs: dict[str, int], read: ReadKernel) -> int:
        """The link register ``x30`` (unsigned at entry: ``paciasp`` has not run yet)."""
        return regs["x30"]

    def sp_after_return(self, regs: dict[str, int]) -> int:
        """``sp`` itself (the callee restores it; ``ret`` pops nothing)."""
        return regs["sp"]


def kernel_abi(arch: Architecture, symbol: Callable[[str], int | None]) -> KernelABI:
    """The :class:`KernelABI` of ``arch`` (``symbol``: the kernel profile's symbol lookup)."""
    if arch.name == "arm64":
        return Arm64ABI(arch)
    if arch.name == "x86_64":
        abi = X86_64ABI(arch)
        abi.bind(symbol)
        return abi
    raise AradiaError(f"tracing does not support {arch.name} guests")


__all__ = ["ENDBR64", "NOP5", "X86_64ABI", "Arm64ABI", "KernelABI", "kernel_abi"]
