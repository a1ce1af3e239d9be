"""Write guest-physical memory to dump files: ELF core, flat raw image, LiME.

Every writer streams from ``mem.read`` in chunks (4 MiB by default) and reports ``progress(done,
total)`` in bytes of RAM after each chunk. Given a path, a writer writes a temporary file beside it
and renames it into place only when complete, so a failure (or an exception raised by ``progress``
to cancel) never leaves a partial file under the final name. Given a binary file object, it writes
to it in order, without seeking (except ``write_raw``, which seeks over holes when it can).
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

from aradia.elf import EM_X86_64, ET_CORE, NT_PRSTATUS, PN_XNUM, PT_LOAD, PT_NOTE
from aradia.errors import AradiaError
from aradia.sources.base import PhysicalMemory, Range
from aradia.sources.elfcore import (
    ARADIA_NOTE,
    GPR_NAMES,
    NT_ARADIA_REGS,
    PRSTATUS64_PID_OFFSET,
    PRSTATUS64_REG_OFFSET,
    PRSTATUS_LAYOUTS,
    QEMU_CPUSTATE_FMT,
    QEMU_CPUSTATE_MACHINES,
    QEMU_CPUSTATE_SIZE,
    QEMU_CPUSTATE_VERSION,
    SEGMENT_NAMES,
    aradia_regs_note,
)
from aradia.sources.lime import LIME_HEADER, LIME_MAGIC, LIME_VERSION
from aradia.sources.raw import PathLike

ByteProgress = Callable[[int, int], None]
"""Called with the bytes written so far and the total while a dump is written."""
Output = PathLike | BinaryIO

DEFAULT_CHUNK = 4 << 20
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_DATA_ALIGN = 4096


def write_elf(
    mem: PhysicalMemory,
    out: Output,
    *,
    vmcoreinfo: str | None = None,
    cpu_states: Sequence[Mapping[str, int]] | None = None,
    progress: ByteProgress | None = None,
    chunk: int = DEFAULT_CHUNK,
    machine: int = EM_X86_64,
) -> None:
    """Write ``mem`` as an ELF64 core (``ET_CORE``) of ELF machine ``machine`` (the guest
    architecture's ``elf_machine``: ``EM_X86_64``, the default, or ``EM_AARCH64``), the way QEMU does.

    One ``PT_LOAD`` per RAM range (``p_paddr`` = guest-physical address, ``p_vaddr`` 0: QEMU's
    ``virt`` RAM at 0x40000000 gives ``p_paddr`` 0x40000000). A ``PT_NOTE`` carries one
    ``CORE``/``NT_PRSTATUS`` note per entry of ``cpu_states`` (register dicts named as
    :attr:`ElfCore.vcpu_registers <aradia.sources.elfcore.ElfCore.vcpu_registers>` returns them;
    missing registers are 0; ``pr_reg`` in the machine's layout), then per vCPU either a ``QEMU``
    note (x86: ``QEMUCPUState`` with segments and control registers) or, on other machines, an
    ``ARADIA`` note with the registers ``pr_reg`` has no slot for (arm64: TTBR0/TTBR1/TCR_EL1), and
    finally a ``VMCOREINFO`` note (type 0) when ``vmcoreinfo`` is given -- the note drgn, crash and
    makedumpfile read to identify the kernel.
    """
    _check_chunk(chunk)
    if machine not in PRSTATUS_LAYOUTS:
        raise AradiaError(f"cannot write an ELF core for ELF machine {machine} "
                          f"(known: {', '.join(map(str, PRSTATUS_LAYOUTS))})")
    ranges = mem.ranges()
    notes = b"".join(_prstatus_note(i, r, machine) for i, r in enumerate(cpu_states or ()))
    if machine in QEMU_CPUSTATE_MACHINES:
        notes += b"".join(_note(b"QEMU", 0, _qemu_cpustate(r)) for r in cpu_states or ())
    else:
        notes += b"".join(_note(ARADIA_NOTE.encode(), NT_ARADIA_REGS, _aradia_regs(i, r, machine))
                          for i, r in enumerate(cpu_states or ()))
    if vmcoreinfo is not None:
        notes += _note(b"VMCOREINFO", 0, vmcoreinfo.encode())
    nphdr = len(ranges) + (1 if notes else 0)
    phoff = _EHDR.size
    shoff = 0
    extended = nphdr >= PN_XNUM
    notes_at = phoff + nphdr * _PHDR.size
    if extended:  # the real count goes into section header 0's sh_info
        shoff = notes_at
        notes_at += _SHDR.size
    data_at = _align(notes_at + len(notes), _DATA_ALIGN)

    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    head = [
        _EHDR.pack(ident, ET_CORE, machine, 1, 0, phoff, shoff, 0, _EHDR.size, _PHDR.size,
                   PN_XNUM if extended else nphdr, _SHDR.size if extended else 0,
                   1 if extended else 0, 0)
    ]  # fmt: skip
    if notes:
        head.append(_PHDR.pack(PT_NOTE, 0, notes_at, 0, 0, len(notes), len(notes), 0))
    off = data_at
    for r in ranges:
        head.append(_PHDR.pack(PT_LOAD, 0x7, off, 0, r.start, r.size, r.size, 0))  # RWX like QEMU
        off += r.size
    if extended:
        head.append(_SHDR.pack(0, 0, 0, 0, 0, 0, 0, nphdr, 0, 0))
    head.append(notes)
    header = b"".join(head)
    header += bytes(data_at - len(header))

    def body(f: BinaryIO) -> None:
        f.write(header)
        _copy_ranges(mem, ranges, f, progress, chunk, lambda _r: b"")

    _write_atomically(out, body)


def write_lime(
    mem: PhysicalMemory,
    out: Output,
    *,
    progress: ByteProgress | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> None:
    """Write ``mem`` as a LiME file: one 32-byte header (inclusive end address) per RAM range."""
    _check_chunk(chunk)
    ranges = mem.ranges()

    def header(r: Range) -> bytes:
        return LIME_HEADER.pack(LIME_MAGIC, LIME_VERSION, r.start, r.end - 1, bytes(8))

    _write_atomically(out, lambda f: _copy_ranges(mem, ranges, f, progress, chunk, header))


def write_raw(
    mem: PhysicalMemory,
    out: Output,
    *,
    progress: ByteProgress | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> None:
    """Write ``mem`` as a flat image: file offset = guest-physical address, holes read as zeros.

    Beware of the size: the file spans 0 up to the top of RAM, so a guest with RAM above 4 GiB
    (QEMU ``pc`` with more than ~3 GiB puts the rest at 0x100000000) gives a file of 4 GiB plus
    the high part however little RAM it has. Holes are skipped with ``seek`` where the output
    can seek (sparse on most file systems) and written as zeros where it cannot.
    """
    ranges = mem.ranges()
    top = ranges[-1].end if ranges else 0

    _check_chunk(chunk)

    def body(f: BinaryIO) -> None:
        seekable = _seekable(f)
        pos = 0
        zero = bytes(min(chunk, 1 << 20))
        done, total = 0, sum(r.size for r in ranges)
        if progress is not None:
            progress(0, total)
        for r in ranges:
            if r.start > pos:
                if seekable:
                    f.seek(r.start - pos, os.SEEK_CUR)
                else:
                    _zero_fill(f, r.start - pos, zero)
            for a in range(r.start, r.end, chunk):
                data = mem.read(a, min(chunk, r.end - a))
                f.write(data)
                done += len(data)
                if progress is not None:
                    progress(done, total)
            pos = r.end
        if seekable:
            f.truncate(top)

    _write_atomically(out, body)


# --- helpers -------------------------------------------------------------------------------------
def _copy_ranges(
    mem: PhysicalMemory,
    ranges: list[Range],
    f: BinaryIO,
    progress: ByteProgress | None,
    chunk: int,
    header: Callable[[Range], bytes],
) -> None:
    done, total = 0, sum(r.size for r in ranges)
    if progress is not None:
        progress(0, total)
    for r in ranges:
        f.write(header(r))
        for a in range(r.start, r.end, chunk):
            data = mem.read(a, min(chunk, r.end - a))
            f.write(data)
            done += len(data)
            if progress is not None:
                progress(done, total)


def _check_chunk(chunk: int) -> None:
    if chunk <= 0:
        raise AradiaError(f"chunk size must be positive, not {chunk}")


def _zero_fill(f: BinaryIO, n: int, zero: bytes) -> None:
    while n > 0:
        k = min(n, len(zero))
        f.write(zero[:k])
        n -= k


def _seekable(f: BinaryIO) -> bool:
    try:
        return bool(f.seekable())
    except (AttributeError, OSError, ValueError):
        return False


def _write_atomically(out: Output, body: Callable[[BinaryIO], None]) -> None:
    """Run ``body`` on ``out`` (a file object), or on a temp file renamed to ``out`` (a path)."""
    if not isinstance(out, str | os.PathLike):
        try:
            body(out)
        except OSError as e:
            raise AradiaError(f"cannot write dump: {e.strerror or e}") from e
        return
    path = Path(out)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.", suffix=".part")
    except OSError as e:
        raise AradiaError(f"cannot write {path}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            body(f)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise AradiaError(f"cannot write {path}: {e.strerror or e}") from e
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _note(name: bytes, ntype: int, desc: bytes) -> bytes:
    name += b"\0"
    return (
        struct.pack("<III", len(name), len(desc), ntype)
        + name.ljust(_align(len(name), 4), b"\0")
        + desc.ljust(_align(len(desc), 4), b"\0")
    )


def _qemu_cpustate(regs: Mapping[str, int]) -> bytes:
    vals: list[int] = [QEMU_CPUSTATE_VERSION, QEMU_CPUSTATE_SIZE + 8]
    vals += [regs.get(n, 0) for n in GPR_NAMES]
    for s in SEGMENT_NAMES:
        vals += [regs.get(s, 0), regs.get(f"{s}_limit", 0), regs.get(f"{s}_flags", 0), 0,
                 regs.get(f"{s}_base", 0)]  # fmt: skip
    vals += [regs.get(f"cr{i}", 0) for i in range(5)]
    try:
        return struct.pack(QEMU_CPUSTATE_FMT, *vals) + struct.pack("<Q", regs.get("kernel_gs_base", 0))
    except struct.error as e:
        raise AradiaError(f"bad register value in cpu state: {e}") from e


def _prstatus_note(index: int, regs: Mapping[str, int], machine: int = EM_X86_64) -> bytes:
    names, size = PRSTATUS_LAYOUTS[machine]
    desc = bytearray(size)
    struct.pack_into("<I", desc, PRSTATUS64_PID_OFFSET, regs.get("pid", index + 1))
    try:
        struct.pack_into(f"<{len(names)}Q", desc, PRSTATUS64_REG_OFFSET, *(regs.get(n, 0) for n in names))
    except struct.error as e:
        raise AradiaError(f"bad register value in cpu state: {e}") from e
    return _note(b"CORE", NT_PRSTATUS, bytes(desc))


def _aradia_regs(index: int, regs: Mapping[str, int], machine: int) -> bytes:
    """The ``ARADIA`` note of one vCPU: its ``pid`` (as in its NT_PRSTATUS) and every register of
    ``regs`` that the machine's ``pr_reg`` has no slot for."""
    names = set(PRSTATUS_LAYOUTS[machine][0])
    extra = {k: v for k, v in regs.items() if k not in names and k != "pid"}
    try:
        return aradia_regs_note({"pid": regs.get("pid", index + 1), **extra})
    except AradiaError as e:
        raise AradiaError(f"bad register value in cpu state: {e}") from e
