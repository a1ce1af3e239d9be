"""x86-64 virtual-to-physical translation by walking guest page tables in physical memory.

4-level (48-bit) and 5-level (LA57, 57-bit) paging; 4 KiB, 2 MiB and 1 GiB pages. The root is a CR3
value: the PCID / PWT / PCD bits (0-11) and the no-flush and LAM bits (61-63) are masked off, as is
every entry's flag and software bits, leaving physical address bits 12-51. Each translation reports
the effective permissions: writable and user only if every level allows it, NX if any level sets it
(the raw bit: whether EFER.NXE is on is the caller's business). Non-canonical addresses, absent
entries, page-table pages outside RAM and the reserved PS bit in a PML5E/PML4E raise
:class:`~aradia.errors.PageFault` naming the level. Walks are at most five reads, so corrupt tables
(loops, wild pointers) cannot hang them; :func:`mappings` bounds the tables it visits.

Freshness rule of :class:`Translator` (the cached walker): it takes ``stamp``, a callable returning a
token that stays equal as long as guest memory cannot change -- the guest is paused and has not run
since (one pause epoch), or the memory is a dump (a constant) -- and ``None`` while the guest runs.
Every cached walk and page-table page belongs to one stamp value:

* the stamp is asked before each page is translated;
* ``None`` -> nothing is cached or served from the cache: each walk reads the page tables afresh;
* a value different from the one the cache was filled under -> the cache is emptied first;
* writes through :meth:`Translator.write` that touch a cached page-table page empty the cache.

So a cached entry is never served after the guest has run. Writes to guest memory made behind the
translator's back while paused (``mem.write``, a debugger) must call :meth:`Translator.invalidate`
or bump the stamp. Only translations are cached, never data: every read goes to memory.
"""

from __future__ import annotations

import bisect
import struct
import threading
from collections.abc import Callable, Iterator
from typing import NamedTuple

from aradia.errors import AradiaError, GuestDataCorrupt, NotRAM, PageFault
from aradia.sources.base import PhysicalMemory, Range

PAGE = 4096
MASK64 = (1 << 64) - 1
ADDR_MASK = 0x000F_FFFF_FFFF_F000  # physical address bits 12..51 of a CR3 or entry
P, RW, US, PS = 0x1, 0x2, 0x4, 0x80
NX = 1 << 63
SIZE_4K, SIZE_2M, SIZE_1G = 1 << 12, 1 << 21, 1 << 30
LEVEL_NAMES = {5: "PML5", 4: "PML4", 3: "PDPT", 2: "PD", 1: "PT"}
DEFAULT_MAX_TABLES = 1 << 16
DEFAULT_MAX_ENTRIES = 1 << 20
_PRESENT = bytes(b & 1 for b in range(256))
_TABLE_STRUCT = struct.Struct("<512Q")


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


EntryReader = Callable[[int, int], int]


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


def _reader(mem: PhysicalMemory) -> EntryReader:
    def read_entry(table: int, index: int) -> int:
        return int.from_bytes(mem.read(table + 8 * index, 8), "little")

    return read_entry


def translate(mem: PhysicalMemory, root: int, vaddr: int, *, la57: bool = False) -> Translation:
    """Translate ``vaddr`` through the page tables at ``root`` (a CR3 value), reading them fresh."""
    try:
        v = canonical(vaddr, la57)
    except PageFault:
        raise PageFault(vaddr, root, "non-canonical address") from None
    return _walk(_reader(mem), root, v, la57)


def _plan(
    tr: Callable[[int], Translation], root: int, vaddr: int, size: int, la57: bool
) -> list[tuple[int, int]]:
    """(paddr, length) pieces of ``[vaddr, vaddr + size)``, all translated before any access."""
    if size < 0:
        raise AradiaError(f"negative size {size}")
    try:
        v = canonical(vaddr, la57)
    except PageFault:
        raise PageFault(vaddr, root, "non-canonical address") from None
    out: list[tuple[int, int]] = []
    left = size
    while left > 0:
        if v != vaddr:
            try:
                canonical(v, la57)
            except PageFault:
                raise PageFault(v, root, "non-canonical address") from None
        t = tr(v)
        n = min(left, t.page_size - (t.paddr & (t.page_size - 1)))
        if out and out[-1][0] + out[-1][1] == t.paddr:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((t.paddr, n))
        v += n
        left -= n
    return out


def read_virt(mem: PhysicalMemory, root: int, vaddr: int, size: int, la57: bool = False) -> bytes:
    """Read ``size`` bytes of guest-virtual memory (any span of pages; PageFault if one is absent)."""
    plan = _plan(lambda v: translate(mem, root, v, la57=la57), root, vaddr, size, la57)
    return b"".join(mem.read(p, n) for p, n in plan)


def write_virt(mem: PhysicalMemory, root: int, vaddr: int, data: bytes, la57: bool = False) -> None:
    """Write ``data`` at guest-virtual ``vaddr``; every page is translated before the first byte is
    written, so a page fault leaves memory untouched. Page permissions are not enforced."""
    plan = _plan(lambda v: translate(mem, root, v, la57=la57), root, vaddr, len(data), la57)
    pos = 0
    for p, n in plan:
        mem.write(p, data[pos : pos + n])
        pos += n


def mappings(
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
            parts = list(_ram_parts(ram_starts, ram, pa, pa + hi - lo))
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


def _ram_parts(starts: list[int], ram: list[Range], lo: int, hi: int) -> Iterator[tuple[int, int]]:
    """The parts of physical ``[lo, hi)`` that are RAM."""
    i = max(0, bisect.bisect_right(starts, lo) - 1)
    while i < len(ram) and ram[i].start < hi:
        a, b = max(lo, ram[i].start), min(hi, ram[i].end)
        if a < b:
            yield a, b
        i += 1


class Translator:
    """A page-table walker that caches walks under the freshness rule of the module docstring.

    ``stamp()`` returns a token equal while memory cannot change, or None while the guest runs.
    For a dump pass a constant, e.g. ``lambda: 0``. Safe to share between threads: a walk that
    straddles an invalidation or a stamp change is returned but not cached.
    """

    def __init__(
        self,
        mem: PhysicalMemory,
        stamp: Callable[[], object | None],
        *,
        max_entries: int = 1 << 18,
        max_tables: int = 1 << 14,
    ) -> None:
        self.mem = mem
        self._stamp = stamp
        self._max_entries = max_entries
        self._max_tables = max_tables
        self._cache_stamp: object | None = None
        # (root, la57, vaddr >> page shift) -> Translation of the page's first byte, one dict per size
        self._p4k: dict[tuple[int, bool, int], Translation] = {}
        self._p2m: dict[tuple[int, bool, int], Translation] = {}
        self._p1g: dict[tuple[int, bool, int], Translation] = {}
        self._pages = {12: self._p4k, 21: self._p2m, 30: self._p1g}
        self._tables: dict[int, bytes] = {}
        self._gen = 0  # bumped by every invalidation
        self._lock = threading.Lock()  # guards inserts against concurrent invalidation
        self.hits = 0
        self.walks = 0

    def invalidate(self) -> None:
        """Forget every cached walk and page-table page."""
        with self._lock:
            self._invalidate_locked()
            self._cache_stamp = None

    def _invalidate_locked(self) -> None:
        self._gen += 1
        for d in self._pages.values():
            d.clear()
        self._tables.clear()

    def _fresh(self) -> bool:
        """Apply the stamp rule; True when the cache may be used for this access."""
        s = self._stamp()
        if s is None:
            if self._cache_stamp is not None or self._tables or self._p4k:
                self.invalidate()
            return False
        if s != self._cache_stamp:
            with self._lock:
                self._invalidate_locked()
                self._cache_stamp = s
        return True

    def _entry_reader(self, gen: int) -> EntryReader:
        """Entry reader for one walk: table pages are cached only while ``gen`` is current."""

        def read_entry(table: int, index: int) -> int:
            data = self._tables.get(table)
            if data is None:
                try:
                    data = self.mem.read(table, PAGE)
                except NotRAM:
                    return int.from_bytes(self.mem.read(table + 8 * index, 8), "little")
                with self._lock:
                    if len(self._tables) >= self._max_tables:
                        # Drop the walks too: every cached walk's tables must stay in _tables so
                        # that write() can tell when it modifies one.
                        self._invalidate_locked()
                    elif gen == self._gen:
                        self._tables[table] = data
            return int.from_bytes(data[8 * index : 8 * index + 8], "little")

        return read_entry

    def invalidate_pages(self) -> None:
        """Drop cached walks and tables but keep the stamp (after a write that may hit tables)."""
        with self._lock:
            self._invalidate_locked()

    def translate(self, root: int, vaddr: int, *, la57: bool = False) -> Translation:
        """Translate ``vaddr`` through the tables at ``root`` (CR3), from the cache when fresh."""
        try:
            v = canonical(vaddr, la57)
        except PageFault:
            raise PageFault(vaddr, root, "non-canonical address") from None
        return self._translate(root & ADDR_MASK, v, la57)

    def _translate(self, root: int, v: int, la57: bool) -> Translation:
        if not self._fresh():
            self.walks += 1
            return _walk(_reader(self.mem), root, v, la57)
        t = self._p4k.get((root, la57, v >> 12))
        if t is not None:
            self.hits += 1
            return Translation(t.paddr | (v & 0xFFF), 4096, t.writable, t.user, t.nx)
        for shift, d in ((21, self._p2m), (30, self._p1g)):
            t = d.get((root, la57, v >> shift))
            if t is not None:
                self.hits += 1
                return Translation(t.paddr | (v & ((1 << shift) - 1)), 1 << shift, t.writable, t.user, t.nx)
        self.walks += 1
        gen, stamp = self._gen, self._cache_stamp
        t = _walk(self._entry_reader(gen), root, v, la57)
        # Keep the result only if nothing was invalidated meanwhile (another thread, or the guest
        # ran and paused again during the walk): a walk must not outlive its stamp.
        if self._stamp() != stamp:
            return t
        shift = t.page_size.bit_length() - 1
        with self._lock:
            if gen == self._gen:
                d = self._pages[shift]
                if len(d) >= self._max_entries:
                    d.clear()
                d[(root, la57, v >> shift)] = Translation(t.page_paddr, t.page_size, t.writable, t.user, t.nx)
        return t

    def read(self, root: int, vaddr: int, size: int, *, la57: bool = False) -> bytes:
        """Read guest-virtual memory (data is always read fresh; only translations are cached)."""
        if 0 < size <= PAGE - (vaddr & 0xFFF):  # within one page: one translation, one read
            return self.mem.read(self.translate(root, vaddr, la57=la57).paddr, size)
        r = root & ADDR_MASK
        plan = _plan(lambda v: self._translate(r, v, la57), root, vaddr, size, la57)
        if len(plan) == 1:
            return self.mem.read(*plan[0])
        return b"".join(self.mem.read(p, n) for p, n in plan)

    def write(self, root: int, vaddr: int, data: bytes, *, la57: bool = False) -> None:
        """Write guest-virtual memory; all pages are translated first. Empties the cache if the
        write touches a page-table page it holds."""
        r = root & ADDR_MASK
        plan = _plan(lambda v: self._translate(r, v, la57), root, vaddr, len(data), la57)
        pos = 0
        for p, n in plan:
            self.mem.write(p, data[pos : pos + n])
            pos += n
            first, last = p & ~(PAGE - 1), (p + n - 1) & ~(PAGE - 1)
            if any(t in self._tables for t in range(first, last + 1, PAGE)):
                self.invalidate_pages()

    def mappings(
        self, root: int, la57: bool = False, start: int = 0, end: int = 1 << 64
    ) -> Iterator[PageMapping]:
        """Mapped runs (see :func:`mappings`); always read fresh."""
        return mappings(self.mem, root, la57, start, end)
