"""x86-64: registers, numbers, and the 4-level (48-bit) and 5-level (LA57, 57-bit) page walk.

4 KiB, 2 MiB and 1 GiB pages. The root is a CR3 value: the PCID / PWT / PCD bits (0-11) and the
no-flush and LAM bits (61-63) are masked off, as is every entry's flag and software bits, leaving
physical address bits 12-51. Each translation reports the effective permissions: writable and user only
if every level allows it, NX if any level sets it (the raw bit: whether EFER.NXE is on is the caller's
business). Non-canonical addresses, absent entries, page-table pages outside RAM and the reserved PS
bit in a PML5E/PML4E raise :class:`~aradia.errors.PageFault` naming the level. Walks are at most five
reads, so corrupt tables (loops, wild pointers) cannot hang them; :func:`x86_mappings` bounds the
tables it visits.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Iterator

from aradia.errors import GuestDataCorrupt, NotRAM, PageFault
from aradia.machine.arch.base import (
    MASK64,
    PAGE,
    Architecture,
    EntryReader,
    PageMapping,
    Translation,
    ram_parts,
)
from aradia.machine.registers import parse_info_registers
from aradia.sources.base import PhysicalMemory

ADDR_MASK = 0x000F_FFFF_FFFF_F000  # physical address bits 12..51 of a CR3 or entry
P, RW, US, PS = 0x1, 0x2, 0x4, 0x80
NX = 1 << 63
CR4_LA57 = 1 << 12
LEVEL_NAMES = {5: "PML5", 4: "PML4", 3: "PDPT", 2: "PD", 1: "PT"}
DEFAULT_MAX_TABLES = 1 << 16
DEFAULT_MAX_ENTRIES = 1 << 20
_PRESENT = bytes(b & 1 for b in range(256))
_TABLE_STRUCT = struct.Struct("<512Q")


def canonical(vaddr: int, la57: bool = False) -> int:
    """``vaddr`` as an unsigned 64-bit address (negative ints are taken as two's complement).

    Raises :class:`PageFault` (level "non-canonical") if it is not canonical for the paging mode.
    """
    if -(1 << 63) <= vaddr < 0:
        vaddr &= MASK64
    bits = 57 if la57 else 48
    top = vaddr >> (bits - 1)
    if vaddr > MASK64 or (top != 0 and top != (1 << (65 - bits)) - 1):
        raise PageFault(vaddr, 0, "non-canonical address")
    return vaddr


def _sign_extend(vaddr: int, la57: bool) -> int:
    bits = 57 if la57 else 48
    if vaddr >> (bits - 1) & 1:
        vaddr |= MASK64 & ~((1 << bits) - 1)
    return vaddr


def _walk(read_entry: EntryReader, root: int, vaddr: int, la57: bool) -> Translation:
    """Walk the tables for canonical ``vaddr``; ``read_entry(table_paddr, index)`` gives entries."""
    table = root & ADDR_MASK
    level = 5 if la57 else 4
    shift = 48 if la57 else 39
    writable = user = True
    nx = False
    while True:
        index = (vaddr >> shift) & 511
        try:
            entry = read_entry(table, index)
        except NotRAM:
            raise PageFault(
                vaddr, root, f"{LEVEL_NAMES[level]} table {table:#x}: not RAM (corrupt page tables)"
            ) from None
        if not entry & P:
            raise PageFault(vaddr, root, f"{LEVEL_NAMES[level]} entry {index} of table {table:#x}")
        writable = writable and bool(entry & RW)
        user = user and bool(entry & US)
        nx = nx or bool(entry & NX)
        if level == 1 or (entry & PS and level <= 3):
            size = 1 << shift
            base = entry & ADDR_MASK & ~(size - 1)
            return Translation(base | (vaddr & (size - 1)), size, writable, user, nx)
        if entry & PS:
            raise PageFault(
                vaddr, root, f"{LEVEL_NAMES[level]} entry {index} of table {table:#x}: reserved PS bit"
            )
        table = entry & ADDR_MASK
        level -= 1
        shift -= 9



def x86_mappings(
    mem: PhysicalMemory,
    root: int,
    la57: bool = False,
    start: int = 0,
    end: int = 1 << 64,
    *,
    max_tables: int = DEFAULT_MAX_TABLES,
    max_entries: int = DEFAULT_MAX_ENTRIES,
) -> Iterator[PageMapping]:
    """Mapped runs of ``[start, end)`` (unsigned addresses), in address order.

    Adjacent pages are merged while both virtual and physical addresses continue and the
    permissions agree. Page-table pages outside RAM are skipped, and data pages are clipped to
    RAM (a corrupt or MMIO entry is reported as nothing rather than as something bogus; a 1 GiB
    page over the legacy VGA hole yields the RAM on both sides). An entry pointing back to a table
    on its own path (a recursive self-map) is not followed. Visiting more than
    ``max_tables`` tables or ``max_entries`` present entries raises :class:`GuestDataCorrupt`
    (tables shared many times over); the defaults allow ~4 GiB of 4 KiB mappings and bound the
    time to a few seconds.
    """
    levels = 5 if la57 else 4
    ram = mem.ranges()
    ram_starts = [r.start for r in ram]
    budget = [max_tables, max_entries]

    def over(what: str, limit: int) -> GuestDataCorrupt:
        return GuestDataCorrupt(
            f"page tables at root {root:#x} need more than {limit} {what}: loop or corrupt tables"
        )

    # The run being merged: vaddr, paddr, size, flags (bit 0 = writable, 1 = user, 2 = nx).
    rv = rp = rn = 0
    rf = -1
    ram_lo = ram_hi = 0  # the RAM range the last leaf fell in (most leaves hit it again)
    # Explicit DFS stack of tables being scanned: [entries, present-map, next index, level, vbase,
    # flags, table paddr]. Tables outside RAM are skipped.
    stack: list[list] = []  # type: ignore[type-arg]

    def push(table: int, level: int, vbase: int, flags: int) -> None:
        budget[0] -= 1
        if budget[0] < 0:
            raise over("table visits", max_tables)
        try:
            data = mem.read(table, PAGE)
        except NotRAM:
            return
        present = data[0::8].translate(_PRESENT)  # byte i is 1 iff entry i has P set
        stack.append([_TABLE_STRUCT.unpack(data), present, present.find(1), level, vbase, flags, table])

    push(root & ADDR_MASK, levels, 0, 0b011)
    while stack:
        top = stack[-1]
        entries, present, i, level, vbase, flags, _ = top
        if i < 0:
            stack.pop()
            continue
        top[2] = present.find(1, i + 1)
        budget[1] -= 1
        if budget[1] < 0:
            raise over("page-table entries", max_entries)
        e = entries[i]
        shift = 3 + 9 * level
        size = 1 << shift
        v = vbase + (i << shift)
        if level == levels:
            v = _sign_extend(v, la57)
        if v >= end or v + size <= start:
            continue
        f = (flags & (0b100 | (2 if e & US else 0) | (1 if e & RW else 0))) | (4 if e & NX else 0)
        if not (level == 1 or (e & PS and level <= 3)):
            sub = e & ADDR_MASK
            if not e & PS and not any(t[6] == sub for t in stack):
                push(sub, level - 1, v, f)
            continue
        lo, hi = max(v, start), min(v + size, end)
        pa = (e & ADDR_MASK & ~(size - 1)) + lo - v
        if ram_lo <= pa and pa + (hi - lo) <= ram_hi:
            parts: list[tuple[int, int]] = [(pa, pa + hi - lo)]
        else:
            parts = list(ram_parts(ram_starts, ram, pa, pa + hi - lo))
            if len(parts) == 1:
                k = bisect.bisect_right(ram_starts, pa) - 1
                ram_lo, ram_hi = ram[k].start, ram[k].end
        for plo, phi in parts:
            vlo, n = lo + plo - pa, phi - plo
            if rf == f and rv + rn == vlo and rp + rn == plo:
                rn += n
                continue
            if rf >= 0:
                yield PageMapping(rv, rp, rn, bool(rf & 1), bool(rf & 2), bool(rf & 4))
            rv, rp, rn, rf = vlo, plo, n, f
    if rf >= 0:
        yield PageMapping(rv, rp, rn, bool(rf & 1), bool(rf & 2), bool(rf & 4))


class X86_64(Architecture):
    """x86-64 (System V calling convention; QEMU target ``x86_64``, ELF machine EM_X86_64)."""

    name = "x86_64"
    qemu_target = "x86_64"
    elf_machine = 62
    gdb_arch = ("i386:x86-64",)
    pc = "rip"
    sp = "rsp"
    args = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")
    ret = "rax"

    def canonical(self, vaddr: int, la57: bool = False) -> int:
        """See :func:`canonical`."""
        return canonical(vaddr, la57)

    def root_table(self, root: int) -> int:
        """CR3 without its PCID/flag bits."""
        return root & ADDR_MASK

    def walk(self, read_entry: EntryReader, root: int, vaddr: int, la57: bool = False) -> Translation:
        """Walk the 4- or 5-level tables at CR3 value ``root``."""
        return _walk(read_entry, root, vaddr, la57)

    def mappings(self, mem: PhysicalMemory, root: int, la57: bool = False, start: int = 0,
                 end: int = 1 << 64, *, max_tables: int = DEFAULT_MAX_TABLES,
                 max_entries: int = DEFAULT_MAX_ENTRIES) -> Iterator[PageMapping]:
        """See :func:`x86_mappings`."""
        return x86_mappings(mem, root, la57, start, end, max_tables=max_tables, max_entries=max_entries)

    def parse_info_registers(self, text: str) -> dict[int, dict[str, int]]:
        """See :func:`aradia.machine.registers.parse_info_registers`."""
        return parse_info_registers(text)

    def kernel_root(self, regs: dict[str, int]) -> int:
        """CR3 (it maps the kernel half in every process)."""
        return regs.get("cr3", 0)

    def privilege(self, regs: dict[str, int]) -> int:
        """CPL: QEMU's ``cpl`` where given, else CS's low bits."""
        return regs.get("cpl", regs.get("cs", 0) & 3)

    def vcpu_summary(self, regs: dict[str, int]) -> dict[str, int | bool]:
        """``rip``, ``cr3``, ``cpl`` and ``la57`` (CR4.LA57: 5-level paging)."""
        return {"rip": regs.get("rip", 0), "cr3": self.kernel_root(regs), "cpl": self.privilege(regs),
                "la57": bool(regs.get("cr4", 0) & CR4_LA57)}


__all__ = ["ADDR_MASK", "DEFAULT_MAX_ENTRIES", "DEFAULT_MAX_TABLES", "X86_64", "canonical", "x86_mappings"]
