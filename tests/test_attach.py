"""Attach to live guests and dumps: every memory path against ground truth from inside the guest.

One guest per kernel series (RAM in a shared file, GDB stub on), so every path reads the same RAM:
proc-mem, shared-file, gdb, and ELF / raw / LiME dumps aradia writes of it.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from aradia.errors import NotRAM, PageFault
from aradia.lab.launcher import Guest
from aradia.lab.memhold import MemHold
from aradia.linux.identify import find_banner, find_vmcoreinfo
from aradia.sources import dumpwrite
from aradia.sources.base import PhysicalMemory
from aradia.vm import VM, attach, open_dump
from guest_truth import proc_maps

LIVE_PATHS = ("shared-file", "proc-mem", "gdb")
DUMP_FORMATS = ("elf", "raw", "lime")
SERIES = ("5.10", "6.1", "6.12")


class Setup:
    """A booted guest, a memhold process in it, live handles on every path and dumps of it."""

    def __init__(self, guest: Guest, tmp: Path) -> None:
        self.guest = guest
        self.truth = guest.run("cat /proc/version").rstrip("\n")
        self.hold: MemHold = guest.start_memhold(seed=0x5EED0000 + guest.pid)
        self.vms: dict[str, VM] = {p: attach(f"qmp:{guest.qmp_path}", memory=p) for p in ("shared-file",)}
        # QMP serves one client: the other live paths share that client's QEMU control.
        qemu = self.vms["shared-file"].machine
        assert qemu is not None
        self.mem: dict[str, PhysicalMemory] = {p: qemu.memory(p) for p in LIVE_PATHS}
        with qemu.paused():
            for fmt in DUMP_FORMATS:
                out = tmp / f"guest.{fmt}"
                if fmt == "elf":
                    dumpwrite.write_elf(self.mem["shared-file"], out,
                                        vmcoreinfo=find_vmcoreinfo(self.mem["shared-file"]))
                else:
                    getattr(dumpwrite, f"write_{fmt}")(self.mem["shared-file"], out)
                self.vms[f"dump-{fmt}"] = open_dump(str(out))
                self.mem[f"dump-{fmt}"] = self.vms[f"dump-{fmt}"].memory

    def close(self) -> None:
        for m in self.mem.values():
            with contextlib.suppress(Exception):
                m.close()
        for vm in self.vms.values():
            vm.close()


@pytest.fixture(scope="module", params=SERIES)
def setup(request: pytest.FixtureRequest, launch_guest: Callable[..., Guest],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    guest = launch_guest(request.param, shared_memory=True, gdb=True, smp=2)
    s = Setup(guest, tmp_path_factory.mktemp(f"dumps-{request.param}"))
    try:
        yield s
    finally:
        s.close()
        guest.stop()


ALL_PATHS = LIVE_PATHS + tuple(f"dump-{f}" for f in DUMP_FORMATS)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("path", ALL_PATHS)
def test_banner_equals_proc_version(setup: Setup, path: str) -> None:
    assert find_banner(setup.mem[path]) == setup.truth


@pytest.mark.timeout(120)
@pytest.mark.parametrize("path", ALL_PATHS)
def test_pattern_by_physical_address(setup: Setup, path: str) -> None:
    hold, mem = setup.hold, setup.mem[path]
    assert len(hold.pages) == hold.size // 4096 and all(hold.pages), "pagemap gave no PFNs"
    for i, paddr in enumerate(hold.pages):
        assert mem.read(paddr, 4096) == hold.expected(i * 4096, 4096), f"page {i} at {paddr:#x}"


def memhold_cr3(vm: VM, hold: MemHold) -> int:
    """The page-table root of the memhold process, taken from a vCPU caught running it.

    A vCPU is taken for memhold only when its RIP is in one of memhold's executable mappings (from the
    guest's /proc/PID/maps: its text, or the vDSO its clock calls run) *and* its CR3 maps every page of
    memhold's region to the frame the guest's /proc/self/pagemap gave. Other static programs
    (busybox) run at the same addresses, but their page tables do not map memhold's region: a CR3
    is never taken on the RIP alone.
    """
    code = [(lo, hi) for lo, hi, perms, *_ in proc_maps(hold.guest, hold.pid) if "x" in perms]
    assert code, "memhold has no executable mapping"
    rejected: list[str] = []
    for _ in range(5):
        with hold.spinning(3):
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                with vm.paused():
                    for c in vm.cpus():
                        if c.cpl != 3 or not any(lo <= c.rip < hi for lo, hi in code):
                            continue
                        try:
                            frames = [vm.translate(hold.vaddr + i * 4096, cr3=c.cr3, la57=c.la57).paddr
                                      for i in range(len(hold.pages))]
                        except PageFault:
                            rejected.append(f"cr3 {c.cr3:#x} (rip {c.rip:#x}) does not map the region")
                            continue
                        if frames == hold.pages:
                            return c.cr3
                        rejected.append(f"cr3 {c.cr3:#x} (rip {c.rip:#x}) maps the region elsewhere")
                time.sleep(0.05)
    raise AssertionError(f"never caught memhold on a vCPU; rejected: {rejected[-5:]}")


@pytest.mark.timeout(120)
def test_pattern_by_virtual_address_through_process_cr3(setup: Setup) -> None:
    hold = setup.hold
    cr3 = memhold_cr3(setup.vms["shared-file"], hold)
    for path in ("shared-file", "dump-elf"):
        v = setup.vms[path]
        assert v.read_virt(hold.vaddr, hold.size, cr3=cr3) == hold.expected()
        for i in (0, 7, hold.size // 4096 - 1):
            assert v.translate(hold.vaddr + i * 4096 + 5, cr3=cr3).paddr == hold.pages[i] + 5


@pytest.mark.timeout(120)
@pytest.mark.parametrize("path", LIVE_PATHS)
def test_write_is_seen_by_the_guest(setup: Setup, path: str) -> None:
    hold, mem = setup.hold, setup.mem[path]
    index = LIVE_PATHS.index(path) + 3
    data = os.urandom(48)
    off = index * 4096 + 100
    mem.write(hold.pages[index] + 100, data)
    assert hold.dump(off, len(data)) == data
    mem.write(hold.pages[index] + 100, hold.expected(off, len(data)))  # restore for other tests
    assert hold.check() == (0, -1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", ALL_PATHS)
def test_read_outside_ram_names_the_address(setup: Setup, path: str) -> None:
    mem = setup.mem[path]
    top = mem.ranges()[-1].end
    with pytest.raises(NotRAM, match=f"{top:#x}"):
        mem.read(top, 16)
    with pytest.raises(NotRAM):
        mem.read(top - 8, 16)


@pytest.mark.timeout(120)
def test_gdb_stub_started_at_run_time(launch_guest: Callable[..., Guest]) -> None:
    """QEMU started without -gdb: aradia starts a stub through HMP and reads RAM through it."""
    guest = launch_guest("6.1")
    assert guest.gdb_port is None
    truth = guest.run("cat /proc/version").rstrip("\n")
    with attach(f"qmp:{guest.qmp_path}", memory="gdb") as vm:
        assert vm.memory.kind == "gdb"
        assert find_banner(vm.memory) == truth
        assert vm.status() == "running"  # reads through the stub leave the guest running
    assert guest.run("echo alive").strip() == "alive"


@pytest.mark.timeout(120)
def test_forwarded_qmp_socket_falls_back_to_a_verified_path(launch_guest: Callable[..., Guest],
                                                             tmp_path: Path) -> None:
    """Through a forwarding socket the peer pid is the forwarder's: aradia must notice, not read it."""
    import socket
    import threading

    guest = launch_guest("6.1", shared_memory=False)
    truth = guest.run("cat /proc/version").rstrip("\n")
    proxy_path = str(tmp_path / "fwd.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(proxy_path)
    srv.listen(1)

    def pump(a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                b.sendall(data)
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)

    def serve() -> None:
        conn, _ = srv.accept()
        upstream = socket.socket(socket.AF_UNIX)
        upstream.connect(str(guest.qmp_path))
        threading.Thread(target=pump, args=(conn, upstream), daemon=True).start()
        pump(upstream, conn)

    threading.Thread(target=serve, daemon=True).start()
    with attach(f"qmp:{proxy_path}") as vm:
        assert vm.machine is not None and vm.machine.pid == os.getpid()  # the forwarder, not QEMU
        assert vm.memory.kind == "gdb"  # proc-mem of the wrong process was tried and rejected
        assert find_banner(vm.memory) == truth
    srv.close()
