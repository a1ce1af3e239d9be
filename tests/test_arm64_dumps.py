"""arm64 dumps: aradia's AArch64 ELF cores, QEMU's own ``dump-guest-memory`` ELF, raw and LiME dumps.

Unit tests (no guest) check the NT_PRSTATUS layout of ``struct user_pt_regs`` and the ELF writer on
RAM at virt's 1 GiB, against offsets computed here from the kernel's structs (not from aradia's
tables). The guest tests dump real arm64 guests (Debian 6.1 and 6.12 under ``-M virt -cpu max``)
running memhold and check every dump against the guest's own ground truth: the pattern at the frames
its pagemap gives, ``uname -r`` (through drgn, which reads the dump's VMCOREINFO note), and the vCPU
registers QEMU's GDB stub reported while the guest was paused for the dump.
"""

from __future__ import annotations

import contextlib
import json
import struct
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from aradia.errors import AradiaError, DumpFormatError
from aradia.lab.launcher import Guest
from aradia.lab.memhold import MemHold
from aradia.machine.arch import ARM64, X86, Arm64
from aradia.machine.arch.arm64 import VIRT_RAM_BASE
from aradia.sources.dumpwrite import write_elf
from aradia.sources.elfcore import ElfCore, parse_aradia_regs, parse_prstatus
from aradia.vm import VM, arch_from_vmcoreinfo, attach, open_dump
from bytes_memory import BytesMemory
from cli_runner import DRGN, assert_one_line_error, run_cli

BootGuest = Callable[..., contextlib.AbstractContextManager[Guest]]

pytestmark = pytest.mark.timeout(120)

EM_AARCH64 = 183
# struct elf_prstatus_common: elf_siginfo (12) + pr_cursig (2, padded to 16) + sigpend, sighold (8 each)
# -> pr_pid at 32; ppid, pgrp, sid, then four 16-byte timevals -> pr_reg at 112.
PID_AT, REG_AT = 32, 112
# struct user_pt_regs: u64 regs[31], sp, pc, pstate -> sp at 112+31*8, pc +8, pstate +16; then
# int pr_fpvalid at 384, padded to 392.
SP_AT, PC_AT, PSTATE_AT, PRSTATUS_SIZE = 360, 368, 376, 392
TTBR1 = 0x0058_0000_4158_F001  # ASID 0x58, tables at 0x4158f000
TCR_48 = (0b10 << 30) | (16 << 16) | 16  # TG1 4 KiB, T1SZ 16, T0SZ 16: 48-bit kernel VA
VMCI_ARM64 = ("OSRELEASE=6.1.0-57-cloud-arm64\nPAGESIZE=4096\nSYMBOL(swapper_pg_dir)=ffffcd1acbb8f000\n"
              "NUMBER(VA_BITS)=48\nNUMBER(kimage_voffset)=0xffffcd1a8a600000\nNUMBER(PHYS_OFFSET)=0x40000000\n"
              "NUMBER(TCR_EL1_T1SZ)=0x10\nKERNELOFFSET=4d1ac2800000\n")
VMCI_X86 = "OSRELEASE=6.1.0-57-cloud-amd64\nPAGESIZE=4096\nSYMBOL(init_top_pgt)=ffffffff8ac0a000\n"


def arm64_regs(i: int) -> dict[str, int]:
    regs = {f"x{n}": 0x1000 * i + n for n in range(31)}
    regs.update(sp=0xFFFF8000082B3A70 + i, pc=0xFFFFCD1ACA973080 + 4 * i, cpsr=0x60000005 if i else 0x0,
                ttbr0_el1=0x6800004159_0000 + i, ttbr1_el1=TTBR1, tcr_el1=TCR_48)
    return regs


def virt_memory() -> BytesMemory:
    """1 MiB of RAM at virt's 1 GiB: each page ends in its own address, an arm64 VMCOREINFO text at
    0x40003100."""
    ram = bytearray(1 << 20)
    for off in range(0, len(ram), 4096):
        ram[off + 0xFF8 : off + 0x1000] = (VIRT_RAM_BASE + off).to_bytes(8, "little")
    ram[0x3100 : 0x3100 + len(VMCI_ARM64)] = VMCI_ARM64.encode()
    return BytesMemory({VIRT_RAM_BASE: ram})


def notes_of(data: bytes) -> list[tuple[str, int, bytes]]:
    """(name, type, desc) of every note in the file's PT_NOTE, parsed here with struct alone."""
    (phoff,) = struct.unpack_from("<Q", data, 32)
    (phnum,) = struct.unpack_from("<H", data, 56)
    out = []
    for i in range(phnum):
        p_type, _f, off, _v, _p, filesz = struct.unpack_from("<IIQQQQ", data, phoff + 56 * i)
        if p_type != 4:
            continue
        pos = off
        while pos < off + filesz:
            namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
            name = data[pos + 12 : pos + 12 + namesz].rstrip(b"\0").decode()
            dpos = pos + 12 + (namesz + 3) // 4 * 4
            out.append((name, ntype, data[dpos : dpos + descsz]))
            pos = dpos + (descsz + 3) // 4 * 4
    return out


def loads_of(data: bytes) -> list[tuple[int, int, int]]:
    """(p_offset, p_paddr, p_filesz) of every PT_LOAD."""
    (phoff,) = struct.unpack_from("<Q", data, 32)
    (phnum,) = struct.unpack_from("<H", data, 56)
    out = []
    for i in range(phnum):
        p_type, _f, off, _v, paddr, filesz = struct.unpack_from("<IIQQQQ", data, phoff + 56 * i)
        if p_type == 1:
            out.append((off, paddr, filesz))
    return out


# --- unit tests ---------------------------------------------------------------------------------------
def test_prstatus_arm64_layout_from_bytes() -> None:
    desc = bytearray(PRSTATUS_SIZE)
    struct.pack_into("<I", desc, PID_AT, 7)
    for n in range(31):
        struct.pack_into("<Q", desc, REG_AT + 8 * n, 0x1111_0000 + n)
    struct.pack_into("<QQQ", desc, SP_AT, 0xFFFF_8000_0800_0010, 0xFFFF_C000_0812_3456, 0x6000_03C5)
    regs = parse_prstatus(bytes(desc), EM_AARCH64)
    assert regs is not None
    assert (regs["pid"], regs["sp"], regs["pc"], regs["cpsr"]) == (7, 0xFFFF_8000_0800_0010,
                                                                    0xFFFF_C000_0812_3456, 0x6000_03C5)
    assert [regs[f"x{n}"] for n in range(31)] == [0x1111_0000 + n for n in range(31)]
    assert len(regs) == 31 + 3 + 1
    # the same bytes read as x86-64 put other values under other names (rip is pr_reg[16])
    x86 = parse_prstatus(bytes(desc), 62)
    assert x86 is not None and x86["rip"] == 0x1111_0000 + 16 and "pc" not in x86
    # one byte short of pstate's end: not an arm64 PRSTATUS; unknown machines give None
    assert parse_prstatus(bytes(desc[: PSTATE_AT + 7]), EM_AARCH64) is None
    assert parse_prstatus(bytes(desc[: PSTATE_AT + 8]), EM_AARCH64) is not None
    assert parse_prstatus(bytes(desc), 40) is None


def test_aradia_register_note_parsing() -> None:
    assert parse_aradia_regs(b"pid=0x1\nttbr1_el1=0x58000041\n\0\0") == {"pid": 1, "ttbr1_el1": 0x58000041}
    assert parse_aradia_regs(b"pid=0x1\nttbr1_el1=58000041\n") is None  # no 0x: malformed
    assert parse_aradia_regs(b"pid=0x1\nBAD=0x1\n") is None
    assert parse_aradia_regs(b"x=0x1\n" * 700) is None  # over 4 KiB


def test_write_elf_arm64_layout(tmp_path: Path) -> None:
    mem = virt_memory()
    cpus = [arm64_regs(0), arm64_regs(1)]
    out = tmp_path / "a.elf"
    write_elf(mem, out, vmcoreinfo=VMCI_ARM64, cpu_states=cpus, machine=EM_AARCH64)
    data = out.read_bytes()
    assert struct.unpack_from("<H", data, 18)[0] == EM_AARCH64
    assert [(paddr, size) for _o, paddr, size in loads_of(data)] == [(VIRT_RAM_BASE, 1 << 20)]
    off = loads_of(data)[0][0]
    assert data[off : off + (1 << 20)] == mem.read(VIRT_RAM_BASE, 1 << 20)
    notes = notes_of(data)
    assert [(n, t, len(d)) for n, t, d in notes] == [
        ("CORE", 1, PRSTATUS_SIZE), ("CORE", 1, PRSTATUS_SIZE), ("ARADIA", 1, len(notes[2][2])),
        ("ARADIA", 1, len(notes[3][2])), ("VMCOREINFO", 0, len(VMCI_ARM64))]
    for i, (_n, _t, desc) in enumerate(notes[:2]):
        assert struct.unpack_from("<I", desc, PID_AT)[0] == i + 1
        assert struct.unpack_from("<QQQ", desc, SP_AT) == (cpus[i]["sp"], cpus[i]["pc"], cpus[i]["cpsr"])
        assert struct.unpack_from("<31Q", desc, REG_AT) == tuple(cpus[i][f"x{n}"] for n in range(31))
    assert notes[3][2] == (f"pid=0x2\ntcr_el1={TCR_48:#x}\nttbr0_el1={cpus[1]['ttbr0_el1']:#x}\n"
                           f"ttbr1_el1={TTBR1:#x}\n").encode()
    assert notes[4][2] == VMCI_ARM64.encode()
    with pytest.raises(AradiaError, match="ELF machine 40"):
        write_elf(mem, tmp_path / "arm32.elf", machine=40)


def test_arm64_elf_reads_back_as_arm64(tmp_path: Path) -> None:
    mem = virt_memory()
    cpus = [arm64_regs(0), arm64_regs(1)]
    out = tmp_path / "a.elf"
    write_elf(mem, out, vmcoreinfo=VMCI_ARM64, cpu_states=cpus, machine=EM_AARCH64)
    with ElfCore(out) as core:
        assert core.machine == EM_AARCH64 and core.cpu_states == []  # no QEMU (x86) notes
        assert core.vcpu_registers == [{**c, "pid": i + 1} for i, c in enumerate(cpus)]
    with open_dump(str(out)) as vm:
        assert vm.arch == Arm64(48) and vm.ranges()[0].start == VIRT_RAM_BASE
        got = [(c.pc, c.sp, c.cr3, c.cpl, c.arch) for c in vm.cpus()]
        assert got == [(c["pc"], c["sp"], TTBR1, (c["cpsr"] >> 2) & 3, "arm64") for c in cpus]
        info = vm.info(kernel=False)
        assert info["arch"] == "arm64"
        assert info["vcpus"][1] == {"index": 1, "pc": cpus[1]["pc"], "sp": cpus[1]["sp"], "el": 1,
                                    "pstate": 0x60000005, "ttbr0": cpus[1]["ttbr0_el1"], "ttbr1": TTBR1}
    with pytest.raises(AradiaError, match="ELF core of arm64, not x86_64"):
        open_dump(str(out), arch="x86_64")
    # the same registers with a 52-bit LPA2 TCR (6.12 on -cpu max) set the walk up that way
    tcr52 = (TCR_48 & ~(0x3F << 16)) | (12 << 16) | (1 << 59)
    write_elf(mem, out, cpu_states=[{**arm64_regs(0), "tcr_el1": tcr52}], machine=EM_AARCH64)
    with open_dump(str(out)) as vm:
        assert vm.arch == Arm64(52, lpa2=True)


def test_arch_from_vmcoreinfo() -> None:
    assert arch_from_vmcoreinfo(VMCI_ARM64) == Arm64(48)
    lpa2 = VMCI_ARM64.replace("VA_BITS)=48", "VA_BITS)=52").replace("T1SZ)=0x10", "T1SZ)=0xc")
    assert arch_from_vmcoreinfo(lpa2) == Arm64(52, lpa2=True)
    # a 52-bit kernel on a CPU without LPA2 runs with 48 bits: T1SZ says so, VA_BITS does not
    assert arch_from_vmcoreinfo(lpa2.replace("T1SZ)=0xc", "T1SZ)=0x10")) == Arm64(48)
    assert arch_from_vmcoreinfo(VMCI_X86) is X86
    assert arch_from_vmcoreinfo("OSRELEASE=6.1\nPAGESIZE=4096\n") is None


def test_raw_and_lime_arch_from_ram_or_option(tmp_path: Path) -> None:
    from aradia.sources.dumpwrite import write_lime, write_raw

    mem = virt_memory()
    raw, lime = tmp_path / "m.raw", tmp_path / "m.lime"
    write_raw(mem, raw)
    write_lime(mem, lime)
    for path in (raw, lime):
        with open_dump(str(path)) as vm:
            assert vm.arch == Arm64(48) and vm.cpus() == []
            assert vm.read(VIRT_RAM_BASE + 0x5FF8, 8) == (VIRT_RAM_BASE + 0x5000).to_bytes(8, "little")
        with open_dump(str(path), arch="x86_64") as vm:
            assert vm.arch is X86  # told: no guessing
    # a raw image of a virt guest keeps file offset = guest-physical address: RAM 1 GiB in
    assert raw.stat().st_size == VIRT_RAM_BASE + (1 << 20)
    plain = tmp_path / "plain.raw"
    plain.write_bytes(bytes(8192))
    with open_dump(str(plain)) as vm:
        assert vm.arch is X86  # nothing says otherwise
    with open_dump(str(plain), arch="aarch64") as vm:
        assert vm.arch == Arm64(48)


# --- real arm64 guests ----------------------------------------------------------------------------------
SERIES = ("6.1", "6.12")
GUEST_OPTIONS = {"shared_memory": True, "gdb": True, "memory": "256M", "boot_timeout": 180, "smp": 2}


@dataclass
class Dumps:
    """Dumps written while the guest was paused (the ELF by ``aradia dump``, raw and LiME by
    ``vm.dump``, QEMU's by ``dump-guest-memory``), and what the guest and its GDB stub said meanwhile."""

    elf: Path
    raw: Path
    lime: Path
    qemu_elf: Path
    stub: dict[int, dict[str, int]]  # vCPU -> pc, sp, cpsr, ttbr0/1_el1, tcr_el1 from the GDB stub
    release: str


@pytest.fixture(scope="module", params=SERIES)
def guest(request: pytest.FixtureRequest, boot_guest: BootGuest) -> Iterator[Guest]:
    """One arm64 guest per kernel series (two vCPUs), stopped before the next boots."""
    with boot_guest(request.param, arch="arm64", **GUEST_OPTIONS) as g:
        yield g


@pytest.fixture(scope="module")
def hold(guest: Guest) -> Iterator[MemHold]:
    h = guest.start_memhold(seed=0xA64D_0000 + guest.pid)
    yield h
    h.stop()


@pytest.fixture(scope="module")
def dumps(guest: Guest, hold: MemHold, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dumps]:
    tmp = tmp_path_factory.mktemp("arm64dumps")
    release = guest.run("uname -r").strip()
    with attach(f"qmp:{guest.qmp_path}") as vm:
        assert isinstance(vm.arch, Arm64) and vm.machine is not None
        vm.pause()
        stub = vm.machine.gdb_registers(("pc", "sp", "cpsr", "ttbr0_el1", "ttbr1_el1", "tcr_el1"))
        for fmt in ("raw", "lime"):
            vm.dump(tmp / f"mem.{fmt}", format=fmt, pause=False)
        vm.machine.qmp.execute("dump-guest-memory", {"paging": False, "protocol": f"file:{tmp}/qemu.elf"},
                               timeout=120)
    try:  # the ELF core as the command line writes it (QEMU's QMP socket takes one client at a time)
        r = run_cli("dump", "--vm", f"qmp:{guest.qmp_path}", "-o", str(tmp / "mem.elf"))
        assert r.returncode == 0 and "wrote" in r.stdout, r.stderr
    finally:
        with attach(f"qmp:{guest.qmp_path}") as vm:
            vm.resume()
    yield Dumps(tmp / "mem.elf", tmp / "mem.raw", tmp / "mem.lime", tmp / "qemu.elf", stub, release)


def assert_pattern(vm: VM, hold: MemHold) -> None:
    assert len(hold.pages) == hold.size // 4096 and all(hold.pages), "pagemap gave no PFNs"
    for i, paddr in enumerate(hold.pages):
        assert vm.read(paddr, 4096) == hold.expected(i * 4096, 4096), f"page {i} at {paddr:#x}"


@pytest.mark.parametrize("kind", ["elf", "raw", "lime", "qemu_elf"])
def test_dump_holds_the_pattern_at_the_pagemap_frames(guest: Guest, hold: MemHold, dumps: Dumps,
                                                     kind: str) -> None:
    with open_dump(str(getattr(dumps, kind))) as vm:
        assert vm.memory.kind == ("elf" if "elf" in kind else kind)
        assert isinstance(vm.arch, Arm64)  # raw and LiME: from the VMCOREINFO text in RAM
        va_bits = int(next(ln for ln in guest.image.config_path.read_text().splitlines()
                           if ln.startswith("CONFIG_ARM64_VA_BITS=")).split("=")[1])
        assert vm.arch.va_bits == va_bits
        starts = [r.start for r in vm.ranges()]
        assert starts == ([0] if kind == "raw" else [VIRT_RAM_BASE])  # raw: file offset = address
        assert vm.ranges()[-1].end == VIRT_RAM_BASE + (256 << 20)
        assert_pattern(vm, hold)


def test_elf_headers_and_notes(dumps: Dumps) -> None:
    data = dumps.elf.read_bytes()
    assert struct.unpack_from("<HH", data, 16) == (4, EM_AARCH64)  # ET_CORE, EM_AARCH64
    loads = loads_of(data)
    assert [(paddr, size) for _o, paddr, size in loads] == [(VIRT_RAM_BASE, 256 << 20)]
    notes = notes_of(data)
    assert [(n, t) for n, t, _d in notes] == [("CORE", 1)] * 2 + [("ARADIA", 1)] * 2 + [("VMCOREINFO", 0)]
    vmci = notes[-1][2].decode()
    assert f"OSRELEASE={dumps.release}\n" in vmci and "NUMBER(kimage_voffset)=" in vmci
    # QEMU's own dump of the same instant: the same RAM bytes, the same PRSTATUS registers
    qemu = dumps.qemu_elf.read_bytes()
    assert struct.unpack_from("<H", qemu, 18)[0] == EM_AARCH64
    qloads = loads_of(qemu)
    assert [(p, s) for _o, p, s in qloads] == [(VIRT_RAM_BASE, 256 << 20)]
    assert data[loads[0][0] : loads[0][0] + (256 << 20)] == qemu[qloads[0][0] : qloads[0][0] + (256 << 20)]
    qprs = [d for n, t, d in notes_of(qemu) if (n, t) == ("CORE", 1)]
    assert [d[REG_AT:PSTATE_AT + 8] for d in qprs] == [d[REG_AT:PSTATE_AT + 8] for _n, _t, d in notes[:2]]


@pytest.mark.parametrize("kind", ["elf", "qemu_elf"])
def test_elf_registers_equal_the_stub_at_dump_time(dumps: Dumps, kind: str) -> None:
    stub = dumps.stub
    assert len(stub) == 2
    with open_dump(str(getattr(dumps, kind))) as vm:
        cpus = vm.cpus()
        assert [(c.index, c.pc, c.sp, c.regs["cpsr"]) for c in cpus] == [
            (i, stub[i]["pc"], stub[i]["sp"], stub[i]["cpsr"]) for i in (0, 1)]
        if kind == "elf":  # aradia keeps the translation registers; QEMU's dump has none
            assert [(c.cr3, c.regs["ttbr0_el1"], c.regs["tcr_el1"]) for c in cpus] == [
                (stub[i]["ttbr1_el1"], stub[i]["ttbr0_el1"], stub[i]["tcr_el1"]) for i in (0, 1)]
            assert vm.arch == Arm64.from_tcr(stub[0]["tcr_el1"])
        else:
            assert [c.cr3 for c in cpus] == [0, 0] and "ttbr1_el1" not in cpus[0].regs


@pytest.mark.parametrize("kind", ["elf", "qemu_elf"])
def test_drgn_reads_the_release(dumps: Dumps, kind: str) -> None:
    r = subprocess.run([DRGN, "-c", str(getattr(dumps, kind)), "--no-default-symbols", "-e",
                        "print(prog['UTS_RELEASE'].string_().decode())"],
                       capture_output=True, text=True, timeout=60)
    if kind == "elf":
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip().splitlines()[-1] == dumps.release
    else:  # QEMU's dump has no VMCOREINFO note without -device vmcoreinfo: drgn cannot tell the kernel
        assert r.returncode != 0 and dumps.release not in r.stdout


def test_cli_info_labels_arm64_registers(dumps: Dumps) -> None:
    r = run_cli("info", "--vm", str(dumps.elf), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    stub = dumps.stub
    assert info["arch"] == "arm64" and info["kernel"].startswith(f"Linux version {dumps.release} ")
    assert info["vcpus"] == [{"index": i, "pc": stub[i]["pc"], "sp": stub[i]["sp"],
                              "el": (stub[i]["cpsr"] >> 2) & 3, "pstate": stub[i]["cpsr"],
                              "ttbr0": stub[i]["ttbr0_el1"], "ttbr1": stub[i]["ttbr1_el1"]} for i in (0, 1)]
    text = run_cli("info", "--vm", str(dumps.elf))
    assert text.returncode == 0, text.stderr
    lines = [ln for ln in text.stdout.splitlines() if ln.startswith("vCPU")]
    assert len(lines) == 2 and "RIP" not in text.stdout and "arch       arm64" in text.stdout
    for i, ln in enumerate(lines):
        assert f"PC {stub[i]['pc']:#018x}" in ln and f"TTBR1 {stub[i]['ttbr1_el1']:#018x}" in ln
        assert f"EL{(stub[i]['cpsr'] >> 2) & 3} " in ln


def test_cli_info_live_arm64(guest: Guest, dumps: Dumps) -> None:
    r = run_cli("info", "--vm", f"qmp:{guest.qmp_path}", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["arch"] == "arm64" and info["state"] == "running"
    assert [sorted(c) for c in info["vcpus"]] == [["el", "index", "pc", "pstate", "sp", "ttbr0", "ttbr1"]] * 2
    # the kernel's tables (swapper_pg_dir) do not move: every vCPU's TTBR1, now and at dump time, names them
    tables = {ARM64.root_table(c["ttbr1"]) for c in info["vcpus"]}
    assert tables == {ARM64.root_table(dumps.stub[i]["ttbr1_el1"]) for i in (0, 1)} and 0 not in tables


def test_cli_arch_option_for_raw_dumps(dumps: Dumps) -> None:
    r = run_cli("info", "--vm", str(dumps.lime), "--json", "--arch", "arm64")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["arch"] == "arm64"
    r = run_cli("info", "--vm", str(dumps.lime), "--json", "--arch", "x86_64")  # told, not guessed
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["arch"] == "x86_64"
    assert_one_line_error(run_cli("info", "--vm", str(dumps.elf), "--arch", "x86_64"), "arm64", "x86_64")


def test_truncated_arm64_elf_is_a_clear_error(dumps: Dumps, tmp_path: Path) -> None:
    cut = tmp_path / "cut.elf"
    with open(dumps.elf, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(128 << 20))  # half of RAM
    assert_one_line_error(run_cli("info", "--vm", str(cut)), "truncated", "PT_LOAD")
    with pytest.raises(DumpFormatError, match="truncated"):
        ElfCore(cut)
    with ElfCore(cut, strict=False) as core:  # lenient: what is there, registers included
        assert core.machine == EM_AARCH64 and [r["pc"] for r in core.vcpu_registers] == [
            dumps.stub[i]["pc"] for i in (0, 1)]
        assert core.ranges()[0].start == VIRT_RAM_BASE and "dropped" in core.warnings[0]
