"""QMP control, the RAM map and the live memory paths, against real (bare, BIOS-only) QEMUs."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from aradia.errors import Busy, NotAttached, NotRAM, ProtocolError
from aradia.machine.qemu import Qemu
from aradia.machine.registers import parse_info_registers
from aradia.proto.mtree import parse_flatview, ram_ranges
from aradia.proto.qmp import QMPClient
from bare_qemu import bare_qemu

DATA = Path(__file__).parent / "data"
GiB = 1 << 30


# --- parsers ------------------------------------------------------------------------------------------
def test_mtree_pc_4g_split() -> None:
    text = (DATA / "mtree-7.2-4G-pcram.txt").read_text()
    rr = ram_ranges(text, {"pc.ram"})
    # -nodefaults: no VGA window; captured before SeaBIOS shadowed its ROMs, so 0xc0000-0xfffff is
    # pc.rom/pc.bios (device ROM, not RAM) and RAM resumes at 1 MiB up to the 3 GiB PCI hole.
    assert [(r.start, r.end, r.offset) for r in rr] == [
        (0, 0xBFFFF, 0), (0x100000, 0xBFFFFFFF, 0x100000), (4 * GiB, 5 * GiB - 1, 0xC0000000)]


def test_mtree_memory_backend_and_vram_excluded() -> None:
    text = (DATA / "mtree-7.2-4G-m0.txt").read_text()
    rr = ram_ranges(text, {"m0"})
    assert rr[-1].start == 4 * GiB and rr[-1].offset == 0xC0000000
    assert not any(r.start <= 0xFD000000 <= r.end for r in rr)  # vga.vram is device RAM


def test_mtree_tolerates_decorations_and_picks_memory_view() -> None:
    text = """FlatView #0
 AS "I/O", root: io
 Root memory region: io
  0000000000000000-0000000000000007 (prio 0, i/o): dma-chan
FlatView #1
 AS "memory", root: system
 AS "cpu-memory-0", root: system
 Root memory region: system
  0000000000000000-000000000009ffff (prio 0, ram): pc.ram KVM
  0000000000100000-000000007fffffff (prio 0, ram): pc.ram @0000000000100000 KVM
  0000000080000000-00000000800fffff (prio 0, ram): other [disabled]
"""
    rr = ram_ranges(text, {"pc.ram"})
    assert [(r.start, r.end, r.offset) for r in rr] == [(0, 0x9FFFF, 0), (0x100000, 0x7FFFFFFF, 0x100000)]
    assert len(parse_flatview(text)) == 3
    with pytest.raises(ProtocolError):
        parse_flatview(text, "nope")
    with pytest.raises(ProtocolError):
        ram_ranges(text, {"absent"})


def test_parse_registers_64bit() -> None:
    text = """CPU#0
RAX=0000000000000000 RBX=ffffffff82a0f940 RCX=0000000000000001 RDX=0000000000000001
RSI=0000000000000083 RDI=000000000001e35c RBP=0000000000000000 RSP=ffffffff82a03e90
R8 =0000000000000001 R9 =0000000000000000 R10=0000000000000001 R11=0000000000000000
RIP=ffffffff81ee9d2b RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1
ES =0000 0000000000000000 00000000 00000000
CS =0010 0000000000000000 ffffffff 00af9b00 DPL=0 CS64 [-RA]
GS =0000 ffff88800f200000 00000000 00000000
GDT=     fffffe0000001000 0000007f
IDT=     fffffe0000000000 00000fff
CR0=80050033 CR2=00007f5d1a2c1000 CR3=000000000260a000 CR4=000006f0
DR0=0000000000000000 DR1=0000000000000000 DR2=0000000000000000 DR3=0000000000000000
EFER=0000000000000d01
CPU#1
RIP=0000000000401000 RFL=00000202 [-------] CPL=3 II=0 A20=1 SMM=0 HLT=0
CR0=80050033 CR2=0000000000000000 CR3=0000000003c7e000 CR4=000006f0
"""
    regs = parse_info_registers(text)
    assert regs[0]["rip"] == 0xFFFFFFFF81EE9D2B and regs[0]["cr3"] == 0x260A000
    assert regs[0]["gs_base"] == 0xFFFF88800F200000 and regs[0]["idt_base"] == 0xFFFFFE0000000000
    assert regs[0]["efer"] == 0xD01 and regs[0]["rflags"] == 0x246 and regs[0]["cpl"] == 0
    assert regs[0]["r8"] == 1 and regs[0]["cs"] == 0x10
    assert regs[1]["cpl"] == 3 and regs[1]["cr3"] == 0x3C7E000
    assert "dr0" not in regs[0]


# --- real QEMU: errors --------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_missing_socket_is_not_attached(tmp_path: Path) -> None:
    with pytest.raises(NotAttached, match="no QMP socket"):
        QMPClient(str(tmp_path / "nope.sock"))


@pytest.mark.timeout(30)
def test_socket_nobody_listens(tmp_path: Path) -> None:
    path = str(tmp_path / "dead.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()  # the file stays, nobody listens
    with pytest.raises(NotAttached, match="nobody is listening"):
        QMPClient(path)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("payload", [b"", b"SSH-2.0-dropbear\r\n", b"{\"not\": \"qmp\"}\n"])
def test_socket_that_is_not_qmp(tmp_path: Path, payload: bytes) -> None:
    path = str(tmp_path / "other.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        conn.sendall(payload)
        time.sleep(5)
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    t0 = time.monotonic()
    with pytest.raises(ProtocolError, match="not a QMP socket"):
        QMPClient(path, greeting_timeout=1.0)
    assert time.monotonic() - t0 < 5
    srv.close()


GREETING = b'{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}\n'
RESUME = b'{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "RESUME"}\n'


@pytest.mark.timeout(30)
@pytest.mark.parametrize("early", [0, 1, 3])
def test_events_before_the_greeting_are_skipped(tmp_path: Path, early: int) -> None:
    """QEMU 7.2 may hand a new client an event left from the previous session before its greeting
    (seen in CI: a RESUME): the client skips it; events and no greeting is still not QMP."""
    path = str(tmp_path / "qmp.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        conn.sendall(RESUME * early + GREETING)
        f = conn.makefile("rb")
        for line in f:  # qmp_capabilities, then query-status (answers carry the request's id)
            req = json.loads(line)
            ret = {} if req["execute"] == "qmp_capabilities" else {"status": "running", "running": True}
            conn.sendall(json.dumps({"return": ret, "id": req["id"]}).encode() + b"\n")

    threading.Thread(target=serve, daemon=True).start()
    with QMPClient(path) as qmp:
        assert qmp.version == (7, 2, 22)
        assert qmp.execute("query-status")["status"] == "running"
    srv.close()

    path2 = str(tmp_path / "events-only.sock")
    srv2 = socket.socket(socket.AF_UNIX)
    srv2.bind(path2)
    srv2.listen(1)

    def events_only() -> None:
        conn, _ = srv2.accept()
        conn.sendall(RESUME * 3)
        time.sleep(5)
        conn.close()

    threading.Thread(target=events_only, daemon=True).start()
    with pytest.raises(ProtocolError, match="not a QMP socket"):
        QMPClient(path2, greeting_timeout=1.0)
    srv2.close()


@pytest.mark.timeout(60)
def test_second_client_gets_busy_quickly() -> None:
    with bare_qemu() as q:
        first = Qemu(q.qmp_path)
        t0 = time.monotonic()
        with pytest.raises(Busy, match="another client holds it"):
            Qemu(q.qmp_path, greeting_timeout=2.0)
        assert time.monotonic() - t0 < 5
        assert first.status() == "running"  # the first client is unharmed
        first.close()


def pmemsave(qemu: Qemu, addr: int, size: int, tmp: Path) -> bytes:
    """QEMU's own copy of guest-physical memory (QMP ``pmemsave``): ground truth for the paths."""
    out = tmp / f"pmem-{addr:x}-{size:x}.bin"
    qemu.qmp.execute("pmemsave", {"val": addr, "size": size, "filename": str(out)})
    return out.read_bytes()


@pytest.mark.timeout(60)
def test_qemu_exit_while_attached(tmp_path: Path) -> None:
    with bare_qemu(shared=True) as q:
        qemu = Qemu(q.qmp_path)
        mems = [qemu.memory("shared-file"), qemu.memory("proc-mem")]
        deadline = time.monotonic() + 20
        while pmemsave(qemu, 0, 0x2000, tmp_path) == bytes(0x2000) and time.monotonic() < deadline:
            time.sleep(0.05)  # until the firmware has written its tables (interrupt vectors, BDA)
        with qemu.paused():  # the firmware's pages hold still while compared
            low = pmemsave(qemu, 0, 0x2000, tmp_path)
            assert low != bytes(len(low)), "the firmware wrote nothing below 8 KiB: nothing to compare"
            for m in mems:
                assert m.read(0, 0x2000) == low, m.kind
        for i, m in enumerate(mems):  # a write through one path is seen through the other and by QEMU
            marker = os.urandom(16)
            m.write(0x200000 + 64 * i, marker)
            assert [k.read(0x200000 + 64 * i, 16) for k in mems] == [marker, marker]
            assert pmemsave(qemu, 0x200000 + 64 * i, 16, tmp_path) == marker
        os.kill(q.pid, 9)
        q.proc.wait()
        deadline = time.monotonic() + 5
        while qemu.qmp.alive and time.monotonic() < deadline:
            time.sleep(0.02)
        for m in mems:
            with pytest.raises(NotAttached):
                m.read(0x1000, 16)
        with pytest.raises(NotAttached):
            qemu.status()


# --- real QEMU: memory paths above and below the 4 GiB split --------------------------------------------
@pytest.mark.timeout(90)
def test_memory_paths_agree_across_the_4g_split() -> None:
    # -S: SeaBIOS never runs. Running, it builds its tables at the top of low RAM (0xbfff_f000 is
    # there) and could overwrite a pattern between our write and QEMU's `xp` (seen once in CI).
    with bare_qemu("4G", shared=True, smp=2, extra=("-S",)) as q:
        qemu = Qemu(q.qmp_path)
        shm, pm = qemu.memory("shared-file"), qemu.memory("proc-mem")
        assert shm.ranges() == pm.ranges()
        top = shm.ranges()[-1]
        assert top.start == 4 * GiB and top.size == 1 * GiB
        probes = [0x7000, 0xBFFFF000 - 8, 4 * GiB, 4 * GiB + 0x12345678, 5 * GiB - 16]
        for i, addr in enumerate(probes):
            pat = os.urandom(8) + i.to_bytes(8, "little")
            (shm if i % 2 else pm).write(addr, pat)
            assert pm.read(addr, 16) == pat and shm.read(addr, 16) == pat
            # QEMU's own view of guest-physical memory agrees (the naive xp path).
            xp = qemu.qmp.hmp(f"xp /2gx {addr:#x}")
            words = [int(w, 16) for w in xp.split(":", 1)[1].split()]
            assert words == [int.from_bytes(pat[:8], "little"), int.from_bytes(pat[8:], "little")]
        for m in (shm, pm):
            with pytest.raises(NotRAM, match="0xc0000000"):
                m.read(0xC0000000, 4096)
            with pytest.raises(NotRAM):
                m.read(0xBFFFFFF8, 16)  # starts in RAM, runs into the hole
        marker = os.urandom(16)
        shm.write(4 * GiB + 0x2345000 + 7, marker)
        for m in (shm, pm):
            assert list(m.search(marker, start=4 * GiB)) == [4 * GiB + 0x2345000 + 7]
            assert list(m.search(marker, start=4 * GiB + 0x2345000 + 8)) == []
        assert list(shm.search(marker)) == [4 * GiB + 0x2345000 + 7]  # all 4 GiB, at mmap speed
        qemu.close()


@pytest.mark.timeout(60)
def test_pause_resume_epochs_and_stamp() -> None:
    with bare_qemu() as q:
        qemu = Qemu(q.qmp_path)
        assert qemu.status() == "running" and qemu.stamp() is None
        with qemu.paused():
            s1 = qemu.stamp()
            assert s1 is not None and qemu.status() == "paused"
            assert qemu.stamp() == s1  # stable while paused
        assert qemu.stamp() is None and qemu.status() == "running"
        qemu.pause()
        s2 = qemu.stamp()
        assert s2 is not None and s2 != s1  # a new pause is a new epoch
        qemu.resume()
        # A resume by someone else (here: HMP "cont" behind our back) is seen through the RESUME event.
        qemu.pause()
        qemu.qmp.hmp("cont")
        deadline = time.monotonic() + 5
        while qemu.stamp() is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert qemu.stamp() is None
        cpus = qemu.vcpus()
        assert [c.index for c in cpus] == [0] and cpus[0].thread_id > 0
        assert "rip" in qemu.registers()[0]
        qemu.close()


# --- QEMU 10.x outputs (Debian 13's 10.0.13, captured under TCG) ------------------------------------------
def test_mtree_10_memory_view_not_first() -> None:
    # 10.x lists the bus-master views ("No rendered FlatView") before the "memory" one; 7.2 after it.
    text = (DATA / "mtree-10-4G-pcram.txt").read_text()
    assert text.index('AS "i440FX"') < text.index('AS "memory"')
    rr = ram_ranges(text, {"pc.ram"})
    assert [(r.start, r.end, r.offset) for r in rr] == [
        (0, 0xBFFFF, 0), (0x100000, 0xBFFFFFFF, 0x100000), (4 * GiB, 5 * GiB - 1, 0xC0000000)]
    assert len(parse_flatview(text)) == 9


@pytest.mark.parametrize(("name", "region"), [("mtree-10-4G-m0.txt", "m0"), ("mtree-10-4G-linux.txt", "pc.ram")])
def test_mtree_10_shadowed_rom_pieces_merge(name: str, region: str) -> None:
    # After SeaBIOS (and Linux) ran, 0xc0000-0xfffff alternates ram/rom pieces of the RAM region itself.
    text = (DATA / name).read_text()
    view = parse_flatview(text)
    assert sum(1 for r in view if r.region == region and r.kind == "rom") >= 2
    for regions in ({region}, None):  # named backend, or the one backing most RAM
        rr = ram_ranges(text, regions)
        assert [(r.start, r.end, r.offset, r.region) for r in rr] == [
            (0, 0xBFFFFFFF, 0, region), (4 * GiB, 5 * GiB - 1, 0xC0000000, region)]


def test_parse_registers_10() -> None:
    # "info registers -a" of a 2-vCPU 6.1 guest (4 GiB) paused under QEMU 10.0.
    regs = parse_info_registers((DATA / "registers-10.txt").read_text())
    assert sorted(regs) == [0, 1]
    c0, c1 = regs[0], regs[1]
    assert c0["rip"] == 0xFFFFFFFFA8617A0B and c0["cr3"] == 0x41210000 and c0["cr4"] == 0x6B0
    assert c0["gs_base"] == 0xFFFF8B60FBC00000 and c0["tr_base"] == 0xFFFFFE0000003000
    assert c0["gdt_base"] == 0xFFFFFE0000001000 and c0["gdt_limit"] == 0x7F and c0["idt_limit"] == 0xFFF
    assert c0["efer"] == 0xD01 and c0["rflags"] == 0x246 and c0["hlt"] == 1 and c0["r8"] == 0xFFFFFFFFFFC60BAA
    assert c1["cr3"] == 0x100936000 and c1["fs_base"] == 0x7FF8284D4740 and c1["hlt"] == 0
    assert c1["rip"] == 0xFFFFFFFFA7D72FE4 and c1["r15"] == 0xFFFF8B60C18C0000 and c1["cs"] == 0x10
    for c in (c0, c1):  # FPU, SSE and debug registers are not taken for general ones
        assert not any(k.startswith(("xmm", "fpr", "dr", "fcw", "mxcsr", "st")) for k in c)
