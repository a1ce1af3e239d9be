"""LiME memory dumps (the Linux Memory Extractor's "lime" format).

The file is a sequence of ranges, each a 32-byte little-endian header -- magic ``0x4C694D45``
("EMiL" on disk), version 1, ``s_addr``, ``e_addr`` (inclusive), 8 reserved bytes -- followed by
``e_addr - s_addr + 1`` bytes of RAM.
"""

from __future__ import annotations

import struct
from pathlib import Path

from aradia.errors import AradiaError, DumpFormatError
from aradia.sources.base import Segment
from aradia.sources.raw import MappedFile, MappedMemory, PathLike

LIME_MAGIC = 0x4C694D45
LIME_VERSION = 1
LIME_HEADER = struct.Struct("<IIQQ8s")
MAX_RANGES = 1 << 20
MAX_PADDR = 1 << 52


class LimeDump(MappedMemory):
    """Guest-physical memory of a LiME file, read through a memory mapping.

    ``strict=False`` accepts a file whose last range is cut short: the present part is kept and
    :attr:`warnings` says what was dropped. Bad magic, versions and addresses always raise
    :class:`DumpFormatError`.
    """

    kind = "lime"
    writable = False

    def __init__(self, path: PathLike, *, strict: bool = True) -> None:
        self.path = Path(path)
        #: Human-readable notes about what a non-strict open dropped.
        self.warnings: list[str] = []
        self._file = MappedFile(path)
        try:
            segments = self._parse(strict)
            super().__init__(segments)
        except AradiaError as e:
            self._file.close()
            if isinstance(e, DumpFormatError):
                raise
            raise DumpFormatError(f"{self.path}: {e}") from e

    def _parse(self, strict: bool) -> list[Segment]:
        m, fsize = self._file.map, self._file.size
        segments: list[Segment] = []
        pos = 0
        while pos < fsize:
            n = len(segments)
            if n >= MAX_RANGES:
                raise DumpFormatError(f"{self.path}: more than {MAX_RANGES} LiME ranges")
            if pos + LIME_HEADER.size > fsize:
                raise DumpFormatError(
                    f"{self.path}: truncated LiME header {n} at file offset {pos:#x} "
                    f"({fsize - pos} bytes left)"
                )
            magic, version, s_addr, e_addr, _ = LIME_HEADER.unpack_from(m, pos)
            where = f"LiME range {n} at file offset {pos:#x}"
            if magic != LIME_MAGIC:
                raise DumpFormatError(f"{self.path}: {where}: bad magic {magic:#010x}")
            if version != LIME_VERSION:
                raise DumpFormatError(f"{self.path}: {where}: unsupported version {version}")
            if e_addr < s_addr or e_addr >= MAX_PADDR:
                raise DumpFormatError(
                    f"{self.path}: {where}: bad address range {s_addr:#x}..{e_addr:#x}"
                )
            size = e_addr - s_addr + 1
            data_at = pos + LIME_HEADER.size
            if data_at + size > fsize:
                kept = fsize - data_at
                msg = (
                    f"{where}: range {s_addr:#x}..{e_addr:#x} needs {size:#x} bytes, "
                    f"the file holds {kept:#x}"
                )
                if strict:
                    raise DumpFormatError(f"{self.path}: truncated: {msg}")
                self.warnings.append(f"{msg}; kept {kept:#x} bytes, dropped {size - kept:#x}")
                if kept:
                    segments.append(Segment(s_addr, kept, data_at))
                break
            segments.append(Segment(s_addr, size, data_at))
            pos = data_at + size
        return segments
