"""One bounded ELF reader: headers, program headers, sections, notes and ``PT_DYNAMIC``.

Every ELF file aradia reads is untrusted: a dump file that may be truncated or corrupt
(:mod:`aradia.sources.elfcore`), a library or program in a guest's page cache
(:mod:`aradia.linux.elfsyms`), a kernel file handed in by a user (:mod:`aradia.linux.vmlinux`), a
``.notes`` blob read from guest RAM (:func:`notes_build_id`, used by :mod:`aradia.linux.profile`).
:class:`ElfFile` reads all of them through one callable ``read(offset, size) -> bytes`` -- a slice
of a memory mapping, of a ``bytes`` object, or a read of guest memory -- so one set of checks serves
every source:

* the ELF header is checked (magic, class, byte order, length) before a field is used;
* table counts are capped (``max_phnum``, ``max_shnum``, :data:`MAX_TABLE_BYTES`, entries of at
  most :data:`MAX_ENTSIZE` bytes) and, when the file's ``size`` is known, every table and section
  is checked against it *before* it is read; when it is not known (guest page cache), a short read
  is the end of the file;
* notes (:func:`iter_notes`) and dynamic entries stop after a caller-given number of entries, and
  every size in them is checked against the bytes that hold them.

A failure is one exception of the class the caller chooses (``error``: a dump reader raises
:class:`~aradia.errors.DumpFormatError`, a guest-file reader
:class:`~aradia.errors.GuestDataCorrupt`, the kernel-file reader its own
:class:`~aradia.errors.AradiaError` subclass), prefixed with the caller's ``context`` (a path) and
naming the table and offsets at fault -- never a ``struct.error``, a hang or a ``MemoryError``.

Why not pyelftools (a dependency, used by the lab's image builder): it reads a seekable stream, so a
guest page-cache reader would need a file-object shim; it has no cap on header counts, note counts
or sizes (its note iterator reads ``n_descsz`` bytes whatever it says and runs to the end of the
segment); it raises a mix of ``ELFError``, ``ELFParseError`` and ``struct``/``construct`` errors that
every caller would have to translate; and a lenient reading of a truncated dump (keep what is
present, report the rest) needs the offsets checked one table at a time anyway. The part aradia
needs is small, so it is plain :mod:`struct` code; the tests check it against pyelftools on real
files.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from aradia.errors import AradiaError, DumpFormatError

Read = Callable[[int, int], bytes]
"""``read(offset, size)``: up to ``size`` bytes of the file at ``offset`` (fewer at its end)."""

ELF_MAGIC = b"\x7fELF"
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB, ELFDATA2MSB = 1, 2
ET_REL, ET_EXEC, ET_DYN, ET_CORE = 1, 2, 3, 4
EM_386, EM_X86_64, EM_AARCH64 = 3, 62, 183
PT_NULL, PT_LOAD, PT_DYNAMIC, PT_INTERP, PT_NOTE = 0, 1, 2, 3, 4
SHT_NOTE, SHT_NOBITS = 7, 8
SHN_UNDEF, SHN_XINDEX = 0, 0xFFFF
PN_XNUM = 0xFFFF
DT_NULL = 0
NT_PRSTATUS = 1
NT_GNU_BUILD_ID = 3

MAX_PHNUM = 1 << 20  # far above any real file (a QEMU dump has one per RAM block or mapping)
MAX_SHNUM = 1 << 20
MAX_ENTSIZE = 256  # header table entries are 32..64 bytes; Linux loads only the exact size
MAX_TABLE_BYTES = 64 << 20  # one header table read at most
MAX_SECTION_NAMES = 16 << 20  # .shstrtab: a few KiB in a kernel, a few hundred KiB in big objects
MAX_NOTES = 1 << 16
MAX_DYNAMIC = 4096
MAX_BUILD_ID = 64  # bytes; GNU ld writes 20 (sha1) or 16 (md5/uuid)
_STRING_CHUNK = 64

_EHDR = {True: "HHIQQQIHHHHHH", False: "HHIIIIIHHHHHH"}  # after e_ident; key: elf64
_PHDR = {True: "IIQQQQQQ", False: "IIIIIIII"}
_SHDR = {True: "IIQQQQIIQQ", False: "IIIIIIIIII"}
_DYN = {True: "qQ", False: "iI"}


@dataclass(frozen=True, slots=True)
class ElfHeader:
    """The fields of the ELF header aradia uses (counts as stored: ``PN_XNUM``/0 not resolved)."""

    elf64: bool
    little: bool
    type: int
    machine: int
    entry: int
    phoff: int
    shoff: int
    phentsize: int
    phnum: int
    shentsize: int
    shnum: int
    shstrndx: int


@dataclass(frozen=True, slots=True)
class ProgramHeader:
    """One program header (segment), ``index`` its place in the table."""

    index: int
    type: int
    flags: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    align: int


@dataclass(frozen=True, slots=True)
class Section:
    """One section header, with its ``name`` looked up in the section name table."""

    index: int
    name: str
    type: int
    flags: int
    addr: int
    offset: int
    size: int
    link: int
    info: int
    entsize: int


@dataclass(frozen=True)
class Note:
    """One ELF note: ``name`` (without the trailing NUL), ``type`` and raw ``desc`` bytes."""

    name: str
    type: int
    desc: bytes


class ElfFile:
    """An ELF file (32/64-bit, either byte order) read through ``read(offset, size)``.

    ``size`` is the file's length when known (a mapped file, a ``bytes`` object): every table and
    section is checked against it before it is read. Without it (a file in guest memory) a short
    read marks the end of the file. The ELF header is read and checked here; the tables are read
    on first use. Every malformed input raises ``error`` (message prefixed with ``context``).
    ``max_phnum`` and ``max_shnum`` cap the header counts (a reader of guest files, where no size
    bounds a table, passes smaller caps).
    """

    def __init__(
        self,
        read: Read,
        size: int | None = None,
        *,
        error: type[AradiaError] = DumpFormatError,
        context: str = "",
        max_phnum: int = MAX_PHNUM,
        max_shnum: int = MAX_SHNUM,
    ) -> None:
        self._read = read
        self.size = size
        self.error = error
        self.context = context
        self.max_phnum = max_phnum
        self.max_shnum = max_shnum
        self._phdrs: list[ProgramHeader] | None = None
        self._sections: list[Section] | None = None
        self._section0: tuple[int, int, int] | None = None  # sh_size, sh_link, sh_info
        head = bytes(read(0, 64 if size is None else min(64, size)))
        if len(head) < 16 or head[:4] != ELF_MAGIC:
            raise self.fail("not an ELF file")
        ei_class, ei_data = head[4], head[5]
        if ei_class not in (ELFCLASS32, ELFCLASS64):
            raise self.fail(f"bad ELF class {ei_class}")
        if ei_data not in (ELFDATA2LSB, ELFDATA2MSB):
            raise self.fail(f"bad ELF data encoding {ei_data}")
        elf64, little = ei_class == ELFCLASS64, ei_data == ELFDATA2LSB
        self._e = "<" if little else ">"
        fmt = self._e + _EHDR[elf64]
        if len(head) < 16 + struct.calcsize(fmt):
            raise self.fail("truncated ELF header")
        (e_type, machine, _version, entry, phoff, shoff, _flags, _ehsize, phentsize, phnum, shentsize,
         shnum, shstrndx) = struct.unpack_from(fmt, head, 16)  # fmt: skip
        self.header = ElfHeader(elf64, little, e_type, machine, entry, phoff, shoff, phentsize, phnum,
                                shentsize, shnum, shstrndx)

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        *,
        error: type[AradiaError] = DumpFormatError,
        context: str = "",
        max_phnum: int = MAX_PHNUM,
        max_shnum: int = MAX_SHNUM,
    ) -> ElfFile:
        """An :class:`ElfFile` over the bytes ``data`` (keyword arguments as for the constructor)."""
        view = memoryview(data)
        return cls(lambda off, n: bytes(view[off:off + n]), len(data), error=error, context=context,
                   max_phnum=max_phnum, max_shnum=max_shnum)

    # --- header shortcuts ------------------------------------------------------------------------
    @property
    def elf64(self) -> bool:
        """True for ELFCLASS64."""
        return self.header.elf64

    @property
    def little(self) -> bool:
        """True for little-endian (ELFDATA2LSB)."""
        return self.header.little

    @property
    def type(self) -> int:
        """``e_type`` (``ET_EXEC``, ``ET_DYN``, ``ET_CORE``, ...)."""
        return self.header.type

    @property
    def machine(self) -> int:
        """``e_machine`` (62: x86-64, 3: i386)."""
        return self.header.machine

    # --- checked reads ---------------------------------------------------------------------------
    def fail(self, msg: str) -> AradiaError:
        """The caller's error class with ``msg`` (and the context prefix)."""
        return self.error(f"{self.context}{msg}")

    def check(self, offset: int, size: int, what: str) -> None:
        """Raise unless ``[offset, offset + size)`` lies inside the file (when its size is known)."""
        if offset < 0 or size < 0 or (self.size is not None and offset + size > self.size):
            raise self.fail(f"{what} at {offset:#x}+{size:#x} lies outside the file"
                            + (f" ({self.size:#x} bytes)" if self.size is not None else ""))

    def read(self, offset: int, size: int, what: str) -> bytes:
        """Exactly ``size`` bytes at ``offset``, or the error naming ``what``."""
        self.check(offset, size, what)
        data = self._read(offset, size)
        if len(data) != size:
            raise self.fail(f"{what} at {offset:#x}+{size:#x} lies outside the file (it ends at "
                            f"{offset + len(data):#x})")
        return bytes(data)

    def cstring(self, offset: int, limit: int, what: str = "string") -> bytes:
        """The NUL-terminated string at ``offset`` (without the NUL), at most ``limit`` bytes long."""
        out = b""
        while len(out) < limit:
            at = offset + len(out)
            n = min(_STRING_CHUNK, limit - len(out))
            if self.size is not None:
                n = min(n, self.size - at)
            if at < 0 or n <= 0:
                break
            chunk = bytes(self._read(at, n))[:n]
            if not chunk:
                break
            end = chunk.find(b"\0")
            if end >= 0:
                return out + chunk[:end]
            out += chunk
        raise self.fail(f"ELF {what} at {offset:#x} is unterminated (or longer than {limit} bytes)")

    def _table(self, offset: int, count: int, entsize: int, natural: int, what: str) -> bytes:
        """``count`` entries of ``entsize`` bytes (at least ``natural``) at ``offset``, bounds checked."""
        if entsize < natural:
            raise self.fail(f"{what} entry size {entsize} is smaller than {natural}")
        if entsize > MAX_ENTSIZE or count * entsize > MAX_TABLE_BYTES:
            raise self.fail(f"absurd {what} table: {count} entries of {entsize} bytes")
        size = count * entsize
        if self.size is not None and offset + size > self.size:
            raise self.fail(f"truncated: {count} {what}s at {offset:#x} lie outside the file "
                            f"({self.size:#x} bytes)")
        data = self._read(offset, size)
        if len(data) != size:
            raise self.fail(f"truncated: {count} {what}s at {offset:#x} lie outside the file")
        return bytes(data)

    def _first_section(self) -> tuple[int, int, int] | None:
        """``(sh_size, sh_link, sh_info)`` of section header 0 (extended numbering), or None."""
        if self._section0 is None:
            h = self.header
            natural = struct.calcsize(_SHDR[h.elf64])
            if h.shoff == 0 or h.shentsize < natural:
                return None
            if self.size is not None and h.shoff + natural > self.size:
                return None
            raw = self._read(h.shoff, natural)
            if len(raw) != natural:
                return None
            f = struct.unpack(self._e + _SHDR[h.elf64], raw)
            self._section0 = (f[5], f[6], f[7])
        return self._section0

    # --- program headers -------------------------------------------------------------------------
    @property
    def phnum(self) -> int:
        """The number of program headers (``e_phnum``, or section 0's ``sh_info`` for ``PN_XNUM``)."""
        n = self.header.phnum
        if n == PN_XNUM:
            first = self._first_section()
            if first is None:
                raise self.fail("e_phnum is PN_XNUM but section header 0 is missing or truncated")
            n = first[2]
        if n > self.max_phnum:
            raise self.fail(f"absurd program header count {n} (at most {self.max_phnum})")
        return n

    def program_headers(self) -> list[ProgramHeader]:
        """Every program header, in table order."""
        if self._phdrs is None:
            h, n = self.header, self.phnum
            if n == 0:
                self._phdrs = []
                return self._phdrs
            fmt = struct.Struct(self._e + _PHDR[h.elf64])
            table = self._table(h.phoff, n, h.phentsize, fmt.size, "program header")
            out = []
            for i in range(n):
                f = fmt.unpack_from(table, i * h.phentsize)
                if h.elf64:
                    p_type, flags, offset, vaddr, paddr, filesz, memsz, align = f
                else:
                    p_type, offset, vaddr, paddr, filesz, memsz, flags, align = f
                out.append(ProgramHeader(i, p_type, flags, offset, vaddr, paddr, filesz, memsz, align))
            self._phdrs = out
        return self._phdrs

    def segments(self, p_type: int) -> list[ProgramHeader]:
        """The program headers of type ``p_type`` (``PT_LOAD``, ``PT_NOTE``, ...)."""
        return [p for p in self.program_headers() if p.type == p_type]

    def dynamic(self, limit: int = MAX_DYNAMIC) -> list[tuple[int, int]]:
        """``(d_tag, d_val)`` of the first ``PT_DYNAMIC`` segment up to ``DT_NULL``, at most
        ``limit`` entries ([] without ``PT_DYNAMIC``)."""
        dyn = self.segments(PT_DYNAMIC)
        if not dyn:
            return []
        fmt = struct.Struct(self._e + _DYN[self.elf64])
        count = min(dyn[0].filesz // fmt.size, limit)
        raw = self.read(dyn[0].offset, count * fmt.size, "ELF dynamic section")
        out = []
        for tag, val in fmt.iter_unpack(raw):
            if tag == DT_NULL:
                break
            out.append((tag, val))
        return out

    # --- sections --------------------------------------------------------------------------------
    @property
    def shnum(self) -> int:
        """The number of section headers (``e_shnum``, or section 0's ``sh_size`` when that is 0)."""
        h = self.header
        n = h.shnum
        if n == 0 and h.shoff != 0:
            first = self._first_section()
            n = first[0] if first is not None else 0
        if n > self.max_shnum:
            raise self.fail(f"absurd section header count {n} (at most {self.max_shnum})")
        return n

    def sections(self) -> list[Section]:
        """Every section header, in table order, with names from the section name table."""
        if self._sections is None:
            h, n = self.header, self.shnum
            if n == 0:
                self._sections = []
                return self._sections
            fmt = struct.Struct(self._e + _SHDR[h.elf64])
            table = self._table(h.shoff, n, h.shentsize, fmt.size, "section header")
            raw = [fmt.unpack_from(table, i * h.shentsize) for i in range(n)]
            names = b""
            strndx = h.shstrndx
            if strndx == SHN_XINDEX:
                strndx = raw[0][6]  # sh_link of section 0
            if strndx != SHN_UNDEF:
                if strndx >= n:
                    raise self.fail(f"ELF section name table index {strndx} out of range ({n} sections)")
                str_off, str_size = raw[strndx][4], raw[strndx][5]
                if str_size > MAX_SECTION_NAMES:
                    raise self.fail(f"ELF section name table of {str_size:#x} bytes is absurd")
                names = self.read(str_off, str_size, "ELF section name table")
            out = []
            for i, f in enumerate(raw):
                name_off, sh_type, flags, addr, offset, size, link, info, _align, entsize = f
                name = ""
                if name_off < len(names):
                    end = names.find(b"\0", name_off)
                    name = names[name_off:end if end >= 0 else len(names)].decode("utf-8", "replace")
                out.append(Section(i, name, sh_type, flags, addr, offset, size, link, info, entsize))
            self._sections = out
        return self._sections

    def section(self, name: str) -> Section | None:
        """The first section called ``name``, or None."""
        return next((s for s in self.sections() if s.name == name), None)

    def section_data(self, section: Section) -> bytes:
        """The contents of ``section`` (empty for ``SHT_NOBITS``), checked against the file."""
        if section.type == SHT_NOBITS:
            return b""
        return self.read(section.offset, section.size, f"ELF section {section.name or section.index}")

    # --- notes -----------------------------------------------------------------------------------
    def notes(self, data: bytes, *, limit: int = MAX_NOTES, align: int = 4) -> Iterator[Note]:
        """:func:`iter_notes` over ``data`` (a ``PT_NOTE`` or ``SHT_NOTE`` body) in this file's
        byte order, failing with this file's error class and context."""
        return iter_notes(data, limit=limit, little=self.little, align=align, error=self.error,
                          context=self.context)


def iter_notes(
    data: bytes,
    *,
    limit: int = MAX_NOTES,
    little: bool = True,
    align: int = 4,
    error: type[AradiaError] = DumpFormatError,
    context: str = "",
) -> Iterator[Note]:
    """The notes in an ELF notes blob, in order.

    Each note is ``namesz, descsz, type`` (32-bit words in the file's byte order), the name padded
    to ``align`` bytes (4; 8 for ``PT_NOTE`` segments aligned to 8), then the descriptor likewise
    padded. Trailing bytes too short for a note header are ignored. Raises ``error`` when a note's
    name or descriptor runs past the end of ``data`` or before a note past the ``limit``-th: a
    blob of any size and content yields at most ``limit`` notes.
    """
    pad = 7 if align == 8 else 3
    header = struct.Struct(("<" if little else ">") + "III")
    pos = count = 0
    while pos + header.size <= len(data):
        if count >= limit:
            raise error(f"{context}more than {limit} ELF notes")
        namesz, descsz, ntype = header.unpack_from(data, pos)
        name_at = pos + header.size
        desc_at = name_at + ((namesz + pad) & ~pad)
        if desc_at + descsz > len(data):
            raise error(f"{context}note at +{pos:#x} (namesz {namesz}, descsz {descsz}) overruns the "
                        f"{len(data):#x} bytes of notes")
        name = bytes(data[name_at:name_at + namesz]).split(b"\0", 1)[0].decode("latin-1")
        yield Note(name, ntype, bytes(data[desc_at:desc_at + descsz]))
        count += 1
        pos = desc_at + ((descsz + pad) & ~pad)


def notes_build_id(data: bytes, *, limit: int = 1024, little: bool = True) -> str | None:
    """The GNU build ID (``NT_GNU_BUILD_ID`` note named ``GNU``) in an ELF notes blob, as hex.

    None when there is none among the first ``limit`` notes, or a malformed note comes first.
    """
    try:
        for note in iter_notes(data, limit=limit, little=little):
            if note.type == NT_GNU_BUILD_ID and note.name == "GNU" and 0 < len(note.desc) <= MAX_BUILD_ID:
                return note.desc.hex()
    except DumpFormatError:
        pass
    return None


__all__ = [
    "ElfFile",
    "ElfHeader",
    "Note",
    "ProgramHeader",
    "Read",
    "Section",
    "iter_notes",
    "notes_build_id",
]
