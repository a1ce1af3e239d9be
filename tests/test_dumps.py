"""Dump readers (raw, ELF core, LiME), format detection and writers, on crafted and real inputs."""

from __future__ import annotations

import itertools
import os
import re
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import drgn
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aradia.errors import AradiaError, DumpFormatError, NotRAM
from aradia.lab.launcher import Guest
from aradia.proto.qmp import QMPClient
from aradia.sources.base import PhysicalMemory
from aradia.sources.dumpfile import dump_format, open_dump_memory
from aradia.sources.dumpwrite import write_elf, write_lime, write_raw
from aradia.sources.elfcore import ElfCore
from aradia.sources.lime import LimeDump
from aradia.sources.raw import RawDump
from bare_qemu import bare_qemu
from bytes_memory import BytesMemory

pytestmark = pytest.mark.timeout(60)


def pattern(n: int, seed: int) -> bytearray:
    """Deterministic, position-dependent bytes (so a misplaced read cannot match)."""
    out = bytearray(n)
    for i in range(0, n, 8):
        out[i : i + 8] = ((i * 0x9E3779B97F4A7C15 + seed) & (2**64 - 1)).to_bytes(8, "little")[: n - i]
    return out


# --- a hand-rolled ELF core builder (independent of aradia's writer) ---------------------------------
@dataclass
class Load:
    paddr: int
    data: bytes
    memsz: int | None = None
    vaddr: int = 0
    offset: int | None = None  # force a file offset (aliases, truncation)


@dataclass
class ElfSpec:
    loads: list[Load]
    notes: list[tuple[bytes, int, bytes]] = field(default_factory=list)
    elf32: bool = False
    machine: int = 62
    e_type: int = 4
    xnum: bool = False  # store the phdr count as PN_XNUM + section header 0


def note_bytes(name: bytes, ntype: int, desc: bytes) -> bytes:
    name += b"\0"
    pad = lambda b: b + bytes(-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(name), len(desc), ntype) + pad(name) + pad(desc)


def build_elf(spec: ElfSpec) -> bytes:
    """Lay out an ELF core: header, phdrs, notes, then each load's data."""
    e64 = not spec.elf32
    ehsize, phsize, shsize = (64, 56, 64) if e64 else (52, 32, 40)
    notes = b"".join(note_bytes(*n) for n in spec.notes)
    nph = len(spec.loads) + (1 if notes else 0)
    phoff = ehsize
    shoff = phoff + nph * phsize if spec.xnum else 0
    pos = phoff + nph * phsize + (shsize if spec.xnum else 0)
    notes_at = pos
    pos += len(notes)
    phdrs, blobs = [], []
    if notes:
        phdrs.append((4, notes_at, 0, 0, len(notes), len(notes)))
    for ld in spec.loads:
        off = pos if ld.offset is None else ld.offset
        phdrs.append((1, off, ld.vaddr, ld.paddr, len(ld.data), ld.memsz or len(ld.data)))
        if ld.offset is None:
            blobs.append(ld.data)
            pos += len(ld.data)
    ident = b"\x7fELF" + bytes([2 if e64 else 1, 1, 1]) + bytes(9)
    phnum = 0xFFFF if spec.xnum else nph
    if e64:
        out = ident + struct.pack("<HHIQQQIHHHHHH", spec.e_type, spec.machine, 1, 0, phoff, shoff, 0,
                                  ehsize, phsize, phnum, shsize if spec.xnum else 0, 1 if spec.xnum else 0, 0)
        for t, off, va, pa, fs, ms in phdrs:
            out += struct.pack("<IIQQQQQQ", t, 7, off, va, pa, fs, ms, 0)
        if spec.xnum:
            out += struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, nph, 0, 0)
    else:
        out = ident + struct.pack("<HHIIIIIHHHHHH", spec.e_type, spec.machine, 1, 0, phoff, shoff, 0,
                                  ehsize, phsize, phnum, shsize if spec.xnum else 0, 1 if spec.xnum else 0, 0)
        for t, off, va, pa, fs, ms in phdrs:
            out += struct.pack("<IIIIIIII", t, off, va, pa, fs, ms, 7, 0)
        if spec.xnum:
            out += struct.pack("<10I", 0, 0, 0, 0, 0, 0, 0, nph, 0, 0)
    assert len(out) == notes_at
    return out + notes + b"".join(blobs)


def qemu_cpustate(rip: int, cr3: int, cr4: int, *, with_kgs: bool = True) -> bytes:
    """A QEMUCPUState as QEMU lays it out (version 1)."""
    size = 440 if with_kgs else 432
    gprs = [0x1000 + i for i in range(16)] + [rip, 0x246]
    segs = []
    for i in range(10):
        segs += [0x10 + i, 0xFFFFF, 0xC09300 + i, 0, 0x100000 * i]
    body = struct.pack("<II18Q" + "IIIIQ" * 10 + "5Q", 1, size, *gprs, *segs, 0x80050033, 0, 0, cr3, cr4)
    return body + (struct.pack("<Q", 0xFFFF888000ABC000) if with_kgs else b"")


def prstatus64(pid: int, rip: int, rsp: int) -> bytes:
    desc = bytearray(336)
    struct.pack_into("<I", desc, 32, pid)
    regs = [0] * 27
    regs[16], regs[19] = rip, rsp
    struct.pack_into("<27Q", desc, 112, *regs)
    return bytes(desc)


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


VMCI = "OSRELEASE=6.1.0-99-amd64\nPAGESIZE=4096\nKERNELOFFSET=1e000000\n"


# --- raw ---------------------------------------------------------------------------------------------
def test_raw_reads_file_offsets_and_base(tmp_path: Path) -> None:
    data = bytes(pattern(3 * 4096 + 100, 1))
    p = write(tmp_path, "mem.raw", data)
    with RawDump(p) as m:
        assert m.kind == "raw"
        assert [(r.start, r.size) for r in m.ranges()] == [(0, len(data))]
        assert m.read(4096, 16) == data[4096:4112]
        assert m.read(len(data) - 4, 4) == data[-4:]
        with pytest.raises(NotRAM):
            m.read(len(data) - 4, 5)
        with pytest.raises(AradiaError):
            m.write(0, b"x")
    with RawDump(p, base=0x100000) as m:
        assert m.read(0x100000 + 8, 8) == data[8:16]
        with pytest.raises(NotRAM):
            m.read(0, 1)
    m = RawDump(p)
    m.close()
    with pytest.raises(AradiaError, match="closed"):
        m.read(0, 1)


def test_open_dump_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(DumpFormatError, match="directory"):
        open_dump_memory(tmp_path)
    with pytest.raises(DumpFormatError, match="empty"):
        open_dump_memory(write(tmp_path, "empty", b""))
    with pytest.raises(DumpFormatError, match="cannot open"):
        open_dump_memory(tmp_path / "missing")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(DumpFormatError, match="not a regular file"):
        open_dump_memory(fifo)  # must not block opening the FIFO


def test_open_dump_detects_formats(tmp_path: Path) -> None:
    elf = write(tmp_path, "a.elf", build_elf(ElfSpec([Load(0, b"E" * 4096)])))
    lime = write(tmp_path, "a.lime", struct.pack("<IIQQ8s", 0x4C694D45, 1, 0, 4095, bytes(8)) + b"L" * 4096)
    raw = write(tmp_path, "a.raw", b"R" * 4096)
    for path, fmt, cls in ((elf, "elf", ElfCore), (lime, "lime", LimeDump), (raw, "raw", RawDump)):
        assert dump_format(path) == fmt
        with open_dump_memory(path) as m:
            assert isinstance(m, cls)
            assert m.read(100, 1) == fmt[0].upper().encode()
    tiny = write(tmp_path, "tiny", b"\x7f")  # too short for any magic: a 1-byte raw image
    assert open_dump_memory(tiny).read(0, 1) == b"\x7f"
    for magic in (b"KDUMP   ", b"makedumpfile", b"PAGEDU64", b"QEVM"):
        with pytest.raises(DumpFormatError, match="unsupported"):
            open_dump_memory(write(tmp_path, "x", magic + bytes(4096)))


# --- ELF cores -------------------------------------------------------------------------------------
def test_elf_loads_notes_and_zero_tail(tmp_path: Path) -> None:
    low, high = bytes(pattern(0x9F000, 2)), bytes(pattern(0x3000, 3))
    spec = ElfSpec(
        loads=[Load(0, low), Load(0x100000, high, memsz=0x5000), Load(0x100000000, b"H" * 4096)],
        notes=[
            (b"CORE", 1, prstatus64(1, 0xFFFFFFFF81000010, 0xFFFFC90000003F00)),
            (b"CORE", 1, prstatus64(2, 0xFFFFFFFF81000020, 0xFFFFC90000007F00)),
            (b"QEMU", 0, qemu_cpustate(0xFFFFFFFF81000010, 0x1234000, 0x3006F0)),
            (b"QEMU", 0, qemu_cpustate(0xFFFFFFFF81000020, 0x5678001, 0x3016F0, with_kgs=False)),
            (b"VMCOREINFO", 0, VMCI.encode() + b"\0"),
        ],
    )
    with ElfCore(write(tmp_path, "c.elf", build_elf(spec))) as m:
        assert [(r.start, r.size) for r in m.ranges()] == [(0, 0x9F000), (0x100000, 0x5000),
                                                         (0x100000000, 4096)]
        assert m.read(0x1234, 64) == low[0x1234 : 0x1234 + 64]
        assert m.read(0x102FF0, 32) == high[-16:] + bytes(16)  # file part then the zero tail
        assert m.read(0x104000, 4096) == bytes(4096)
        assert m.read(0x100000000, 2) == b"HH"
        with pytest.raises(NotRAM):
            m.read(0x9F000, 1)
        assert m.vmcoreinfo == VMCI
        assert [n.name for n in m.notes] == ["CORE", "CORE", "QEMU", "QEMU", "VMCOREINFO"]
        cpus = m.cpu_states
        assert len(cpus) == 2
        assert cpus[0]["rip"] == 0xFFFFFFFF81000010 and cpus[0]["cr3"] == 0x1234000
        assert cpus[0]["cr4"] == 0x3006F0 and cpus[0]["cr0"] == 0x80050033
        assert cpus[0]["rax"] == 0x1000 and cpus[0]["r15"] == 0x100F and cpus[0]["rflags"] == 0x246
        assert cpus[0]["cs"] == 0x10 and cpus[0]["ds"] == 0x11 and cpus[0]["idt"] == 0x19
        assert cpus[0]["gs_base"] == 0x400000 and cpus[0]["gdt_limit"] == 0xFFFFF
        assert cpus[0]["kernel_gs_base"] == 0xFFFF888000ABC000
        assert "kernel_gs_base" not in cpus[1] and cpus[1]["cr3"] == 0x5678001
        pr = m.prstatus
        assert [(p["pid"], p["rip"], p["rsp"]) for p in pr] == [
            (1, 0xFFFFFFFF81000010, 0xFFFFC90000003F00), (2, 0xFFFFFFFF81000020, 0xFFFFC90000007F00)]
        assert m.warnings == []


def test_elf32_and_pn_xnum(tmp_path: Path) -> None:
    data = bytes(pattern(8192, 4))
    spec = ElfSpec([Load(0x2000, data)], notes=[(b"VMCOREINFO", 0, b"OSRELEASE=x\n")], elf32=True, machine=3)
    with ElfCore(write(tmp_path, "32.elf", build_elf(spec))) as m:
        assert not m.elf64 and m.read(0x2000, 8192) == data and m.vmcoreinfo == "OSRELEASE=x\n"
    spec = ElfSpec([Load(0x1000 * i, bytes([i]) * 4096) for i in range(1, 4)], xnum=True)
    with ElfCore(write(tmp_path, "x.elf", build_elf(spec))) as m:
        assert m.read(0x3000, 1) == b"\x03" and len(m.loads) == 3


def test_elf_unusable_paddr_skipped(tmp_path: Path) -> None:
    spec = ElfSpec([Load(0, b"A" * 4096), Load(2**64 - 1, b"K" * 4096, vaddr=0xFFFFFFFF81000000)])
    with ElfCore(write(tmp_path, "k.elf", build_elf(spec))) as m:
        assert [(r.start, r.size) for r in m.ranges()] == [(0, 4096)]
        assert any("not a usable physical address" in w for w in m.warnings)


def test_elf_truncated_strict_and_lenient(tmp_path: Path) -> None:
    a, b = bytes(pattern(0x4000, 5)), bytes(pattern(0x4000, 6))
    full = build_elf(ElfSpec([Load(0, a), Load(0x10000, b, memsz=0x8000)]))
    cut = write(tmp_path, "cut.elf", full[: len(full) - 0x1800])
    with pytest.raises(DumpFormatError, match=r"truncated.*0x10000"):
        ElfCore(cut)
    with ElfCore(cut, strict=False) as m:
        assert [(r.start, r.size) for r in m.ranges()] == [(0, 0x4000), (0x10000, 0x2800)]
        assert m.read(0x10000, 0x2800) == b[:0x2800]
        assert len(m.warnings) == 1 and "kept 0x2800 bytes, dropped 0x5800" in m.warnings[0]
    gone = write(tmp_path, "gone.elf", full[: len(full) - 0x4000])  # second load entirely missing
    with ElfCore(gone, strict=False) as m:
        assert [(r.start, r.size) for r in m.ranges()] == [(0, 0x4000)]
    assert open_dump_memory(gone, strict=False).read(0, 4) == a[:4]
    with pytest.raises(DumpFormatError, match="truncated"):
        open_dump_memory(gone)


def test_elf_truncated_notes(tmp_path: Path) -> None:
    raw = build_elf(ElfSpec([], notes=[(b"VMCOREINFO", 0, b"OSRELEASE=1\n" * 50)]))
    cut = write(tmp_path, "n.elf", raw[:-100])
    with pytest.raises(DumpFormatError, match="truncated"):
        ElfCore(cut)
    with ElfCore(cut, strict=False) as m:
        assert m.notes == [] and m.ranges() == [] and len(m.warnings) == 2


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[:40], "truncated ELF header"),
        (lambda b: b[:4] + b"\x07" + b[5:], "bad ELF class"),
        (lambda b: b[:16] + struct.pack("<H", 2) + b[18:], "not a core dump"),
        (lambda b: b[:56] + struct.pack("<H", 0xFFFE) + b[58:], "truncated: 65534 program headers"),
        (lambda b: b[:54] + struct.pack("<H", 20) + b[56:], "entry size 20"),
        (lambda b: b[:56] + struct.pack("<H", 0) + b[58:], "no program headers"),
        (lambda b: b[:56] + struct.pack("<H", 0xFFFF) + b[58:], "PN_XNUM"),
    ],
)
def test_elf_corrupt_headers(tmp_path: Path, mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    good = build_elf(ElfSpec([Load(0, b"A" * 4096)]))
    with pytest.raises(DumpFormatError, match=message):
        ElfCore(write(tmp_path, "bad.elf", mutate(good)))


def test_elf_absurd_sizes(tmp_path: Path) -> None:
    bad = build_elf(ElfSpec([Load(0x1000, b"A" * 4096, memsz=2**52)]))
    with pytest.raises(DumpFormatError, match="absurd size"):
        ElfCore(write(tmp_path, "a.elf", bad))
    spec = ElfSpec([Load(0, b"A" * 4096)])
    raw = bytearray(build_elf(spec))
    struct.pack_into("<Q", raw, 64 + 32, 2**40)  # p_filesz > p_memsz
    with pytest.raises(DumpFormatError, match="exceeds p_memsz"):
        ElfCore(write(tmp_path, "b.elf", bytes(raw)))
    note = build_elf(ElfSpec([], notes=[(b"X", 0, b"y")]))
    raw = bytearray(note)
    struct.pack_into("<I", raw, 64 + 56 + 4, 0x7FFFFFF0)  # descsz far past the segment
    with pytest.raises(DumpFormatError, match="overruns"):
        ElfCore(write(tmp_path, "c.elf", bytes(raw)))


def test_elf_overlaps(tmp_path: Path) -> None:
    a = bytes(pattern(0x4000, 7))
    # Same file bytes mapped twice (QEMU paging=true): accepted, one copy.
    data_at = 64 + 2 * 56  # after the ELF header and two program headers
    alias = build_elf(ElfSpec([Load(0, a), Load(0x1000, a[0x1000:0x3000], offset=data_at + 0x1000,
                                                  vaddr=0xFFFFFFFF81000000)]))
    with ElfCore(write(tmp_path, "alias.elf", alias)) as m:
        assert [(r.start, r.size) for r in m.ranges()] == [(0, 0x4000)] and m.read(0, 0x4000) == a
    # kdump: the kernel text again, as a separate copy with equal bytes: accepted.
    kd = build_elf(ElfSpec([Load(0, a), Load(0x2000, a[0x2000:0x3000], vaddr=0xFFFFFFFF81000000)]))
    with ElfCore(write(tmp_path, "kd.elf", kd)) as m:
        assert m.read(0, 0x4000) == a
    # Different bytes for the same address: refused.
    bad = build_elf(ElfSpec([Load(0, a), Load(0x2000, b"X" * 0x1000)]))
    with pytest.raises(DumpFormatError, match="disagree"):
        ElfCore(write(tmp_path, "bad.elf", bad))
    # A zero tail overlapping data that is not zero: refused.
    tail = build_elf(ElfSpec([Load(0, a[:0x1000], memsz=0x3000), Load(0x2000, a[:0x1000])]))
    with pytest.raises(DumpFormatError, match="disagree"):
        ElfCore(write(tmp_path, "tail.elf", tail))
    # Partial overlap extending further: union kept.
    ext = build_elf(ElfSpec([Load(0, a[:0x2000]), Load(0x1000, a[0x1000:])]))
    with ElfCore(write(tmp_path, "ext.elf", ext)) as m:
        assert [(r.start, r.size) for r in m.ranges()] == [(0, 0x4000)] and m.read(0, 0x4000) == a


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=0, max_size=600), cut=st.integers(0, 700), flips=st.lists(
    st.tuples(st.integers(0, 700), st.integers(0, 255)), max_size=6))
def test_elf_fuzz_never_raw_exception(tmp_path: Path, data: bytes, cut: int, flips: list) -> None:  # type: ignore[type-arg]
    """Mangled ELF cores give a DumpFormatError or a usable object, never another exception."""
    good = bytearray(build_elf(ElfSpec([Load(0, b"A" * 64), Load(0x1000, data, memsz=len(data) + 8)],
                                       notes=[(b"VMCOREINFO", 0, b"A=1\n"), (b"QEMU", 0, b"short")])))
    for pos, val in flips:
        if pos < len(good):
            good[pos] = val
    p = tmp_path / "f.elf"
    p.write_bytes(bytes(good[: max(cut, 1)]))
    for strict in (True, False):
        try:
            m = ElfCore(p, strict=strict)
        except DumpFormatError:
            continue
        for r in m.ranges():
            assert len(m.read(r.start, min(r.size, 64))) == min(r.size, 64)
        _ = m.vmcoreinfo, m.cpu_states, m.prstatus
        m.close()


# --- LiME --------------------------------------------------------------------------------------------
def lime_header(s: int, e: int, magic: int = 0x4C694D45, version: int = 1) -> bytes:
    return struct.pack("<IIQQ8s", magic, version, s, e, bytes(8))


def test_lime_ranges_and_errors(tmp_path: Path) -> None:
    a, b = bytes(pattern(0x9F000, 8)), bytes(pattern(0x2000, 9))
    good = lime_header(0, 0x9EFFF) + a + lime_header(0x100000, 0x101FFF) + b
    with LimeDump(write(tmp_path, "g.lime", good)) as m:
        assert [(r.start, r.size) for r in m.ranges()] == [(0, 0x9F000), (0x100000, 0x2000)]
        assert m.read(0x9EFF0, 16) == a[-16:] and m.read(0x101000, 0x1000) == b[0x1000:]
    cases = [
        (lime_header(0, 0xFFF, magic=0x12345678) + bytes(4096), "bad magic"),
        (lime_header(0, 0xFFF, version=2) + bytes(4096), "unsupported version"),
        (lime_header(0x2000, 0xFFF) + bytes(4096), "bad address range"),
        (lime_header(0, 2**60) + bytes(4096), "bad address range"),
        (lime_header(0, 0xFFF) + bytes(4096) + b"junk", "truncated LiME header"),
        (lime_header(0, 0xFFF) + bytes(4096) + lime_header(0x800, 0x17FF) + bytes(4096), "overlapping"),
    ]
    for blob, msg in cases:
        with pytest.raises(DumpFormatError, match=msg):
            LimeDump(write(tmp_path, "bad.lime", blob))
    cut = write(tmp_path, "cut.lime", good[:-0x1800])
    with pytest.raises(DumpFormatError, match="truncated"):
        LimeDump(cut)
    with LimeDump(cut, strict=False) as m:
        assert [(r.start, r.size) for r in m.ranges()] == [(0, 0x9F000), (0x100000, 0x800)]
        assert "dropped 0x1800" in m.warnings[0]


# --- writers -----------------------------------------------------------------------------------------
def sample_memory() -> BytesMemory:
    return BytesMemory({0: pattern(0x9F000, 10), 0x100000: pattern(0x300000, 11),
                        0x100000000: pattern(0x21000, 12)})


def assert_same(mem: PhysicalMemory, dump: PhysicalMemory) -> None:
    assert dump.ranges() == mem.ranges()
    for r in mem.ranges():
        assert dump.read(r.start, r.size) == mem.read(r.start, r.size)


def test_write_elf_round_trip(tmp_path: Path) -> None:
    mem = sample_memory()
    cpus = [{"rip": 0xFFFFFFFF81000000 + i, "cr3": 0x1000 * (i + 1), "cr4": 0x6F0, "rsp": 0x7000 + i,
             "cs": 0x10, "gs_base": 0xFFFF888007C00000, "kernel_gs_base": 0x55} for i in range(3)]
    seen: list[tuple[int, int]] = []
    out = tmp_path / "o.elf"
    write_elf(mem, out, vmcoreinfo=VMCI, cpu_states=cpus, progress=lambda d, t: seen.append((d, t)),
              chunk=0x40000)
    with open_dump_memory(out) as d:
        assert isinstance(d, ElfCore)
        assert_same(mem, d)
        assert d.vmcoreinfo == VMCI
        for got, want in zip(d.cpu_states, cpus, strict=True):
            assert {k: got[k] for k in want} == want
        assert [(p["pid"], p["rip"], p["rsp"]) for p in d.prstatus] == [
            (i + 1, c["rip"], c["rsp"]) for i, c in enumerate(cpus)]
    total = mem.size
    assert seen[0] == (0, total) and seen[-1] == (total, total)
    assert all(a[0] < b[0] for a, b in itertools.pairwise(seen))
    assert [p.name for p in tmp_path.iterdir()] == ["o.elf"]  # no temp file left
    out2 = tmp_path / "plain.elf"
    write_elf(mem, out2)
    with ElfCore(out2) as d:
        assert d.notes == [] and d.vmcoreinfo is None and d.cpu_states == []
        assert_same(mem, d)


def test_write_lime_and_raw_round_trip(tmp_path: Path) -> None:
    mem = sample_memory()
    write_lime(mem, tmp_path / "o.lime", chunk=0x10000)
    with open_dump_memory(tmp_path / "o.lime") as d:
        assert isinstance(d, LimeDump)
        assert_same(mem, d)
    small = BytesMemory({0x1000: pattern(0x3000, 13), 0x8000: pattern(0x1000, 14)})
    write_raw(small, tmp_path / "o.raw")
    blob = (tmp_path / "o.raw").read_bytes()
    assert len(blob) == 0x9000
    assert blob[:0x1000] == bytes(0x1000) and blob[0x4000:0x8000] == bytes(0x4000)
    assert blob[0x1000:0x4000] == small.bufs[0x1000] and blob[0x8000:] == small.bufs[0x8000]
    # A non-seekable output gets the holes as written zeros.
    r, w = os.pipe()
    with os.fdopen(w, "wb") as wf, os.fdopen(r, "rb") as rf:
        got: list[bytes] = []
        t = threading.Thread(target=lambda: got.append(rf.read()))
        t.start()
        write_raw(small, wf)
        wf.close()
        t.join(10)
    assert got == [blob]


def test_writers_leave_no_partial_file(tmp_path: Path) -> None:
    mem = sample_memory()
    out = tmp_path / "o.elf"
    out.write_bytes(b"previous")

    def cancel(done: int, total: int) -> None:
        if done > 0x100000:
            raise KeyboardInterrupt

    for writer in (write_elf, write_lime, write_raw):
        with pytest.raises(KeyboardInterrupt):
            writer(mem, out, progress=cancel, chunk=0x10000)
        assert out.read_bytes() == b"previous"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["o.elf"]
    with pytest.raises(AradiaError, match="cannot write"):
        write_elf(mem, tmp_path / "no" / "such" / "dir.elf")


def test_write_elf_to_file_object(tmp_path: Path) -> None:
    mem = sample_memory()
    p = tmp_path / "f.elf"
    with open(p, "wb") as f:
        write_elf(mem, f, vmcoreinfo=VMCI)
    with open_dump_memory(p) as d:
        assert_same(mem, d)


def test_write_elf_many_ranges_uses_pn_xnum(tmp_path: Path) -> None:
    mem = BytesMemory({0x2000 * i: bytearray(i.to_bytes(4, "little") * 16) for i in range(0x10000)})
    write_elf(mem, tmp_path / "many.elf")
    with ElfCore(tmp_path / "many.elf") as d:
        assert len(d.loads) == 0x10000 and d.read(0x2000 * 0xFFFF, 4) == (0xFFFF).to_bytes(4, "little")


# --- drgn reads what write_elf writes ------------------------------------------------------------------
def test_drgn_accepts_written_elf(tmp_path: Path) -> None:
    """drgn identifies the kernel from the VMCOREINFO note and reads physical memory.

    A crafted VMCOREINFO gives drgn the release, page size and KASLR offset; anything needing real
    kernel data (symbols, tasks) is out of reach without a kernel, so only those are checked here
    (page-table walks through drgn are checked in test_paging).
    """
    mem = sample_memory()
    out = tmp_path / "k.elf"
    vmci = VMCI + "SYMBOL(swapper_pg_dir)=ffffffff9f00a000\nNUMBER(phys_base)=0\n"
    write_elf(mem, out, vmcoreinfo=vmci, cpu_states=[{"rip": 0xFFFFFFFF9F000000, "rsp": 0x8000}])
    prog = drgn.Program()
    prog.set_core_dump(str(out))
    assert prog.flags & drgn.ProgramFlags.IS_LINUX_KERNEL
    assert prog.platform.arch == drgn.Architecture.X86_64
    assert prog["UTS_RELEASE"].string_() == b"6.1.0-99-amd64"
    assert prog["PAGE_SIZE"].value_() == 4096
    for r in mem.ranges():
        assert prog.read(r.start + 0x10, 32, True) == mem.read(r.start + 0x10, 32)
        assert prog.read(r.end - 32, 32, True) == mem.read(r.end - 32, 32)


# --- real QEMU dumps against QEMU's own register report -------------------------------------------------
_SEG_RE = re.compile(r"^(ES|CS|SS|DS|FS|GS|LDT|TR) *=([0-9a-f]+) ([0-9a-f]+) ([0-9a-f]+) ([0-9a-f]+)", re.M)
_TABLE_RE = re.compile(r"^(GDT|IDT)=\s+([0-9a-f]+) ([0-9a-f]+)", re.M)
_REG_RE = re.compile(r"\b([RE]?[A-Z][A-Z0-9]*|R\d+)\s*=([0-9a-f]+)\b")
_HMP_NAMES = {"RFL": "rflags", "EFL": "rflags", "RIP": "rip", "EIP": "rip",
              **{f"{p}{r}": f"r{r.lower()}" for p in "RE" for r in ("AX", "BX", "CX", "DX", "SI", "DI", "SP", "BP")},
              **{f"R{i}": f"r{i}" for i in range(8, 16)}, **{f"CR{i}": f"cr{i}" for i in (0, 2, 3, 4)}}


def info_registers(text: str) -> dict[int, dict[str, int]]:
    """HMP ``info registers -a``, parsed here (not by aradia): per vCPU the general registers, RIP
    (EIP), RFLAGS, CR0/2/3/4, segments (selector, base, limit, flags as HMP masks them) and GDT/IDT.
    ``wide`` is 0 when QEMU printed the 32-bit form (values are then the low 32 bits)."""
    out: dict[int, dict[str, int]] = {}
    for index, block in re.findall(r"^CPU#(\d+)\n(.*?)(?=^CPU#|\Z)", text.replace("\r", ""), re.M | re.S):
        general = "\n".join(line for line in block.splitlines()
                            if not _SEG_RE.match(line) and not _TABLE_RE.match(line))
        regs = {_HMP_NAMES[k]: int(v, 16) for k, v in _REG_RE.findall(general) if k in _HMP_NAMES}
        regs["wide"] = int("RIP=" in block)
        for name, sel, base, limit, flags in _SEG_RE.findall(block):
            n = name.lower()
            regs.update({n: int(sel, 16), f"{n}_base": int(base, 16), f"{n}_limit": int(limit, 16),
                         f"{n}_flags": int(flags, 16)})
        for name, base, limit in _TABLE_RE.findall(block):
            regs.update({f"{name.lower()}_base": int(base, 16), f"{name.lower()}_limit": int(limit, 16)})
        out[int(index)] = regs
    return out


def _dump_and_truth(qmp: QMPClient, out: Path) -> tuple[ElfCore, dict[int, dict[str, int]]]:
    """Stop the VM, take QEMU's register report, let QEMU dump the same moment; the dump and the report."""
    qmp.execute("stop")
    truth = info_registers(qmp.hmp("info registers -a"))
    qmp.execute("dump-guest-memory", {"paging": False, "protocol": f"file:{out}"})
    assert qmp.execute("query-status")["status"] == "paused"  # the report is of the dumped moment
    core = open_dump_memory(out)
    assert isinstance(core, ElfCore)
    return core, truth


SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr")


def assert_registers_equal(dumped: list[dict[str, int]], truth: dict[int, dict[str, int]]) -> None:
    """Each vCPU's registers in the dump's QEMU notes equal what QEMU reported for it at dump time."""
    assert sorted(truth) == list(range(len(dumped))) and dumped
    for index, regs in enumerate(dumped):
        want = truth[index]
        mask = (1 << 64) - 1 if want["wide"] else 0xFFFFFFFF
        compared = 0
        for name, value in want.items():
            if name == "wide":
                continue
            if name.endswith("_flags"):
                assert regs[name] & 0x00FFFF00 == value, (index, name, hex(regs[name]), hex(value))
            elif name.endswith(("_base", "_limit")) or name in SEGMENTS:
                assert regs[name] == value, (index, name, hex(regs[name]), hex(value))
            else:
                assert regs[name] & mask == value, (index, name, hex(regs[name]), hex(value))
            compared += 1
        # 8 (or 16) GPRs, rip, rflags, 4 CRs, 8 segments x 4, GDT and IDT x 2
        assert compared == (58 if want["wide"] else 50), (index, sorted(want))


@pytest.mark.timeout(60)
def test_real_qemu_dump(tmp_path: Path) -> None:
    """QEMU's own dump-guest-memory output (firmware only, no OS): layout, notes, and registers equal
    to QEMU's own report of the same stopped moment."""
    out = tmp_path / "q.elf"
    with bare_qemu("32M", smp=2) as q, QMPClient(q.qmp_path) as qmp:
        time.sleep(0.3)  # let the firmware run a little
        d, truth = _dump_and_truth(qmp, out)
    with d:
        ranges = [(r.start, r.size) for r in d.ranges()]
        assert ranges[0] == (0, 32 << 20)  # -nodefaults: no VGA hole, all of pc.ram
        assert ranges[-1][0] + ranges[-1][1] == 1 << 32  # the BIOS ROM just below 4 GiB
        assert len(d.cpu_states) == 2 and len(d.prstatus) == 2
        assert_registers_equal(d.cpu_states, truth)
        assert all(c["cr3"] == 0 for c in d.cpu_states)  # firmware: no paging yet
        # QEMU writes its registers twice: the QEMU note and NT_PRSTATUS must agree.
        for c, p in zip(d.cpu_states, d.prstatus, strict=True):
            assert c["rip"] & 0xFFFFFFFF == p.get("rip", p.get("eip"))
        # The reset vector in the ROM is a far jump.
        assert d.read(0xFFFFFFF0, 1) == b"\xea"
        write_elf(d, tmp_path / "copy.elf", cpu_states=d.cpu_states)
        with open_dump_memory(tmp_path / "copy.elf") as c:
            assert_same(d, c)
            assert c.cpu_states == d.cpu_states


@pytest.mark.timeout(180)
def test_real_qemu_dump_of_a_booted_guest(launch_guest: Callable[..., Guest], tmp_path: Path) -> None:
    """A booted 64-bit Linux guest: every vCPU in the dump is in long mode with paging on, and every
    register equals what QEMU reported for that vCPU at dump time; aradia's own ELF writer keeps them."""
    guest = launch_guest("6.1", smp=2)
    with QMPClient(guest.qmp_path) as qmp:
        try:
            d, truth = _dump_and_truth(qmp, tmp_path / "linux.elf")
        finally:
            qmp.execute("cont")
    with d:
        assert len(d.cpu_states) == 2 and all(t["wide"] for t in truth.values())
        assert_registers_equal(d.cpu_states, truth)
        for c in d.cpu_states:
            assert c["cr0"] & 0x80000001 == 0x80000001, hex(c["cr0"])  # PE and PG: protected, paging
            assert c["cr4"] & 0x20 and c["cr3"] != 0, (hex(c["cr4"]), hex(c["cr3"]))  # PAE, a page-table root
            assert c["cs"] in (0x10, 0x33), hex(c["cs"])  # the kernel's or user space's 64-bit code segment
        write_elf(d, tmp_path / "copy.elf", cpu_states=d.cpu_states)
        with open_dump_memory(tmp_path / "copy.elf") as c:
            assert c.cpu_states == d.cpu_states
            assert_registers_equal(c.cpu_states, truth)


@st.composite
def layouts(draw: st.DrawFn) -> dict[int, bytearray]:
    chunks, pos = {}, draw(st.integers(0, 3)) * 0x1000
    for i in range(draw(st.integers(1, 4))):
        size = draw(st.integers(1, 0x3000))
        chunks[pos] = pattern(size, i)
        pos += size + draw(st.integers(0, 2)) * 0x800  # adjacent or with a hole
    return chunks


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunks=layouts(), reads=st.lists(st.tuples(st.integers(-8, 0x10000), st.integers(0, 0x2000)),
                                        min_size=1, max_size=40))
def test_readers_agree_with_source(tmp_path: Path, chunks: dict[int, bytearray],
                                   reads: list[tuple[int, int]]) -> None:
    """Every reader returns what was written, or NotRAM exactly where the source has no RAM."""
    mem = BytesMemory(chunks)
    write_elf(mem, tmp_path / "p.elf")
    write_lime(mem, tmp_path / "p.lime")
    dumps = [open_dump_memory(tmp_path / "p.elf"), open_dump_memory(tmp_path / "p.lime")]
    try:
        for addr, size in reads:
            try:
                want: bytes | type[AradiaError] = mem.read(addr, size)
            except AradiaError:
                want = AradiaError
            for d in dumps:
                if want is AradiaError:
                    with pytest.raises(AradiaError):
                        d.read(addr, size)
                else:
                    assert d.read(addr, size) == want
    finally:
        for d in dumps:
            d.close()
