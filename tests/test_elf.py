"""The one ELF reader (:mod:`aradia.elf`) on crafted inputs: valid files of each class and byte order,
truncated headers, absurd counts and sizes, hostile notes, and random mutations (hypothesis); and
against pyelftools on real files of this host."""

from __future__ import annotations

import mmap
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aradia import elf as E
from aradia.elf import ElfFile, Note, iter_notes, notes_build_id
from aradia.errors import AradiaError, DumpFormatError, GuestDataCorrupt
from aradia.linux.elfsyms import DynamicSymbols

pytestmark = pytest.mark.timeout(60)

BUILD_ID = bytes(range(1, 21))


# --- a small ELF writer --------------------------------------------------------------------------------
@dataclass
class Seg:
    type: int
    data: bytes
    vaddr: int = 0
    memsz: int | None = None


@dataclass
class Spec:
    """What :func:`build` lays out: header, program headers, segment data, section data, .shstrtab,
    section headers (null section first)."""

    segments: list[Seg] = field(default_factory=list)
    sections: list[tuple[str, int, bytes]] = field(default_factory=list)  # (name, sh_type, data)
    elf64: bool = True
    little: bool = True
    type: int = E.ET_DYN
    machine: int = E.EM_X86_64
    xnum: bool = False  # program header count as PN_XNUM + sh_info of section 0
    xshnum: bool = False  # section count as e_shnum 0 + sh_size of section 0, shstrndx as SHN_XINDEX


def note(name: bytes, ntype: int, desc: bytes, *, little: bool = True, align: int = 4) -> bytes:
    """One note as a linker writes it (name with its NUL, both padded to ``align``)."""
    name += b"\0"
    pad = lambda b: b + bytes(-len(b) % align)  # noqa: E731
    return struct.pack(("<" if little else ">") + "III", len(name), len(desc), ntype) + pad(name) + pad(desc)


def build(spec: Spec) -> bytes:
    e = "<" if spec.little else ">"
    e64 = spec.elf64
    ehsize, phsize, shsize = (64, 56, 64) if e64 else (52, 32, 40)
    names = b"\0" + b"".join(n.encode() + b"\0" for n, _, _ in spec.sections) + b".shstrtab\0"
    body = bytearray(ehsize + phsize * len(spec.segments))
    phdrs = []
    for s in spec.segments:
        off = len(body)
        body += s.data
        phdrs.append((s.type, off, s.vaddr, len(s.data), s.memsz if s.memsz is not None else len(s.data)))
    shdrs = [(0, 0, 0, 0, 0, 0)]  # (name, type, offset, size, link, info); patched for section 0 below
    for name, sh_type, data in [*spec.sections, (".shstrtab", 3, names)]:
        while len(body) % 8:
            body.append(0)
        shdrs.append((names.index(name.encode() + b"\0"), sh_type, len(body), len(data), 0, 0))
        body += data
    while len(body) % 8:
        body.append(0)
    nsec, strndx = len(shdrs), len(shdrs) - 1
    shdrs[0] = (0, 0, 0, nsec if spec.xshnum else 0, strndx if spec.xshnum else 0,
                len(phdrs) if spec.xnum else 0)
    shoff = len(body)
    for name_off, sh_type, off, size, link, info in shdrs:
        if e64:
            body += struct.pack(e + "IIQQQQIIQQ", name_off, sh_type, 0, 0, off, size, link, info, 1, 0)
        else:
            body += struct.pack(e + "10I", name_off, sh_type, 0, 0, off, size, link, info, 1, 0)
    pos = ehsize
    for p_type, off, vaddr, filesz, memsz in phdrs:
        if e64:
            body[pos:pos + phsize] = struct.pack(e + "IIQQQQQQ", p_type, 5, off, vaddr, vaddr, filesz, memsz, 8)
        else:
            body[pos:pos + phsize] = struct.pack(e + "8I", p_type, off, vaddr, vaddr, filesz, memsz, 5, 4)
        pos += phsize
    ident = b"\x7fELF" + bytes([2 if e64 else 1, 1 if spec.little else 2, 1]) + bytes(9)
    fmt = e + ("HHIQQQIHHHHHH" if e64 else "HHIIIIIHHHHHH")
    phnum = E.PN_XNUM if spec.xnum else len(phdrs)
    shnum, shstrndx = (0, E.SHN_XINDEX) if spec.xshnum else (nsec, strndx)
    body[:ehsize] = ident + struct.pack(fmt, spec.type, spec.machine, 1, 0x1040, ehsize, shoff, 0, ehsize,
                                        phsize, phnum, shsize, shnum, shstrndx)
    return bytes(body)


def dynamic(entries: list[tuple[int, int]], *, elf64: bool = True, little: bool = True) -> bytes:
    fmt = ("<" if little else ">") + ("qQ" if elf64 else "iI")
    return b"".join(struct.pack(fmt, t, v) for t, v in entries)


def sample(**kw: object) -> Spec:
    """A small valid file: a PT_LOAD, a PT_NOTE with two notes, a PT_DYNAMIC; .text, .notes, .bss."""
    little, elf64 = kw.get("little", True) is not False, kw.get("elf64", True) is not False
    notes = note(b"Linux", 1, b"\1\2\3\4", little=little) + note(b"GNU", 3, BUILD_ID, little=little)
    spec = Spec(
        segments=[Seg(E.PT_LOAD, b"\x90" * 32, 0x400000, 0x2000), Seg(E.PT_NOTE, notes),
                  Seg(E.PT_DYNAMIC, dynamic([(5, 0x1000), (10, 0x40), (0, 0), (5, 0xBAD)], elf64=elf64,
                                            little=little))],
        sections=[(".text", 1, b"\xc3" * 16), (".notes", E.SHT_NOTE, notes), (".bss", E.SHT_NOBITS, b"")],
    )
    for k, v in kw.items():
        setattr(spec, k, v)
    return spec


def recording(data: bytes) -> tuple[Callable[[int, int], bytes], list[int]]:
    """A ``read`` over ``data`` with no known size (like guest memory) that records each size asked."""
    sizes: list[int] = []

    def read(off: int, n: int) -> bytes:
        sizes.append(n)
        return data[off:off + n]

    return read, sizes


# --- valid files ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("elf64", "little"), [(True, True), (True, False), (False, True), (False, False)])
def test_crafted_file_each_class_and_byte_order(elf64: bool, little: bool) -> None:
    raw = build(sample(elf64=elf64, little=little))
    elf = ElfFile.from_bytes(raw)
    assert (elf.elf64, elf.little, elf.type, elf.machine) == (elf64, little, E.ET_DYN, E.EM_X86_64)
    assert elf.header.entry == 0x1040
    ph = elf.program_headers()
    assert [p.type for p in ph] == [E.PT_LOAD, E.PT_NOTE, E.PT_DYNAMIC]
    assert [p.index for p in ph] == [0, 1, 2]
    load = ph[0]
    assert (load.vaddr, load.paddr, load.filesz, load.memsz, load.flags) == (0x400000, 0x400000, 32, 0x2000, 5)
    assert raw[load.offset:load.offset + 32] == b"\x90" * 32
    assert elf.segments(E.PT_NOTE) == [ph[1]]
    assert [s.name for s in elf.sections()] == ["", ".text", ".notes", ".bss", ".shstrtab"]
    text = elf.section(".text")
    assert text is not None and elf.section_data(text) == b"\xc3" * 16
    bss = elf.section(".bss")
    assert bss is not None and elf.section_data(bss) == b""
    assert elf.section(".nothing") is None
    notes_sec = elf.section(".notes")
    assert notes_sec is not None
    blob = elf.section_data(notes_sec)
    assert list(elf.notes(blob)) == [Note("Linux", 1, b"\1\2\3\4"), Note("GNU", 3, BUILD_ID)]
    assert notes_build_id(blob, little=little) == BUILD_ID.hex()
    assert elf.dynamic() == [(5, 0x1000), (10, 0x40)]  # up to DT_NULL
    assert elf.dynamic(limit=1) == [(5, 0x1000)]


def test_three_sources_read_alike(tmp_path: Path) -> None:
    """bytes, a memory mapping and a read callable without a size give the same tables."""
    raw = build(sample())
    path = tmp_path / "f.elf"
    path.write_bytes(raw)
    read, _ = recording(raw)
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
        mapped = ElfFile(lambda off, n: m[off:off + n], len(m))
        views = [ElfFile.from_bytes(raw), mapped, ElfFile(read)]
        got = [(f.header, f.program_headers(), f.sections(), f.dynamic()) for f in views]
    assert got[0] == got[1] == got[2]


def test_extended_numbering() -> None:
    """PN_XNUM program header count, e_shnum 0 and SHN_XINDEX resolve through section header 0."""
    plain = ElfFile.from_bytes(build(sample()))
    ext = ElfFile.from_bytes(build(sample(xnum=True, xshnum=True)))
    assert ext.header.phnum == E.PN_XNUM and ext.header.shnum == 0 and ext.header.shstrndx == E.SHN_XINDEX
    assert ext.phnum == 3 and ext.shnum == 5
    assert [p.type for p in ext.program_headers()] == [p.type for p in plain.program_headers()]
    assert [s.name for s in ext.sections()] == [s.name for s in plain.sections()]


def test_no_tables() -> None:
    raw = bytearray(build(sample()))
    struct.pack_into("<H", raw, 56, 0)  # e_phnum
    struct.pack_into("<Q", raw, 40, 0)  # e_shoff
    struct.pack_into("<H", raw, 60, 0)  # e_shnum
    elf = ElfFile.from_bytes(bytes(raw))
    assert elf.program_headers() == [] and elf.sections() == [] and elf.dynamic() == []


# --- truncated and malformed headers -----------------------------------------------------------------------
def test_every_truncated_header_is_an_error() -> None:
    raw = build(sample())
    for n in range(64):
        cut = raw[:n]
        with pytest.raises(GuestDataCorrupt, match=r"not an ELF file|truncated ELF header") as e:
            ElfFile.from_bytes(cut, error=GuestDataCorrupt, context="lib.so: ")
        assert str(e.value).startswith("lib.so: ")
        with pytest.raises(DumpFormatError):  # the same without a known size
            ElfFile(recording(cut)[0])
    small32 = build(sample(elf64=False))
    with pytest.raises(DumpFormatError, match="truncated ELF header"):
        ElfFile.from_bytes(small32[:51])
    assert ElfFile.from_bytes(small32[:52]).elf64 is False


@pytest.mark.parametrize(
    ("at", "value", "message"),
    [
        (0, b"\x7fELG", "not an ELF file"),
        (4, b"\x03", "bad ELF class 3"),
        (5, b"\x00", "bad ELF data encoding 0"),
    ],
)
def test_bad_ident(at: int, value: bytes, message: str) -> None:
    raw = bytearray(build(sample()))
    raw[at:at + len(value)] = value
    with pytest.raises(DumpFormatError, match=message):
        ElfFile.from_bytes(bytes(raw))


def test_tables_past_the_end() -> None:
    raw = build(sample())
    cut = ElfFile.from_bytes(raw[:-10])  # the section header table is last
    with pytest.raises(DumpFormatError, match=r"truncated: 5 section headers at .* lie outside the file"):
        cut.sections()
    with pytest.raises(DumpFormatError, match="truncated: 5 section headers"):
        ElfFile(recording(raw[:-10])[0]).sections()
    bad = bytearray(raw)
    struct.pack_into("<Q", bad, 32, len(raw) - 100)  # e_phoff near the end
    with pytest.raises(DumpFormatError, match="truncated: 3 program headers"):
        ElfFile.from_bytes(bytes(bad)).program_headers()
    elf = ElfFile.from_bytes(raw)
    text = elf.section(".text")
    assert text is not None
    moved = E.Section(text.index, text.name, text.type, 0, 0, len(raw) - 8, 16, 0, 0, 0)
    with pytest.raises(DumpFormatError, match=r"ELF section \.text at .* lies outside the file"):
        elf.section_data(moved)
    with pytest.raises(DumpFormatError, match="outside the file"):
        elf.read(len(raw), 1, "x")
    with pytest.raises(DumpFormatError, match="outside the file"):
        elf.read(-1, 1, "x")


def test_entry_sizes() -> None:
    raw = bytearray(build(sample()))
    struct.pack_into("<H", raw, 54, 20)  # e_phentsize
    with pytest.raises(DumpFormatError, match="program header entry size 20 is smaller than 56"):
        ElfFile.from_bytes(bytes(raw)).program_headers()
    struct.pack_into("<H", raw, 54, 0xFFFF)
    with pytest.raises(DumpFormatError, match="absurd program header table"):
        ElfFile.from_bytes(bytes(raw)).program_headers()
    struct.pack_into("<H", raw, 54, 56)
    struct.pack_into("<H", raw, 58, 8)  # e_shentsize
    with pytest.raises(DumpFormatError, match="section header entry size 8"):
        ElfFile.from_bytes(bytes(raw)).sections()


def test_absurd_counts_are_refused_before_reading() -> None:
    """Huge counts fail on the count, without asking ``read`` for the table."""
    raw = bytearray(build(sample(xnum=True, xshnum=True)))
    shoff = struct.unpack_from("<Q", raw, 40)[0]
    struct.pack_into("<I", raw, shoff + 44, 0xFFFFFFFF)  # sh_info of section 0: the phdr count
    struct.pack_into("<Q", raw, shoff + 32, 1 << 40)  # sh_size of section 0: the section count
    read, sizes = recording(bytes(raw))
    elf = ElfFile(read)
    with pytest.raises(DumpFormatError, match="absurd program header count 4294967295"):
        elf.program_headers()
    with pytest.raises(DumpFormatError, match="absurd section header count 1099511627776"):
        elf.sections()
    assert max(sizes) <= 64
    # e_phnum 0xfffe is allowed by the format; a caller's cap refuses it without reading 3.5 MiB.
    plain = bytearray(build(sample()))
    struct.pack_into("<H", plain, 56, 0xFFFE)
    read, sizes = recording(bytes(plain))
    with pytest.raises(GuestDataCorrupt, match="absurd program header count 65534"):
        ElfFile(read, error=GuestDataCorrupt, max_phnum=512).program_headers()
    assert max(sizes) <= 64
    read, sizes = recording(bytes(plain))
    with pytest.raises(DumpFormatError, match="truncated: 65534 program headers"):
        ElfFile(read, len(plain)).program_headers()  # a known size is checked before the read
    assert max(sizes) <= 64


def test_pn_xnum_without_section_zero() -> None:
    raw = bytearray(build(sample()))
    struct.pack_into("<H", raw, 56, E.PN_XNUM)
    struct.pack_into("<Q", raw, 40, 0)  # no section headers
    with pytest.raises(DumpFormatError, match="PN_XNUM but section header 0 is missing"):
        ElfFile.from_bytes(bytes(raw)).program_headers()
    struct.pack_into("<Q", raw, 40, len(raw) - 8)  # section 0 cut short by the end of the file
    with pytest.raises(DumpFormatError, match="PN_XNUM"):
        ElfFile.from_bytes(bytes(raw)).program_headers()


def test_section_name_table() -> None:
    raw = bytearray(build(sample()))
    struct.pack_into("<H", raw, 62, 9)  # e_shstrndx past the 5 sections
    with pytest.raises(DumpFormatError, match="section name table index 9 out of range"):
        ElfFile.from_bytes(bytes(raw)).sections()
    raw = bytearray(build(sample()))
    shoff = struct.unpack_from("<Q", raw, 40)[0]
    struct.pack_into("<Q", raw, shoff + 4 * 64 + 32, 1 << 40)  # .shstrtab sh_size
    read, sizes = recording(bytes(raw))
    with pytest.raises(DumpFormatError, match="section name table of 0x10000000000 bytes is absurd"):
        ElfFile(read).sections()
    assert max(sizes) <= 5 * 64
    struct.pack_into("<Q", raw, shoff + 4 * 64 + 32, 64)  # runs past the end of the file
    struct.pack_into("<Q", raw, shoff + 4 * 64 + 24, len(raw) - 10)
    with pytest.raises(DumpFormatError, match=r"section name table at .* lies outside the file"):
        ElfFile.from_bytes(bytes(raw)).sections()
    raw = bytearray(build(sample()))
    struct.pack_into("<I", raw, shoff + 64, 0xFFFFFF)  # .text's name offset past the table: no name
    assert [s.name for s in ElfFile.from_bytes(bytes(raw)).sections()][:2] == ["", ""]


def test_dynamic_past_the_end() -> None:
    raw = build(sample())
    elf = ElfFile.from_bytes(raw)
    dyn = elf.segments(E.PT_DYNAMIC)[0]
    bad = bytearray(raw)
    struct.pack_into("<Q", bad, 64 + 2 * 56 + 32, 1 << 40)  # p_filesz of PT_DYNAMIC
    read, sizes = recording(bytes(bad))
    assert ElfFile(read).dynamic(limit=3) == [(5, 0x1000), (10, 0x40)]  # the limit bounds the read
    assert sizes[-1] == 3 * 16 and max(sizes) < 256  # not the 1 TiB p_filesz claims
    with pytest.raises(DumpFormatError, match=r"dynamic section at .* lies outside the file"):
        ElfFile.from_bytes(bytes(bad)).dynamic()
    assert dyn.filesz == 4 * 16


def test_cstring() -> None:
    data = build(sample()) + b"hello\0" + b"x" * 300
    at = len(data) - 306
    elf = ElfFile.from_bytes(data)
    assert elf.cstring(at, 100) == b"hello"
    with pytest.raises(DumpFormatError, match="unterminated"):
        elf.cstring(at + 6, 100)  # 300 bytes, no NUL within the limit
    with pytest.raises(DumpFormatError, match="unterminated"):
        elf.cstring(at + 6, 1000)  # no NUL before the end of the file
    read, sizes = recording(data)
    with pytest.raises(DumpFormatError, match="unterminated"):
        ElfFile(read).cstring(at + 6, 1 << 30)
    assert sum(sizes[1:]) <= 400


# --- notes -----------------------------------------------------------------------------------------------
def test_iter_notes_layouts() -> None:
    blob = note(b"CORE", 1, b"abcde") + note(b"", 7, b"") + note(b"VMCOREINFO", 0, b"X=1\n")
    assert list(iter_notes(blob)) == [Note("CORE", 1, b"abcde"), Note("", 7, b""), Note("VMCOREINFO", 0, b"X=1\n")]
    assert list(iter_notes(blob + b"\0" * 11)) == list(iter_notes(blob))  # short tail: padding
    big = note(b"GNU", 5, b"\1" * 12, little=False, align=8) + note(b"Go", 4, b"id", little=False, align=8)
    assert list(iter_notes(big, little=False, align=8)) == [Note("GNU", 5, b"\1" * 12), Note("Go", 4, b"id")]
    assert list(iter_notes(b"")) == []


@pytest.mark.parametrize("field_at", [0, 4])
def test_note_sizes_past_the_data(field_at: int) -> None:
    blob = bytearray(note(b"CORE", 1, b"abcd") + note(b"CORE", 2, b"efgh"))
    struct.pack_into("<I", blob, 24 + field_at, 0xFFFFFFFF)  # namesz or descsz of the second note
    got: list[Note] = []
    with pytest.raises(GuestDataCorrupt, match=r"ctx: note at \+0x18 .* overruns"):
        got.extend(iter_notes(bytes(blob), error=GuestDataCorrupt, context="ctx: "))
    assert got == [Note("CORE", 1, b"abcd")]  # notes before the bad one were yielded


def test_note_loop_is_bounded() -> None:
    """A blob of a million empty notes (a note 'loop' of 12-byte headers) stops at the limit."""
    blob = struct.pack("<III", 0, 0, 1) * (1 << 20)
    started = time.perf_counter()
    seen = 0
    with pytest.raises(DumpFormatError, match="more than 1000 ELF notes"):
        for _ in iter_notes(blob, limit=1000):
            seen += 1
    assert seen == 1000 and time.perf_counter() - started < 2
    assert len(list(iter_notes(blob[:12 * 1000], limit=1000))) == 1000  # exactly the limit is fine
    assert notes_build_id(blob, limit=1000) is None


def test_notes_build_id() -> None:
    gnu = note(b"GNU", 3, BUILD_ID)
    other = note(b"Linux", 3, b"\xaa" * 20)  # type 3 but not GNU's
    assert notes_build_id(other + gnu) == BUILD_ID.hex()
    assert notes_build_id(other) is None
    assert notes_build_id(note(b"GNU", 3, b"\1" * 65)) is None  # longer than any build ID
    assert notes_build_id(note(b"GNU", 3, b"")) is None
    assert notes_build_id(other * 3 + gnu, limit=3) is None  # past the limit
    assert notes_build_id(other * 3 + gnu, limit=4) == BUILD_ID.hex()
    broken = bytearray(other + gnu)
    struct.pack_into("<I", broken, 4, 1 << 20)  # the first note's descsz runs off the end
    assert notes_build_id(bytes(broken)) is None
    assert notes_build_id(note(b"GNU", 3, BUILD_ID, little=False), little=False) == BUILD_ID.hex()


# --- users of the reader -------------------------------------------------------------------------------
def test_dynamic_symbols_use_the_bounded_reader() -> None:
    """A guest file with a huge e_phnum is GuestDataCorrupt, and the 3.5 MiB table is never read."""
    raw = bytearray(build(sample()))
    struct.pack_into("<H", raw, 56, 0xFFFE)
    read, sizes = recording(bytes(raw))
    with pytest.raises(GuestDataCorrupt, match="absurd program header count"):
        DynamicSymbols(read)
    assert max(sizes) <= 64
    with pytest.raises(GuestDataCorrupt, match="64-bit little-endian"):
        DynamicSymbols(recording(build(sample(elf64=False)))[0])


# --- against pyelftools -----------------------------------------------------------------------------------
def _host_files() -> list[Path]:
    candidates = [Path(sys.executable).resolve(), Path("/bin/ls"), Path("/usr/bin/env"),
                  *sorted(Path("/lib/x86_64-linux-gnu").glob("libc.so.*"))]
    return [p for p in candidates if p.is_file()][:4]


@pytest.mark.parametrize("path", _host_files(), ids=lambda p: p.name)
def test_agrees_with_pyelftools(path: Path) -> None:
    data = path.read_bytes()
    if data[:4] != b"\x7fELF":
        pytest.skip(f"{path} is not an ELF file")
    ours = ElfFile.from_bytes(data)
    with path.open("rb") as fh:
        ref = ELFFile(fh)
        assert ours.elf64 == (ref.elfclass == 64) and ours.little == ref.little_endian
        assert (ours.machine == E.EM_X86_64) == (ref["e_machine"] == "EM_X86_64")
        assert [(p.offset, p.vaddr, p.filesz, p.memsz) for p in ours.program_headers()] == [
            (s["p_offset"], s["p_vaddr"], s["p_filesz"], s["p_memsz"]) for s in ref.iter_segments()]
        assert [(s.name, s.offset, s.size) for s in ours.sections()] == [
            (s.name, s["sh_offset"], s["sh_size"]) for s in ref.iter_sections()]
        build_id = ours.section(".note.gnu.build-id")
        if build_id is not None:
            ref_note = next(iter(ref.get_section_by_name(".note.gnu.build-id").iter_notes()))
            assert notes_build_id(ours.section_data(build_id)) == ref_note["n_desc"]
        ref_dyn = ref.get_section_by_name(".dynamic")
        if ref_dyn is not None:  # pyelftools yields the DT_NULL that ends the table, we stop before it
            want = [t.entry.d_val for t in ref_dyn.iter_tags()]
            assert [v for _, v in ours.dynamic()] == want[:-1] and ref_dyn.num_tags() == len(want)


# --- random corruption -------------------------------------------------------------------------------------
_SAMPLES = {
    "elf64": build(sample()),
    "elf32be": build(sample(elf64=False, little=False)),
    "extended": build(sample(xnum=True, xshnum=True)),
}


def _exercise(elf: ElfFile) -> None:
    """Every reader call, as a user of the module makes them."""
    _ = elf.header, elf.elf64, elf.little, elf.type, elf.machine
    for p in elf.program_headers():
        if p.type == E.PT_NOTE and p.filesz < 1 << 16:
            for _n in elf.notes(elf.read(p.offset, p.filesz, "PT_NOTE"), limit=64):
                pass
    elf.dynamic(limit=64)
    for s in elf.sections():
        if s.size < 1 << 16:
            data = elf.section_data(s)
            if s.type == E.SHT_NOTE:
                notes_build_id(data, limit=64)
    elf.cstring(0x30, 64)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(_SAMPLES)),
       edits=st.lists(st.tuples(st.integers(0, 1 << 12), st.binary(min_size=1, max_size=8)), max_size=6),
       cut=st.integers(0, 1 << 12), sized=st.booleans())
def test_mutations_raise_only_the_callers_error(name: str, edits: list[tuple[int, bytes]], cut: int,
                                                sized: bool) -> None:
    """Bytes overwritten anywhere and any truncation: a result or the error class given, nothing else."""
    data = bytearray(_SAMPLES[name])
    for at, chunk in edits:
        at %= len(data)
        data[at:at + len(chunk)] = chunk
    if cut % 2:
        data = data[:cut % len(data)]
    raw = bytes(data)
    read, sizes = recording(raw)
    try:
        elf = ElfFile.from_bytes(raw, error=GuestDataCorrupt) if sized else ElfFile(read, error=GuestDataCorrupt)
        _exercise(elf)
    except GuestDataCorrupt:
        pass
    assert all(n <= E.MAX_TABLE_BYTES for n in sizes)


@settings(max_examples=300, deadline=None)
@given(blob=st.binary(max_size=512), limit=st.integers(0, 40), little=st.booleans(),
       align=st.sampled_from([4, 8]))
def test_random_note_blobs(blob: bytes, limit: int, little: bool, align: int) -> None:
    """Any bytes: at most ``limit`` notes, each inside the blob, then the end or the error given."""
    got: list[Note] = []
    try:
        for n in iter_notes(blob, limit=limit, little=little, align=align, error=GuestDataCorrupt):
            got.append(n)
    except GuestDataCorrupt:
        pass
    assert len(got) <= limit
    assert sum(12 + len(n.desc) for n in got) <= len(blob)
    assert notes_build_id(blob, limit=limit, little=little) in (None, *(n.desc.hex() for n in got))


def test_errors_are_aradia_errors() -> None:
    """The default error class is the dump error, and every class given is an AradiaError."""
    with pytest.raises(DumpFormatError):
        ElfFile.from_bytes(b"junk")
    assert issubclass(DumpFormatError, AradiaError) and issubclass(GuestDataCorrupt, AradiaError)
