"""Open a memory dump of any supported format, chosen by the file's first bytes.

``\\x7fELF`` -> :class:`~aradia.sources.elfcore.ElfCore`; LiME magic (``EMiL`` on disk) ->
:class:`~aradia.sources.lime.LimeDump`; any other non-empty regular file is a flat raw image
(:class:`~aradia.sources.raw.RawDump`).
"""

from __future__ import annotations

import struct

from aradia.errors import DumpFormatError
from aradia.sources.base import PhysicalMemory
from aradia.sources.elfcore import ElfCore
from aradia.sources.lime import LIME_MAGIC, LimeDump
from aradia.sources.raw import PathLike, RawDump, read_magic

ELF_MAGIC = b"\x7fELF"
LIME_MAGIC_BYTES = struct.pack("<I", LIME_MAGIC)


def dump_format(path: PathLike) -> str:
    """``"elf"``, ``"lime"`` or ``"raw"`` for the dump at ``path`` (DumpFormatError if unusable)."""
    head = read_magic(path, 4)
    if not head:
        raise DumpFormatError(f"{path}: empty file, not a memory dump")
    if head == ELF_MAGIC:
        return "elf"
    if head == LIME_MAGIC_BYTES:
        return "lime"
    return "raw"


def open_dump(path: PathLike, *, strict: bool = True, raw_base: int = 0) -> PhysicalMemory:
    """Open the dump at ``path`` read-only, detecting its format from its magic bytes.

    ``strict=False`` lets a truncated ELF or LiME dump open with what it holds (see the reader's
    ``warnings``). ``raw_base`` is the guest-physical address of a raw image's first byte.
    """
    fmt = dump_format(path)
    if fmt == "elf":
        return ElfCore(path, strict=strict)
    if fmt == "lime":
        return LimeDump(path, strict=strict)
    return RawDump(path, base=raw_base)
