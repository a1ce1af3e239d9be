"""BTF from a kernel file: a ``vmlinuz`` (bzImage), a ``vmlinux`` ELF, a compressed vmlinux or a raw blob.

A bzImage is a real-mode setup area followed by the protected-mode part; its setup header (at
0x1f1, signature ``HdrS`` at 0x202, boot protocol 2.08+) gives the compressed kernel's place:
``payload_offset`` (0x248) from the start of the protected-mode part, which begins after
``setup_sects + 1`` sectors of 512 bytes (``setup_sects`` 0 means 4), and ``payload_length``
(0x24c). The payload is the stripped ``vmlinux`` ELF compressed with one of the kernel's
compressors, recognised by its magic:

=========  ======================  =============================================================
gzip       ``1f 8b``               zlib; the gzip trailer holds the size
xz         ``fd 37 7a 58 5a 00``   ``lzma`` (XZ container)
lzma       ``5d 00 00``            ``lzma`` (legacy .lzma, "alone")
bzip2      ``42 5a 68``            ``bz2``
lz4        ``02 21 4c 18``         the *legacy* LZ4 frame: after the magic, blocks of ``u32 size``
                                   + LZ4 block data, each at most 8 MiB uncompressed; a repeated
                                   magic starts a new stream
zstd       ``28 b5 2f fd``         ``zstandard``
=========  ======================  =============================================================

Every compressor but gzip is followed by the uncompressed size as a little-endian ``u32`` (the
kernel build's ``size_append``). The ELF's ``.BTF`` section is the kernel's BTF, byte-identical to
``__start_BTF``..``__stop_BTF`` in RAM; its ``.notes`` section carries the GNU build ID, which
:func:`find_profile <aradia.linux.profile.find_profile>` checks against the running kernel. The ELF
itself is read by :class:`aradia.elf.ElfFile`.

Every size here comes from an untrusted file: output is capped at :data:`MAX_VMLINUX` bytes and
every malformed input is a :class:`~aradia.errors.AradiaError` naming what is wrong.
"""

from __future__ import annotations

import bz2
import lzma
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lz4.block
import zstandard

from aradia.elf import SHT_NOBITS, ElfFile, notes_build_id
from aradia.errors import AradiaError

MAX_VMLINUX = 1 << 30  # decompressed kernel image: Debian's is ~53 MB, with DWARF ~0.5 GB
MAX_INPUT = 2 << 30
LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
LZ4_LEGACY_BLOCK = 8 << 20
BTF_MAGIC = b"\x9f\xeb"
ELF_MAGIC = b"\x7fELF"
_SETUP_SECTS, _HDRS, _VERSION, _PAYLOAD = 0x1F1, 0x202, 0x206, 0x248


class KernelFileError(AradiaError):
    """A kernel file that cannot be read or holds no BTF."""


@dataclass(frozen=True)
class KernelFileBtf:
    """The BTF blob of a kernel file, the kernel's build ID (None if the file has none) and how it
    was stored (``"bzImage/lz4"``, ``"elf"``, ``"btf"``, ...)."""

    blob: bytes
    build_id: str | None
    format: str


def read_btf(path: str | os.PathLike[str]) -> KernelFileBtf:
    """The BTF of the kernel file at ``path``: a bzImage (``vmlinuz``), a vmlinux ELF, a vmlinux
    compressed with a kernel compressor, or a raw BTF blob."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_INPUT:
            raise KernelFileError(f"{p}: {size} bytes is too large for a kernel file")
        data = p.read_bytes()
    except OSError as e:
        raise KernelFileError(f"{p}: cannot read kernel file: {e.strerror or e}") from e
    try:
        return btf_from_bytes(data)
    except KernelFileError as e:
        raise KernelFileError(f"{p}: {e}") from None


def btf_from_bytes(data: bytes) -> KernelFileBtf:
    """Like :func:`read_btf`, for a file's contents."""
    if data[:2] == BTF_MAGIC:
        return KernelFileBtf(data, None, "btf")
    if data[:4] == ELF_MAGIC:
        blob, build_id = elf_btf(data)
        return KernelFileBtf(blob, build_id, "elf")
    payload = bzimage_payload(data)
    outer = "bzImage/" if payload is not None else ""
    name, vmlinux = decompress(payload if payload is not None else data)
    if vmlinux[:4] != ELF_MAGIC:
        raise KernelFileError(f"the {name} payload is not an ELF file")
    blob, build_id = elf_btf(vmlinux)
    return KernelFileBtf(blob, build_id, outer + name)


# --- bzImage -----------------------------------------------------------------------------------------


def bzimage_payload(data: bytes) -> bytes | None:
    """The compressed kernel inside a bzImage, or None when ``data`` is not a bzImage."""
    if len(data) < _PAYLOAD + 8 or data[_HDRS:_HDRS + 4] != b"HdrS":
        return None
    (version,) = struct.unpack_from("<H", data, _VERSION)
    if version < 0x208:
        raise KernelFileError(f"bzImage boot protocol {version >> 8}.{version & 0xFF} "
                              "predates payload_offset (2.08)")
    setup_sects = data[_SETUP_SECTS] or 4
    offset, length = struct.unpack_from("<II", data, _PAYLOAD)
    start = (setup_sects + 1) * 512 + offset
    if not length or start + length > len(data):
        raise KernelFileError(f"bzImage payload {start:#x}+{length:#x} lies outside the "
                              f"{len(data):#x}-byte file")
    return data[start:start + length]


# --- decompressors -----------------------------------------------------------------------------------


def _too_big() -> KernelFileError:
    return KernelFileError(f"decompressed kernel is larger than {MAX_VMLINUX} bytes")


def _gzip(data: bytes) -> bytes:
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = d.decompress(data, MAX_VMLINUX + 1)
    if len(out) > MAX_VMLINUX:
        raise _too_big()
    if not d.eof:
        raise KernelFileError("truncated gzip stream")
    return out


Decompressor = lzma.LZMADecompressor | bz2.BZ2Decompressor


def _lzma_like(make: Callable[[], Decompressor], name: str) -> Callable[[bytes], bytes]:
    def run(data: bytes) -> bytes:
        d = make()
        out = d.decompress(data, MAX_VMLINUX + 1)
        if len(out) > MAX_VMLINUX:
            raise _too_big()
        if not d.eof:
            raise KernelFileError(f"truncated {name} stream")
        return out

    return run


def _zstd(data: bytes) -> bytes:
    # Fed in small pieces so a decompression bomb is caught after at most ~128 MiB of output per
    # piece (zstd's ratio is bounded by its 128 KiB blocks); the frame ends before the size trailer.
    d = zstandard.ZstdDecompressor(max_window_size=1 << 30).decompressobj()
    parts: list[bytes] = []
    total = 0
    for pos in range(0, len(data), 4096):
        chunk = d.decompress(data[pos:pos + 4096])
        total += len(chunk)
        if total > MAX_VMLINUX:
            raise _too_big()
        parts.append(chunk)
        if d.eof:
            return b"".join(parts)
    raise KernelFileError("truncated zstd stream")


def lz4_legacy(data: bytes) -> bytes:
    """Decompress LZ4 legacy frames (``lz4 -l``, what the kernel's ``unlz4`` reads)."""
    if data[:4] != LZ4_LEGACY_MAGIC:
        raise KernelFileError("not an LZ4 legacy stream")
    out: list[bytes] = []
    total = 0
    pos = 4
    while pos + 4 <= len(data):
        (n,) = struct.unpack_from("<I", data, pos)
        if n == 0x184C2102:  # the magic again: a concatenated stream
            pos += 4
            continue
        if pos + 4 + n > len(data):
            break  # what is left is the size the kernel build appends, not a block
        try:
            block = lz4.block.decompress(data[pos + 4:pos + 4 + n], uncompressed_size=LZ4_LEGACY_BLOCK)
        except lz4.block.LZ4BlockError as e:
            raise KernelFileError(f"corrupt LZ4 block at {pos:#x}: {e}") from None
        total += len(block)
        if total > MAX_VMLINUX:
            raise _too_big()
        out.append(block)
        pos += 4 + n
    if not out:
        raise KernelFileError("empty LZ4 legacy stream")
    return b"".join(out)


DECOMPRESSORS: tuple[tuple[bytes, str, Callable[[bytes], bytes]], ...] = (
    (b"\x1f\x8b", "gzip", _gzip),
    (b"\xfd7zXZ\x00", "xz", _lzma_like(lambda: lzma.LZMADecompressor(lzma.FORMAT_XZ), "xz")),
    (b"\x5d\x00\x00", "lzma", _lzma_like(lambda: lzma.LZMADecompressor(lzma.FORMAT_ALONE), "lzma")),
    (b"BZh", "bzip2", _lzma_like(bz2.BZ2Decompressor, "bzip2")),
    (LZ4_LEGACY_MAGIC, "lz4", lz4_legacy),
    (b"\x28\xb5\x2f\xfd", "zstd", _zstd),
)
"""(magic, name, decompress) of the kernel's compressors that aradia reads."""


def decompress(data: bytes) -> tuple[str, bytes]:
    """``(compressor name, output)`` for a stream starting with one of :data:`DECOMPRESSORS`' magics."""
    for magic, name, fn in DECOMPRESSORS:
        if data.startswith(magic):
            try:
                return name, fn(data)
            except (OSError, EOFError, ValueError, lzma.LZMAError, zlib.error, zstandard.ZstdError) as e:
                raise KernelFileError(f"corrupt {name} stream: {e}") from None
    lzo = " (LZO kernels are not supported)" if data[:4] == b"\x89LZO" else ""
    raise KernelFileError(f"not a bzImage, vmlinux ELF, BTF blob or known compressed stream "
                          f"(starts {data[:6].hex()}){lzo}")


# --- ELF ---------------------------------------------------------------------------------------------


def kernel_elf(data: bytes) -> ElfFile:
    """The little-endian ELF64 file ``data`` (a vmlinux or a module), as an :class:`ElfFile`."""
    elf = ElfFile.from_bytes(data, error=KernelFileError)
    if not (elf.elf64 and elf.little):
        raise KernelFileError("not a little-endian 64-bit ELF file (x86-64 kernels are)")
    return elf


def elf_sections(data: bytes) -> dict[str, tuple[int, int]]:
    """Section name -> (file offset, size) of a little-endian ELF64 file, checked against its size.

    ``SHT_NOBITS`` sections (``.bss``: no file contents) are left out; of sections with one name,
    the first is kept.
    """
    elf = kernel_elf(data)
    out: dict[str, tuple[int, int]] = {}
    for sec in elf.sections():
        if sec.type == SHT_NOBITS:
            continue
        elf.check(sec.offset, sec.size, f"ELF section {sec.name}")
        out.setdefault(sec.name, (sec.offset, sec.size))
    return out


def elf_btf(data: bytes) -> tuple[bytes, str | None]:
    """The ``.BTF`` section and the GNU build ID (from ``.notes``) of a vmlinux ELF."""
    elf = kernel_elf(data)
    btf = elf.section(".BTF")
    if btf is None:
        raise KernelFileError("the kernel ELF has no .BTF section (built without CONFIG_DEBUG_INFO_BTF?)")
    blob = elf.section_data(btf)
    if blob[:2] != BTF_MAGIC:
        raise KernelFileError("the .BTF section does not start with the BTF magic")
    notes = elf.section(".notes")
    build_id = notes_build_id(elf.section_data(notes)) if notes is not None else None
    return blob, build_id
