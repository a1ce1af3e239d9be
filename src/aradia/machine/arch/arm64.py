"""arm64 (AArch64): registers, numbers, and the VMSAv8-64 stage-1 page walk with a 4 KiB granule.

The VA size is the kernel's (``CONFIG_ARM64_VA_BITS``, ``64 - TCR_EL1.T1SZ``): 39 bits walk three
levels (L1-L3), 48 bits four (L0-L3), 52 bits five (L-1 to L3, which needs FEAT_LPA2: ``TCR_EL1.DS``;
Debian's 6.12 kernels use it on ``-cpu max``, 6.1 uses 48 bits). :meth:`Arm64.from_tcr` sets a walk
up from the vCPU's TCR_EL1. An address with its top bits all ones belongs to the TTBR1 half
(the kernel), all zeros to the TTBR0 half (user space); anything else is non-canonical. The walk uses
the root it is given: pass TTBR1 (``swapper_pg_dir``) for kernel addresses, a task's TTBR0
(``mm->pgd``) for its user addresses. A root is a TTBR value: the ASID (bits 48-63) and CnP (bit 0)
are masked off.

Descriptors: bit 0 valid; at L-1 to L2 bit 1 set is a table, clear a block (1 GiB at L1, 2 MiB at L2,
512 GiB at L0 with LPA2 only; never at L-1); at L3 bit 1 must be set (a page). Output addresses are
bits 12-47 (48-bit PA), or with LPA2 bits 12-49 plus bits 8-9 as address bits 50-51 (a TTBR then
carries address bits 48-51 in its bits 2-5). The contiguous hint (bit 52) only says a TLB may cache
neighbours together: it is ignored, each entry is translated on its own. Effective permissions:
writable unless AP[2] (bit 7) or a table's APTable[1] (bit 62) says read-only; user when AP[1] (bit
6) grants EL0 and no table's APTable[0] (bit 61) withdraws it; ``nx`` is UXN (bit 54, or a table's
UXNTable, bit 60) for user pages and PXN (bit 53, PXNTable bit 59) for kernel pages. Invalid
entries, reserved encodings and tables outside RAM raise :class:`~aradia.errors.PageFault` naming the
level.

Guest-physical RAM of QEMU's ``virt`` machine starts at 0x40000000 (:data:`VIRT_RAM_BASE`); that is
the RAM map's business (QEMU's memory tree), not the walk's.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator

from aradia.errors import AradiaError, GuestDataCorrupt, NotRAM, PageFault, UnsupportedKernel
from aradia.machine.arch.base import (
    MASK64,
    PAGE,
    Architecture,
    EntryReader,
    Leaf,
    PageMapping,
    Translation,
    merge_leaves,
)
from aradia.machine.registers import cpu_sections
from aradia.sources.base import PhysicalMemory

VIRT_RAM_BASE = 0x4000_0000
OA_MASK = 0x0000_FFFF_FFFF_F000  # output address bits 12..47 of a descriptor
OA_MASK_LPA2 = 0x0003_FFFF_FFFF_F000  # with LPA2: bits 12..49 (50..51 are in descriptor bits 8..9)
TTBR_BADDR = 0x0000_FFFF_FFFF_FFFE  # table base bits 1..47 of a TTBR (ASID and CnP masked off)
TTBR_BADDR_LPA2 = 0x0000_FFFF_FFFF_FFC0  # with LPA2: bits 6..47 (48..51 are in TTBR bits 2..5)
VALID, TABLE = 0x1, 0x2
AP_EL0, AP_RO = 1 << 6, 1 << 7
PXN, UXN = 1 << 53, 1 << 54
PXN_TABLE, UXN_TABLE = 1 << 59, 1 << 60
AP_TABLE_NO_EL0, AP_TABLE_RO = 1 << 61, 1 << 62
CONTIGUOUS = 1 << 52
DEFAULT_MAX_TABLES = 1 << 16
DEFAULT_MAX_ENTRIES = 1 << 20
_TABLE_STRUCT = struct.Struct("<512Q")
_PAIR = re.compile(r"\b(PC|SP|PSTATE|X\d\d)=([0-9a-fA-F]+)\b")


def levels_for(va_bits: int) -> int:
    """How many levels a 4 KiB-granule walk of ``va_bits`` takes (52: 5, 48: 4, 39: 3)."""
    return -(-(va_bits - 12) // 9)


class Arm64(Architecture):
    """AArch64 with a 4 KiB granule and ``va_bits`` of virtual address (QEMU target ``aarch64``)."""

    name = "arm64"
    qemu_target = "aarch64"
    elf_machine = 183  # EM_AARCH64
    gdb_arch = ("aarch64",)
    pc = "pc"
    sp = "sp"
    args = ("x0", "x1", "x2", "x3", "x4", "x5", "x6", "x7")
    ret = "x0"
    link = "x30"

    def __init__(self, va_bits: int = 48, lpa2: bool = False) -> None:
        """``va_bits``: the kernel's VA size, 25 to 52; ``lpa2``: descriptors in the FEAT_LPA2 format
        (``TCR_EL1.DS``), which a VA over 48 bits needs."""
        if not 25 <= va_bits <= 52 or (va_bits > 48 and not lpa2):
            raise UnsupportedKernel(f"arm64 with a {va_bits}-bit VA{' and LPA2' if lpa2 else ''} is not "
                                    "supported (25 to 48 bits, or up to 52 with LPA2, are)")
        self.va_bits = va_bits
        self.lpa2 = lpa2
        self.levels = levels_for(va_bits)

    @classmethod
    def from_tcr(cls, tcr: int) -> Arm64:
        """The walk a vCPU with this TCR_EL1 does for the kernel half (T1SZ, TG1, DS)."""
        if (tcr >> 30) & 3 != 0b10:
            raise UnsupportedKernel(f"arm64 kernel uses TCR_EL1.TG1={(tcr >> 30) & 3:#b}: "
                                    "only the 4 KiB granule is supported")
        return cls(64 - ((tcr >> 16) & 0x3F), bool((tcr >> 59) & 1))

    def for_registers(self, regs: dict[str, int]) -> Arm64:
        """The walk the vCPU with these registers does: from its ``tcr_el1`` when known (and set)."""
        tcr = regs.get("tcr_el1", 0)
        return Arm64.from_tcr(tcr) if tcr else self

    def __repr__(self) -> str:
        return f"<Architecture arm64 va_bits={self.va_bits}{' lpa2' if self.lpa2 else ''}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Arm64) and (other.va_bits, other.lpa2) == (self.va_bits, self.lpa2)

    def __hash__(self) -> int:
        return hash(("arm64", self.va_bits, self.lpa2))

    def _oa(self, entry: int) -> int:
        """A descriptor's output address (next table, block or page)."""
        if self.lpa2:
            return (entry & OA_MASK_LPA2) | ((entry & 0x300) << 42)
        return entry & OA_MASK

    def _no_la57(self, la57: bool) -> None:
        if la57:
            raise AradiaError("la57 (x86 5-level paging) asked of an arm64 walk")

    def canonical(self, vaddr: int, la57: bool = False) -> int:
        """``vaddr`` as an unsigned 64-bit address in the TTBR0 or the TTBR1 half.

        Negative ints are taken as two's complement; PageFault (level "non-canonical") otherwise.
        """
        self._no_la57(la57)
        if -(1 << 63) <= vaddr < 0:
            vaddr &= MASK64
        top = vaddr >> self.va_bits
        if vaddr > MASK64 or (top != 0 and top != (1 << (64 - self.va_bits)) - 1):
            raise PageFault(vaddr, 0, "non-canonical address")
        return vaddr

    def root_table(self, root: int) -> int:
        """A TTBR value without its ASID and CnP bits (with LPA2: address bits 48-51 from bits 2-5)."""
        if self.lpa2:
            return (root & TTBR_BADDR_LPA2) | ((root >> 2) & 0xF) << 48
        return root & TTBR_BADDR

    def _top_index(self, vaddr: int) -> int:
        shift = 12 + 9 * (self.levels - 1)
        return (vaddr >> shift) & ((1 << (self.va_bits - shift)) - 1)

    def walk(self, read_entry: EntryReader, root: int, vaddr: int, la57: bool = False) -> Translation:
        """Walk the tables at TTBR value ``root`` for canonical ``vaddr``."""
        self._no_la57(la57)
        table = self.root_table(root)
        level = 4 - self.levels  # the first level: -1 for 52 bits, 0 for 48, 1 for 39
        shift = 12 + 9 * (3 - level)
        index = self._top_index(vaddr)
        ro = no_el0 = uxn = pxn = False
        while True:
            try:
                entry = read_entry(table, index)
            except NotRAM:
                raise PageFault(vaddr, root,
                                f"L{level} table {table:#x}: not RAM (corrupt page tables)") from None
            if not entry & VALID:
                raise PageFault(vaddr, root, f"L{level} entry {index} of table {table:#x}")
            if level < 3 and entry & TABLE:
                ro = ro or bool(entry & AP_TABLE_RO)
                no_el0 = no_el0 or bool(entry & AP_TABLE_NO_EL0)
                uxn = uxn or bool(entry & UXN_TABLE)
                pxn = pxn or bool(entry & PXN_TABLE)
                table = self._oa(entry)
                level += 1
                shift -= 9
                index = (vaddr >> shift) & 511
                continue
            if level < 0 or (level == 0 and not self.lpa2) or (level == 3 and not entry & TABLE):
                raise PageFault(vaddr, root, f"L{level} entry {index} of table {table:#x}: reserved encoding")
            size = 1 << shift
            user = not no_el0 and bool(entry & AP_EL0)
            nx = (uxn or bool(entry & UXN)) if user else (pxn or bool(entry & PXN))
            base = self._oa(entry) & ~(size - 1)
            return Translation(base | (vaddr & (size - 1)), size, not ro and not entry & AP_RO, user, nx)

    def mappings(self, mem: PhysicalMemory, root: int, la57: bool = False, start: int = 0,
                 end: int = 1 << 64, *, max_tables: int = DEFAULT_MAX_TABLES,
                 max_entries: int = DEFAULT_MAX_ENTRIES) -> Iterator[PageMapping]:
        """Mapped runs of ``[start, end)`` under TTBR value ``root`` (see
        :func:`aradia.machine.paging.mappings`): tables outside RAM are skipped, leaves clipped to RAM,
        a table on its own path not followed, and more than ``max_tables`` tables or ``max_entries``
        valid entries raise :class:`GuestDataCorrupt`. A TTBR serves one half of the address space but
        does not say which: the root is walked as each half ``[start, end)`` overlaps (pass the
        half's bounds, e.g. ``start=0xffff000000000000`` for a TTBR1 root)."""
        self._no_la57(la57)
        return merge_leaves(self._leaves(mem, root, start, end, max_tables, max_entries), mem.ranges(),
                            start, end)

    def _leaves(self, mem: PhysicalMemory, root: int, start: int, end: int, max_tables: int,
                max_entries: int) -> Iterator[Leaf]:
        budget = [max_tables, max_entries]
        high = MASK64 & ~((1 << self.va_bits) - 1)  # the TTBR1 half's first address

        def over(what: str, limit: int) -> GuestDataCorrupt:
            return GuestDataCorrupt(f"page tables at root {root:#x} need more than {limit} {what}: "
                                    "loop or corrupt tables")

        def visit(table: int, level: int, vbase: int, flags: int, path: tuple[int, ...]) -> Iterator[Leaf]:
            budget[0] -= 1
            if budget[0] < 0:
                raise over("table visits", max_tables)
            try:
                entries = _TABLE_STRUCT.unpack(mem.read(table, PAGE))
            except NotRAM:
                return
            shift = 12 + 9 * (3 - level)
            size = 1 << shift
            count = 1 << (self.va_bits - shift) if level == 4 - self.levels else 512
            for i in range(min(count, 512)):
                e = entries[i]
                if not e & VALID:
                    continue
                budget[1] -= 1
                if budget[1] < 0:
                    raise over("page-table entries", max_entries)
                v = vbase + (i << shift)
                if v >= end or v + size <= start:
                    continue
                if level < 3 and e & TABLE:
                    sub = self._oa(e)
                    if sub in path:
                        continue
                    f = flags | (1 if e & AP_TABLE_RO else 0) | (2 if e & AP_TABLE_NO_EL0 else 0)
                    f |= (4 if e & UXN_TABLE else 0) | (8 if e & PXN_TABLE else 0)
                    yield from visit(sub, level + 1, v, f, (*path, sub))
                    continue
                if level < 0 or (level == 0 and not self.lpa2) or (level == 3 and not e & TABLE):
                    continue  # reserved encodings map nothing
                user = not flags & 2 and bool(e & AP_EL0)
                nx = (bool(flags & 4) or bool(e & UXN)) if user else (bool(flags & 8) or bool(e & PXN))
                writable = not flags & 1 and not e & AP_RO
                flags_out = int(writable) | (2 if user else 0) | (4 if nx else 0)
                yield v, size, self._oa(e) & ~(size - 1), flags_out

        table = self.root_table(root)
        # The same root serves either half: walk it as the half [start, end) asks for.
        bases = [b for b in (0, high) if b < end and start < b + (1 << self.va_bits)]
        for vbase in bases:
            yield from visit(table, 4 - self.levels, vbase, 0, (table,))

    system_registers = ("ttbr0_el1", "ttbr1_el1", "tcr_el1")

    def parse_info_registers(self, text: str) -> dict[int, dict[str, int]]:
        """vCPU index -> ``pc``, ``sp``, ``x0``..``x30``, ``cpsr`` (PSTATE) from HMP ``info registers``.

        QEMU prints ``PC=``, ``X00=``..``X30=``, ``SP=``, ``PSTATE=`` and then SVE/FP state, which is
        skipped; names follow QEMU's GDB stub (``x0``, ``cpsr``), so both sources agree.
        """
        out: dict[int, dict[str, int]] = {}
        for idx, chunk in cpu_sections(text):
            regs: dict[str, int] = {}
            for name, val in _PAIR.findall(chunk):
                key = {"PSTATE": "cpsr"}.get(name, name.lower())
                if key.startswith("x"):
                    key = f"x{int(key[1:])}"
                regs[key] = int(val, 16)
            if regs:
                out[idx] = regs
        return out

    def kernel_root(self, regs: dict[str, int]) -> int:
        """TTBR1_EL1 (the kernel half's tables), where the registers carry it (GDB stub, not HMP)."""
        return regs.get("ttbr1_el1", 0)

    def privilege(self, regs: dict[str, int]) -> int:
        """The exception level, PSTATE.EL (bits 2-3 of ``cpsr``): 1 in the kernel, 0 in user space."""
        return (regs.get("cpsr", 0) >> 2) & 3

    def vcpu_summary(self, regs: dict[str, int]) -> dict[str, int | bool]:
        """``pc``, ``sp``, ``el`` (PSTATE.EL), ``pstate`` and the translation roots ``ttbr0`` and
        ``ttbr1`` (TTBR0_EL1, TTBR1_EL1 as the vCPU holds them, ASID included; 0 when the source did
        not give them)."""
        return {"pc": regs.get("pc", 0), "sp": regs.get("sp", 0), "el": self.privilege(regs),
                "pstate": regs.get("cpsr", 0), "ttbr0": regs.get("ttbr0_el1", 0),
                "ttbr1": regs.get("ttbr1_el1", 0)}

    def check_tcr(self, tcr: int) -> None:
        """Raise :class:`UnsupportedKernel` unless TCR_EL1 says what this walk assumes: a 4 KiB
        granule (TG1 = 0b10), ``64 - T1SZ == va_bits`` for the kernel half and the LPA2 format (DS)."""
        other = Arm64.from_tcr(tcr)
        if other != self:
            raise UnsupportedKernel(f"arm64 kernel uses a {other.va_bits}-bit kernel VA"
                                    f"{' with LPA2' if other.lpa2 else ''} (TCR_EL1 {tcr:#x}); this walk "
                                    f"was set up for {self.va_bits} bits{' with LPA2' if self.lpa2 else ''}")


ARM64 = Arm64()
"""arm64 with 48-bit VA (Debian's kernels: ``CONFIG_ARM64_VA_BITS=48``)."""


__all__ = ["ARM64", "VIRT_RAM_BASE", "Arm64", "levels_for"]
