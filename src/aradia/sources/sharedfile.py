"""Guest RAM read from the file QEMU maps as its RAM backend (``memory-backend-file,share=on``).

The file is mapped into our process too, so a read is a slice of an mmap: memory speed. Each
segment's ``backing`` is the file offset of its first byte (the ``@offset`` of ``info mtree -f``).
The mapping stays valid if QEMU exits (the file stays until removed), so liveness is the caller's
business.
"""

from __future__ import annotations

import bisect
import mmap
import os
from collections.abc import Callable, Iterable, Iterator

from aradia.errors import AradiaError, NotAttached
from aradia.sources.base import PhysicalMemory, Segment


class SharedFileMemory(PhysicalMemory):
    """Reads and writes guest RAM through a shared mmap of QEMU's RAM backend file."""

    kind = "shared-file"
    writable = True

    def __init__(self, path: str, segments: Iterable[Segment], *, writable: bool = True,
                 gone: Callable[[], bool] | None = None) -> None:
        super().__init__(segments)
        self.path = path
        self._gone = gone or (lambda: False)
        self.writable = writable
        try:
            fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        except OSError as e:
            raise NotAttached(f"cannot open guest RAM file {path}: {e}") from e
        try:
            size = os.fstat(fd).st_size
            need = max((s.backing + s.size for s in self._segments), default=0)
            if size < need:
                raise NotAttached(f"guest RAM file {path} is {size} bytes, the memory map needs {need}")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
        finally:
            os.close(fd)
        self._view = memoryview(self._map)
        # (first gpa, end gpa, file offset - gpa) of the segment the last read hit: most reads
        # land in the big low-RAM segment, so this skips the search.
        self._hot = (0, 0, 0)

    def _check(self) -> None:
        # The mapping outlives QEMU: without this a read after QEMU exited would return stale RAM.
        if self._gone():
            raise NotAttached(f"the QEMU using {self.path} has exited")

    def read(self, paddr: int, size: int) -> bytes:
        """Read guest-physical memory (a slice of the shared mapping)."""
        if self._gone():
            self._check()
        lo, hi, delta = self._hot
        if lo <= paddr and paddr + size <= hi and size > 0:
            start = paddr + delta
            return self._map[start : start + size]
        i = bisect.bisect_right(self._starts, paddr) - 1
        if i >= 0 and size > 0 and paddr >= 0:
            seg = self._segments[i]
            if paddr + size <= seg.end:
                self._hot = (seg.gpa, seg.end, seg.backing - seg.gpa)
                start = paddr - seg.gpa + seg.backing
                return self._map[start : start + size]
        return super().read(paddr, size)

    def write(self, paddr: int, data: bytes) -> None:
        """Write guest-physical memory into the shared mapping."""
        self._check()
        super().write(paddr, data)

    def _read_backing(self, seg: Segment, offset: int, size: int) -> bytes:
        start = seg.backing + offset
        return self._map[start : start + size]

    def _write_backing(self, seg: Segment, offset: int, data: bytes) -> None:
        start = seg.backing + offset
        self._view[start : start + len(data)] = data

    def _find_in_segment(self, seg: Segment, needle: bytes, chunk: int) -> Iterator[int]:
        end = seg.backing + seg.size
        i = self._map.find(needle, seg.backing, end)
        while i >= 0:
            yield i - seg.backing
            i = self._map.find(needle, i + 1, end)

    def close(self) -> None:
        """Unmap the file."""
        if getattr(self, "_view", None) is not None:
            self._view.release()
            self._view = None  # type: ignore[assignment]
            self._hot = (0, 0, 0)
            self._map.close()
            path = self.path

            def closed() -> bool:
                raise AradiaError(f"guest RAM file {path} was closed")

            self._gone = closed
