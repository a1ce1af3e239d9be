"""The physical-memory interface every byte source implements.

A source maps guest-physical addresses to some backing store (a QEMU process's address space, a shared
RAM file, a dump file, a GDB stub) through a sorted list of :class:`Segment`. Reads and writes that
touch an address outside every segment raise :class:`~aradia.errors.NotRAM` naming that address.
"""

from __future__ import annotations

import bisect
import itertools
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from aradia.errors import AradiaError, NotRAM


@dataclass(frozen=True)
class Range:
    """A run of guest-physical RAM: ``[start, start + size)``."""

    start: int
    size: int

    @property
    def end(self) -> int:
        """First address after the range."""
        return self.start + self.size


@dataclass(frozen=True)
class Segment:
    """Guest-physical ``[gpa, gpa + size)`` stored at ``backing`` (file offset, host address, ...)."""

    gpa: int
    size: int
    backing: int

    @property
    def end(self) -> int:
        """First guest-physical address after the segment."""
        return self.gpa + self.size


def check_segments(segments: Iterable[Segment]) -> list[Segment]:
    """Sort segments by address and reject overlaps and empty ones (they mean a corrupt map)."""
    out = sorted((s for s in segments if s.size > 0), key=lambda s: s.gpa)
    for a, b in itertools.pairwise(out):
        if b.gpa < a.end:
            raise AradiaError(f"overlapping memory segments at {a.gpa:#x} and {b.gpa:#x}")
    return out


class PhysicalMemory(ABC):
    """Guest-physical memory: ``read``, ``write`` and the list of RAM ``ranges``."""

    #: Short name of the path the bytes come from ("proc-mem", "shared-file", "gdb", "elf", ...).
    kind: str = "memory"
    #: Whether ``write`` is possible at all.
    writable: bool = False

    def __init__(self, segments: Iterable[Segment]) -> None:
        self._segments = check_segments(segments)
        self._starts = [s.gpa for s in self._segments]

    # --- the interface -------------------------------------------------------------------------
    def ranges(self) -> list[Range]:
        """Guest-physical RAM ranges, sorted, adjacent segments merged."""
        out: list[Range] = []
        for s in self._segments:
            if out and out[-1].end == s.gpa:
                out[-1] = Range(out[-1].start, out[-1].size + s.size)
            else:
                out.append(Range(s.gpa, s.size))
        return out

    @property
    def size(self) -> int:
        """Total bytes of RAM."""
        return sum(s.size for s in self._segments)

    def read(self, paddr: int, size: int) -> bytes:
        """Read ``size`` bytes at guest-physical ``paddr``; :class:`NotRAM` if any byte is not RAM."""
        if size < 0:
            raise AradiaError(f"negative read size {size}")
        if size == 0:
            return b""
        i = bisect.bisect_right(self._starts, paddr) - 1
        if i >= 0 and paddr >= 0:
            seg = self._segments[i]
            if paddr + size <= seg.end:  # the common case: one segment, no splitting
                return self._read_backing(seg, paddr - seg.gpa, size)
        parts = [self._read_backing(seg, off, n) for seg, off, n in self._pieces(paddr, size)]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def write(self, paddr: int, data: bytes) -> None:
        """Write ``data`` at guest-physical ``paddr``; :class:`NotRAM` if any byte is not RAM."""
        if not self.writable:
            raise AradiaError(f"{self.kind} memory is read-only")
        pos = 0
        for seg, off, n in self._pieces(paddr, len(data)):
            self._write_backing(seg, off, data[pos : pos + n])
            pos += n

    def is_ram(self, paddr: int, size: int = 1) -> bool:
        """Whether every byte of ``[paddr, paddr + size)`` is RAM."""
        try:
            for _ in self._pieces(paddr, size):
                pass
        except NotRAM:
            return False
        return True

    def search(self, needle: bytes, *, start: int = 0, end: int | None = None, limit: int = 1 << 20,
               chunk: int = 4 << 20) -> Iterator[int]:
        """Yield guest-physical addresses in ``[start, end)`` where ``needle`` occurs, in address order,
        at most ``limit``. Matches never span two segments (separate RAM ranges are not contiguous).
        """
        if not needle:
            raise AradiaError("empty search pattern")
        found = 0
        for whole in self._segments:
            lo, hi = max(whole.gpa, start), min(whole.end, end if end is not None else whole.end)
            if hi - lo < len(needle):
                continue
            seg = Segment(lo, hi - lo, whole.backing + (lo - whole.gpa))
            for off in self._find_in_segment(seg, needle, chunk):
                yield seg.gpa + off
                found += 1
                if found >= limit:
                    return

    def _find_in_segment(self, seg: Segment, needle: bytes, chunk: int) -> Iterator[int]:
        """Offsets of ``needle`` inside ``seg``; chunked reads overlapping by ``len(needle) - 1``."""
        overlap = len(needle) - 1
        pos = 0
        while pos < seg.size:
            n = min(chunk + overlap, seg.size - pos)
            data = self._read_backing(seg, pos, n)
            i = data.find(needle)
            while i >= 0:
                yield pos + i
                i = data.find(needle, i + 1)
            if pos + n >= seg.size:
                break
            pos += chunk

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release files and connections held by the source."""

    def __enter__(self) -> PhysicalMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- for subclasses ------------------------------------------------------------------------
    @abstractmethod
    def _read_backing(self, seg: Segment, offset: int, size: int) -> bytes:
        """Read ``size`` bytes at ``offset`` inside ``seg`` (already bounds-checked)."""

    def _write_backing(self, seg: Segment, offset: int, data: bytes) -> None:
        raise AradiaError(f"{self.kind} memory is read-only")

    def _pieces(self, paddr: int, size: int) -> list[tuple[Segment, int, int]]:
        """Split ``[paddr, paddr+size)`` into (segment, offset in segment, length); NotRAM on a hole."""
        if paddr < 0:
            raise NotRAM(paddr, size, "negative address")
        out = []
        addr, left = paddr, size
        while left > 0:
            i = bisect.bisect_right(self._starts, addr) - 1
            if i < 0 or addr >= self._segments[i].end:
                raise NotRAM(addr, left)
            seg = self._segments[i]
            n = min(left, seg.end - addr)
            out.append((seg, addr - seg.gpa, n))
            addr += n
            left -= n
        return out

    def segments(self) -> list[Segment]:
        """The segments backing this source (for dump writers and diagnostics)."""
        return list(self._segments)
