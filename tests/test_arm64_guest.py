"""Debian 6.1 and 6.12 arm64 guests under qemu-system-aarch64 -M virt -cpu max (KASLR on): attach, RAM,
paging, kallsyms.

Ground truth comes from inside the guest: its /proc/version, /proc/iomem and /proc/kallsyms, and the
memhold program's own report (its pattern, and the frames /proc/self/pagemap gives for its pages).
The kernel's placement and kallsyms come from the VMCOREINFO text the kernel leaves in RAM.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator

import pytest

from aradia.errors import PageFault
from aradia.lab.launcher import Guest
from aradia.lab.memhold import MemHold
from aradia.linux.arm64_layout import find_layout, kallsyms
from aradia.linux.identify import find_banner
from aradia.machine.arch import ARM64, Arm64
from aradia.machine.arch.arm64 import VIRT_RAM_BASE
from aradia.vm import VM, attach
from guest_truth import guest_kallsyms, kcore_read, proc_maps

BootGuest = Callable[..., contextlib.AbstractContextManager[Guest]]

SERIES = ("6.1", "6.12")
GUEST_OPTIONS = {"shared_memory": True, "gdb": True, "memory": "256M", "boot_timeout": 180}

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module", params=SERIES)
def guest(request: pytest.FixtureRequest, boot_guest: BootGuest) -> Iterator[Guest]:
    """One arm64 guest per kernel series, stopped before the next boots."""
    with boot_guest(request.param, arch="arm64", **GUEST_OPTIONS) as g:
        yield g


@pytest.fixture(scope="module")
def vm(guest: Guest) -> Iterator[VM]:
    with attach(f"qmp:{guest.qmp_path}") as v:
        yield v


@pytest.fixture(scope="module")
def hold(guest: Guest) -> Iterator[MemHold]:
    h = guest.start_memhold(seed=0xA64_0000 + guest.pid)
    yield h
    h.stop()


def test_guest_is_arm64_and_attach_detects_it(guest: Guest, vm: VM) -> None:
    assert guest.run("uname -m").strip() == "aarch64"
    assert isinstance(vm.arch, Arm64) and vm.arch.name == "arm64"
    assert vm.memory.kind == "shared-file"
    # virt's RAM starts at 1 GiB; the shared file holds it from offset 0
    assert [(r.start, r.size) for r in vm.ranges()] == [(VIRT_RAM_BASE, 256 << 20)]


def test_banner_equals_proc_version(guest: Guest, vm: VM) -> None:
    assert find_banner(vm.memory) == guest.run("cat /proc/version").rstrip("\n")


def test_pattern_by_physical_address(vm: VM, hold: MemHold) -> None:
    assert len(hold.pages) == hold.size // 4096 and all(hold.pages), "pagemap gave no PFNs"
    assert all(VIRT_RAM_BASE <= p < VIRT_RAM_BASE + (256 << 20) for p in hold.pages)
    for i, paddr in enumerate(hold.pages):
        assert vm.read(paddr, 4096) == hold.expected(i * 4096, 4096), f"page {i} at {paddr:#x}"


def memhold_ttbr0(vm: VM, hold: MemHold) -> int:
    """memhold's TTBR0_EL1, from a vCPU caught at EL0 in memhold's code whose TTBR0 maps every page of
    the region to the frame the guest's pagemap gave (never taken on the PC alone)."""
    code = [(lo, hi) for lo, hi, perms, *_ in proc_maps(hold.guest, hold.pid) if "x" in perms]
    assert code, "memhold has no executable mapping"
    rejected: list[str] = []
    for _ in range(5):
        with hold.spinning(3):
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                with vm.paused():
                    for c in vm.cpus():
                        if c.cpl != 0 or not any(lo <= c.pc < hi for lo, hi in code):
                            continue
                        ttbr0 = c.regs["ttbr0_el1"]
                        try:
                            frames = [vm.translate(hold.vaddr + i * 4096, cr3=ttbr0).paddr
                                      for i in range(len(hold.pages))]
                        except PageFault:
                            rejected.append(f"ttbr0 {ttbr0:#x} (pc {c.pc:#x}) does not map the region")
                            continue
                        if frames == hold.pages:
                            return ttbr0
                        rejected.append(f"ttbr0 {ttbr0:#x} (pc {c.pc:#x}) maps the region elsewhere")
                time.sleep(0.05)
    raise AssertionError(f"never caught memhold on a vCPU; rejected: {rejected[-5:]}")


def test_pattern_by_virtual_address_through_ttbr0(vm: VM, hold: MemHold) -> None:
    ttbr0 = memhold_ttbr0(vm, hold)  # (its walk already equals the guest's pagemap for every page)
    assert vm.read_virt(hold.vaddr, hold.size, cr3=ttbr0) == hold.expected()
    for i in (0, 7, hold.size // 4096 - 1):
        t = vm.translate(hold.vaddr + i * 4096 + 5, cr3=ttbr0)
        assert (t.paddr, t.page_size, t.user, t.writable) == (hold.pages[i] + 5, 4096, True, True)
    data = os.urandom(40)
    off = 3 * 4096 - 20  # across a page boundary
    vm.write_virt(hold.vaddr + off, data, cr3=ttbr0)
    try:
        assert hold.dump(off, len(data)) == data  # the guest process sees the write
    finally:
        vm.write_virt(hold.vaddr + off, hold.expected(off, len(data)), cr3=ttbr0)
    assert hold.check() == (0, -1)


def test_kernel_text_through_ttbr1_matches_the_kernels_own_map(guest: Guest, vm: VM) -> None:
    root, la57 = vm.kernel_root()  # TTBR1_EL1 through the GDB stub, checked against TCR_EL1
    assert root and not la57
    stext = int(guest.run("grep ' _stext$' /proc/kallsyms").split()[0], 16)
    assert stext >= 0xFFFF_0000_0000_0000
    code = next(line for line in guest.run("cat /proc/iomem").splitlines() if "Kernel code" in line)
    code_start, code_end = (int(x, 16) for x in code.split()[0].split("-"))  # from _text or _stext on
    t = vm.translate(stext)
    assert code_start <= t.paddr < code_end and t.paddr & 0xFFF == stext & 0xFFF
    assert not t.user and not t.nx and not t.writable
    assert vm.read_virt(stext, 256) == kcore_read(guest, stext, 256)  # the guest kernel's own view


def test_layout_and_kallsyms_from_ram(guest: Guest, vm: VM) -> None:
    layout = find_layout(vm)
    # the kernel's build config: 6.1 has 48-bit VA, 6.12 52-bit (with LPA2, which -cpu max offers)
    config = guest.image.config_path.read_text()
    va_bits = int(next(ln for ln in config.splitlines() if ln.startswith("CONFIG_ARM64_VA_BITS=")).split("=")[1])
    assert layout.phys_offset == VIRT_RAM_BASE and layout.va_bits == va_bits
    assert isinstance(vm.arch, Arm64) and vm.arch.va_bits == va_bits  # set up from TCR_EL1
    assert layout.kaslr_offset != 0  # KASLR is on (virt passes a seed)
    root, _ = vm.kernel_root()  # the vCPUs' TTBR1_EL1 (GDB stub) and swapper_pg_dir agree
    assert layout.kernel_root == ARM64.root_table(root)
    table = kallsyms(vm, layout)
    assert table.proc_kallsyms().splitlines() == guest_kallsyms(guest)
