"""User-space symbols: ``LIB:SYMBOL`` resolved to addresses in the processes that map LIB.

A library or executable is found among a process's file mappings by name (the file's basename,
``libcrypt.so.1`` also matching ``libcrypt.so.1.1.0``, or its ``DT_SONAME``, or a full path), its
dynamic symbols are read from guest memory (:mod:`aradia.linux.elfsyms` over the file's pages in the
page cache, falling back to the process's own mapping), and the symbol's address in the process is
the mapping's load bias plus the symbol's value. Each file is parsed once per :class:`UserSymbols`.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

import drgn
from drgn.helpers.linux.mm import access_remote_vm

from aradia.errors import AradiaError
from aradia.linux.bounds import GUEST_ERRORS, Warnings, bounded
from aradia.linux.elfsyms import DynamicSymbols, ElfSymbol
from aradia.linux.maps import vmas
from aradia.linux.pagecache import NotCached, read_cached
from aradia.linux.walks import d_path

PAGE = 4096


@dataclass(frozen=True)
class LoadedFile:
    """A file mapped from offset 0 in one address space: where, and what file."""

    path: str
    inode: int  # address of the struct inode
    start: int  # address of the mapping of file offset 0
    mm: int  # address of the struct mm_struct


@dataclass(frozen=True)
class UserSymbol:
    """A symbol of a mapped file at its address in one address space."""

    address: int
    symbol: ElfSymbol
    file: LoadedFile


def parse_spec(spec: str) -> tuple[str, str]:
    """``LIB:SYMBOL`` (``libcrypt.so.1:crypt``, ``/bin/bash:readline``) as ``(lib, symbol)``."""
    lib, sep, sym = spec.rpartition(":")
    if not sep or not lib or not sym:
        raise AradiaError(f"{spec!r} is not LIB:SYMBOL (e.g. libcrypt.so.1:crypt or bash:readline)")
    return lib, sym


def name_matches(path: str, lib: str, soname: str | None = None) -> bool:
    """Whether a mapped file ``path`` is what ``lib`` names."""
    if "/" in lib:
        return path == lib
    base = posixpath.basename(path)
    return base == lib or base.startswith(lib + ".") or (soname is not None and soname == lib)


class FileReader:
    """Reads the bytes of one mapped file: from its page cache, else through the mapping of the
    process being resolved now (:meth:`bind`).

    It holds values (addresses), never drgn reference objects into a VMA: a parsed file outlives the
    process whose mapping first found it, and :class:`~aradia.linux.elfsyms.DynamicSymbols` reads
    lazily (a lookup reads hash chains and symbols), so a reference would re-read that process's VMA
    and ``struct file`` after they were freed and reused (a bash that exited, e.g. ``ssh host cmd``,
    made the next bash's symbols unreadable).
    """

    def __init__(self, inode: drgn.Object) -> None:
        self.inode = inode.read_()  # the pointer's value, not a reference to where it was stored
        self.mm: drgn.Object | None = None
        self.start = self.end = 0

    def bind(self, vma: drgn.Object) -> None:
        """Fall back to ``vma``'s mapping (a live process's, the one being resolved) for pages the
        page cache does not hold."""
        self.mm = vma.vm_mm.read_()
        self.start, self.end = int(vma.vm_start), int(vma.vm_end)

    def __call__(self, offset: int, size: int) -> bytes:
        try:
            return read_cached(self.inode, offset, size)
        except NotCached:
            if self.mm is None or offset + size > self.end - self.start:
                raise
            return access_remote_vm(self.mm, self.start + offset, size)


def file_key(inode: drgn.Object) -> tuple[int, int, int, int]:
    """What identifies a file's contents across lookups: the inode's address, number, generation and
    size (an inode freed and reused for another file, or a file rewritten, is parsed anew)."""
    return inode.value_(), int(inode.i_ino), int(inode.i_generation), int(inode.i_size)


@dataclass
class UserSymbols:
    """Resolves ``LIB:SYMBOL`` in guest processes; parsed files are cached by :func:`file_key`."""

    prog: drgn.Program
    warnings: Warnings = field(default_factory=Warnings)
    #: path -> why: files that are a looked-up library by name but whose symbols could not be read
    unreadable: dict[str, str] = field(default_factory=dict)
    _files: dict[tuple[int, int, int, int], tuple[FileReader, DynamicSymbols | None]] = field(
        default_factory=dict)
    _why: dict[tuple[int, int, int, int], str] = field(default_factory=dict)

    def mapped_files(self, mm: drgn.Object) -> list[tuple[drgn.Object, LoadedFile]]:
        """The ``(vma, file)`` of every mapping of a file from offset 0 in ``mm``."""
        out = []
        what = f"mm {mm.value_():#x}"
        for vma in bounded(vmas(mm, what, self.warnings), what, self.warnings, limit=1 << 20,
                           key=lambda v: v.value_()):
            try:
                f = vma.vm_file
                if not f or int(vma.vm_pgoff):
                    continue
                path = d_path(f.f_path).decode(errors="replace")
                out.append((vma, LoadedFile(path, f.f_inode.value_(), int(vma.vm_start), mm.value_())))
            except GUEST_ERRORS as e:
                self.warnings.add(f"{what}: VMA at {vma.value_():#x} unreadable ({e})")
        return out

    def elf(self, vma: drgn.Object) -> DynamicSymbols | None:
        """The dynamic symbols of the file ``vma`` maps (None: not an ELF file we can read); later
        reads of a file parsed before go through ``vma``'s process."""
        inode = vma.vm_file.f_inode.read_()
        key = file_key(inode)
        if key in self._files:
            reader, syms = self._files[key]
            reader.bind(vma)
            return syms
        reader = FileReader(inode)
        reader.bind(vma)
        try:
            syms = DynamicSymbols(reader)
        except (NotCached, drgn.FaultError) as e:
            # Pages neither cached nor mapped in yet (a disk-backed binary just started): not kept,
            # so a later process (or this one, once it ran there) gets the file parsed again.
            name = vma.vm_file.f_path.dentry.d_name.name.string_().decode(errors="replace")
            self._why[key] = f"dynamic symbols not in memory yet ({e})"
            self.warnings.add(f"{name}: {self._why[key]}")
            return None
        except GUEST_ERRORS as e:
            name = vma.vm_file.f_path.dentry.d_name.name.string_().decode(errors="replace")
            self._why[key] = f"no dynamic symbols ({e})"
            self.warnings.add(f"{name}: {self._why[key]}")
            syms = None
        self._files[key] = (reader, syms)
        return syms

    def file_matches(self, vma: drgn.Object, path: str, lib: str) -> bool:
        """Whether the file ``vma`` maps (at ``path``) is ``lib``: by name, or by its ``DT_SONAME``."""
        if name_matches(path, lib):
            return True
        if "/" in lib or "." not in lib:
            return False
        elf = self.elf(vma)
        return elf is not None and elf.soname == lib

    def lookup(self, vma: drgn.Object, path: str, lib: str,
               symbol: str) -> tuple[DynamicSymbols, ElfSymbol | None] | None:
        """``(its symbols, symbol)`` when ``vma`` maps ``lib`` (the symbol None if ``lib`` has none of
        that name); None when it maps another file, or one whose symbols cannot be read (that file
        is then in :attr:`unreadable`)."""
        if not self.file_matches(vma, path, lib):
            return None
        elf = self.elf(vma)
        if elf is None:
            self.unreadable[path] = self._why.get(file_key(vma.vm_file.f_inode.read_()), "unreadable")
            return None
        try:
            sym = elf.lookup(symbol)
        except GUEST_ERRORS as e:
            self.unreadable[path] = f"symbol table unreadable ({e})"
            raise
        self.unreadable.pop(path, None)  # readable now (its pages came into memory)
        return elf, sym

    def resolve(self, mm: drgn.Object, lib: str, symbol: str) -> list[UserSymbol]:
        """Addresses of ``lib``'s ``symbol`` in address space ``mm`` (one per mapping of ``lib``)."""
        out = []
        missing = None
        for vma, mf in self.mapped_files(mm):
            try:
                found = self.lookup(vma, mf.path, lib, symbol)
            except GUEST_ERRORS as e:
                self.warnings.add(f"{mf.path}: symbols unreadable ({e})")
                continue
            if found is None:
                continue
            elf, sym = found
            if sym is None:
                missing = mf.path
                continue
            out.append(UserSymbol(load_address(mf.start, elf, sym), sym, mf))
        if not out and missing is not None:
            raise AradiaError(f"{missing} has no dynamic symbol {symbol!r}")
        return out


def load_address(start: int, elf: DynamicSymbols, sym: ElfSymbol) -> int:
    """Where ``sym`` is in a process that maps the file's first page at ``start``."""
    return start - elf.first_vaddr + sym.value
