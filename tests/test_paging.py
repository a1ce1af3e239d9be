"""x86-64 page walks: property tests against a reference model and drgn, corrupt tables, caching."""

from __future__ import annotations

import itertools
import random
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import drgn
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from aradia.errors import AradiaError, GuestDataCorrupt, PageFault
from aradia.machine.paging import (
    PageMapping,
    Translator,
    canonical,
    mappings,
    read_virt,
    translate,
    write_virt,
)
from aradia.sources.base import PhysicalMemory, Segment
from bytes_memory import BytesMemory

pytestmark = pytest.mark.timeout(120)

P, RW, US, PS, NX = 1, 2, 4, 0x80, 1 << 63
ADDR = 0x000F_FFFF_FFFF_F000
SIZES = (1 << 12, 1 << 21, 1 << 30)


class SparseMemory(PhysicalMemory):
    """1 TiB of RAM that reads as zeros until written, held as a dict of 4 KiB pages."""

    kind = "sparse"
    writable = True

    def __init__(self, size: int = 1 << 40) -> None:
        self.pages: dict[int, bytearray] = {}
        super().__init__([Segment(0, size, 0)])

    def _read_backing(self, seg: Segment, offset: int, size: int) -> bytes:
        out = bytearray()
        while size:
            n = min(size, 4096 - offset % 4096)
            page = self.pages.get(offset >> 12)
            out += page[offset % 4096 : offset % 4096 + n] if page else bytes(n)
            offset += n
            size -= n
        return bytes(out)

    def _write_backing(self, seg: Segment, offset: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            n = min(len(data) - pos, 4096 - offset % 4096)
            page = self.pages.setdefault(offset >> 12, bytearray(4096))
            page[offset % 4096 : offset % 4096 + n] = data[pos : pos + n]
            offset += n
            pos += n


@dataclass(frozen=True)
class Map:
    vaddr: int
    size: int
    paddr: int
    writable: bool
    user: bool
    nx: bool


class Tables:
    """Builds page tables in ``mem``; tables are allocated upward from ``table_base``."""

    def __init__(self, mem: PhysicalMemory, la57: bool, table_base: int) -> None:
        self.mem, self.la57 = mem, la57
        self.next = table_base
        self.root = self.alloc()
        self.model: list[Map] = []

    def alloc(self) -> int:
        a = self.next
        self.next += 4096
        self.mem.write(a, bytes(4096))
        return a

    def entry(self, table: int, index: int) -> int:
        return int.from_bytes(self.mem.read(table + 8 * index, 8), "little")

    def set(self, table: int, index: int, value: int) -> None:
        self.mem.write(table + 8 * index, value.to_bytes(8, "little"))

    def map(self, vaddr: int, paddr: int, size: int, *, rw: bool = True, us: bool = True,
            nx: bool = False, upper: int = P | RW | US) -> bool:
        """Map one page; False (and nothing changed) if it collides with an existing mapping."""
        table = self.root
        shift = 48 if self.la57 else 39
        path = []
        while (1 << shift) != size:
            i = (vaddr >> shift) & 511
            e = self.entry(table, i)
            if e & P and (e & PS or shift == 12):
                return False  # a leaf above: collision
            path.append((table, i, e))
            if not e & P:
                break
            table = e & ADDR
            shift -= 9
        else:
            i = (vaddr >> shift) & 511
            if self.entry(table, i) & P:
                return False
            self._leaf(table, i, paddr, size, rw, us, nx)
            self.model.append(Map(canonical(vaddr, self.la57), size, paddr, rw, us, nx))
            return True
        # Create the missing tables below the last present entry.
        table, i, _ = path[-1]
        while (1 << shift) != size:
            new = self.alloc()
            self.set(table, i, new | upper)
            table = new
            shift -= 9
            i = (vaddr >> shift) & 511
        self._leaf(table, i, paddr, size, rw, us, nx)
        self.model.append(Map(canonical(vaddr, self.la57), size, paddr, rw, us, nx))
        return True

    def _leaf(self, table: int, i: int, paddr: int, size: int, rw: bool, us: bool, nx: bool) -> None:
        e = paddr | P | (RW if rw else 0) | (US if us else 0) | (NX if nx else 0) | (PS if size > 4096 else 0)
        self.set(table, i, e)

    def leaf_slot(self, vaddr: int) -> tuple[int, int]:
        """(table, index) of the entry that maps ``vaddr``."""
        table, shift = self.root, 48 if self.la57 else 39
        while True:
            i = (vaddr >> shift) & 511
            e = self.entry(table, i)
            if shift == 12 or e & PS or not e & P:
                return table, i
            table, shift = e & ADDR, shift - 9

    def expect(self, vaddr: int) -> Map | None:
        for m in self.model:
            if m.vaddr <= vaddr < m.vaddr + m.size:
                return m
        return None


def vaddr_strategy(la57: bool, size: int) -> st.SearchStrategy[int]:
    bits = 57 if la57 else 48
    half = 1 << (bits - 1)
    low = st.integers(0, half // size - 1).map(lambda k: k * size)
    high = st.integers(0, half // size - 1).map(lambda k: (1 << 64) - half + k * size)
    # Clustered addresses share tables, which is where walks go wrong.
    near = st.integers(0, 1023).map(lambda k: (0xFFFF_8880_0000_0000 if not la57 else 0xFF11_0000_0000_0000)
                                    + (k * size) % (1 << 40))
    return st.one_of(low, high, near)


@st.composite
def page_specs(draw: st.DrawFn, la57: bool) -> list[tuple[int, int, int, bool, bool, bool]]:
    out = []
    for _ in range(draw(st.integers(1, 24))):
        size = draw(st.sampled_from(SIZES))
        v = draw(vaddr_strategy(la57, size))
        p = draw(st.integers((1 << 32) // size, (1 << 40) // size - 1)) * size
        out.append((v, p, size, draw(st.booleans()), draw(st.booleans()), draw(st.booleans())))
    return out


def probes(t: Tables, rnd: random.Random) -> list[int]:
    out = []
    for m in t.model:
        out += [m.vaddr, m.vaddr + m.size - 1, m.vaddr + rnd.randrange(m.size)]
        if m.vaddr + m.size < 1 << 64:
            out.append(m.vaddr + m.size)
        if m.vaddr >= 1:
            out.append(m.vaddr - 1)
    return [v for v in out if _is_canonical(v, t.la57)]


def _is_canonical(v: int, la57: bool) -> bool:
    try:
        canonical(v, la57)
        return True
    except PageFault:
        return False


@settings(max_examples=120, deadline=None)
@given(data=st.data(), la57=st.booleans(), seed=st.integers(0, 2**32))
def test_walk_matches_model(data: st.DataObject, la57: bool, seed: int) -> None:
    mem = SparseMemory()
    t = Tables(mem, la57, table_base=0x100000)
    for v, p, size, rw, us, nx in data.draw(page_specs(la57)):
        t.map(v, p, size, rw=rw, us=us, nx=nx)
    rnd = random.Random(seed)
    cached = Translator(mem, lambda: "dump")
    cr3 = t.root | 0x5A5 | (1 << 63)  # PCID and the no-flush bit must be ignored
    for v in probes(t, rnd) + [rnd.randrange(1 << 64) for _ in range(20)]:
        if not _is_canonical(v, la57):
            with pytest.raises(PageFault, match="non-canonical"):
                translate(mem, cr3, v, la57=la57)
            continue
        want = t.expect(v)
        if want is None:
            with pytest.raises(PageFault):
                translate(mem, cr3, v, la57=la57)
            with pytest.raises(PageFault):
                cached.translate(cr3, v, la57=la57)
            continue
        for _ in range(2):  # the second cached lookup is a hit
            for got in (translate(mem, cr3, v, la57=la57), cached.translate(cr3, v, la57=la57)):
                assert got.paddr == want.paddr + (v - want.vaddr)
                assert got.page_size == want.size
                assert (got.writable, got.user, got.nx) == (want.writable, want.user, want.nx)
    assert cached.hits > 0 or not t.model
    # read_virt / write_virt agree with the model: write through virtual, read back physically.
    for m in t.model[:5]:
        off = rnd.randrange(m.size - 64)
        blob = rnd.randbytes(64)
        write_virt(mem, cr3, m.vaddr + off, blob, la57=la57)
        assert mem.read(m.paddr + off, 64) == blob
        assert read_virt(mem, cr3, m.vaddr + off, 64, la57=la57) == blob
        assert cached.read(cr3, m.vaddr + off, 64, la57=la57) == blob
    # mappings() enumerates exactly the model (data pages are all RAM here).
    got = list(mappings(mem, cr3, la57))
    covered = sum(g.size for g in got)
    assert covered == sum(m.size for m in t.model)
    for g in got:
        w = t.expect(g.vaddr)
        assert w is not None and g.paddr == w.paddr + (g.vaddr - w.vaddr)
        assert (g.writable, g.user, g.nx) == (w.writable, w.user, w.nx)
    assert all(a.end <= b.vaddr for a, b in itertools.pairwise(got))


def test_read_virt_spans_pages_and_sizes() -> None:
    mem = SparseMemory()
    t = Tables(mem, False, 0x100000)
    base = 0xFFFF_C900_0000_0000
    # Two 4 KiB pages mapped out of order, then a 2 MiB page, then a hole.
    assert t.map(base, 0x2000_0000, 4096)
    assert t.map(base + 0x1000, 0x1000_0000, 4096)
    assert t.map(base + 0x200000, 0x4000_0000, 1 << 21)
    for i in range(2, 512):
        assert t.map(base + i * 0x1000, 0x3000_0000 + i * 0x1000, 4096)
    blob = random.Random(1).randbytes(0x300000)
    write_virt(mem, t.root, base + 0x800, blob[: 0x400000 - 0x800 - 0x100000])
    got = read_virt(mem, t.root, base + 0x800, 0x400000 - 0x800 - 0x100000)
    assert got == blob[: len(got)]
    assert mem.read(0x1000_0000, 0x800) == blob[0x800:0x1000]
    with pytest.raises(PageFault):
        read_virt(mem, t.root, base + 0x3FF000, 0x2000)
    # A failing write leaves memory untouched: every page is translated first.
    before = mem.read(0x4000_0000 + 0x1FF000, 0x1000)
    with pytest.raises(PageFault):
        write_virt(mem, t.root, base + 0x3FF000, b"Z" * 0x2000)
    assert mem.read(0x4000_0000 + 0x1FF000, 0x1000) == before
    runs = list(mappings(mem, t.root))
    assert [(r.vaddr - base, r.paddr, r.size) for r in runs] == [
        (0, 0x2000_0000, 0x1000), (0x1000, 0x1000_0000, 0x1000), (0x2000, 0x3000_2000, 0x1FE000),
        (0x200000, 0x4000_0000, 0x200000)]
    assert list(mappings(mem, t.root, start=base + 0x1800, end=base + 0x3000)) == [
        PageMapping(base + 0x1800, 0x1000_0800, 0x800, True, True, False),
        PageMapping(base + 0x2000, 0x3000_2000, 0x1000, True, True, False)]


def test_canonical_and_la57() -> None:
    mem = SparseMemory()
    t4 = Tables(mem, False, 0x100000)
    t5 = Tables(mem, True, 0x200000)
    v = 0x0000_8000_0000_0000  # canonical only with 5 levels
    assert t5.map(v, 0x1_0000_0000, 1 << 30)
    assert translate(mem, t5.root, v + 5, la57=True).paddr == 0x1_0000_0005
    with pytest.raises(PageFault, match="non-canonical"):
        translate(mem, t4.root, v)
    with pytest.raises(PageFault, match="non-canonical"):
        translate(mem, t5.root, 0x0100_0000_0000_0000, la57=True)
    with pytest.raises(PageFault, match="non-canonical"):
        translate(mem, t4.root, 1 << 64)
    # Negative ints are two's complement kernel addresses.
    assert t4.map(0xFFFF_FFFF_8100_0000, 0x1_0020_0000, 1 << 21)
    assert translate(mem, t4.root, -0x7F00_0000 + 0x10).paddr == 0x1_0020_0010
    # Reading across the end of the lower half faults at the first non-canonical byte.
    assert t4.map(0x7FFF_FFFF_F000, 0x1_0000_0000, 4096)
    with pytest.raises(PageFault, match=r"0x800000000000 .*non-canonical"):
        read_virt(mem, t4.root, 0x7FFF_FFFF_FFF0, 32)


def test_permissions_combine_across_levels() -> None:
    mem = SparseMemory()
    t = Tables(mem, False, 0x100000)
    g = 1 << 39  # one PML4 slot each, so the upper flags are not shared
    assert t.map(1 * g, 0x1_0000_0000, 4096, upper=P | US)  # RW off above
    assert t.map(2 * g, 0x1_0000_1000, 4096, upper=P | RW)  # US off above
    assert t.map(3 * g, 0x1_0000_2000, 4096, upper=P | RW | US)
    a, b, c = (translate(mem, t.root, k * g) for k in (1, 2, 3))
    assert (a.writable, a.user) == (False, True)
    assert (b.writable, b.user) == (True, False)
    assert (c.writable, c.user, c.nx) == (True, True, False)
    pml4e = t.entry(t.root, 3)
    t.set(t.root, 3, pml4e | NX)  # NX at the top applies to everything below
    assert translate(mem, t.root, 3 * g).nx
    t.set(t.root, 3, pml4e | PS)  # PS is reserved in a PML4E
    with pytest.raises(PageFault, match="reserved PS bit"):
        translate(mem, t.root, 3 * g)
    # The PAT bit (12) of a large page is not part of its address.
    assert t.map(4 * g, 0x1_0020_0000, 1 << 21)
    pd, i = t.leaf_slot(4 * g)
    t.set(pd, i, t.entry(pd, i) | 0x1000)
    assert translate(mem, t.root, 4 * g + 0x123).paddr == 0x1_0020_0123


# --- corrupt tables ---------------------------------------------------------------------------------
def small_memory() -> BytesMemory:
    return BytesMemory({0: bytearray(0x400000)})


@pytest.mark.timeout(30)
def test_corrupt_tables_outside_ram_and_loops() -> None:
    mem = small_memory()
    t = Tables(mem, False, 0x100000)
    assert t.map(0x1000, 0x200000, 4096)
    t.set(t.root, 1, 0xDEAD_BEEF_F000 | P | RW)  # PML4 entry to a table outside RAM
    with pytest.raises(PageFault, match="not RAM"):
        translate(mem, t.root, 1 << 39)
    with pytest.raises(PageFault, match="not RAM"):
        Translator(mem, lambda: 1).translate(t.root, 1 << 39)
    t.set(t.root, 2, 0x200000 | P | RW | US)  # a PML4 entry to a "table" full of garbage
    mem.write(0x200000, bytes([0xFF]) * 4096)
    # A leaf outside RAM translates (MMIO exists) but is not listed and cannot be read.
    assert t.map(0x2000, 0x7000_0000_0000, 4096)
    assert translate(mem, t.root, 0x2000).paddr == 0x7000_0000_0000
    with pytest.raises(AradiaError):
        read_virt(mem, t.root, 0x2000, 8)
    start = time.monotonic()
    runs = list(mappings(mem, t.root, max_tables=5000))
    assert time.monotonic() - start < 10
    assert all(mem.is_ram(r.paddr, r.size) for r in runs)
    assert any(r.vaddr == 0x1000 and r.paddr == 0x200000 for r in runs)
    assert not any(r.vaddr == 0x2000 for r in runs)


@pytest.mark.timeout(60)
def test_self_referencing_and_shared_tables_are_bounded() -> None:
    mem = small_memory()
    root = 0x100000
    mem.write(root, struct.pack("<512Q", *([root | P | RW | US] * 512)))
    # A walk is at most four reads: the self-map resolves (to the root page itself).
    assert translate(mem, root, 0x1234_5678_9000).paddr == root
    assert list(mappings(mem, root)) == []  # entries back to the own path are not followed
    # Tables shared over and over (no cycle): 512**3 paths to one page; the budget ends it.
    a, b, c = 0x101000, 0x102000, 0x103000
    for table, target in ((root, a), (a, b), (b, c)):
        mem.write(table, struct.pack("<512Q", *([target | P | RW | US] * 512)))
    mem.write(c, struct.pack("<512Q", *([0x200000 | P | RW | US] * 512)))
    with pytest.raises(GuestDataCorrupt, match="loop or corrupt"):
        list(mappings(mem, root, max_tables=2000))
    start = time.monotonic()
    with pytest.raises(GuestDataCorrupt, match="entries"):
        for _ in mappings(mem, root):  # the default bounds also end it
            pass
    assert time.monotonic() - start < 30


# --- the cached translator and the freshness stamp ---------------------------------------------------
def test_translator_honours_stamp() -> None:
    mem = small_memory()
    t = Tables(mem, False, 0x100000)
    assert t.map(0x40_0000_0000, 0x200000, 4096)
    token: list[object | None] = ["epoch-1"]
    tr = Translator(mem, lambda: token[0])
    v = 0x40_0000_0010
    assert tr.translate(t.root, v).paddr == 0x200010
    reads = mem.reads
    assert tr.translate(t.root, v + 8).paddr == 0x200018
    assert mem.reads == reads and tr.hits == 1  # served from the cache
    # The guest "runs" and remaps the page; until the stamp changes nothing may notice ...
    pt, slot = t.leaf_slot(v)
    t.set(pt, slot, 0x300000 | P | RW)
    assert tr.translate(t.root, v).paddr == 0x200010  # same epoch: cached (by contract unchanged)
    token[0] = "epoch-2"  # ... and after the stamp changed the new mapping must be seen
    assert tr.translate(t.root, v).paddr == 0x300010
    # Running guest: no caching at all, every walk reads fresh.
    token[0] = None
    hits = tr.hits
    for target in (0x310000, 0x320000, 0x330000):
        t.set(pt, slot, target | P | RW)
        assert tr.translate(t.root, v).paddr == target + 0x10
        assert tr.read(t.root, v, 4) == mem.read(target + 0x10, 4)
    assert tr.hits == hits
    # Back to a paused epoch that happens to reuse an old token: the cache was emptied meanwhile.
    token[0] = "epoch-2"
    assert tr.translate(t.root, v).paddr == 0x330010
    # Writes through the translator into a page-table page it holds drop its cache.
    pml4_va = 0x60_0000_0000
    assert t.map(pml4_va, pt, 4096)  # the PT page itself is visible at pml4_va
    token[0] = "epoch-3"  # (that map was a write behind the translator's back)
    assert tr.translate(t.root, v).paddr == 0x330010
    tr.write(t.root, pml4_va + 8 * slot, (0x340000 | P | RW).to_bytes(8, "little"))
    assert tr.translate(t.root, v).paddr == 0x340010
    # invalidate() is the hook for writes made behind the translator's back.
    t.set(pt, slot, 0x350000 | P | RW)
    tr.invalidate()
    assert tr.translate(t.root, v).paddr == 0x350010


def test_translator_bounded_cache() -> None:
    mem = SparseMemory()
    t = Tables(mem, False, 0x100000)
    for i in range(64):
        assert t.map(0x1000 * i, 0x1_0000_0000 + 0x1000 * i, 4096)
    tr = Translator(mem, lambda: 0, max_entries=16, max_tables=2)
    for _ in range(3):
        for i in range(64):
            assert tr.translate(t.root, 0x1000 * i + 7).paddr == 0x1_0000_0007 + 0x1000 * i
    assert len(tr._pages[12]) <= 16 and len(tr._tables) <= 2


# --- drgn as an independent oracle ------------------------------------------------------------------
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data(), la57=st.booleans(), seed=st.integers(0, 2**32))
def test_drgn_agrees(tmp_path: Path, data: st.DataObject, la57: bool, seed: int) -> None:
    """drgn walks the page tables of an ELF written by write_elf; both must read the same bytes.

    drgn also maps every PT_LOAD at its p_vaddr (0 in our dumps, as in QEMU's), so it reads virtual
    addresses below the top of RAM as physical ones without a walk: those are not compared.
    """
    from aradia.sources.dumpwrite import write_elf

    ram = 16 << 20
    rnd = random.Random(seed)
    mem = BytesMemory({0: bytearray(rnd.randbytes(ram))})
    t = Tables(mem, la57, 0x100000)
    for _ in range(data.draw(st.integers(1, 12))):
        size = data.draw(st.sampled_from(SIZES))
        v = data.draw(vaddr_strategy(la57, size))
        p = 0 if size == 1 << 30 else data.draw(st.integers(0x400000 // size, ram // size - 1)) * size
        t.map(v, p, size, rw=data.draw(st.booleans()), nx=data.draw(st.booleans()))
    assume(t.model)
    vmci = (f"OSRELEASE=6.1.0-test\nPAGESIZE=4096\nKERNELOFFSET=0\nNUMBER(phys_base)=0\n"
            f"SYMBOL(swapper_pg_dir)={0xFFFFFFFF80000000 + t.root:x}\n"
            f"NUMBER(pgtable_l5_enabled)={int(la57)}\n")
    out = tmp_path / "pt.elf"
    write_elf(mem, out, vmcoreinfo=vmci)
    prog = drgn.Program()
    prog.set_core_dump(str(out))
    for v in probes(t, rnd):
        if v < ram:
            continue
        want = t.expect(v)
        n = 16
        if want is not None:
            n = min(16, want.vaddr + want.size - v)
            pa = want.paddr + (v - want.vaddr)
            if pa + n > ram or v + n == 1 << 64:  # drgn 0.3 cannot read the last byte of the space
                continue
            assert prog.read(v, n) == read_virt(mem, t.root, v, n, la57=la57) == mem.read(pa, n)
        else:
            with pytest.raises(PageFault):
                translate(mem, t.root, v, la57=la57)
            with pytest.raises(drgn.FaultError):
                prog.read(v, 1)


@pytest.mark.parametrize("la57", [False, True])
def test_drgn_agrees_fixed_layout(tmp_path: Path, la57: bool) -> None:
    """A Linux-like layout (direct map with 1 GiB and 2 MiB pages, vmalloc 4 KiB pages) read by both."""
    from aradia.sources.dumpwrite import write_elf

    ram = 16 << 20
    mem = BytesMemory({0: bytearray(random.Random(7).randbytes(ram))})
    t = Tables(mem, la57, 0x100000)
    direct = 0xFF11_0000_0000_0000 if la57 else 0xFFFF_8880_0000_0000
    vmalloc = 0xFFA0_0000_0000_0000 if la57 else 0xFFFF_C900_0000_0000
    assert t.map(direct, 0, 1 << 30, nx=True)
    assert t.map(direct + (1 << 30), 0x800000, 1 << 21)
    for i in range(8):
        assert t.map(vmalloc + i * 4096, 0xF00000 - i * 4096, 4096, rw=i % 2 == 0)
    vmci = (f"OSRELEASE=6.1.0-test\nPAGESIZE=4096\nKERNELOFFSET=0\nNUMBER(phys_base)=0\n"
            f"SYMBOL(swapper_pg_dir)={0xFFFFFFFF80000000 + t.root:x}\n"
            f"NUMBER(pgtable_l5_enabled)={int(la57)}\n")
    write_elf(mem, tmp_path / "l.elf", vmcoreinfo=vmci)
    prog = drgn.Program()
    prog.set_core_dump(str(tmp_path / "l.elf"))
    compared = 0
    for v, n in ((direct + 0x1234, 64), (direct + ram - 64, 64), (direct + (1 << 30) + 0x1FFF00, 256),
                 (vmalloc + 0x0FF0, 0x7000 + 0x10)):
        assert prog.read(v, n) == read_virt(mem, t.root, v, n, la57=la57)
        compared += 1
    assert read_virt(mem, t.root, vmalloc, 8, la57=la57) == mem.read(0xF00000, 8)
    for v in (direct + (1 << 30) + (1 << 21), vmalloc + 8 * 4096, vmalloc - 4096):
        with pytest.raises(drgn.FaultError):
            prog.read(v, 1)
        with pytest.raises(PageFault):
            translate(mem, t.root, v, la57=la57)
    assert compared == 4


@pytest.mark.timeout(60)
def test_translator_threads_never_see_stale_entries() -> None:
    """One thread remaps and bumps the stamp while another translates: a translation made wholly
    inside one stamp value must show that value's mapping."""
    import threading

    mem = small_memory()
    t = Tables(mem, False, 0x100000)
    v = 0x7F00_0000_0000
    assert t.map(v, 0x200000, 4096)
    pt, slot = t.leaf_slot(v)
    token: list[object | None] = [(0, 0x200000)]
    tr = Translator(mem, lambda: token[0])
    stop = threading.Event()
    bad: list[tuple[object, int]] = []
    checked = [0]

    errors: list[BaseException] = []

    def reader() -> None:
        try:
            while not stop.is_set():
                before = token[0]
                got = tr.translate(t.root, v).paddr
                if before is not None and token[0] is before:
                    checked[0] += 1
                    if got != before[1]:  # type: ignore[index]
                        bad.append((before, got))
        except BaseException as e:  # surface failures of the thread in the test
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for th in threads:
        th.start()
    try:
        deadline = time.monotonic() + 2
        k = 0
        while time.monotonic() < deadline:
            k += 1
            target = 0x200000 + (k % 256) * 0x1000
            token[0] = None  # the guest runs ...
            t.set(pt, slot, target | P | RW)
            token[0] = (k, target)  # ... and is paused in a new epoch
            time.sleep(0.0005)
    finally:
        stop.set()
        for th in threads:
            th.join(10)
    assert not errors, errors
    assert not bad, bad[:5]
    assert checked[0] > 100
