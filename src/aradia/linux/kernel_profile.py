"""What aradia knows about a running kernel (:class:`KernelProfile`), whichever way it was found:
:func:`aradia.linux.profile.find_profile` (x86-64) or :func:`aradia.linux.arm64_profile.find_arm64_profile`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aradia.linux import kallsyms as ks
from aradia.linux.btf import Btf
from aradia.linux.placement import START_KERNEL_MAP
from aradia.machine.paging import MASK64
from aradia.sources.base import PhysicalMemory


@dataclass
class KernelProfile:
    """What aradia knows about the running kernel: identity, layout, symbols and types.

    ``phys_base`` is the kernel's unsigned ``phys_base`` variable (VMCOREINFO may print it negative);
    :meth:`kernel_phys` is ``__pa_symbol``. ``kernel_root`` is the physical address of
    ``init_top_pgt`` (the kernel's own page-table root; ``la57`` says whether it has five levels).

    On arm64 (``arch == "arm64"``): ``phys_base`` is ``PHYS_OFFSET`` (where the linear map's RAM
    starts), ``page_offset_base`` is ``PAGE_OFFSET``, ``kimage_voffset`` places the image,
    ``kernel_root`` is ``swapper_pg_dir`` and ``la57`` is False; ``recovered`` holds the data symbols
    found in RAM (kallsyms lists functions only there).
    """

    release: str
    build_id: str
    banner: str
    kaslr_offset: int
    phys_base: int
    la57: bool
    page_offset_base: int
    kernel_root: int
    symbols: ks.SymbolTable
    kallsyms_tables: ks.KallsymsTables  # kernel virtual addresses
    btf: Btf | None
    vmcoreinfo: str | None  # the kernel's own text, when it was found in RAM
    source: str  # "vmcoreinfo" or "scan": how the kernel was located
    cached: dict[str, bool] = field(default_factory=dict)  # which parts came from the cache
    timings: dict[str, float] = field(default_factory=dict)
    arch: str = "x86_64"  # aradia's architecture name (``x86_64``, ``arm64``)
    kimage_voffset: int | None = None  # arm64: kernel-image virtual minus physical address
    recovered: dict[str, int] = field(default_factory=dict)  # data symbols kallsyms lacks, found in RAM

    @property
    def kernel_base(self) -> int:
        """``__START_KERNEL_map`` + slide: cached offsets are relative to this."""
        return START_KERNEL_MAP + self.kaslr_offset

    def kernel_phys(self, vaddr: int) -> int:
        """Physical address of a kernel-image virtual address (``__pa_symbol``)."""
        if self.kimage_voffset is not None:
            return (vaddr - self.kimage_voffset) & MASK64
        return (vaddr - START_KERNEL_MAP + self.phys_base) & MASK64

    def direct_phys(self, vaddr: int) -> int:
        """Physical address of a direct-map (linear-map) address: ``__pa``. ``phys_base`` is the first
        RAM address the map starts at on arm64 (``PHYS_OFFSET``); x86's direct map starts at 0."""
        return vaddr - self.page_offset_base + (self.phys_base if self.arch == "arm64" else 0)

    def symbol(self, name: str) -> int | None:
        """Address of the kallsyms symbol ``name`` (the first of that name), or of a data symbol
        recovered from RAM where kallsyms has no data symbols (arm64), or None."""
        addr = self.symbols.address(name)
        return self.recovered.get(name) if addr is None else addr

    def read_image(self, mem: PhysicalMemory, vaddr: int, size: int) -> bytes:
        """Read kernel-image memory (text, rodata, data, bss) by virtual address, physically."""
        return mem.read(self.kernel_phys(vaddr), size)

    def vmcoreinfo_text(self) -> str:
        """VMCOREINFO for drgn: the kernel's own text, or one synthesised from this profile."""
        if self.vmcoreinfo:
            return self.vmcoreinfo if self.vmcoreinfo.endswith("\n") else self.vmcoreinfo + "\n"
        pb = self.phys_base - (1 << 64) if self.phys_base >= 1 << 63 else self.phys_base
        root = self.symbol("init_top_pgt") or self.symbol("swapper_pg_dir") or 0
        lines = [f"OSRELEASE={self.release}", f"BUILD-ID={self.build_id}", "PAGESIZE=4096",
                 f"SYMBOL(swapper_pg_dir)={root:x}", f"SYMBOL(init_top_pgt)={root:x}",
                 f"NUMBER(phys_base)={pb}", f"NUMBER(pgtable_l5_enabled)={int(self.la57)}",
                 f"KERNELOFFSET={self.kaslr_offset:x}"]
        for name in ("_stext", "init_uts_ns", "mem_section", "prb", "printk_rb_static", "clear_seq"):
            a = self.symbol(name)
            if a is not None:
                lines.append(f"SYMBOL({name})={a:x}")
        return "\n".join(lines) + "\n"

    def summary(self) -> dict[str, Any]:
        """A JSON-serialisable summary."""
        return {"release": self.release, "build_id": self.build_id, "kaslr_offset": self.kaslr_offset,
                "phys_base": self.phys_base, "la57": self.la57, "page_offset_base": self.page_offset_base,
                "kernel_root": self.kernel_root, "symbols": len(self.symbols),
                "btf_types": len(self.btf) if self.btf else 0, "source": self.source, "arch": self.arch,
                "cached": dict(self.cached), "timings": dict(self.timings)}


__all__ = ["KernelProfile"]
