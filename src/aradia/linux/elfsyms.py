"""The dynamic symbol table of an ELF file (a library or executable a guest process maps).

The file is read through a callable ``read(offset, size)`` over the file's bytes, which
:mod:`aradia.linux.usersyms` serves from guest memory (the page cache, or the process's own
mapping). Only what the dynamic linker itself uses is parsed: the program headers and ``PT_DYNAMIC``
(read by :class:`aradia.elf.ElfFile`, with its bounds) and the ``.dynsym``/``.dynstr``/hash tables
they point at — a stripped binary has exactly these. Lookups go through the GNU or SysV hash table,
so finding one symbol reads a few hundred bytes. Everything is bounded: the file is guest data and
may be corrupt or hostile.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from aradia.elf import PT_LOAD, ElfFile
from aradia.errors import GuestDataCorrupt

ReadFile = Callable[[int, int], bytes]

DT_HASH, DT_STRTAB, DT_SYMTAB, DT_STRSZ, DT_SYMENT, DT_SONAME = 4, 5, 6, 10, 11, 14
DT_GNU_HASH = 0x6FFFFEF5
DT_VERSYM = 0x6FFFFFF0
VERSYM_HIDDEN = 0x8000
STT_NAMES = {0: "notype", 1: "object", 2: "func", 3: "section", 4: "file", 5: "common", 6: "tls",
             10: "ifunc"}
MAX_PHNUM = 512
MAX_DYNAMIC = 4096  # entries
MAX_NAME = 1024
MAX_SYMBOLS = 1 << 20
MAX_CHAIN = 1 << 16
_SYM = struct.Struct("<IBBHQQ")


@dataclass(frozen=True)
class ElfSymbol:
    """A dynamic symbol: its link-time ``value`` (add the load bias for the address in a process)."""

    name: str
    value: int
    size: int
    type: str  # "func", "object", "ifunc", ...
    defined: bool  # False: an import (``UND``), resolved in another file
    hidden: bool = False  # an old version of the name (``name@VER``), not the default (``name@@VER``)


def gnu_hash(name: bytes) -> int:
    """The GNU hash (``DT_GNU_HASH``) of a symbol name."""
    h = 5381
    for c in name:
        h = (h * 33 + c) & 0xFFFFFFFF
    return h


def sysv_hash(name: bytes) -> int:
    """The SysV ELF hash (``DT_HASH``) of a symbol name."""
    h = 0
    for c in name:
        h = ((h << 4) + c) & 0xFFFFFFFF
        g = h & 0xF0000000
        if g:
            h ^= g >> 24
        h &= ~g & 0xFFFFFFFF
    return h


class DynamicSymbols:
    """The dynamic symbols of one ELF64 little-endian file read through ``read(offset, size)``.

    Raises :class:`~aradia.errors.GuestDataCorrupt` when the headers make no sense.
    """

    def __init__(self, read: ReadFile) -> None:
        elf = ElfFile(read, error=GuestDataCorrupt, max_phnum=MAX_PHNUM)
        if not (elf.elf64 and elf.little):
            raise GuestDataCorrupt("not a 64-bit little-endian ELF file")
        self._elf = elf
        self.type = elf.type
        self.loads: list[tuple[int, int, int]] = [  # (p_offset, p_vaddr, p_filesz)
            (p.offset, p.vaddr, p.filesz) for p in elf.segments(PT_LOAD)]
        if not self.loads:
            raise GuestDataCorrupt("ELF file has no PT_LOAD segment")
        #: The link-time address the file's first page is loaded at (0 for a library or PIE).
        self.first_vaddr = min(v - o for o, v, _ in self.loads if o == 0) if any(
            o == 0 for o, _, _ in self.loads) else min(v for _, v, _ in self.loads) & ~0xFFF
        self._dyn: dict[int, int] = {}
        for tag, val in elf.dynamic(MAX_DYNAMIC):
            self._dyn.setdefault(tag, val)
        self._symtab = self._offset(self._dyn.get(DT_SYMTAB))
        self._strtab = self._offset(self._dyn.get(DT_STRTAB))
        self._strsz = min(self._dyn.get(DT_STRSZ, 1 << 24), 1 << 24)
        self._syment = self._dyn.get(DT_SYMENT, _SYM.size)
        if self._syment < _SYM.size or self._syment > 256:
            raise GuestDataCorrupt(f"ELF symbol entries of {self._syment} bytes")
        self._versym = self._offset(self._dyn.get(DT_VERSYM))
        self.soname = self._string(self._dyn[DT_SONAME]) if DT_SONAME in self._dyn else None

    # --- raw access -----------------------------------------------------------------------------------
    def _bytes(self, offset: int, size: int, what: str) -> bytes:
        return self._elf.read(offset, size, f"ELF {what}")

    def _offset(self, vaddr: int | None) -> int | None:
        """File offset of a link-time address (``d_ptr`` values are addresses, not offsets)."""
        if vaddr is None:
            return None
        for off, start, size in self.loads:
            if start <= vaddr < start + size:
                return off + vaddr - start
        raise GuestDataCorrupt(f"ELF dynamic pointer {vaddr:#x} is outside every loaded segment")

    def _string(self, index: int) -> str:
        if self._strtab is None or not 0 <= index < self._strsz:
            raise GuestDataCorrupt(f"ELF string index {index} out of range")
        return self._elf.cstring(self._strtab + index, MAX_NAME, f"string at index {index}").decode(
            errors="replace")

    def _symbol(self, index: int) -> ElfSymbol:
        assert self._symtab is not None
        name, info, _other, shndx, value, size = _SYM.unpack(
            self._bytes(self._symtab + index * self._syment, _SYM.size, f"symbol {index}"))
        hidden = False
        if self._versym is not None:
            ver, = struct.unpack("<H", self._bytes(self._versym + 2 * index, 2, "symbol version"))
            hidden = bool(ver & VERSYM_HIDDEN)
        return ElfSymbol(self._string(name), value, size, STT_NAMES.get(info & 0xF, str(info & 0xF)),
                         defined=shndx != 0, hidden=hidden)

    # --- lookups --------------------------------------------------------------------------------------
    def lookup(self, name: str) -> ElfSymbol | None:
        """The defined symbol ``name`` (its default version, as a new link would bind it; a version
        suffix ``@...`` is ignored), or None."""
        if self._symtab is None:
            return None
        key = name.split("@", 1)[0]
        found = None
        for index in self._candidates(key.encode()):
            sym = self._symbol(index)
            if sym.name == key and sym.defined:
                if not sym.hidden:
                    return sym
                found = found or sym
        return found

    def _candidates(self, name: bytes) -> Iterator[int]:
        if DT_GNU_HASH in self._dyn:
            yield from self._gnu_candidates(name, self._offset(self._dyn[DT_GNU_HASH]) or 0)
        elif DT_HASH in self._dyn:
            yield from self._sysv_candidates(name, self._offset(self._dyn[DT_HASH]) or 0)
        else:
            yield from range(self._count())

    def _gnu_candidates(self, name: bytes, table: int) -> Iterator[int]:
        nbuckets, symoffset, bloom_size, _shift = struct.unpack("<IIII", self._bytes(table, 16, "GNU hash"))
        if not nbuckets or nbuckets > MAX_SYMBOLS or bloom_size > MAX_SYMBOLS:
            raise GuestDataCorrupt(f"GNU hash table with {nbuckets} buckets")
        h = gnu_hash(name)
        buckets = table + 16 + bloom_size * 8
        index, = struct.unpack("<I", self._bytes(buckets + 4 * (h % nbuckets), 4, "GNU hash bucket"))
        if index < symoffset:
            return
        chains = buckets + 4 * nbuckets
        for _ in range(MAX_CHAIN):
            chain, = struct.unpack("<I", self._bytes(chains + 4 * (index - symoffset), 4, "GNU hash chain"))
            if (chain | 1) == (h | 1):
                yield index
            if chain & 1:
                return
            index += 1
        raise GuestDataCorrupt("GNU hash chain does not end")

    def _sysv_candidates(self, name: bytes, table: int) -> Iterator[int]:
        nbucket, nchain = struct.unpack("<II", self._bytes(table, 8, "ELF hash"))
        if not nbucket or nbucket > MAX_SYMBOLS or nchain > MAX_SYMBOLS:
            raise GuestDataCorrupt(f"ELF hash table with {nbucket} buckets")
        index, = struct.unpack("<I", self._bytes(table + 8 + 4 * (sysv_hash(name) % nbucket), 4, "bucket"))
        for _ in range(MAX_CHAIN):
            if index == 0 or index >= nchain:
                return
            yield index
            index, = struct.unpack("<I", self._bytes(table + 8 + 4 * (nbucket + index), 4, "ELF hash chain"))
        raise GuestDataCorrupt("ELF hash chain does not end")

    def _count(self) -> int:
        """Number of dynamic symbols (from the hash table; ``.dynstr`` follows ``.dynsym`` otherwise)."""
        if DT_HASH in self._dyn:
            table = self._offset(self._dyn[DT_HASH]) or 0
            return min(struct.unpack("<II", self._bytes(table, 8, "ELF hash"))[1], MAX_SYMBOLS)
        if DT_GNU_HASH in self._dyn:
            table = self._offset(self._dyn[DT_GNU_HASH]) or 0
            nbuckets, symoffset, bloom_size, _ = struct.unpack("<IIII", self._bytes(table, 16, "GNU hash"))
            if nbuckets > MAX_SYMBOLS or bloom_size > MAX_SYMBOLS:
                raise GuestDataCorrupt(f"GNU hash table with {nbuckets} buckets")
            buckets = table + 16 + bloom_size * 8
            raw = self._bytes(buckets, 4 * nbuckets, "GNU hash buckets")
            last = max(struct.unpack(f"<{nbuckets}I", raw), default=0)
            if last < symoffset:
                return symoffset
            chains = buckets + 4 * nbuckets
            for _ in range(MAX_CHAIN):
                at = chains + 4 * (last - symoffset)
                chain, = struct.unpack("<I", self._bytes(at, 4, "GNU hash chain"))
                last += 1
                if chain & 1:
                    return min(last, MAX_SYMBOLS)
            raise GuestDataCorrupt("GNU hash chain does not end")
        if self._symtab is not None and self._strtab is not None and self._strtab > self._symtab:
            return min((self._strtab - self._symtab) // self._syment, MAX_SYMBOLS)
        return 0

    def symbols(self) -> Iterator[ElfSymbol]:
        """Every dynamic symbol, in table order (index 0, the null symbol, skipped)."""
        if self._symtab is None:
            return
        for index in range(1, self._count()):
            yield self._symbol(index)
