"""What every architecture module provides, and the translation results they share.

An :class:`Architecture` holds one CPU architecture's facts and its page-table walk: register names
(program counter, stack pointer, argument and return registers), ELF machine number, QEMU's target
name, and ``walk``/``canonical``/``root_table`` for :mod:`aradia.machine.paging`. The rest of aradia
asks the VM's architecture (:mod:`aradia.machine.arch`) instead of assuming x86-64.

A paging *mode* flag travels with every root: ``la57`` (5-level paging) on x86-64, where one guest may
mix modes per vCPU; it must be False on architectures whose VA size is fixed per kernel (arm64 carries
its VA size in the :class:`Architecture` instance instead).
"""

from __future__ import annotations

import abc
import bisect
from collections.abc import Callable, Iterator
from typing import NamedTuple

from aradia.sources.base import PhysicalMemory, Range

PAGE = 4096
MASK64 = (1 << 64) - 1

EntryReader = Callable[[int, int], int]
"""``read_entry(table_paddr, index)``: one 8-byte page-table entry (raises NotRAM off RAM)."""


class Translation(NamedTuple):
    """Where a virtual address lives: ``paddr`` and its page's size and effective permissions.

    (A named tuple: cheap to create on the cached fast path.)
    """

    paddr: int
    page_size: int
    writable: bool
    user: bool
    nx: bool

    @property
    def page_paddr(self) -> int:
        """Physical address of the start of the page."""
        return self.paddr & ~(self.page_size - 1)


class PageMapping(NamedTuple):
    """A run of virtual memory ``[vaddr, vaddr + size)`` mapped contiguously to ``paddr``."""

    vaddr: int
    paddr: int
    size: int
    writable: bool
    user: bool
    nx: bool

    @property
    def end(self) -> int:
        """First virtual address after the run."""
        return self.vaddr + self.size


class Architecture(abc.ABC):
    """One CPU architecture: names, numbers and the page-table walk (each architecture's module
    implements the abstract methods)."""

    name: str = ""  # aradia's name: "x86_64", "arm64"
    qemu_target: str = ""  # QMP query-target's "arch"
    elf_machine: int = 0  # e_machine of its ELF files and cores
    gdb_arch: tuple[str, ...] = ()  # <architecture> names in a GDB target description
    pc: str = ""  # program counter register (GDB stub name)
    sp: str = ""  # stack pointer register
    args: tuple[str, ...] = ()  # integer argument registers of the C calling convention, in order
    ret: str = ""  # integer return-value register
    #: the register a call leaves its return address in (arm64 ``x30``, the link register); None: the
    #: call pushes it, so at a function's first instruction it is the word at the stack pointer (x86)
    link: str | None = None
    page_shifts: tuple[int, ...] = (12, 21, 30)  # page and block sizes a walk can end in, smallest first

    @abc.abstractmethod
    def canonical(self, vaddr: int, la57: bool = False) -> int:
        """``vaddr`` as an unsigned 64-bit address; PageFault if it cannot be translated at all."""

    @abc.abstractmethod
    def root_table(self, root: int) -> int:
        """The physical address of the top-level table named by a root register value (CR3, TTBR)."""

    @abc.abstractmethod
    def walk(self, read_entry: EntryReader, root: int, vaddr: int, la57: bool = False) -> Translation:
        """Translate canonical ``vaddr`` through the tables at ``root``; PageFault names the level."""

    @abc.abstractmethod
    def mappings(self, mem: PhysicalMemory, root: int, la57: bool = False, start: int = 0,
                 end: int = 1 << 64, *, max_tables: int, max_entries: int) -> Iterator[PageMapping]:
        """Mapped runs of ``[start, end)`` in address order (see :func:`aradia.machine.paging.mappings`)."""

    @abc.abstractmethod
    def parse_info_registers(self, text: str) -> dict[int, dict[str, int]]:
        """vCPU index -> registers (lower-case GDB names) from HMP ``info registers -a``."""

    @abc.abstractmethod
    def kernel_root(self, regs: dict[str, int]) -> int:
        """The page-table root kernel addresses translate through, from a vCPU's registers (0: unknown)."""

    @abc.abstractmethod
    def privilege(self, regs: dict[str, int]) -> int:
        """The vCPU's privilege level: x86 CPL (0 kernel, 3 user), arm64 EL (1 kernel, 0 user)."""

    @abc.abstractmethod
    def vcpu_summary(self, regs: dict[str, int]) -> dict[str, int | bool]:
        """A vCPU's registers as :meth:`aradia.vm.VM.info` reports them, under this architecture's names
        (x86-64: ``rip``, ``cr3``, ``cpl``, ``la57``; arm64: ``pc``, ``sp``, ``el``, ``pstate``,
        ``ttbr0``, ``ttbr1``)."""

    def for_registers(self, regs: dict[str, int]) -> Architecture:
        """The walk a vCPU with these registers does (arm64: VA size and format from TCR_EL1)."""
        return self

    system_registers: tuple[str, ...] = ()
    """Registers the HMP dump lacks but translation needs, read through the GDB stub (arm64: TTBRs)."""

    def __repr__(self) -> str:
        return f"<Architecture {self.name}>"




Leaf = tuple[int, int, int, int]
"""A leaf of a page-table walk: (vaddr, size, paddr, flags), flags bit 0 writable, 1 user, 2 nx."""


def merge_leaves(leaves: Iterator[Leaf], ram: list[Range], start: int = 0,
                 end: int = 1 << 64) -> Iterator[PageMapping]:
    """Mapped runs from ``leaves`` (in address order): clipped to ``[start, end)`` and to RAM, adjacent
    leaves merged while virtual and physical addresses continue and the permissions agree."""
    starts = [r.start for r in ram]
    rv = rp = rn = 0
    rf = -1
    for v, size, pa, f in leaves:
        lo, hi = max(v, start), min(v + size, end)
        if lo >= hi:
            continue
        p0 = pa + lo - v
        for plo, phi in ram_parts(starts, ram, p0, p0 + hi - lo):
            vlo, n = lo + plo - p0, phi - plo
            if rf == f and rv + rn == vlo and rp + rn == plo:
                rn += n
                continue
            if rf >= 0:
                yield PageMapping(rv, rp, rn, bool(rf & 1), bool(rf & 2), bool(rf & 4))
            rv, rp, rn, rf = vlo, plo, n, f
    if rf >= 0:
        yield PageMapping(rv, rp, rn, bool(rf & 1), bool(rf & 2), bool(rf & 4))


def ram_parts(starts: list[int], ram: list[Range], lo: int, hi: int) -> Iterator[tuple[int, int]]:
    """The parts of physical ``[lo, hi)`` that are RAM (``starts``: the ranges' start addresses)."""
    i = max(0, bisect.bisect_right(starts, lo) - 1)
    while i < len(ram) and ram[i].start < hi:
        a, b = max(lo, ram[i].start), min(hi, ram[i].end)
        if a < b:
            yield a, b
        i += 1


__all__ = ["MASK64", "PAGE", "Architecture", "EntryReader", "Leaf", "PageMapping", "Translation",
           "merge_leaves", "ram_parts"]
