"""What the layers above ``machine`` hold of a VM: :class:`VMHandle`, and the vCPU state it reports.

:class:`aradia.vm.VM` (the object a user holds) satisfies :class:`VMHandle`; the Linux layer takes a
``VMHandle`` and the trace layer a :class:`aradia.linux.kernel.LinuxVM` (a handle with its kernel),
so neither imports the facade above them.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from aradia.machine.arch import X86, Architecture
from aradia.machine.paging import Translation, Translator
from aradia.machine.qemu import Qemu
from aradia.sources.base import PhysicalMemory

CR4_LA57 = 1 << 12


@dataclass(frozen=True)
class CpuState:
    """The registers of one vCPU that address translation and a first look need.

    The x86 names stand for their role on every architecture: ``rip`` is the program counter,
    ``rsp`` the stack pointer, ``cr3`` the root kernel addresses translate through (arm64:
    TTBR1_EL1, 0 when the source did not give it) and ``cpl`` the privilege level (arm64: the
    exception level, 1 in the kernel). ``cr4`` is 0 on arm64.
    """

    index: int
    rip: int
    rsp: int
    cr3: int
    cr4: int
    cpl: int
    regs: dict[str, int]
    arch: str = "x86_64"

    @property
    def pc(self) -> int:
        """The program counter (``rip`` on x86-64, ``pc`` on arm64)."""
        return self.rip

    @property
    def sp(self) -> int:
        """The stack pointer."""
        return self.rsp

    @property
    def la57(self) -> bool:
        """Whether the vCPU uses 5-level paging."""
        return bool(self.cr4 & CR4_LA57)


def cpu_state(index: int, regs: dict[str, int], arch: Architecture = X86) -> CpuState:
    """A :class:`CpuState` from a register dictionary (QMP ``info registers``, the GDB stub or a dump's
    notes) of a vCPU of ``arch``."""
    return CpuState(index, regs.get(arch.pc, 0), regs.get(arch.sp, 0), arch.kernel_root(regs),
                    regs.get("cr4", 0), arch.privilege(regs), regs, arch.name)


class VMHandle(Protocol):
    """Guest memory, vCPUs and run control of one VM, live (``machine`` set) or a dump."""

    memory: PhysicalMemory
    machine: Qemu | None
    translator: Translator
    arch: Architecture

    def stamp(self) -> object | None:
        """Freshness token: equal only while the guest stays paused in one epoch (a dump: always)."""
        ...

    def cpus(self) -> list[CpuState]:
        """Register state of every vCPU."""
        ...

    def kernel_root(self) -> tuple[int, bool]:
        """A page-table root that maps the kernel and whether it is 5-level."""
        ...

    def paused(self) -> AbstractContextManager[object]:
        """A consistent point-in-time view for the block (no-op on a dump)."""
        ...

    def translate(self, vaddr: int, cr3: int | None = None, la57: bool | None = None) -> Translation:
        """Translate a guest-virtual address (default root: :meth:`kernel_root`)."""
        ...

    def read_virt(self, vaddr: int, size: int, cr3: int | None = None, la57: bool | None = None) -> bytes:
        """Read guest-virtual memory through the page tables at ``cr3``."""
        ...

    def write_virt(self, vaddr: int, data: bytes, cr3: int | None = None, la57: bool | None = None) -> None:
        """Write guest-virtual memory through the page tables at ``cr3``."""
        ...


__all__ = ["CpuState", "VMHandle", "cpu_state"]
