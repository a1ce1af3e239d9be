"""The GDB remote-serial-protocol client and the GDB memory source, against real QEMU (SeaBIOS only).

Ground truth comes from QEMU itself through other paths: QMP ``query-status`` for the run state,
QMP ``pmemsave`` for memory, the CPU reset state for registers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aradia.errors import AradiaError, Busy, NotAttached, NotRAM, PageFault, ProtocolError
from aradia.proto.gdbrsp import (
    BP_SOFTWARE,
    WP_WRITE,
    GdbClient,
    GdbStub,
    StopEvent,
    checksum,
    decode_rle,
    escape,
    frame,
    parse_address,
    parse_stop_reply,
    parse_target_xml,
    unescape,
)
from aradia.proto.mtree import ram_ranges
from aradia.sources.base import Segment
from aradia.sources.gdbstub import GdbMemory
from aradia.trace.guardian import GuardedStub
from bare_qemu import BareQemu, bare_qemu

MIB = 1 << 20


# --- helpers ------------------------------------------------------------------------------------------
def qmp(path: str, command: str, **arguments: Any) -> Any:
    """One QMP command over a fresh connection (raw JSON, events skipped)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        f = s.makefile("rwb")
        json.loads(f.readline())
        for cmd in ({"execute": "qmp_capabilities"}, {"execute": command, "arguments": arguments}):
            f.write(json.dumps(cmd).encode() + b"\n")
            f.flush()
            while True:
                msg = json.loads(f.readline())
                if "error" in msg:
                    raise AssertionError(f"QMP {cmd['execute']}: {msg['error']}")
                if "return" in msg:
                    break
        return msg["return"]


def status(q: BareQemu) -> str:
    """QEMU's run state from QMP: "running", "paused", "debug", "prelaunch"..."""
    return str(qmp(q.qmp_path, "query-status")["status"])


def wait_status(q: BareQemu, want: str, timeout: float = 5.0) -> str:
    """Poll QMP until the run state is ``want`` (or the timeout); return the last state seen."""
    end = time.monotonic() + timeout
    state = status(q)
    while state != want and time.monotonic() < end:
        time.sleep(0.05)
        state = status(q)
    return state


def pmemsave(q: BareQemu, addr: int, size: int) -> bytes:
    """Guest-physical bytes as QEMU's QMP ``pmemsave`` sees them."""
    fd, path = tempfile.mkstemp(prefix="aradia-pmem-")
    os.close(fd)
    try:
        qmp(q.qmp_path, "pmemsave", val=addr, size=size, filename=path)
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# QEMU >= 8.1 no longer tells a connecting client that the VM ran (7.2 sent T02): like aradia's
# machine layer, the tests give the client QMP's answer.
QMP_OF: dict[str, str] = {}


def _hint(address: Any, kwargs: dict[str, Any]) -> None:
    if "was_running" not in kwargs and address in QMP_OF:
        kwargs["was_running"] = str(qmp(QMP_OF[address], "query-status")["status"]) == "running"


def connect(address: str, **kwargs: Any) -> GdbClient:
    """Connect, retrying while QEMU has not opened its stub yet."""
    _hint(address, kwargs)
    end = time.monotonic() + 10
    while True:
        try:
            return GdbClient(address, **kwargs)
        except NotAttached:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)


def _wait_listening(port: int, timeout: float = 10) -> None:
    """Wait until something listens on TCP ``port``, without connecting (a connection to the stub
    would become its client): QEMU opens its QMP socket before its GDB stub."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with open("/proc/net/tcp") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                    return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on port {port}")


@dataclass
class Vm:
    """A bare QEMU with a GDB stub."""

    q: BareQemu
    gdb: str


@contextlib.contextmanager
def gdb_qemu(*, paused: bool, smp: int = 2, unix: bool = False) -> Iterator[Vm]:
    """A SeaBIOS-only QEMU with ``-gdb``; killed by pid afterwards (bare_qemu's finaliser)."""
    if unix:
        sock_dir = tempfile.mkdtemp(prefix="aradia-gdb-")
        gdb = os.path.join(sock_dir, "gdb.sock")
        dev = f"unix:{gdb},server=on,wait=off"
    else:
        gdb = f"127.0.0.1:{free_port()}"
        dev = f"tcp:{gdb}"
    extra = ("-gdb", dev, *(("-S",) if paused else ()))
    q: BareQemu | None = None
    try:
        with bare_qemu(smp=smp, extra=extra) as q:
            if not unix:
                _wait_listening(int(gdb.rsplit(":", 1)[1]))
            QMP_OF[gdb] = q.qmp_path
            yield Vm(q, gdb)
    finally:
        if q is not None and q.proc.stderr is not None:
            q.proc.stderr.close()  # bare_qemu leaves its stderr pipe open
        if unix:
            with contextlib.suppress(OSError):
                os.unlink(gdb)
            with contextlib.suppress(OSError):
                os.rmdir(sock_dir)


@pytest.fixture
def vm() -> Iterator[Vm]:
    """A QEMU started with -S: the vCPUs sit at the reset vector."""
    with gdb_qemu(paused=True) as v:
        yield v


@pytest.fixture
def live_vm() -> Iterator[Vm]:
    """A QEMU whose SeaBIOS runs."""
    with gdb_qemu(paused=False) as v:
        yield v


# --- pure protocol pieces -----------------------------------------------------------------------------
@given(st.binary(max_size=5000))
def test_checksum_is_the_byte_sum(data: bytes) -> None:
    assert checksum(data) == sum(data) & 0xFF
    ascii_data = bytes(b & 0x7F for b in data)
    assert checksum(ascii_data) == sum(ascii_data) & 0xFF


@given(st.binary(max_size=600))
def test_escape_roundtrip(data: bytes) -> None:
    esc = escape(data)
    assert not any(c in esc for c in b"#$*")
    assert unescape(esc) == data


def test_frame_and_rle() -> None:
    assert frame(b"OK") == b"$OK#9a"
    assert decode_rle(b"0* ") == b"0000"  # ' ' = 32: three more repeats
    assert decode_rle(b"ab*\"c") == b"abbbbbbc"  # '"' = 34: five more
    with pytest.raises(ProtocolError):
        decode_rle(b"*!")
    with pytest.raises(ProtocolError):
        decode_rle(b"a*~" * 20000, limit=1000)


def test_parse_stop_reply() -> None:
    ev = parse_stop_reply(b"T05thread:p01.02;watch:8000;")
    assert (ev.kind, ev.signal, ev.thread, ev.watch_address) == ("signal", 5, "p01.02", 0x8000)
    assert parse_stop_reply(b"W00").ended
    assert parse_stop_reply(b"S02").signal == 2
    with pytest.raises(ProtocolError):
        parse_stop_reply(b"OK")


def test_parse_target_xml_strips_comments_and_follows_includes() -> None:
    files = {
        "target.xml": b'<?xml version="1.0"?><target><architecture>i386:x86-64</architecture>'
                      b'<xi:include href="core.xml"/><xi:include href="extra.xml"/></target>',
        "core.xml": b'<feature><reg name="rax" bitsize="64" regnum="0"/><!-- <reg name="bogus" bitsize="8"/>'
                    b'\n<reg name="bogus2" bitsize="8"/> --><reg name="eflags" bitsize="32"/></feature>',
        "extra.xml": b"<feature><reg name='CR3' bitsize='64' regnum='0x10'/></feature>",
    }
    arch, regs = parse_target_xml(lambda name: files[name])
    assert arch == "i386:x86-64"
    got = [(r.name, r.regnum, r.bitsize) for r in regs]
    assert got == [("rax", 0, 64), ("eflags", 1, 32), ("cr3", 16, 64)]
    files["core.xml"] = b'<xi:include href="target.xml"/>'
    with pytest.raises(ProtocolError):
        parse_target_xml(lambda name: files[name])


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:1234") == (socket.AF_INET, ("127.0.0.1", 1234))
    assert parse_address("tcp::1234") == (socket.AF_INET, ("127.0.0.1", 1234))
    assert parse_address("unix:/run/g.sock,server=on") == (socket.AF_UNIX, "/run/g.sock")
    assert parse_address("/run/g.sock") == (socket.AF_UNIX, "/run/g.sock")
    with pytest.raises(AradiaError):
        parse_address("nonsense")


MTREE_SAMPLE = """\
FlatView #2
 AS "memory", root: system
 AS "cpu-memory-0", root: system
 Root memory region: system
  0000000000000000-000000000009ffff (prio 0, ram): pc.ram
  00000000000a0000-00000000000bffff (prio 1, i/o): vga-lowmem
  00000000000c0000-00000000000cafff (prio 0, rom): pc.ram @00000000000c0000
  00000000000cb000-00000000000cdfff (prio 0, ram): pc.ram @00000000000cb000
  0000000000100000-000000000fffffff (prio 0, ram): pc.ram @0000000000100000
  00000000fd000000-00000000fdffffff (prio 1, ram): vga.vram
  00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios

FlatView #3
 AS "I/O", root: io
  0000000000000000-0000000000000007 (prio 0, i/o): dma-chan
"""


def test_parse_mtree_ram() -> None:
    want = [(0, 0xA0000), (0xC0000, 0xE000), (0x100000, 0xFF00000)]
    assert [(r.start, r.size) for r in ram_ranges(MTREE_SAMPLE, {"pc.ram"})] == want
    assert [(r.start, r.size) for r in ram_ranges(MTREE_SAMPLE)] == want  # no names: the biggest RAM region
    with pytest.raises(ProtocolError):
        ram_ranges("FlatView #0\n AS \"I/O\", root: io\n")


# --- against QEMU -------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_connect_reads_target_description(vm: Vm) -> None:
    with connect(vm.gdb) as c:
        assert c.architecture == "i386:x86-64"
        names = [r.name for r in c.register_map]
        for name in ("rax", "rip", "eflags", "cs", "fs_base", "cr0", "cr2", "cr3", "cr4", "cr8", "efer"):
            assert name in names
        assert "cs_base" not in names  # commented out in QEMU's i386-64bit.xml
        assert c.multiprocess and c.packet_size >= 0x1000
        assert not c.vm_was_running  # -S: nothing ran, so connecting paused nothing
        assert c.threads() == ["p01.01", "p01.02"]
    assert status(vm.q) == "prelaunch"  # closing left the never-started VM alone


@pytest.mark.timeout(60)
def test_registers_at_reset(vm: Vm) -> None:
    with connect(vm.gdb) as c:
        regs = c.registers()
        assert regs["rip"] == 0xFFF0 and regs["cs"] == 0xF000  # the x86 reset vector
        assert regs["cr0"] == 0x60000010 and regs["cr3"] == 0 and regs["efer"] == 0
        assert c.read_register("cr0") == regs["cr0"]
        assert c.registers("p01.02")["cr0"] == 0x60000010
        c.write_register("cr3", 0x5000, "p01.02")
        assert c.read_register("cr3", "p01.02") == 0x5000
        assert c.read_register("cr3", "p01.01") == 0  # per vCPU
        c.write_register("cr3", 0, "p01.02")
        with pytest.raises(AradiaError, match="no register"):
            c.read_register("nosuchreg")
        with pytest.raises(AradiaError, match="does not fit"):
            c.write_register("eflags", 1 << 40)


@pytest.mark.timeout(120)
def test_physical_write_read_across_packets(vm: Vm) -> None:
    payload = os.urandom(3 * 4096 + 123)
    base = 0x300000 + 7  # unaligned, so chunks straddle the stub's 2048-byte m limit
    with connect(vm.gdb) as c:
        c.write_memory(base, payload, physical=True)
        assert c.read_memory(base, len(payload), physical=True) == payload
        assert pmemsave(vm.q, base, len(payload)) == payload  # QEMU agrees through another path
        cuts = [(0, 1), (2040, 16), (2047, 2), (2048, 2048), (1, 4095), (4000, 5000), (0, len(payload))]
        for off, size in cuts:
            assert c.read_memory(base + off, size, physical=True) == payload[off:off + size], (off, size)
        # paging is off at reset: virtual addresses are physical ones
        assert c.read_memory(base, 4096) == payload[:4096]
        # pipelined and one-at-a-time reads agree
        big = c.read_memory(0x100000, MIB, physical=True)
        c.window = 1
        assert c.read_memory(0x100000, MIB, physical=True) == big
        assert pmemsave(vm.q, 0x100000, MIB) == big


@pytest.mark.timeout(60)
def test_unmapped_and_not_ram(vm: Vm) -> None:
    with connect(vm.gdb) as c:
        with pytest.raises(PageFault, match="0xffff800000000000"):
            c.read_memory(0xFFFF800000000000, 16)
        mem = GdbMemory(c)  # probes the RAM map over the stub's monitor channel
        # at -S SeaBIOS has not shadowed itself yet: 0xc0000-0xfffff is ROM, not RAM
        assert [(r.start, r.end) for r in mem.ranges()] == [(0, 0xC0000), (0x100000, 256 * MIB)]
        assert mem.kind == "gdb" and mem.writable
        with pytest.raises(NotRAM, match="0x10000000"):
            mem.read(0x10000000, 16)
        with pytest.raises(NotRAM):
            mem.read(0x10000000 - 8, 16)  # straddles the end of RAM
        with pytest.raises(NotRAM):
            mem.write(0xFEE00000, b"\0")
        mem.write(0x10000000 - 8, b"12345678")
        assert mem.read(0x10000000 - 8, 8) == b"12345678"
        assert "VM status" in c.monitor("info status")


# A 16-bit loop at 0x7000: inc ax; mov [0x8000], ax; inc bx; jmp 0x7000
LOOP = bytes([0x40, 0xA3, 0x00, 0x80, 0x43, 0xEB, 0xF9])


def _start_loop(c: GdbStub) -> None:
    c.write_memory(0x7000, LOOP, physical=True)
    for name, value in (("cs", 0), ("rip", 0x7000), ("rax", 0), ("rbx", 0), ("rcx", 0)):
        c.write_register(name, value, "p01.01")


@pytest.mark.timeout(90)
def test_breakpoint_hit_step_and_remove(vm: Vm) -> None:
    with connect(vm.gdb) as c:
        _start_loop(c)
        c.set_breakpoint(0x7004, BP_SOFTWARE)
        assert c.breakpoints == [(0x7004, BP_SOFTWARE, 1)]
        c.cont()
        ev = c.wait_stop(10)
        assert ev is not None and ev.signal == 5 and ev.thread == "p01.01"
        assert c.read_register("rip", "p01.01") == 0x7004
        assert c.read_memory(0x7004, 1, physical=True) == b"\x43"  # no 0xCC planted under TCG
        ax = c.read_register("rax", "p01.01") & 0xFFFF
        assert ax >= 1
        ev = c.step("p01.01", until_pc_changes=True)
        assert ev.signal == 5
        assert c.read_register("rip", "p01.01") == 0x7005
        assert c.read_register("rbx", "p01.01") & 0xFFFF == ax  # inc bx executed once
        c.remove_breakpoint(0x7004, BP_SOFTWARE)
        assert c.breakpoints == []
        c.cont()
        assert c.wait_stop(0.5) is None  # nothing stops it now
        assert status(vm.q) == "running"
        ev = c.interrupt()  # it was running: the stop it reports is our interrupt (SIGINT) of the vCPU
        assert ev is not None and (ev.kind, ev.signal, ev.thread) == ("signal", 2, "p01.01"), ev
        assert status(vm.q) == "paused"
        assert c.read_register("rax", "p01.01") & 0xFFFF != ax
        # a write watchpoint on the loop's store
        c.set_breakpoint(0x8000, WP_WRITE, 2)
        c.cont()
        ev = c.wait_stop(10)
        assert ev is not None and ev.watch_address == 0x8000
        c.remove_breakpoint(0x8000, WP_WRITE, 2)
        # a GDB write invalidates translated code: patch "inc bx" into "inc cx" while it loops
        c.cont()
        time.sleep(0.1)
        c.write_memory(0x7004, b"\x41", physical=True)  # stops, writes, continues
        assert status(vm.q) == "running"
        time.sleep(0.2)
        c.interrupt()
        assert c.read_register("rcx", "p01.01") & 0xFFFF > 0


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["GdbClient", "GuardedStub"])
def test_the_same_scenario_through_either_gdb_stub(vm: Vm, kind: str) -> None:
    """The two implementations of the GdbStub interface, driven by the same code, do the same."""
    stub: GdbStub = connect(vm.gdb) if kind == "GdbClient" else GuardedStub(vm.gdb, was_running=False)
    try:
        assert stub.threads() == ["p01.01", "p01.02"]
        _start_loop(stub)
        assert stub.read_register("rip", "p01.01") == 0x7000
        stub.set_breakpoint(0x7004)
        stub.cont()
        ev = stub.wait_stop(10)
        assert isinstance(ev, StopEvent) and (ev.kind, ev.signal, ev.thread) == ("signal", 5, "p01.01")
        assert stub.registers("p01.01")["rip"] == 0x7004
        ax = stub.read_register("rax", "p01.01") & 0xFFFF
        ev = stub.step("p01.01", until_pc_changes=True)
        assert isinstance(ev, StopEvent) and ev.signal == 5
        assert stub.read_register("rip", "p01.01") == 0x7005
        assert stub.read_register("rbx", "p01.01") & 0xFFFF == ax  # inc bx executed once
        stub.remove_breakpoint(0x7004)
        stub.set_breakpoint(0x8000, WP_WRITE, 2)
        stub.cont()
        ev = stub.wait_stop(10)
        assert isinstance(ev, StopEvent) and (ev.watch_address, ev.watch_kind) == (0x8000, "watch")
        stub.remove_breakpoint(0x8000, WP_WRITE, 2)
        stub.cont()
        assert stub.wait_stop(0.5) is None  # nothing armed any more
        assert status(vm.q) == "running"
        ev = stub.interrupt()
        assert isinstance(ev, StopEvent) and ev.signal == 2
        assert status(vm.q) == "paused"
        assert stub.monitor("info status").strip() == "VM status: paused"
        stub.write_memory(0x7004, b"\x41", physical=True)  # inc bx -> inc cx
        assert stub.read_memory(0x7000, len(LOOP), physical=True) == LOOP[:4] + b"\x41" + LOOP[5:]
    finally:
        stub.close()


def hmp_registers(q: BareQemu) -> dict[str, int]:
    """vCPU 0's rax, rbx and rip as QEMU's own HMP ``info registers`` prints them (ground truth; EAX..
    EIP outside long mode, as here)."""
    text = qmp(q.qmp_path, "human-monitor-command", **{"command-line": "info registers"})
    return {"r" + m[1].lower(): int(m[2], 16) for m in re.finditer(r"\b[RE](AX|BX|IP)=([0-9a-f]+)", text)}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["GdbClient", "GuardedStub"])
def test_hot_path_through_either_gdb_stub(vm: Vm, kind: str) -> None:
    """Per hit: the registers come with the stop, one resume writes RIP past the instruction and runs."""
    stub: GdbStub = connect(vm.gdb) if kind == "GdbClient" else GuardedStub(vm.gdb, was_running=False)
    try:
        _start_loop(stub)
        stub.set_breakpoint(0x7004)  # on "inc bx": every hit skips it by moving RIP to 0x7005
        stub.resume()
        seen: list[dict[str, int]] = []
        for _ in range(20):
            ev = stub.wait_stop(10, registers=True)
            assert isinstance(ev, StopEvent) and ev.thread == "p01.01" and ev.registers is not None
            truth = hmp_registers(vm.q)
            assert {k: ev.registers[k] for k in ("rax", "rbx", "rip")} == truth
            seen.append(ev.registers)
            stub.resume({"rip": 0x7005}, "p01.01")
        assert [r["rip"] for r in seen] == [0x7004] * 20
        ax = [r["rax"] & 0xFFFF for r in seen]
        assert ax == list(range(ax[0], ax[0] + 20))  # one loop iteration per hit, none lost
        assert {r["rbx"] for r in seen} == {0}  # "inc bx" was skipped every time
        assert stub.wait_stop(10) is not None  # (the 21st hit)
        # without the write the continue stays on the breakpoint: the same iteration reports again
        stub.resume(None, "p01.01")
        again = stub.wait_stop(10, registers=True)
        assert again is not None and again.registers is not None
        assert (again.registers["rip"], again.registers["rax"] & 0xFFFF) == (0x7004, ax[-1] + 1)
        # bad writes are refused before anything runs
        with pytest.raises(AradiaError, match="no register 'nosuch'"):
            stub.resume({"nosuch": 1}, "p01.01")
        with pytest.raises(AradiaError, match="does not fit register rip"):
            stub.resume({"rip": 1 << 64}, "p01.01")
        assert status(vm.q) == "debug" and hmp_registers(vm.q)["rip"] == 0x7004
        stub.remove_breakpoint(0x7004)
        stub.resume({"rbx": 0x4242_0000}, "p01.01")  # (a write that is not the PC: P, then c)
        assert stub.wait_stop(0.5) is None  # nothing armed: it runs
        assert status(vm.q) == "running"
        stub.interrupt()
        bx = hmp_registers(vm.q)["rbx"]
        assert bx >> 16 == 0x4242 and bx & 0xFFFF > 0  # written, then the 16-bit "inc bx" ran on
    finally:
        stub.close()


@pytest.mark.timeout(60)
def test_registers_and_monitor_commands_in_one_exchange(vm: Vm) -> None:
    with connect(vm.gdb) as c:
        c.write_registers({"rax": 0x1111, "rbx": 0x2222}, "p01.01")
        regs, said = c.registers_and_monitor("p01.01", ["info status", "info version"])
        assert {k: v for k, v in hmp_registers(vm.q).items() if k != "rip"} == {"rax": 0x1111, "rbx": 0x2222}
        assert (regs["rax"], regs["rbx"], regs["rip"]) == (0x1111, 0x2222, hmp_registers(vm.q)["rip"])
        version = qmp(vm.q.qmp_path, "query-version")["qemu"]
        assert status(vm.q) == "prelaunch"
        assert said is not None and said.startswith("VM status: paused (prelaunch)\n")
        assert f"{version['major']}.{version['minor']}.{version['micro']}" in said  # both outputs, in order
        assert c.registers_and_monitor("p01.01") == (c.registers("p01.01"), "")  # no commands: no output


@pytest.mark.timeout(60)
def test_sstep_flags_and_modes_restored_on_close(vm: Vm) -> None:
    with connect(vm.gdb) as c:
        assert c.sstep_bits() == {"ENABLE": 1, "NOIRQ": 2, "NOTIMER": 4}
        before = c.sstep_flags()
        c.set_sstep_flags(1)
        assert c.sstep_flags() == 1
        c.read_memory(0, 16, physical=True)  # leaves the stub in physical mode
        _start_loop(c)
        c.set_breakpoint(0x7000, BP_SOFTWARE)
    with connect(vm.gdb) as c:
        assert c.sstep_flags() == before
        assert c.request("qqemu.PhyMemMode") == b"0"
        _start_loop(c)
        c.cont()  # the previous client's breakpoint is gone
        assert c.wait_stop(0.5) is None
        c.interrupt()


@pytest.mark.timeout(60)
def test_close_leaves_a_paused_vm_paused(live_vm: Vm) -> None:
    qmp(live_vm.q.qmp_path, "stop")
    with connect(live_vm.gdb) as c:
        assert not c.vm_was_running
        c.read_memory(0, 16, physical=True)
    time.sleep(0.2)
    assert status(live_vm.q) == "paused"  # D would have resumed it: close() did not send it


@pytest.mark.timeout(90)
def test_second_client_is_busy(live_vm: Vm) -> None:
    a = connect(live_vm.gdb)
    try:
        assert a.vm_was_running
        a.restore_run_state()
        assert wait_status(live_vm.q, "running") == "running"
        t = time.monotonic()
        with pytest.raises(Busy, match="another client"):
            GdbClient(live_vm.gdb)
        assert time.monotonic() - t < 2.5
        # without the /proc/net check the stub's silence is the tell
        t = time.monotonic()
        with pytest.raises(Busy, match="did not answer"):
            GdbClient(live_vm.gdb, check_busy=False, busy_timeout=1.0)
        assert time.monotonic() - t < 3.0
        # the holder is unaffected: it reads what QEMU itself has there (the firmware's interrupt vectors)
        assert a.read_memory(0, 64, physical=True) == pmemsave(live_vm.q, 0, 64) != bytes(64)
    finally:
        a.close()
    # QEMU now accepts the queued socket (pausing the VM); its keeper detaches, so the VM runs again
    time.sleep(0.5)
    assert wait_status(live_vm.q, "running") == "running"
    c = connect(live_vm.gdb)
    c.close()


@pytest.mark.timeout(60)
def test_unix_socket_and_busy() -> None:
    with gdb_qemu(paused=True, unix=True) as v, connect(v.gdb) as c:
        assert c.read_register("rip") == 0xFFF0
        with pytest.raises(Busy):
            GdbClient(v.gdb)


@pytest.mark.timeout(60)
def test_qemu_killed_while_connected(live_vm: Vm) -> None:
    c = connect(live_vm.gdb)
    c.restore_run_state()
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            c.wait_stop(30)
        except BaseException as e:
            errors.append(e)

    th = threading.Thread(target=waiter)
    th.start()
    time.sleep(0.2)
    os.kill(live_vm.q.pid, signal.SIGKILL)
    th.join(5)
    assert not th.is_alive()
    assert errors and isinstance(errors[0], NotAttached)
    t = time.monotonic()
    with pytest.raises(NotAttached):
        c.read_memory(0, 16, physical=True)
    assert time.monotonic() - t < 1
    c.close()  # no error on a dead connection


@pytest.mark.timeout(60)
def test_qemu_quit_while_connected(vm: Vm) -> None:
    c = connect(vm.gdb)
    c.read_memory(0, 16, physical=True)
    qmp(vm.q.qmp_path, "quit")
    t = time.monotonic()
    with pytest.raises(NotAttached):
        for _ in range(100):
            c.read_memory(0, 16, physical=True)
            time.sleep(0.05)
    assert time.monotonic() - t < 5
    with pytest.raises(NotAttached):
        GdbClient(vm.gdb)  # refused


@pytest.mark.timeout(120)
def test_live_reads_keep_the_vm_running(live_vm: Vm) -> None:
    c = connect(live_vm.gdb)
    try:
        assert c.vm_was_running and status(live_vm.q) == "paused"  # connecting paused it
        mem = GdbMemory(c)
        assert wait_status(live_vm.q, "running") == "running"  # the source continued it
        pattern = os.urandom(0x10000)
        mem.write(0x900000, pattern)  # stop, write, continue
        assert wait_status(live_vm.q, "running") == "running"
        n = 50
        t = time.perf_counter()
        for _ in range(n):
            assert mem.read(0x900000, 0x10000) == pattern
        cost = (time.perf_counter() - t) / n
        assert status(live_vm.q) == "running"
        print(f"live 64 KiB read (stop, read, continue): {cost * 1e3:.2f} ms")
        assert pmemsave(live_vm.q, 0x900000, 0x10000) == pattern
        # paused by QMP while we believed it ran: reads leave it paused
        qmp(live_vm.q.qmp_path, "stop")
        time.sleep(0.1)
        assert mem.read(0x900000, 4096) == pattern[:4096]
        time.sleep(0.1)
        assert status(live_vm.q) == "paused"
        # resumed by QMP while we believed it stopped: our packet is eaten, resent, and it runs again
        qmp(live_vm.q.qmp_path, "cont")
        assert mem.read(0x900000, 4096) == pattern[:4096]
        assert wait_status(live_vm.q, "running", 2) == "running"
        ev = c.wait_stop(0.2)  # the QMP stop was reported as an event, not taken for ours
        assert ev is not None and ev.signal == 2
    finally:
        c.close()
    assert wait_status(live_vm.q, "running") == "running"


@pytest.mark.timeout(60)
def test_step_into_a_dead_halt_times_out_cleanly(vm: Vm) -> None:
    with connect(vm.gdb) as c:
        c.write_memory(0x7000, b"\xfa\xf4\xeb\xfd", physical=True)  # cli; hlt; jmp back to hlt
        c.write_register("cs", 0, "p01.01")
        c.write_register("rip", 0x7001, "p01.01")
        t = time.monotonic()
        with pytest.raises(AradiaError, match="did not finish"):
            c.step("p01.01", timeout=1.0)
        assert time.monotonic() - t < 4
        assert not c.running and status(vm.q) == "paused"
        assert c.read_memory(0x7000, 4, physical=True) == b"\xfa\xf4\xeb\xfd"  # still usable


@pytest.mark.timeout(120)
def test_concurrent_reads_on_a_live_vm(live_vm: Vm) -> None:
    c = connect(live_vm.gdb)
    try:
        mem = GdbMemory(c)
        patterns = {0x800000 + i * 0x40000: os.urandom(0x9000) for i in range(4)}
        for addr, data in patterns.items():
            mem.write(addr, data)
        stop_seen: list[object] = []
        failures: list[BaseException] = []

        def reader(addr: int, data: bytes) -> None:
            try:
                for i in range(40):
                    off = (i * 0x351) % 0x8000
                    assert mem.read(addr + off, 0x1000) == data[off:off + 0x1000]
            except BaseException as e:
                failures.append(e)

        def waiter() -> None:
            try:
                stop_seen.append(c.wait_stop(3))
            except BaseException as e:
                failures.append(e)

        threads = [threading.Thread(target=reader, args=item) for item in patterns.items()]
        threads.append(threading.Thread(target=waiter))
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert not failures, failures
        assert stop_seen == [None]  # our own interrupts are not reported as stop events
        assert status(live_vm.q) == "running"
        for addr, data in patterns.items():
            assert pmemsave(live_vm.q, addr, len(data)) == data
    finally:
        c.close()


CRASHING_CLIENT = """
import sys, time
from aradia.proto.gdbrsp import GdbClient, BP_SOFTWARE
c = GdbClient(sys.argv[1])
c.write_memory(0x7000, bytes.fromhex(sys.argv[2]), physical=True)
c.write_register("cs", 0, "p01.01")
c.write_register("rip", 0x7000, "p01.01")
c.set_breakpoint(0x7004, BP_SOFTWARE)
c.cont()
print("hit" if c.wait_stop(10) else "miss", flush=True)
time.sleep(60)
"""


@pytest.mark.timeout(90)
def test_stale_breakpoint_of_a_killed_client_is_cleared(vm: Vm) -> None:
    proc = subprocess.Popen([sys.executable, "-c", CRASHING_CLIENT, vm.gdb, LOOP.hex()],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "hit"
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert status(vm.q) == "debug"  # frozen at the dead client's breakpoint, which stays armed
    c = connect(vm.gdb)
    try:
        assert c.cleared_stale and c.vm_was_running  # detached (clearing it), then reconnected
        c.restore_run_state()
        assert c.wait_stop(0.5) is None  # the loop runs through 0x7004 now
        assert status(vm.q) == "running"
    finally:
        c.close()
    assert wait_status(vm.q, "running") == "running"


@pytest.mark.timeout(60)
def test_close_respects_run_state_changed_over_qmp(live_vm: Vm) -> None:
    # we keep it running, QMP pauses it: closing must not resume it
    c = connect(live_vm.gdb)
    GdbMemory(c, [Segment(0, 256 * MIB, 0)]).read(0x1000, 8)
    assert status(live_vm.q) == "running"
    qmp(live_vm.q.qmp_path, "stop")
    time.sleep(0.1)
    c.close()
    time.sleep(0.2)
    assert status(live_vm.q) == "paused"
    # we found it paused, QMP resumes it while we work on it: closing leaves it running
    c = connect(live_vm.gdb)
    assert not c.vm_was_running
    c.read_memory(0, 8, physical=True)
    qmp(live_vm.q.qmp_path, "cont")
    c.close()  # restoring the physical mode finds the VM running: stop, restore, detach
    assert wait_status(live_vm.q, "running") == "running"
    c = connect(live_vm.gdb)
    assert c.vm_was_running and c.request("qqemu.PhyMemMode") == b"0"
    c.close()


@pytest.mark.timeout(60)
def test_read_survives_a_frozen_qemu(vm: Vm) -> None:
    # silence makes the client probe (QEMU >= 8.1 eats packets sent to a running VM without a
    # word); a merely slow QEMU must still give every reply exactly once
    with connect(vm.gdb) as c:
        data = c.read_memory(0x100000, 256 * 1024, physical=True)
        os.kill(vm.q.pid, signal.SIGSTOP)
        timer = threading.Timer(0.8, os.kill, (vm.q.pid, signal.SIGCONT))
        timer.start()
        try:
            t = time.monotonic()
            assert c.read_memory(0x100000, 256 * 1024, physical=True) == data
            assert time.monotonic() - t >= 0.7
        finally:
            timer.join()
            os.kill(vm.q.pid, signal.SIGCONT)
        assert c.registers()["rip"] == 0xFFF0
        assert status(vm.q) == "prelaunch"  # nothing was resumed


@pytest.mark.timeout(60)
def test_memory_source_owning_its_connection(live_vm: Vm) -> None:
    ram = [Segment(0, 0xA0000, 0), Segment(0x100000, 255 * MIB, 0x100000)]
    kw: dict[str, Any] = {}
    _hint(live_vm.gdb, kw)
    with GdbMemory.connect(live_vm.gdb, ram, **kw) as mem:
        assert wait_status(live_vm.q, "running") == "running"
        mem.write(0x200000, b"aradia")
        assert mem.read(0x200000, 6) == b"aradia" == pmemsave(live_vm.q, 0x200000, 6)
        with pytest.raises(NotRAM):
            mem.read(0xA0000, 1)
    c = connect(live_vm.gdb)  # the source closed its connection: the stub is free again
    c.close()
    assert wait_status(live_vm.q, "running") == "running"
