"""Virtual-to-physical translation by walking guest page tables in physical memory.

The walk itself belongs to the guest's architecture (:mod:`aradia.machine.arch`: x86-64 4- and
5-level paging in :mod:`~aradia.machine.arch.x86_64`, arm64 in :mod:`~aradia.machine.arch.arm64`);
every function and :class:`Translator` here takes ``arch`` (default x86-64) and does the rest the same
way for all of them: reads spanning pages, writes translated in full before the first byte, mapping
runs, and a cache. Walks are a handful of reads, so corrupt tables (loops, wild pointers) cannot hang
them; :func:`mappings` bounds the tables it visits.

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

import threading
from collections.abc import Callable, Iterator

from aradia.errors import AradiaError, NotRAM, PageFault
from aradia.machine.arch import X86
from aradia.machine.arch.base import MASK64, PAGE, Architecture, EntryReader, PageMapping, Translation
from aradia.machine.arch.x86_64 import ADDR_MASK, DEFAULT_MAX_ENTRIES, DEFAULT_MAX_TABLES, canonical
from aradia.sources.base import PhysicalMemory

SIZE_4K, SIZE_2M, SIZE_1G = 1 << 12, 1 << 21, 1 << 30


def _reader(mem: PhysicalMemory) -> EntryReader:
    def read_entry(table: int, index: int) -> int:
        return int.from_bytes(mem.read(table + 8 * index, 8), "little")

    return read_entry


def translate(mem: PhysicalMemory, root: int, vaddr: int, *, la57: bool = False,
              arch: Architecture = X86) -> Translation:
    """Translate ``vaddr`` through the page tables at ``root`` (CR3; TTBR on arm64), reading them fresh."""
    try:
        v = arch.canonical(vaddr, la57)
    except PageFault:
        raise PageFault(vaddr, root, "non-canonical address") from None
    return arch.walk(_reader(mem), root, v, la57)


def _plan(
    tr: Callable[[int], Translation], root: int, vaddr: int, size: int, la57: bool, arch: Architecture
) -> list[tuple[int, int]]:
    """(paddr, length) pieces of ``[vaddr, vaddr + size)``, all translated before any access."""
    if size < 0:
        raise AradiaError(f"negative size {size}")
    try:
        v = arch.canonical(vaddr, la57)
    except PageFault:
        raise PageFault(vaddr, root, "non-canonical address") from None
    out: list[tuple[int, int]] = []
    left = size
    while left > 0:
        if v != vaddr:
            try:
                arch.canonical(v, la57)
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


def read_virt(mem: PhysicalMemory, root: int, vaddr: int, size: int, la57: bool = False, *,
              arch: Architecture = X86) -> bytes:
    """Read ``size`` bytes of guest-virtual memory (any span of pages; PageFault if one is absent)."""
    plan = _plan(lambda v: translate(mem, root, v, la57=la57, arch=arch), root, vaddr, size, la57, arch)
    return b"".join(mem.read(p, n) for p, n in plan)


def write_virt(mem: PhysicalMemory, root: int, vaddr: int, data: bytes, la57: bool = False, *,
               arch: Architecture = X86) -> None:
    """Write ``data`` at guest-virtual ``vaddr``; every page is translated before the first byte is
    written, so a page fault leaves memory untouched. Page permissions are not enforced."""
    plan = _plan(lambda v: translate(mem, root, v, la57=la57, arch=arch), root, vaddr, len(data), la57, arch)
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
    arch: Architecture = X86,
) -> Iterator[PageMapping]:
    """Mapped runs of ``[start, end)`` under page-table ``root``, in address order, merged while
    both addresses continue and the permissions agree: ``arch``'s walk (see
    :func:`aradia.machine.arch.x86_64.x86_mappings` for what is skipped, clipped and bounded)."""
    return arch.mappings(mem, root, la57, start, end, max_tables=max_tables, max_entries=max_entries)


class Translator:
    """A page-table walker that caches walks under the freshness rule of the module docstring.

    ``stamp()`` returns a token equal while memory cannot change, or None while the guest runs.
    For a dump pass a constant, e.g. ``lambda: 0``. ``arch`` is the guest's architecture (its walk).
    Safe to share between threads: a walk that straddles an invalidation or a stamp change is returned
    but not cached.
    """

    def __init__(
        self,
        mem: PhysicalMemory,
        stamp: Callable[[], object | None],
        *,
        max_entries: int = 1 << 18,
        max_tables: int = 1 << 14,
        arch: Architecture = X86,
    ) -> None:
        self.mem = mem
        self.arch = arch
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
        """Translate ``vaddr`` through the tables at ``root`` (CR3, TTBR), from the cache when fresh."""
        try:
            v = self.arch.canonical(vaddr, la57)
        except PageFault:
            raise PageFault(vaddr, root, "non-canonical address") from None
        return self._translate(self.arch.root_table(root), v, la57)

    def _translate(self, root: int, v: int, la57: bool) -> Translation:
        if not self._fresh():
            self.walks += 1
            return self.arch.walk(_reader(self.mem), root, v, la57)
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
        t = self.arch.walk(self._entry_reader(gen), root, v, la57)
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
        r = self.arch.root_table(root)
        plan = _plan(lambda v: self._translate(r, v, la57), root, vaddr, size, la57, self.arch)
        if len(plan) == 1:
            return self.mem.read(*plan[0])
        return b"".join(self.mem.read(p, n) for p, n in plan)

    def write(self, root: int, vaddr: int, data: bytes, *, la57: bool = False) -> None:
        """Write guest-virtual memory; all pages are translated first. Empties the cache if the
        write touches a page-table page it holds."""
        r = self.arch.root_table(root)
        plan = _plan(lambda v: self._translate(r, v, la57), root, vaddr, len(data), la57, self.arch)
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
        return mappings(self.mem, root, la57, start, end, arch=self.arch)


__all__ = ["ADDR_MASK", "MASK64", "PAGE", "SIZE_1G", "SIZE_2M", "SIZE_4K", "PageMapping", "Translation",
           "Translator", "canonical", "mappings", "read_virt", "translate", "write_virt"]
