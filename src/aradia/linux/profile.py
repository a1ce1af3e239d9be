"""The kernel profile, found in guest RAM alone: where the kernel is, its symbols and its types.

:func:`find_profile` works on a live VM or a dump, with no debug package and no System.map, in named
steps:

1. **Locate the kernel** (:mod:`aradia.linux.placement`). The VMCOREINFO text the kernel writes at
   boot (``OSRELEASE=...``; present in RAM even without QEMU's vmcoreinfo device) gives
   ``KERNELOFFSET`` (the KASLR slide), ``phys_base``, ``init_top_pgt``, ``pgtable_l5_enabled``,
   ``BUILD-ID`` and, since 6.0, the kallsyms table addresses. Without it, the kallsyms token table is
   found by its ``"0\\0" .. "9\\0"`` run -- first near the physical address of a vCPU's kernel RIP,
   then anywhere in RAM -- and the slide and ``phys_base`` follow from the decoded symbols: the one
   ``phys_base`` under which the kernel's own page tables map ``_text`` to where it is.
2. **kallsyms** (:mod:`aradia.linux.kallsyms`) and **BTF** (:mod:`aradia.linux.btf`) are read through
   the kernel image's physical mapping (``__pa_symbol``: ``vaddr - __START_KERNEL_map + phys_base``),
   no page-table walk needed.
3. ``page_offset_base`` (the direct-map base) is read from the kernel's variable, the paging mode
   is checked by walking the kernel's root table (``init_top_pgt``) for ``_text``.

**Cache** (:mod:`aradia.linux.profile_cache`). Under ``$ARADIA_CACHE/profiles/<build id>/`` (default
``~/.cache/aradia``): the decoded kallsyms names and types, the table layout *relative to the kernel
base*, and the BTF index. Nothing that changes per boot is cached: the slide, ``phys_base``, the
symbol addresses (the s32 offsets table is re-read; it is small) and ``page_offset_base`` are read
from RAM on every attach. A cached part is only used when the digest of the bytes it was decoded from
matches the bytes in RAM now.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aradia.elf import notes_build_id
from aradia.errors import AradiaError, GuestDataCorrupt, UnsupportedKernel
from aradia.linux import kallsyms as ks
from aradia.linux.arm64_profile import find_arm64_profile
from aradia.linux.btf import Btf
from aradia.linux.identify import KernelNotFound
from aradia.linux.kernel_profile import KernelProfile
from aradia.linux.placement import (
    DEFAULT_START_KERNEL,
    KERNEL_HALF,
    START_KERNEL_MAP,
    Anchor,
    anchor_from_vmcoreinfo,
    anchor_plausible,
    check_anchor,
    image_reader,
    kernel_windows,
    paging_mode,
    phys_base_by_scan,
    scan_tables,
    va_minus_pa,
    vmcoreinfo_candidates,
)
from aradia.linux.profile_cache import PROFILE_FORMAT, ProfileCache, valid_build_id
from aradia.linux.vmlinux import read_btf as read_kernel_file_btf
from aradia.machine.handle import VMHandle
from aradia.machine.paging import MASK64
from aradia.progress import Progress, StepTimer
from aradia.sources.base import PhysicalMemory

DIRECT_MAP_4L = 0xFFFF_8880_0000_0000
DIRECT_MAP_5L = 0xFF11_0000_0000_0000


# --- finding the profile ------------------------------------------------------------------------------

def find_profile(vm: VMHandle, progress: Progress | None = None, *, cache: ProfileCache | bool | None = True,
                 with_btf: bool = True, use_vmcoreinfo: bool = True,
                 btf_source: str | os.PathLike[str] | None = None) -> KernelProfile:
    """The kernel profile of ``vm`` (an :class:`aradia.vm.VM`: live or a dump) from its RAM alone.

    ``progress`` is called with a short line before each slow step. ``cache``: a
    :class:`ProfileCache`, True for the default one, False for none. ``use_vmcoreinfo=False``
    ignores VMCOREINFO and locates the kernel by scanning (as for a kernel without it). Raises
    :class:`~aradia.linux.identify.KernelNotFound` when no kernel is found and
    :class:`~aradia.errors.GuestDataCorrupt` when what is found does not hold together.
    ``btf_source`` takes the BTF from a kernel file instead of RAM (a ``vmlinuz``, a ``vmlinux`` or
    a raw blob: :mod:`aradia.linux.vmlinux`); a file of another kernel build is
    :class:`~aradia.errors.UnsupportedKernel`.
    """
    if vm.arch.name == "arm64":
        if btf_source is not None or not use_vmcoreinfo:
            raise UnsupportedKernel("on arm64 the kernel is found through VMCOREINFO and its BTF in RAM")
        return find_arm64_profile(vm, progress, cache=cache, with_btf=with_btf)
    mem: PhysicalMemory = vm.memory
    store = ProfileCache() if cache is True else (cache or None)
    tm = StepTimer(progress)
    found = _Found(store)
    tm.say("looking for VMCOREINFO")
    anchor = _anchor_by_vmcoreinfo(vm, mem) if use_vmcoreinfo else None
    tm.lap("vmcoreinfo")
    if anchor is not None:
        found.build_id = anchor.info.get("BUILD-ID", "").lower()
        found.meta = store.load_meta(found.build_id) if store and valid_build_id(found.build_id) else None
    tables, phys_tables, reader = _locate_kallsyms(vm, mem, anchor, found, tm)
    tm.lap("locate")
    names, symtab = _read_kallsyms(reader, tables, found, tm)
    tm.lap("kallsyms")
    anchor, tables, text_va, la57_found = _place_kernel(mem, symtab, anchor, tables, phys_tables)
    root, la57, page_offset_base = _page_tables(mem, anchor, symtab, text_va, la57_found)
    release, banner = _identity(mem, anchor, symtab, found)
    tm.lap("layout")
    btf = _load_btf(mem, anchor, symtab, found, btf_source, tm) if with_btf else None
    tm.lap("btf")
    profile = KernelProfile(
        release=release, build_id=found.build_id, banner=banner, kaslr_offset=anchor.slide,
        phys_base=anchor.phys_base, la57=la57, page_offset_base=page_offset_base, kernel_root=root,
        symbols=symtab, kallsyms_tables=tables, btf=btf, vmcoreinfo=anchor.text,
        source="vmcoreinfo" if anchor.text else "scan", cached=found.cached)
    _store(profile, names, found)
    tm.lap("cache")
    profile.timings = tm.total()
    return profile


@dataclass
class _Found:
    """What the steps of one :func:`find_profile` share: the cache, the build ID and cached
    description as far as known, and which parts came from the cache."""

    store: ProfileCache | None
    build_id: str = ""
    meta: dict[str, Any] | None = None
    cached: dict[str, bool] = field(default_factory=dict)


def _anchor_by_vmcoreinfo(vm: VMHandle, mem: PhysicalMemory) -> Anchor | None:
    """The placement the first plausible VMCOREINFO text in the dump or RAM states, or None."""
    for text in vmcoreinfo_candidates(mem):
        a = anchor_from_vmcoreinfo(text)
        if a is not None and anchor_plausible(vm, mem, a):
            return a
    return None


def _locate_kallsyms(vm: Any, mem: PhysicalMemory, anchor: Anchor | None, found: _Found,
                     tm: StepTimer) -> tuple[ks.KallsymsTables, ks.KallsymsTables | None, ks.Reader]:
    """The kallsyms tables and a reader for their addresses.

    With a VMCOREINFO ``anchor``: kernel virtual addresses, from the cached layout, the symbols
    VMCOREINFO names or a scan of the kernel image. Without: a scan of RAM, physical addresses (the
    second item is then those tables too: the placement is derived from them later).
    """
    if anchor is None:
        tm.say("no VMCOREINFO: scanning RAM for the kallsyms token table")
        phys_tables = scan_tables(mem, kernel_windows(vm, mem))
        return phys_tables, phys_tables, mem.read
    read_v = image_reader(mem, anchor.phys)
    meta = found.meta
    if meta and "tables" in meta:
        with contextlib.suppress(AradiaError, KeyError, TypeError, ValueError):
            cand = ks.KallsymsTables.from_dict(meta["tables"]).shifted(START_KERNEL_MAP + anchor.slide)
            if ks.names_digest(read_v, cand) == meta.get("kallsyms_digest"):
                found.cached["layout"] = True
                return cand, None, read_v
    if anchor.sym("kallsyms_names") is not None:
        tm.say("reading the kallsyms tables named by VMCOREINFO")
        with contextlib.suppress(AradiaError):  # bad symbols: fall back to scanning
            return ks.tables_from_symbols(read_v, anchor.sym), None, read_v
    tm.say("scanning the kernel image for the kallsyms tables")
    stext = anchor.sym("_stext") or DEFAULT_START_KERNEL + anchor.slide
    lo = anchor.phys(stext)
    phys_tables = scan_tables(mem, [(lo, lo + (96 << 20))], whole_ram=False)
    return phys_tables.shifted(va_minus_pa(anchor)), phys_tables, read_v


def _read_kallsyms(reader: ks.Reader, tables: ks.KallsymsTables, found: _Found,
                   tm: StepTimer) -> tuple[ks.NameTable, ks.SymbolTable]:
    """Names and types (from the cache when their bytes' digest matches) and this boot's addresses.

    A kernel found without a build ID is looked up in the cache by its kallsyms digest.
    """
    store = found.store
    names: ks.NameTable | None = None
    digest = ks.names_digest(reader, tables)
    if store and not found.build_id:
        bid = store.find_by_kallsyms(digest)
        if bid:
            found.build_id, found.meta = bid, store.load_meta(bid)
    if store and found.build_id:
        names = store.load_names(found.build_id, digest)
    found.cached["kallsyms"] = names is not None
    if names is None:
        tm.say(f"decoding {tables.count} kallsyms symbols")
        names = ks.decode_names(reader, tables)
    addrs = ks.read_addresses(reader, tables)
    return names, ks.SymbolTable(addrs, names.types, names.names)


def _place_kernel(mem: PhysicalMemory, symtab: ks.SymbolTable, anchor: Anchor | None,
                  tables: ks.KallsymsTables, phys_tables: ks.KallsymsTables | None,
                  ) -> tuple[Anchor, ks.KallsymsTables, int, bool | None]:
    """Where the kernel is: the VMCOREINFO ``anchor`` checked against kallsyms or, for a kernel found
    by scanning, the slide from ``_text`` and the ``phys_base`` its page tables agree with.

    Returns the placement, the kallsyms tables in kernel virtual addresses, ``_text`` and the paging
    mode when placing the kernel already found it (None: not yet known).
    """
    text_va = symtab.address("_text") or symtab.address("_stext")
    if text_va is None or text_va < KERNEL_HALF:
        raise GuestDataCorrupt("kallsyms has no _text symbol in the kernel half")
    if anchor is not None:
        check_anchor(anchor, symtab)
        return anchor, tables, text_va, None
    # kaslr_offset() is _text - __START_KERNEL; __START_KERNEL is 16 MiB into the kernel map
    # unless CONFIG_PHYSICAL_START was changed (then this is the slide plus that difference).
    slide = (text_va - DEFAULT_START_KERNEL) & MASK64
    assert phys_tables is not None
    phys_base, la57 = phys_base_by_scan(mem, symtab, phys_tables, text_va)
    anchor = Anchor(slide & MASK64, phys_base, {}, None)
    return anchor, phys_tables.shifted(va_minus_pa(anchor)), text_va, la57


def _page_tables(mem: PhysicalMemory, anchor: Anchor, symtab: ks.SymbolTable, text_va: int,
                 la57_found: bool | None) -> tuple[int, bool, int]:
    """The kernel's page-table root (physical), whether it has five levels, and ``page_offset_base``."""
    root_va = (symtab.address("init_top_pgt") or anchor.sym("init_top_pgt")
               or symtab.address("swapper_pg_dir") or anchor.sym("swapper_pg_dir"))
    if root_va is None:
        raise UnsupportedKernel("no init_top_pgt/swapper_pg_dir symbol: not an x86-64 kernel?")
    root = anchor.phys(root_va)
    la57 = paging_mode(mem, anchor, symtab, root, text_va, la57_found)
    pob_va = symtab.address("page_offset_base")
    page_offset_base = (_read_u64(mem, anchor.phys(pob_va)) if pob_va
                        else DIRECT_MAP_5L if la57 else DIRECT_MAP_4L)
    if page_offset_base < KERNEL_HALF and not (la57 and page_offset_base >= 0xFF00_0000_0000_0000):
        raise GuestDataCorrupt(f"page_offset_base {page_offset_base:#x} is not a kernel address")
    return root, la57, page_offset_base


def _identity(mem: PhysicalMemory, anchor: Anchor, symtab: ks.SymbolTable, found: _Found) -> tuple[str, str]:
    """The release and banner; the build ID from the kernel's notes (it wins over VMCOREINFO's)."""
    banner = _banner(mem, symtab, anchor.phys)
    release = anchor.info.get("OSRELEASE") or (banner.split(" ")[2] if banner.count(" ") >= 2 else "")
    found.build_id = _notes_build_id(mem, symtab, anchor.phys) or found.build_id
    if not found.build_id:
        raise UnsupportedKernel("the kernel has no build ID (neither .notes nor VMCOREINFO)")
    return release, banner


def _load_btf(mem: PhysicalMemory, anchor: Anchor, symtab: ks.SymbolTable, found: _Found,
              btf_source: str | os.PathLike[str] | None, tm: StepTimer) -> Btf | None:
    """The kernel's BTF from ``btf_source`` or from RAM (``__start_BTF``..``__stop_BTF``), with its
    index from the cache when it matches; None when the kernel has none."""
    start, stop = symtab.address("__start_BTF"), symtab.address("__stop_BTF")
    blob: bytes | None = None
    if btf_source is not None:
        tm.say(f"reading BTF from {btf_source}")
        kf = read_kernel_file_btf(btf_source)
        if kf.build_id is not None and kf.build_id != found.build_id:
            raise UnsupportedKernel(f"{btf_source} is kernel build {kf.build_id}; "
                                    f"the guest runs {found.build_id}")
        blob = kf.blob
    elif start is not None and stop is not None and stop > start:
        blob = mem.read(anchor.phys(start), stop - start)
    if blob is None:
        return None
    index = found.store.load_btf_index(found.build_id) if found.store else None
    if index is None:
        tm.say("indexing BTF")
    btf = Btf(blob, index=index)
    found.cached["btf"] = index is not None and index.get("digest") == btf.digest
    return btf


def _store(profile: KernelProfile, names: ks.NameTable, found: _Found) -> None:
    """Write to the cache what it lacked or held stale (nothing when everything came from it)."""
    cached, btf = found.cached, profile.btf
    stale = found.meta is None or not cached.get("kallsyms") or (btf is not None and not cached.get("btf")) \
        or (profile.vmcoreinfo is not None and not cached.get("layout"))
    if not found.store or not stale:
        return
    tables = profile.kallsyms_tables.shifted(-profile.kernel_base).to_dict()
    meta = {"format": PROFILE_FORMAT, "release": profile.release, "build_id": profile.build_id,
            "banner": profile.banner, "tables": tables, "kallsyms_digest": names.digest,
            "btf_digest": btf.digest if btf else None}
    found.store.store(profile.build_id, meta, None if cached.get("kallsyms") else names,
                      btf if btf is not None and not cached.get("btf") else None)


# --- small reads ---------------------------------------------------------------------------------------

def _read_u64(mem: PhysicalMemory, paddr: int) -> int:
    return int(struct.unpack("<Q", mem.read(paddr, 8))[0])


def _banner(mem: PhysicalMemory, symtab: ks.SymbolTable, phys: Callable[[int], int]) -> str:
    va = symtab.address("linux_banner")
    if va is None:
        return ""
    with contextlib.suppress(AradiaError):
        raw = mem.read(phys(va), 512).split(b"\0", 1)[0]
        text = raw.decode("ascii", "replace").rstrip("\n")
        if text.startswith("Linux version "):
            return text
    return ""


def _notes_build_id(mem: PhysicalMemory, symtab: ks.SymbolTable, phys: Callable[[int], int]) -> str | None:
    start, stop = symtab.address("__start_notes"), symtab.address("__stop_notes")
    if start is None or stop is None or not 0 < stop - start <= 1 << 16:
        return None
    with contextlib.suppress(AradiaError):
        return notes_build_id(mem.read(phys(start), stop - start), limit=256)
    return None


__all__ = ["KernelNotFound", "KernelProfile", "ProfileCache", "find_profile"]
