"""Open a memory dump of any supported format, chosen by the file's first bytes.

``\\x7fELF`` -> :class:`~aradia.sources.elfcore.ElfCore`; LiME magic (``EMiL`` on disk) ->
:class:`~aradia.sources.lime.LimeDump`; any other non-empty regular file is a flat raw image
(:class:`~aradia.sources.raw.RawDump`) -- except files that start with the magic of a format known
not to be a flat image (kdump-compressed, makedumpfile flattened, Windows crash dumps, QEMU
migration streams), which would otherwise be misread silently as RAM.
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
#: Leading bytes of formats that are not flat images and that aradia does not read.
UNSUPPORTED_MAGIC = {
    b"KDUMP   ": "kdump-compressed dump (makedumpfile or QEMU format=kdump-*); convert it with "
    "'makedumpfile -E' or dump with QEMU's default ELF format",
    b"DISKDUMP": "diskdump-compressed dump; convert it with 'makedumpfile -E'",
    b"makedumpfile": "makedumpfile flattened dump; rearrange it with 'makedumpfile -R' first",
    b"PAGEDU64": "Windows crash dump (QEMU format=win-dmp)",
    b"PAGEDUMP": "Windows crash dump",
    b"QEVM": "QEMU migration/savevm stream, not a memory dump",
}


def dump_format(path: PathLike) -> str:
    """``"elf"``, ``"lime"`` or ``"raw"`` for the dump at ``path`` (DumpFormatError if unusable)."""
    head = read_magic(path, 16)
    if not head:
        raise DumpFormatError(f"{path}: empty file, not a memory dump")
    if head.startswith(ELF_MAGIC):
        return "elf"
    if head.startswith(LIME_MAGIC_BYTES):
        return "lime"
    for magic, what in UNSUPPORTED_MAGIC.items():
        if head.startswith(magic):
            raise DumpFormatError(f"{path}: unsupported format: {what}")
    return "raw"


def open_dump_memory(path: PathLike, *, strict: bool = True, raw_base: int = 0) -> PhysicalMemory:
    """The physical memory of the dump at ``path``, read-only, its format detected from its magic bytes.

    (:func:`aradia.vm.open_dump` wraps this in a :class:`~aradia.vm.VM`.)

    ``strict=False`` lets a truncated ELF or LiME dump open with what it holds (see the reader's
    ``warnings``). ``raw_base`` is the guest-physical address of a raw image's first byte.
    """
    fmt = dump_format(path)
    if fmt == "elf":
        return ElfCore(path, strict=strict)
    if fmt == "lime":
        return LimeDump(path, strict=strict)
    return RawDump(path, base=raw_base)
