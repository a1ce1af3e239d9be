"""Where the kernel sits in guest RAM: the KASLR slide, ``phys_base`` and the paging mode.

Two ways, tried in this order by :func:`aradia.linux.profile.find_profile`:

* **VMCOREINFO** (:func:`vmcoreinfo_candidates`, :func:`anchor_from_vmcoreinfo`): the text the
  kernel writes at boot gives ``KERNELOFFSET`` and ``phys_base`` outright; a stale copy from a
  previous boot is refused by :func:`anchor_plausible`, and the symbols it names are checked against
  kallsyms (:func:`check_anchor`).
* **Scanning** (:func:`kernel_windows`, :func:`scan_tables`, :func:`phys_base_by_scan`): the kallsyms
  token table is found by its ``"0\\0" .. "9\\0"`` run, first near a vCPU's kernel RIP, then anywhere
  in RAM; the slide follows from ``_text``, and ``phys_base`` is the one value under which the
  kernel's own page tables map ``_text`` to where it is.

Either way the result is an :class:`Anchor`; :func:`paging_mode` then tells 4- from 5-level paging by
walking the kernel's root table.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from aradia.errors import AradiaError, GuestDataCorrupt, NotRAM, PageFault, UnsupportedKernel
from aradia.linux import kallsyms as ks
from aradia.linux.identify import KernelNotFound, find_vmcoreinfo_texts, parse_vmcoreinfo, vmcoreinfo_symbol
from aradia.machine.handle import CpuState, VMHandle
from aradia.machine.paging import MASK64, translate
from aradia.sources.base import PhysicalMemory

START_KERNEL_MAP = 0xFFFF_FFFF_8000_0000
DEFAULT_START_KERNEL = START_KERNEL_MAP + 0x100_0000  # __START_KERNEL with PHYSICAL_START = 16 MiB
KERNEL_HALF = 0xFFFF_8000_0000_0000
PHYSICAL_ALIGN = 0x20_0000
MAX_IMAGE = 1 << 30  # KERNEL_IMAGE_SIZE


# --- VMCOREINFO -----------------------------------------------------------------------------------

def vmcoreinfo_candidates(mem: PhysicalMemory) -> Iterator[str]:
    """A dump's VMCOREINFO note first (QEMU's ``-device vmcoreinfo``, kdump), then RAM's texts."""
    note = getattr(mem, "vmcoreinfo", None)
    if isinstance(note, str) and note:
        yield note
    for _addr, text in find_vmcoreinfo_texts(mem):
        yield text


@dataclass(frozen=True)
class Anchor:
    """The kernel's placement: slide and phys_base (and the VMCOREINFO text they came from)."""

    slide: int
    phys_base: int
    info: dict[str, str]
    text: str | None

    def phys(self, vaddr: int) -> int:
        """Physical address of a kernel-image virtual address under this placement (``__pa_symbol``)."""
        return (vaddr - START_KERNEL_MAP + self.phys_base) & MASK64

    def sym(self, name: str) -> int | None:
        """The address VMCOREINFO gives for ``SYMBOL(name)``, or None."""
        return vmcoreinfo_symbol(self.info, name)


def anchor_from_vmcoreinfo(text: str) -> Anchor | None:
    """The placement a VMCOREINFO text states, or None when it states none that can be right."""
    info = parse_vmcoreinfo(text)
    try:
        slide = int(info["KERNELOFFSET"], 16)
        phys_base = int(info["NUMBER(phys_base)"], 0) & MASK64
    except (KeyError, ValueError):
        return None
    if slide & (PHYSICAL_ALIGN - 1) or slide >= MAX_IMAGE:
        return None
    return Anchor(slide, phys_base, info, text)


def anchor_plausible(vm: VMHandle, mem: PhysicalMemory, a: Anchor) -> bool:
    """A VMCOREINFO can be stale (a previous boot's page): the kernel it describes must be in RAM
    where it says, and a vCPU in kernel mode (if any) must map its text there."""
    stext = a.sym("_stext")
    if stext is None:
        return mem.is_ram(a.phys(DEFAULT_START_KERNEL + a.slide))
    pa = a.phys(stext)
    if not mem.is_ram(pa, 4096):
        return False
    checked = False
    for c in _cpus(vm):
        if c.rip < KERNEL_HALF or not c.cr3:
            continue
        try:
            got = translate(mem, c.cr3, stext, la57=c.la57).paddr
        except AradiaError:
            continue
        checked = True
        if got == pa:
            return True
    return not checked


def check_anchor(a: Anchor, symtab: ks.SymbolTable) -> None:
    """GuestDataCorrupt when VMCOREINFO and kallsyms disagree on where a symbol is."""
    for name in ("_stext", "init_uts_ns", "init_top_pgt"):
        want, got = a.sym(name), symtab.address(name)
        if want is not None and got is not None and want != got:
            raise GuestDataCorrupt(f"VMCOREINFO says {name} is at {want:#x}, kallsyms says {got:#x}")


# --- scanning -------------------------------------------------------------------------------------

def kernel_windows(vm: VMHandle, mem: PhysicalMemory) -> list[tuple[int, int]]:
    """Physical windows likely to hold the kernel image: around each vCPU's kernel-mode RIP."""
    out: list[tuple[int, int]] = []
    for c in _cpus(vm):
        if c.rip < KERNEL_HALF or not c.cr3:
            continue
        try:
            pa = translate(mem, c.cr3, c.rip, la57=c.la57).paddr
        except AradiaError:
            continue
        w = (max(0, pa - (48 << 20)), pa + (64 << 20))
        if w not in out:
            out.append(w)
    return out


def _cpus(vm: VMHandle) -> list[CpuState]:
    try:
        return list(vm.cpus())
    except AradiaError:
        return []


def _token_tables(mem: PhysicalMemory, windows: list[tuple[int, int]],
                  whole_ram: bool) -> Iterator[tuple[int, int]]:
    seen: set[int] = set()
    sources: list[Iterator[int]] = [mem.search(ks.DIGIT_TOKENS, start=lo, end=hi, limit=256)
                                    for lo, hi in windows]
    if whole_ram:
        sources.append(mem.search(ks.DIGIT_TOKENS, limit=256))
    for hits in sources:
        for hit in hits:
            if hit in seen:
                continue
            seen.add(hit)
            found = ks.token_table_at(mem, hit)
            if found is not None:
                yield found


def scan_tables(mem: PhysicalMemory, windows: list[tuple[int, int]], *,
                 whole_ram: bool = True) -> ks.KallsymsTables:
    """The kallsyms tables (physical addresses) found from a token table in ``windows`` (then, with
    ``whole_ram``, anywhere in RAM); :class:`KernelNotFound` when none is usable."""
    errors: list[str] = []
    for tt, ti in _token_tables(mem, windows, whole_ram):
        try:
            return ks.locate_tables(mem, tt, ti)
        except AradiaError as e:
            errors.append(f"{tt:#x}: {e}")
            if len(errors) > 16:
                break
    detail = "; ".join(errors[:3])
    raise KernelNotFound("no Linux kernel found in RAM: no usable kallsyms table"
                         + (f" ({detail})" if detail else ""))


def phys_base_by_scan(mem: PhysicalMemory, symtab: ks.SymbolTable, t_phys: ks.KallsymsTables,
                       text_va: int) -> tuple[int, bool]:
    """The phys_base under which the kernel's own page tables map ``_text`` to its physical copy.

    The token table's virtual address is unknown, but it lies in the image and is congruent to its
    physical address modulo the 2 MiB alignment of both placements: a few dozen candidates.
    """
    end_va = symtab.address("_end") or text_va + (128 << 20)
    root_va = symtab.address("init_top_pgt") or symtab.address("swapper_pg_dir")
    if root_va is None:
        raise UnsupportedKernel("no init_top_pgt/swapper_pg_dir symbol: not an x86-64 kernel?")
    tt = t_phys.token_table
    first = text_va + ((tt - text_va) % PHYSICAL_ALIGN)
    found: list[tuple[int, bool]] = []
    for va in range(first, min(end_va, text_va + MAX_IMAGE), PHYSICAL_ALIGN):
        phys_base = (tt - (va - START_KERNEL_MAP)) & MASK64
        a = Anchor(0, phys_base, {}, None)
        root, text_pa = a.phys(root_va), a.phys(text_va)
        if not mem.is_ram(root, 4096) or not mem.is_ram(text_pa, 4096):
            continue
        for la57 in (False, True):
            if _maps_to(mem, root, text_va, text_pa, la57):
                found.append((phys_base, la57))
                break
    if len(found) != 1:
        raise GuestDataCorrupt(f"cannot place the kernel image: {len(found)} candidate phys_base values")
    return found[0]


# --- paging ---------------------------------------------------------------------------------------

def _maps_to(mem: PhysicalMemory, root: int, vaddr: int, paddr: int, la57: bool) -> bool:
    try:
        return translate(mem, root, vaddr, la57=la57).paddr == paddr
    except (PageFault, NotRAM):
        return False


def paging_mode(mem: PhysicalMemory, a: Anchor, symtab: ks.SymbolTable, root: int, text_va: int,
                 known: bool | None) -> bool:
    """Whether the kernel's page tables at ``root`` have five levels: the mode under which they map
    ``_text`` to where it is, trying first what ``known``, VMCOREINFO and the kernel's variable say."""
    order: list[bool] = []
    if known is not None:
        order.append(known)
    v = a.info.get("NUMBER(pgtable_l5_enabled)")
    if v is not None and v.strip() in ("0", "1"):
        order.append(v.strip() == "1")
    l5_va = symtab.address("__pgtable_l5_enabled")
    if l5_va is not None:
        with contextlib.suppress(AradiaError):
            order.append(bool(struct.unpack("<I", mem.read(a.phys(l5_va), 4))[0]))
    order += [False, True]
    text_pa = a.phys(text_va)
    for la57 in dict.fromkeys(order):
        if _maps_to(mem, root, text_va, text_pa, la57):
            return la57
    raise GuestDataCorrupt(f"the kernel page tables at {root:#x} do not map _text to {text_pa:#x}")


def va_minus_pa(a: Anchor) -> int:
    """What to add to a kernel-image physical address to get its virtual address."""
    return (START_KERNEL_MAP - a.phys_base) & MASK64


def image_reader(mem: PhysicalMemory, phys: Callable[[int], int]) -> ks.Reader:
    """A reader of kernel-image virtual addresses through ``phys`` (no page-table walk)."""
    def read(vaddr: int, size: int) -> bytes:
        return mem.read(phys(vaddr), size)

    return read


__all__ = ["DEFAULT_START_KERNEL", "KERNEL_HALF", "MAX_IMAGE", "PHYSICAL_ALIGN", "START_KERNEL_MAP", "Anchor",
           "anchor_from_vmcoreinfo", "anchor_plausible", "check_anchor", "image_reader", "kernel_windows",
           "paging_mode", "phys_base_by_scan", "scan_tables", "va_minus_pa", "vmcoreinfo_candidates"]
