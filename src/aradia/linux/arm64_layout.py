"""Where an arm64 Linux kernel sits in guest RAM, and its kallsyms, from the VMCOREINFO text in RAM.

arm64 kernels write VMCOREINFO at boot (also without kdump or QEMU's vmcoreinfo device) and it states
the whole placement: ``NUMBER(kimage_voffset)`` (kernel-image virtual minus physical, KASLR included),
``NUMBER(PHYS_OFFSET)`` (the first RAM address: 0x40000000 on QEMU's virt), ``NUMBER(VA_BITS)``,
``NUMBER(TCR_EL1_T1SZ)``, ``KERNELOFFSET`` (the KASLR slide), ``SYMBOL(swapper_pg_dir)`` (the
kernel's TTBR1 tables) and, from 6.0 on, the six kallsyms table symbols. Debian's arm64 kernels are
built without ``CONFIG_KALLSYMS_ALL`` (unlike amd64), so kallsyms holds functions only: data symbols
(``init_task``, ``__start_BTF``) must come from elsewhere.

A text from a previous boot may linger in RAM: a placement is taken only if the kernel text it names
is RAM and, when a vCPU's TTBR1 is known, that vCPU's tables map ``_stext`` to the same frame.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from aradia.errors import AradiaError, UnsupportedKernel
from aradia.linux import kallsyms as ks
from aradia.linux.identify import KernelNotFound, find_vmcoreinfo_texts, parse_vmcoreinfo, vmcoreinfo_symbol
from aradia.machine.arch import Arm64
from aradia.machine.arch.base import MASK64
from aradia.machine.handle import VMHandle
from aradia.machine.paging import translate


@dataclass(frozen=True)
class Arm64Layout:
    """An arm64 kernel's placement as its VMCOREINFO states it."""

    kimage_voffset: int
    phys_offset: int
    kaslr_offset: int
    va_bits: int
    info: dict[str, str]
    text: str

    def phys(self, vaddr: int) -> int:
        """Physical address of a kernel-image virtual address (the kernel's ``__pa_symbol``)."""
        return (vaddr - self.kimage_voffset) & MASK64

    def sym(self, name: str) -> int | None:
        """The address VMCOREINFO gives for ``SYMBOL(name)``, or None."""
        return vmcoreinfo_symbol(self.info, name)

    @property
    def kernel_root(self) -> int:
        """Physical address of ``swapper_pg_dir``: the tables TTBR1_EL1 points at."""
        root = self.sym("swapper_pg_dir")
        if root is None:
            raise UnsupportedKernel("arm64 VMCOREINFO names no swapper_pg_dir")
        return self.phys(root)


def layout_from_vmcoreinfo(text: str) -> Arm64Layout | None:
    """The placement an arm64 VMCOREINFO text states, or None when it is not one (x86, garbled)."""
    info = parse_vmcoreinfo(text)
    try:
        voffset = int(info["NUMBER(kimage_voffset)"], 0) & MASK64
        phys_offset = int(info["NUMBER(PHYS_OFFSET)"], 0)
        va_bits = int(info["NUMBER(VA_BITS)"], 0)
        slide = int(info.get("KERNELOFFSET", "0"), 16)
    except (KeyError, ValueError):
        return None
    if not 36 <= va_bits <= 52 or voffset < (1 << 63) or phys_offset & 0xFFF:
        return None
    return Arm64Layout(voffset, phys_offset, slide, va_bits, info, text)


def find_layout(vm: VMHandle) -> Arm64Layout:
    """The placement of the kernel running in ``vm`` (an arm64 guest), from VMCOREINFO texts in RAM.

    Raises :class:`~aradia.linux.identify.KernelNotFound` when no text fits this boot.
    """
    mem = vm.memory
    roots: list[int] = []
    # no registers (a stub held elsewhere, a raw dump): RAM alone decides
    with contextlib.suppress(AradiaError):
        roots = [c.cr3 for c in vm.cpus() if c.cr3]
    arch = vm.arch if isinstance(vm.arch, Arm64) else Arm64()
    seen = 0
    for _addr, text in find_vmcoreinfo_texts(mem):
        seen += 1
        layout = layout_from_vmcoreinfo(text)
        stext = layout.sym("_stext") if layout else None
        if layout is None or stext is None or not mem.is_ram(layout.phys(stext), 4096):
            continue
        if not any(_maps(vm, arch, root, stext, layout.phys(stext)) is False for root in roots):
            return layout
    raise KernelNotFound(f"no arm64 VMCOREINFO for this boot in RAM ({seen} VMCOREINFO texts looked at)")


def _maps(vm: VMHandle, arch: Arm64, root: int, vaddr: int, paddr: int) -> bool | None:
    """Whether ``root`` maps ``vaddr`` to ``paddr`` (None: it maps nothing there)."""
    try:
        return translate(vm.memory, root, vaddr, arch=arch).paddr == paddr
    except AradiaError:
        return None


def kallsyms(vm: VMHandle, layout: Arm64Layout) -> ks.SymbolTable:
    """The kernel's kallsyms (vmlinux part, as ``/proc/kallsyms`` lists it), read from RAM through the
    tables VMCOREINFO names (kernel 6.0 and later)."""
    return kallsyms_with_tables(vm, layout)[1]


def kallsyms_with_tables(vm: VMHandle, layout: Arm64Layout) -> tuple[ks.KallsymsTables, ks.SymbolTable]:
    """:func:`kallsyms` and the kallsyms tables (kernel virtual addresses) it was read from."""
    def read(vaddr: int, size: int) -> bytes:
        return vm.memory.read(layout.phys(vaddr), size)

    tables = ks.tables_from_symbols(read, layout.sym)
    names = ks.decode_names(read, tables)
    return tables, ks.SymbolTable(ks.read_addresses(read, tables), names.types, names.names)


__all__ = ["Arm64Layout", "find_layout", "kallsyms", "kallsyms_with_tables", "layout_from_vmcoreinfo"]
