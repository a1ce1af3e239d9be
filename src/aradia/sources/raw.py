"""Flat raw memory images: guest-physical address ``base + offset`` is file offset ``offset``.

Every dump reader here maps its file with :mod:`mmap`, so reading a page is one slice of the mapping
(no system call per read) and the OS page cache does the rest.
"""

from __future__ import annotations

import bisect
import errno
import mmap
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from aradia.errors import AradiaError, DumpFormatError
from aradia.sources.base import PhysicalMemory, Segment

PathLike = str | os.PathLike[str]


def check_dump_path(path: PathLike) -> None:
    """Raise :class:`DumpFormatError` unless ``path`` names an existing regular file or device."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise DumpFormatError(f"{path}: cannot open dump: {e.strerror or e}") from e
    if stat.S_ISDIR(st.st_mode):
        raise DumpFormatError(f"{path}: is a directory, not a memory dump")
    if not stat.S_ISREG(st.st_mode) and not stat.S_ISBLK(st.st_mode):
        raise DumpFormatError(f"{path}: not a regular file")


def read_magic(path: PathLike, n: int = 8) -> bytes:
    """The first ``n`` bytes of a dump file (fewer if it is shorter); clear errors for bad paths."""
    check_dump_path(path)
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as e:
        raise DumpFormatError(f"{path}: cannot read dump: {e.strerror or e}") from e


class MappedFile:
    """A read-only memory mapping of a whole regular, non-empty file.

    The file must not shrink while mapped (the kernel would kill the process with SIGBUS on a read
    past the new end): do not open a dump that is still being written.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        check_dump_path(self.path)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise DumpFormatError(f"{self.path}: cannot open dump: {e.strerror or e}") from e
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
            if size == 0:
                raise DumpFormatError(f"{self.path}: empty file, not a memory dump")
            try:
                self.map: mmap.mmap | ClosedMap = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                raise DumpFormatError(f"{self.path}: cannot map dump: {e}") from e
        finally:
            os.close(fd)
        self.size = size

    def close(self) -> None:
        """Unmap the file; later reads raise :class:`AradiaError` instead of touching freed memory."""
        if not isinstance(self.map, ClosedMap):
            old, self.map = self.map, ClosedMap(self.path)
            old.close()


class ClosedMap:
    """Stands in for a closed mapping so a read after ``close`` is a clear error, at no cost before."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __getitem__(self, key: object) -> bytes:
        raise AradiaError(f"{self.path}: dump is closed")

    def __len__(self) -> int:
        return 0


class MappedMemory(PhysicalMemory):
    """Base of the mmap-backed dump readers: a read inside one file-backed segment is a single slice
    of the mapping (the segment of the previous read is tried first), skipping the generic piece
    splitting (4x faster for page reads).

    Subclasses set ``self._file`` before ``PhysicalMemory.__init__``; segments whose ``backing`` is
    negative are not file-backed and always take the generic path.
    """

    _file: MappedFile
    # (first gpa, end gpa, file offset - gpa, mapping) of the hot segment; empty when none.
    _hot: tuple[int, int, int, mmap.mmap | ClosedMap] = (0, 0, 0, ClosedMap(Path()))

    def read(self, paddr: int, size: int) -> bytes:
        """Read ``size`` bytes at guest-physical ``paddr``; :class:`NotRAM` if any byte is not RAM."""
        lo, hi, delta, m = self._hot
        if lo <= paddr and paddr + size <= hi and size > 0:
            start = paddr + delta
            return m[start : start + size]
        if size > 0 and paddr >= 0:
            i = bisect.bisect_right(self._starts, paddr) - 1
            if i >= 0:
                seg = self._segments[i]
                if paddr + size <= seg.end and seg.backing >= 0:
                    m = self._file.map
                    self._hot = (seg.gpa, seg.end, seg.backing - seg.gpa, m)
                    start = paddr - seg.gpa + seg.backing
                    return m[start : start + size]
        return super().read(paddr, size)

    def _read_backing(self, seg: Segment, offset: int, size: int) -> bytes:
        if seg.backing < 0:
            return bytes(size)
        start = seg.backing + offset
        return self._file.map[start : start + size]

    def close(self) -> None:
        """Unmap the file; reads after this raise :class:`AradiaError`."""
        self._hot = (0, 0, 0, ClosedMap(Path()))
        self._file.close()


MAX_DATA_RUNS = 1 << 16


def data_runs(path: PathLike, start: int, end: int) -> list[tuple[int, int]]:
    """The parts of file offsets ``[start, end)`` that hold data, skipping the holes of a sparse file
    (``SEEK_DATA``/``SEEK_HOLE``); the whole range where the file system cannot tell, or when it
    has more than :data:`MAX_DATA_RUNS` parts."""
    whole = [(start, end)] if start < end else []
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return whole
    runs: list[tuple[int, int]] = []
    try:
        pos = start
        while pos < end:
            try:
                lo = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after pos
                    break
                return whole
            if lo >= end:
                break
            hi = min(os.lseek(fd, lo, os.SEEK_HOLE), end)
            runs.append((lo, hi))
            if len(runs) > MAX_DATA_RUNS:
                return whole
            pos = hi
    except (OSError, AttributeError):
        return whole
    finally:
        os.close(fd)
    return runs


class RawDump(MappedMemory):
    """A flat raw image: one RAM segment ``[base, base + filesize)`` backed by the whole file.

    A search skips the holes of a sparse file (they read as zeros, so a pattern without a zero byte
    cannot be there): ``aradia dump --format raw`` of an arm64 ``virt`` guest leaves the first GiB,
    below its RAM, as a hole that would otherwise cost seconds of page faults to scan.
    """

    kind = "raw"
    writable = False

    def __init__(self, path: PathLike, *, base: int = 0) -> None:
        if base < 0:
            raise DumpFormatError(f"negative base address {base:#x} for raw image")
        self.path = Path(path)
        self._file = MappedFile(path)
        super().__init__([Segment(base, self._file.size, 0)])

    def _find_in_segment(self, seg: Segment, needle: bytes, chunk: int) -> Iterator[int]:
        """Offsets of ``needle`` inside ``seg``, looking only at the file's data (see the class)."""
        if 0 in needle:
            yield from super()._find_in_segment(seg, needle, chunk)
            return
        for lo, hi in data_runs(self.path, seg.backing, seg.backing + seg.size):
            part = Segment(seg.gpa + lo - seg.backing, hi - lo, lo)
            for off in super()._find_in_segment(part, needle, chunk):
                yield lo - seg.backing + off
