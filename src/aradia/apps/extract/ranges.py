"""Where each byte of an extracted file came from: runs of pages with one source each."""

from __future__ import annotations

from dataclasses import dataclass

PAGE_SIZE = 4096

CACHE = "cache"
"""A clean page of the guest's page cache (the same bytes as the disk holds, or a tmpfs page)."""
DIRTY = "cache-dirty"
"""A page of the page cache written by the guest and not yet written back: newer than the disk."""
HOLE = "hole"
"""A page of a memory-only file system (tmpfs, ramfs) never written: zeros, as the guest reads it."""
DISK = "disk"
"""Read from the guest's disk through QEMU (an NBD export), found by the file system's own blocks."""
MISSING = "missing"
"""In neither memory nor disk (or a tmpfs page swapped out): zeros in the output, reported."""

SOURCES = (CACHE, DIRTY, HOLE, DISK, MISSING)


@dataclass(frozen=True)
class Extent:
    """Bytes ``[start, end)`` of the file and where they came from (one of :data:`SOURCES`)."""

    start: int
    end: int
    source: str

    @property
    def size(self) -> int:
        """Length in bytes."""
        return self.end - self.start


def runs(sources: list[str], file_size: int) -> list[Extent]:
    """Merge per-page sources (page ``i`` covers ``[i*4096, (i+1)*4096)``) into extents, the last
    one clipped to ``file_size``."""
    out: list[Extent] = []
    for i, src in enumerate(sources):
        start, end = i * PAGE_SIZE, min((i + 1) * PAGE_SIZE, file_size)
        if out and out[-1].source == src and out[-1].end == start:
            out[-1] = Extent(out[-1].start, end, src)
        else:
            out.append(Extent(start, end, src))
    return out


def totals(extents: list[Extent]) -> dict[str, int]:
    """Bytes per source."""
    out: dict[str, int] = {}
    for e in extents:
        out[e.source] = out.get(e.source, 0) + e.size
    return out


__all__ = ["CACHE", "DIRTY", "DISK", "HOLE", "MISSING", "SOURCES", "Extent", "runs", "totals"]
