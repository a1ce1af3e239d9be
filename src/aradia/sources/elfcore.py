"""ELF core memory dumps: QEMU ``dump-guest-memory`` output, kdump ``/proc/vmcore`` copies, and ours.

Each ``PT_LOAD`` maps guest-physical ``[p_paddr, p_paddr + p_memsz)``; its first ``p_filesz`` bytes
are at file offset ``p_offset`` and the rest read as zeros. Segments whose ``p_paddr`` cannot be a
physical address (``/proc/kcore``'s ``-1``, beyond 2**52) are skipped and listed in ``warnings``.

Overlapping segments are allowed only when they agree: QEMU's ``paging=true`` dumps point several
virtual mappings at one file copy of a physical range (same address-to-offset relation), and kdump
vmcores carry the kernel text twice (a second copy whose bytes are equal). Any other overlap is a
:class:`~aradia.errors.DumpFormatError`.

Headers and notes are read by :mod:`aradia.elf`, which checks every count, size and offset; this
module adds what is particular to a dump. ``PT_NOTE`` notes are kept as :class:`Note`; the
``VMCOREINFO`` note text, the per-CPU ``QEMU`` notes (``QEMUCPUState``: general registers,
segments, cr0..cr4; QEMU writes them for x86 only) and ``CORE``/``NT_PRSTATUS`` notes are decoded.
The ``pr_reg`` layout of ``NT_PRSTATUS`` is the ELF machine's (:data:`PRSTATUS_LAYOUTS`): x86-64's
``struct user_regs_struct``, i386's, and arm64's ``struct user_pt_regs`` (x0..x30, sp, pc, pstate).

The ELF header's ``e_machine`` says which architecture a core is; this module keys every layout by it
(it sits below :mod:`aradia.machine.arch`, which maps machine numbers to architectures).

aradia's own arm64 cores keep the vCPU registers ``pr_reg`` has no slot for (TTBR0_EL1, TTBR1_EL1,
TCR_EL1: what address translation needs) in one ``ARADIA`` note per vCPU (type
:data:`NT_ARADIA_REGS`): ASCII lines ``name=0xvalue``, the first ``pid=`` the vCPU's ``pr_pid``.
Readers that do not know the note (drgn, crash, readelf) skip it.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from aradia.elf import (
    EM_386,
    EM_AARCH64,
    EM_X86_64,
    ET_CORE,
    NT_PRSTATUS,
    PT_LOAD,
    PT_NOTE,
    ElfFile,
    Note,
    ProgramHeader,
    iter_notes,
)
from aradia.errors import DumpFormatError
from aradia.sources.base import Segment
from aradia.sources.raw import MappedFile, MappedMemory, PathLike

MAX_NOTES = 1 << 16
MAX_NOTE_BYTES = 64 << 20
MAX_PADDR = 1 << 52  # x86-64 architectural limit of physical addresses
MAX_OVERLAP_CHECKS = 1 << 16
MAX_COMPARE_BYTES = 4 << 30  # bytes compared to accept overlapping copies (kdump kernel text)
_CMP_CHUNK = 4 << 20
ZERO_BACKING = -1  # Segment.backing of a p_memsz > p_filesz tail: reads as zeros

SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr", "gdt", "idt")
GPR_NAMES = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
    "rip", "rflags",
)  # fmt: skip
#: x86-64 ``struct user_regs_struct`` order (the ``pr_reg`` of NT_PRSTATUS).
PRSTATUS64_REGS = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx",
    "rsi", "rdi", "orig_rax", "rip", "cs", "rflags", "rsp", "ss", "fs_base", "gs_base",
    "ds", "es", "fs", "gs",
)  # fmt: skip
PRSTATUS64_PID_OFFSET = 32
PRSTATUS64_REG_OFFSET = 112
PRSTATUS64_SIZE = 336
#: arm64 ``struct user_pt_regs`` (``pr_reg`` of NT_PRSTATUS): x0..x30, sp, pc, pstate, named as
#: QEMU's GDB stub names them (PSTATE is ``cpsr``).
AARCH64_PRSTATUS_REGS = (*(f"x{i}" for i in range(31)), "sp", "pc", "cpsr")
#: 112 bytes of ``struct elf_prstatus_common``, 34 * 8 of ``pr_reg``, ``int pr_fpvalid``, padding to 8.
AARCH64_PRSTATUS_SIZE = 392
#: ``e_machine`` -> (``pr_reg`` register names in order, ``sizeof(struct elf_prstatus)``) of the 64-bit
#: layouts (``pr_pid`` at :data:`PRSTATUS64_PID_OFFSET`, ``pr_reg`` at :data:`PRSTATUS64_REG_OFFSET`).
PRSTATUS_LAYOUTS: dict[int, tuple[tuple[str, ...], int]] = {
    EM_X86_64: (PRSTATUS64_REGS, PRSTATUS64_SIZE),
    EM_AARCH64: (AARCH64_PRSTATUS_REGS, AARCH64_PRSTATUS_SIZE),
}
#: Machines whose QEMU writes a ``QEMU`` note (``QEMUCPUState``) per vCPU: on the others the vCPU
#: registers of a dump come from NT_PRSTATUS (and aradia's ``ARADIA`` notes).
QEMU_CPUSTATE_MACHINES = frozenset({EM_X86_64, EM_386})
ARADIA_NOTE = "ARADIA"
NT_ARADIA_REGS = 1
MAX_ARADIA_REGS_BYTES = 4096
_ARADIA_LINE = re.compile(rb"([a-z][a-z0-9_]{0,31})=0x([0-9a-f]{1,16})")
_PRSTATUS32_REGS = (
    ("ebx", "I"), ("ecx", "I"), ("edx", "I"), ("esi", "I"), ("edi", "I"), ("ebp", "I"), ("eax", "I"),
    ("ds", "H"), ("", "H"), ("es", "H"), ("", "H"), ("fs", "H"), ("", "H"), ("gs", "H"), ("", "H"),
    ("orig_eax", "I"), ("eip", "I"), ("cs", "H"), ("", "H"), ("eflags", "I"), ("esp", "I"),
    ("ss", "H"), ("", "H"),
)  # fmt: skip
_PRSTATUS32_FMT = "<" + "".join(f for _, f in _PRSTATUS32_REGS)
_PRSTATUS32_PID_OFFSET = 24
_PRSTATUS32_REG_OFFSET = 72

#: ``QEMUCPUState`` (QEMU ``target/i386/arch_dump.c``, version 1): version, size, 18 GPRs,
#: 10 segments (selector, limit, flags, pad: u32; base: u64), cr[5]; newer QEMUs append
#: kernel_gs_base and announce it through ``size``.
QEMU_CPUSTATE_FMT = "<II18Q" + "IIIIQ" * 10 + "5Q"
QEMU_CPUSTATE_SIZE = struct.calcsize(QEMU_CPUSTATE_FMT)  # 432
QEMU_CPUSTATE_VERSION = 1


#: A ``PT_LOAD`` program header as found in the file (``index``, ``offset``, ``vaddr``, ``paddr``,
#: ``filesz``, ``memsz``, ...).
LoadSegment = ProgramHeader


@dataclass
class _Piece:
    gpa: int
    size: int
    off: int  # file offset, or ZERO_BACKING

    @property
    def end(self) -> int:
        return self.gpa + self.size


class ElfCore(MappedMemory):
    """Guest-physical memory of an ELF core file, read through a memory mapping.

    ``strict=False`` accepts a truncated file: segments are kept up to the end of the file and
    what was dropped is described in :attr:`warnings`. Other corruption always raises
    :class:`DumpFormatError`.

    Attributes: ``notes`` (every :class:`Note`, in file order), ``loads`` (the ``PT_LOAD``
    headers as found), ``machine`` (``e_machine``: 62 x86-64, 3 i386 -- QEMU writes EM_386 while
    the guest is not in long mode --, 183 arm64), ``elf64`` and ``warnings``. QEMU notes of an unknown
    ``QEMUCPUState`` version and short PRSTATUS notes are left out of :attr:`cpu_states` and
    :attr:`prstatus` (they stay in ``notes``).
    """

    kind = "elf"
    writable = False

    def __init__(self, path: PathLike, *, strict: bool = True) -> None:
        self.path = Path(path)
        self.strict = strict
        #: Human-readable notes about skipped or truncated parts of the file.
        self.warnings: list[str] = []
        self._file = MappedFile(path)
        try:
            self._parse()
            super().__init__(self._build_segments())
        except BaseException:
            self._file.close()
            raise

    # --- public metadata ------------------------------------------------------------------------
    @property
    def vmcoreinfo(self) -> str | None:
        """Text of the first ``VMCOREINFO`` note, or None when the dump has none."""
        for n in self.notes:
            if n.name == "VMCOREINFO":
                return n.desc.rstrip(b"\0").decode("utf-8", "replace")
        return None

    @property
    def cpu_states(self) -> list[dict[str, int]]:
        """Registers from QEMU's per-CPU ``QEMU`` notes, one dict per vCPU in note order.

        Keys: the 16 GPRs, ``rip``, ``rflags``, ``cr0``..``cr4``, each segment's selector
        (``cs``) plus ``cs_base``, ``cs_limit``, ``cs_flags`` (likewise ds es fs gs ss ldt tr gdt
        idt), and ``kernel_gs_base`` when the QEMU wrote it.
        """
        out = []
        for n in self.notes:
            if n.name == "QEMU" and n.type == 0:
                regs = parse_qemu_cpustate(n.desc)
                if regs is not None:
                    out.append(regs)
        return out

    @property
    def vcpu_registers(self) -> list[dict[str, int]]:
        """The registers saved per vCPU, whatever the machine: :attr:`cpu_states` (QEMU's ``QEMU``
        notes) on x86; elsewhere (arm64) :attr:`prstatus` with, for each vCPU, the registers of
        aradia's ``ARADIA`` note of the same ``pid`` (``ttbr0_el1``, ``ttbr1_el1``, ``tcr_el1``). A core
        with no usable notes gives ``[]``."""
        if self.machine in QEMU_CPUSTATE_MACHINES:
            return self.cpu_states
        extra: dict[int, dict[str, int]] = {}
        for n in self.notes:
            if n.name == ARADIA_NOTE and n.type == NT_ARADIA_REGS:
                regs = parse_aradia_regs(n.desc)
                if regs is not None and "pid" in regs:
                    extra.setdefault(regs["pid"], regs)
        return [{**extra.get(p["pid"], {}), **p} for p in self.prstatus]

    @property
    def prstatus(self) -> list[dict[str, int]]:
        """Registers and ``pid`` from ``CORE``/``NT_PRSTATUS`` notes (x86-64, i386 and arm64 layouts)."""
        out = []
        for n in self.notes:
            if n.name == "CORE" and n.type == NT_PRSTATUS:
                regs = parse_prstatus(n.desc, self.machine)
                if regs is not None:
                    out.append(regs)
        return out

    # --- parsing --------------------------------------------------------------------------------
    def _fail(self, msg: str) -> DumpFormatError:
        return DumpFormatError(f"{self.path}: {msg}")

    def _parse(self) -> None:
        f = self._file
        elf = ElfFile(lambda off, n: f.map[off : off + n], f.size, context=f"{self.path}: ")
        if elf.type != ET_CORE:
            raise self._fail(f"ELF file is not a core dump (e_type {elf.type}, expected {ET_CORE})")
        self.elf64, self.machine = elf.elf64, elf.machine
        phdrs = elf.program_headers()
        if not phdrs:
            raise self._fail("ELF core has no program headers")
        self.loads: list[LoadSegment] = [p for p in phdrs if p.type == PT_LOAD]
        self.notes: list[Note] = []
        for p in phdrs:
            if p.type == PT_NOTE:
                self._parse_notes(p, elf.little)

    def _parse_notes(self, ph: ProgramHeader, little: bool) -> None:
        fsize, offset, size = self._file.size, ph.offset, ph.filesz
        if size > MAX_NOTE_BYTES:
            raise self._fail(f"PT_NOTE {ph.index}: absurd size {size:#x}")
        if offset + size > fsize:
            msg = f"PT_NOTE {ph.index} at {offset:#x}+{size:#x} ends past the end of the file ({fsize:#x})"
            if self.strict:
                raise self._fail("truncated: " + msg)
            self.warnings.append(msg + "; parsed the part that is present")
            size = max(0, fsize - offset)
        data = self._file.map[offset : offset + size]
        try:
            for note in iter_notes(data, limit=MAX_NOTES - len(self.notes), little=little):
                self.notes.append(note)
        except DumpFormatError as e:
            if len(self.notes) >= MAX_NOTES:  # the limit, not a broken note: fatal even when lenient
                raise self._fail(f"more than {MAX_NOTES} ELF notes") from None
            if self.strict:
                raise self._fail(f"PT_NOTE {ph.index}: {e}") from None
            self.warnings.append(f"PT_NOTE {ph.index}: {e}; later notes dropped")

    def _build_segments(self) -> list[Segment]:
        fsize = self._file.size
        pieces: list[_Piece] = []
        for ld in self.loads:
            where = f"PT_LOAD {ld.index} (guest-physical {ld.paddr:#x}+{ld.memsz:#x})"
            if ld.memsz == 0:
                continue
            if ld.paddr >= MAX_PADDR:
                self.warnings.append(f"{where}: not a usable physical address; skipped")
                continue
            if ld.paddr + ld.memsz > MAX_PADDR:
                raise self._fail(f"{where}: absurd size, ends past the 2**52 physical address limit")
            if ld.filesz > ld.memsz:
                raise self._fail(f"{where}: p_filesz {ld.filesz:#x} exceeds p_memsz")
            filesz, memsz = ld.filesz, ld.memsz
            if ld.offset + filesz > fsize:
                msg = (
                    f"{where}: data at file offset {ld.offset:#x}+{filesz:#x} ends past the end of "
                    f"the file ({fsize:#x} bytes)"
                )
                if self.strict:
                    raise self._fail("truncated: " + msg)
                kept = max(0, fsize - ld.offset) if ld.offset < fsize else 0
                self.warnings.append(f"{msg}; kept {kept:#x} bytes, dropped {memsz - kept:#x}")
                filesz = memsz = kept
            if filesz:
                pieces.append(_Piece(ld.paddr, filesz, ld.offset))
            if memsz > filesz:
                pieces.append(_Piece(ld.paddr + filesz, memsz - filesz, ZERO_BACKING))
        return [Segment(p.gpa, p.size, p.off) for p in self._resolve_overlaps(pieces)]

    def _resolve_overlaps(self, pieces: list[_Piece]) -> list[_Piece]:
        """Merge pieces into a sorted, non-overlapping list; overlaps must agree (module docstring)."""
        pieces.sort(key=lambda p: (p.gpa, -p.size))
        out: list[_Piece] = []
        max_end = 0
        checks = 0
        compare_budget = [MAX_COMPARE_BYTES]
        for p in pieces:
            if out and p.gpa < max_end:
                lo, hi = p.gpa, min(p.end, max_end)
                j = len(out) - 1
                while j >= 0 and out[j].end > lo:
                    r = out[j]
                    a, b = max(lo, r.gpa), min(hi, r.end)
                    if a < b:
                        checks += 1
                        if checks > MAX_OVERLAP_CHECKS:
                            raise self._fail("too many overlapping PT_LOAD segments")
                        self._check_agree(r, p, a, b, compare_budget)
                    j -= 1
                if p.end <= max_end:
                    continue
                cut = max_end - p.gpa
                p = _Piece(max_end, p.size - cut, p.off + cut if p.off >= 0 else ZERO_BACKING)
            if out and out[-1].end == p.gpa and _continues(out[-1], p):
                out[-1] = _Piece(out[-1].gpa, out[-1].size + p.size, out[-1].off)
            else:
                out.append(p)
            max_end = max(max_end, p.end)
        return out

    def _check_agree(self, r: _Piece, p: _Piece, a: int, b: int, budget: list[int]) -> None:
        """Raise unless pieces ``r`` and ``p`` hold the same bytes over ``[a, b)``."""
        if r.off >= 0 and p.off >= 0 and r.off - r.gpa == p.off - p.gpa:
            return  # same file bytes: an alias, e.g. QEMU paging=true mappings
        if r.off < 0 and p.off < 0:
            return
        budget[0] -= b - a
        if budget[0] < 0:
            raise self._fail("overlapping PT_LOAD segments too large to verify")
        m = self._file.map
        for s in range(a, b, _CMP_CHUNK):
            n = min(_CMP_CHUNK, b - s)
            x = bytes(n) if r.off < 0 else m[r.off + s - r.gpa : r.off + s - r.gpa + n]
            y = bytes(n) if p.off < 0 else m[p.off + s - p.gpa : p.off + s - p.gpa + n]
            if x != y:
                raise self._fail(
                    f"overlapping PT_LOAD segments disagree about guest-physical {s:#x}..{s + n:#x}"
                )


def _continues(a: _Piece, b: _Piece) -> bool:
    if a.off < 0 or b.off < 0:
        return a.off < 0 and b.off < 0
    return a.off + a.size == b.off


def parse_qemu_cpustate(desc: bytes) -> dict[str, int] | None:
    """Decode a ``QEMU`` note's ``QEMUCPUState``; None when too short or of an unknown version."""
    if len(desc) < QEMU_CPUSTATE_SIZE:
        return None
    f = struct.unpack_from(QEMU_CPUSTATE_FMT, desc)
    version, size = f[0], f[1]
    if version != QEMU_CPUSTATE_VERSION:
        return None
    regs = dict(zip(GPR_NAMES, f[2:20], strict=True))
    pos = 20
    for name in SEGMENT_NAMES:
        selector, limit, flags, _pad, base = f[pos : pos + 5]
        regs[name] = selector
        regs[f"{name}_limit"] = limit
        regs[f"{name}_flags"] = flags
        regs[f"{name}_base"] = base
        pos += 5
    for i in range(5):
        regs[f"cr{i}"] = f[pos + i]
    if size >= QEMU_CPUSTATE_SIZE + 8 and len(desc) >= QEMU_CPUSTATE_SIZE + 8:
        (regs["kernel_gs_base"],) = struct.unpack_from("<Q", desc, QEMU_CPUSTATE_SIZE)
    return regs


def parse_prstatus(desc: bytes, machine: int) -> dict[str, int] | None:
    """Decode an ``NT_PRSTATUS`` note for x86-64, i386 or arm64 (``machine``: the core's
    ``e_machine``); None for other machines or short notes."""
    if machine in PRSTATUS_LAYOUTS:
        names, _size = PRSTATUS_LAYOUTS[machine]
        if len(desc) < PRSTATUS64_REG_OFFSET + 8 * len(names):
            return None
        values = struct.unpack_from(f"<{len(names)}Q", desc, PRSTATUS64_REG_OFFSET)
        regs = dict(zip(names, values, strict=True))
        (regs["pid"],) = struct.unpack_from("<I", desc, PRSTATUS64_PID_OFFSET)
        return regs
    if machine == EM_386:
        if len(desc) < _PRSTATUS32_REG_OFFSET + struct.calcsize(_PRSTATUS32_FMT):
            return None
        vals = struct.unpack_from(_PRSTATUS32_FMT, desc, _PRSTATUS32_REG_OFFSET)
        regs = {name: v for (name, _), v in zip(_PRSTATUS32_REGS, vals, strict=True) if name}
        (regs["pid"],) = struct.unpack_from("<I", desc, _PRSTATUS32_PID_OFFSET)
        return regs
    return None


def parse_aradia_regs(desc: bytes) -> dict[str, int] | None:
    """Decode an ``ARADIA`` register note (``name=0xvalue`` lines, see the module docstring); None when
    it is too long or any line is malformed."""
    if len(desc) > MAX_ARADIA_REGS_BYTES:
        return None
    regs: dict[str, int] = {}
    for line in desc.rstrip(b"\0").splitlines():
        m = _ARADIA_LINE.fullmatch(line)
        if m is None:
            return None
        regs[m[1].decode()] = int(m[2], 16)
    return regs


def aradia_regs_note(regs: Mapping[str, int]) -> bytes:
    """The description of an ``ARADIA`` register note for ``regs`` (``pid`` first, then by name);
    :class:`DumpFormatError` for a name or value the note cannot carry."""
    lines = []
    for k in sorted(regs, key=lambda k: (k != "pid", k)):
        v = regs[k]
        line = f"{k}={v:#x}".encode()
        if not 0 <= v < 1 << 64 or not _ARADIA_LINE.fullmatch(line):
            raise DumpFormatError(f"register {k}={v:#x} cannot be written to an ARADIA note")
        lines.append(line + b"\n")
    desc = b"".join(lines)
    if len(desc) > MAX_ARADIA_REGS_BYTES:
        raise DumpFormatError(f"{len(regs)} registers do not fit an ARADIA note")
    return desc


__all__ = [
    "AARCH64_PRSTATUS_REGS",
    "AARCH64_PRSTATUS_SIZE",
    "ARADIA_NOTE",
    "NT_ARADIA_REGS",
    "PRSTATUS_LAYOUTS",
    "ElfCore",
    "LoadSegment",
    "Note",
    "aradia_regs_note",
    "parse_aradia_regs",
    "parse_prstatus",
    "parse_qemu_cpustate",
]
