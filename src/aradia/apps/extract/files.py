"""A file's contents from the guest's kernel objects: its inode's page cache, over its disk.

Every page of the file is taken from the page cache when the guest has it there (dirty pages
included: what the guest sees now), else, for a memory-only file system (tmpfs, ramfs), it is a
hole (zeros, as the guest reads it), else from the disk through QEMU (:mod:`.disk`), else it is
missing (zeros, reported). Nothing runs in the guest and nothing is read through the guest's own
file system code, so the guest's page cache is left as it was.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

import drgn

from aradia.apps.extract.disk import DiskFiles
from aradia.apps.extract.ranges import CACHE, DIRTY, DISK, HOLE, MISSING, Extent, runs, totals
from aradia.errors import AradiaError
from aradia.linux.bounds import Warnings
from aradia.linux.dcache import S_IFMT, S_IFREG
from aradia.linux.files import InodeInfo, inode_info
from aradia.linux.pagecache import PAGE_SIZE, cached_pages

MEMORY_FS = frozenset({"tmpfs", "ramfs", "rootfs", "devtmpfs", "hugetlbfs"})
MAX_FILE = 64 << 30  # a larger i_size is guest data corruption (or a file too big to extract here)
CHUNK_PAGES = 256  # pages read from the disk per request
SOURCE_CHOICES = ("auto", "memory", "disk")


class NotARegularFile(AradiaError):
    """Only regular files have contents to extract."""


@dataclass
class Extraction:
    """The result of extracting one file: what it is, where each range came from, its SHA-256."""

    name: str
    info: InodeInfo
    extents: list[Extent]
    sha256: str
    output: str
    warnings: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Whether every byte came from the guest's memory or disk (nothing missing)."""
        return all(e.source != MISSING for e in self.extents)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready document."""
        return {"name": self.name, "output": self.output, "ino": self.info.ino, "size": self.info.size,
                "fstype": self.info.fstype, "dev": self.info.dev, "deleted": self.info.deleted,
                "sha256": self.sha256, "complete": self.complete, "bytes": totals(self.extents),
                "extents": [{"start": e.start, "end": e.end, "source": e.source} for e in self.extents],
                "warnings": list(self.warnings)}


def _sources(info: InodeInfo, pages: dict[int, Any], disk_ok: bool, source: str,
             swapped: set[int]) -> list[str]:
    npages = -(-info.size // PAGE_SIZE)
    memory_only = info.fstype in MEMORY_FS
    out = []
    for i in range(npages):
        page = pages.get(i) if source != "disk" else None
        if page is not None:  # tmpfs pages are always dirty (no storage behind them): plain cache
            out.append(DIRTY if page.dirty and not memory_only else CACHE)
        elif memory_only and source != "disk":  # never written: zeros; swapped out: not in RAM
            out.append(MISSING if i in swapped else HOLE)
        elif disk_ok and source != "memory":
            out.append(DISK)
        else:
            out.append(MISSING)
    return out


def extract_inode(read_phys: Callable[[int, int], bytes], inode: drgn.Object, out: IO[bytes], *,
                  name: str = "", disk: DiskFiles | None = None, source: str = "auto",
                  output: str = "") -> Extraction:
    """Write the contents of ``inode`` (a ``struct inode *``) to ``out``; the map of its sources.

    ``read_phys(paddr, n)`` reads guest-physical memory; ``disk`` supplies pages not in memory;
    ``source`` is ``auto`` (page cache over disk), ``memory`` (never the disk) or ``disk`` (only
    the disk: what the guest's storage holds, without unwritten changes).
    """
    if source not in SOURCE_CHOICES:
        raise AradiaError(f"source must be one of {', '.join(SOURCE_CHOICES)}, not {source!r}")
    warnings = Warnings()
    info = inode_info(inode)
    if info.mode & S_IFMT != S_IFREG:
        raise NotARegularFile(f"{name or info.ino}: not a regular file (mode {info.mode:o})")
    if not 0 <= info.size <= MAX_FILE:
        raise AradiaError(f"{name or info.ino}: size {info.size} is out of range")
    swapped: set[int] = set()
    pages = cached_pages(inode, warnings, values=swapped) if source != "disk" else {}
    opened = None
    if source != "memory" and info.fstype not in MEMORY_FS and disk is not None:
        needs_disk = source == "disk" or len(pages) < -(-info.size // PAGE_SIZE)
        opened = disk.opener(inode, warnings) if needs_disk else None
    elif source == "disk" and info.fstype in MEMORY_FS:
        warnings.add(f"{info.fstype} has no disk: the file exists only in memory")
    if source == "disk" and disk is None:
        warnings.add("no disk to read")
    sources = _sources(info, pages, opened is not None, source, swapped)
    extents = runs(sources, info.size)
    digest = hashlib.sha256()
    final: list[Extent] = []
    for ext in extents:
        for start, data, src in _fill(read_phys, ext, pages, opened, warnings):
            out.write(data)
            digest.update(data)
            if final and final[-1].source == src and final[-1].end == start:
                final[-1] = Extent(final[-1].start, start + len(data), src)
            else:
                final.append(Extent(start, start + len(data), src))
    return Extraction(name, info, final, digest.hexdigest(), output, list(warnings))


def _fill(read_phys: Callable[[int, int], bytes], ext: Extent, pages: dict[int, Any],
          opened: tuple[Any, int] | None, warnings: Warnings) -> list[tuple[int, bytes, str]]:
    """The bytes of one extent as ``(offset, data, source)`` pieces (a disk read can fall short)."""
    if ext.source in (CACHE, DIRTY):
        pieces = []
        off = ext.start
        while off < ext.end:  # one read per run of physically contiguous pages
            phys = pages[off // PAGE_SIZE].phys
            n = min(PAGE_SIZE, ext.end - off)
            while (off + n < ext.end and n < CHUNK_PAGES * PAGE_SIZE
                   and pages[(off + n) // PAGE_SIZE].phys == phys + n):
                n += min(PAGE_SIZE, ext.end - off - n)
            pieces.append((off, read_phys(phys, n), ext.source))
            off += n
        return pieces
    if ext.source == DISK and opened is not None:
        stream, disk_size = opened
        pieces = []
        for off in range(ext.start, ext.end, CHUNK_PAGES * PAGE_SIZE):
            n = min(CHUNK_PAGES * PAGE_SIZE, ext.end - off)
            got = b""
            if off < disk_size:
                try:
                    stream.seek(off)
                    got = stream.read(min(n, disk_size - off))
                except Exception as e:  # dissect on untrusted disk bytes
                    warnings.add(f"disk: read at {off} failed: {e}")
                    got = b""
            if got:
                pieces.append((off, got, DISK))
            if len(got) < n:
                pieces.append((off + len(got), bytes(n - len(got)), MISSING))
        return pieces
    step = CHUNK_PAGES * PAGE_SIZE
    return [(off, bytes(min(step, ext.end - off)), ext.source) for off in range(ext.start, ext.end, step)]


__all__ = ["MEMORY_FS", "SOURCE_CHOICES", "Extraction", "NotARegularFile", "extract_inode"]
