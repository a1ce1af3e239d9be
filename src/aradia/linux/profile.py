"""The kernel profile, found in guest RAM alone: where the kernel is, its symbols and its types.

:func:`find_profile` works on a live VM or a dump, with no debug package and no System.map:

1. **Locate the kernel.** The VMCOREINFO text the kernel writes at boot (``OSRELEASE=...``; present
   in RAM even without QEMU's vmcoreinfo device) gives ``KERNELOFFSET`` (the KASLR slide),
   ``phys_base``, ``init_top_pgt``, ``pgtable_l5_enabled``, ``BUILD-ID`` and, since 6.0, the kallsyms
   table addresses. Without it, the kallsyms token table is found by its ``"0\\0" .. "9\\0"`` run --
   first near the physical address of a vCPU's kernel RIP, then anywhere in RAM -- and the slide
   and ``phys_base`` follow from the decoded symbols: the one ``phys_base`` under which the kernel's
   own page tables map ``_text`` to where it is.
2. **kallsyms** (:mod:`aradia.linux.kallsyms`) and **BTF** (:mod:`aradia.linux.btf`) are read through
   the kernel image's physical mapping (``__pa_symbol``: ``vaddr - __START_KERNEL_map + phys_base``),
   no page-table walk needed.
3. ``page_offset_base`` (the direct-map base) is read from the kernel's variable, the paging mode
   is checked by walking the kernel's root table (``init_top_pgt``) for ``_text``.

**Cache.** Under ``$ARADIA_CACHE/profiles/<build id>/`` (default ``~/.cache/aradia``): the decoded
kallsyms names and types, the table layout *relative to the kernel base*, and the BTF index. Nothing
that changes per boot is cached: the slide, ``phys_base``, the symbol addresses (the s32 offsets
table is re-read; it is small) and ``page_offset_base`` are read from RAM on every attach. A cached
part is only used when the digest of the bytes it was decoded from matches the bytes in RAM now.
"""

from __future__ import annotations

import contextlib
import json
import marshal
import os
import re
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aradia.cache import cache_dir
from aradia.elf import notes_build_id
from aradia.errors import AradiaError, GuestDataCorrupt, NotRAM, PageFault, UnsupportedKernel
from aradia.linux import kallsyms as ks
from aradia.linux.btf import Btf
from aradia.linux.identify import KernelNotFound, find_vmcoreinfo_texts, parse_vmcoreinfo
from aradia.linux.vmlinux import read_btf as read_kernel_file_btf
from aradia.machine.paging import translate
from aradia.sources.base import PhysicalMemory

Progress = Callable[[str], None]

MASK64 = (1 << 64) - 1
START_KERNEL_MAP = 0xFFFF_FFFF_8000_0000
DEFAULT_START_KERNEL = START_KERNEL_MAP + 0x100_0000  # __START_KERNEL with PHYSICAL_START = 16 MiB
KERNEL_HALF = 0xFFFF_8000_0000_0000
PHYSICAL_ALIGN = 0x20_0000
DIRECT_MAP_4L = 0xFFFF_8880_0000_0000
DIRECT_MAP_5L = 0xFF11_0000_0000_0000
MAX_IMAGE = 1 << 30  # KERNEL_IMAGE_SIZE
MAX_VMCOREINFO = 4096
PROFILE_FORMAT = 1


@dataclass
class KernelProfile:
    """What aradia knows about the running kernel: identity, layout, symbols and types.

    ``phys_base`` is the kernel's unsigned ``phys_base`` variable (VMCOREINFO may print it negative);
    :meth:`kernel_phys` is ``__pa_symbol``. ``kernel_root`` is the physical address of
    ``init_top_pgt`` (the kernel's own page-table root; ``la57`` says whether it has five levels).
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

    @property
    def kernel_base(self) -> int:
        """``__START_KERNEL_map`` + slide: cached offsets are relative to this."""
        return START_KERNEL_MAP + self.kaslr_offset

    def kernel_phys(self, vaddr: int) -> int:
        """Physical address of a kernel-image virtual address (``__pa_symbol``)."""
        return (vaddr - START_KERNEL_MAP + self.phys_base) & MASK64

    def symbol(self, name: str) -> int | None:
        """Address of the kallsyms symbol ``name`` (the first of that name), or None."""
        return self.symbols.address(name)

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
                "btf_types": len(self.btf) if self.btf else 0, "source": self.source,
                "cached": dict(self.cached), "timings": dict(self.timings)}


# --- VMCOREINFO -----------------------------------------------------------------------------------

def _vmcoreinfo_candidates(mem: PhysicalMemory) -> Iterator[str]:
    """A dump's VMCOREINFO note first (QEMU's ``-device vmcoreinfo``, kdump), then RAM's texts."""
    note = getattr(mem, "vmcoreinfo", None)
    if isinstance(note, str) and note:
        yield note
    for _addr, text in find_vmcoreinfo_texts(mem):
        yield text


@dataclass(frozen=True)
class _Anchor:
    """The kernel's placement: slide and phys_base (and the VMCOREINFO text they came from)."""

    slide: int
    phys_base: int
    info: dict[str, str]
    text: str | None

    def phys(self, vaddr: int) -> int:
        return (vaddr - START_KERNEL_MAP + self.phys_base) & MASK64

    def sym(self, name: str) -> int | None:
        v = self.info.get(f"SYMBOL({name})")
        try:
            return int(v, 16) if v else None
        except ValueError:
            return None


def _anchor_from_vmcoreinfo(text: str) -> _Anchor | None:
    info = parse_vmcoreinfo(text)
    try:
        slide = int(info["KERNELOFFSET"], 16)
        phys_base = int(info["NUMBER(phys_base)"], 0) & MASK64
    except (KeyError, ValueError):
        return None
    if slide & (PHYSICAL_ALIGN - 1) or slide >= MAX_IMAGE:
        return None
    return _Anchor(slide, phys_base, info, text)


# --- helpers ------------------------------------------------------------------------------------

def _kernel_windows(vm: Any, mem: PhysicalMemory) -> list[tuple[int, int]]:
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


def _cpus(vm: Any) -> list[Any]:
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


def _maps_to(mem: PhysicalMemory, root: int, vaddr: int, paddr: int, la57: bool) -> bool:
    try:
        return translate(mem, root, vaddr, la57=la57).paddr == paddr
    except (PageFault, NotRAM):
        return False


def _read_u64(mem: PhysicalMemory, paddr: int) -> int:
    return int(struct.unpack("<Q", mem.read(paddr, 8))[0])


class _Timer:
    def __init__(self, progress: Progress | None) -> None:
        self.t = time.perf_counter()
        self.start = self.t
        self.out: dict[str, float] = {}
        self.progress = progress

    def say(self, msg: str) -> None:
        if self.progress:
            self.progress(msg)

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.out[name] = round(now - self.t, 4)
        self.t = now

    def total(self) -> dict[str, float]:
        self.out["total"] = round(time.perf_counter() - self.start, 4)
        return self.out


# --- the cache ------------------------------------------------------------------------------------

class ProfileCache:
    """``<root>/<build id>/``: ``profile.json``, ``names.bin`` (kallsyms), ``btf-index.bin``."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else cache_dir("profiles")

    def _dir(self, build_id: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{8,128}", build_id):
            raise AradiaError(f"bad build id {build_id!r}")
        return self.root / build_id

    def load_meta(self, build_id: str) -> dict[str, Any] | None:
        """The cached profile description, or None."""
        try:
            meta = json.loads((self._dir(build_id) / "profile.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or meta.get("format") != PROFILE_FORMAT:
            return None
        return meta

    def load_names(self, build_id: str, digest: str) -> ks.NameTable | None:
        """Cached kallsyms names and types decoded from bytes with ``digest``, or None."""
        try:
            d = marshal.loads((self._dir(build_id) / "names.bin").read_bytes())
            if d.get("digest") != digest:
                return None
            return ks.NameTable(list(d["names"]), str(d["types"]), digest)
        except (OSError, ValueError, EOFError, TypeError, KeyError, AttributeError):
            return None

    def load_btf_index(self, build_id: str) -> dict[str, Any] | None:
        """The cached BTF index (checked against the blob's digest by :class:`Btf`), or None."""
        try:
            return Btf.load_index((self._dir(build_id) / "btf-index.bin").read_bytes())
        except OSError:
            return None

    def find_by_kallsyms(self, digest: str) -> str | None:
        """Build id of the cached kernel whose kallsyms bytes have ``digest`` (kernels found by scan)."""
        try:
            bid = (self.root / "by-kallsyms" / digest).read_text().strip()
        except OSError:
            return None
        return bid if re.fullmatch(r"[0-9a-f]{8,128}", bid) else None

    def store(self, build_id: str, meta: dict[str, Any], names: ks.NameTable | None,
              btf: Btf | None) -> None:
        """Write (atomically, file by file) what was learnt; failures to write are ignored."""
        with contextlib.suppress(OSError):
            d = self._dir(build_id)
            d.mkdir(parents=True, exist_ok=True)
            if names is not None:
                _atomic_write(d / "names.bin", marshal.dumps(
                    {"digest": names.digest, "names": names.names, "types": names.types}))
            if btf is not None:
                _atomic_write(d / "btf-index.bin", btf.dump_index())
            _atomic_write(d / "profile.json", json.dumps(meta, indent=1, sort_keys=True).encode())
            digest = meta.get("kallsyms_digest")
            if isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{32}", digest):
                alias = self.root / "by-kallsyms"
                alias.mkdir(exist_ok=True)
                _atomic_write(alias / digest, build_id.encode())


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --- finding the profile ------------------------------------------------------------------------------

def find_profile(vm: Any, progress: Progress | None = None, *, cache: ProfileCache | bool | None = True,
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
    mem: PhysicalMemory = vm.memory
    store = ProfileCache() if cache is True else (cache or None)
    tm = _Timer(progress)
    tm.say("looking for VMCOREINFO")
    anchor: _Anchor | None = None
    for text in _vmcoreinfo_candidates(mem) if use_vmcoreinfo else ():
        a = _anchor_from_vmcoreinfo(text)
        if a is not None and _anchor_plausible(vm, mem, a):
            anchor = a
            break
    tm.lap("vmcoreinfo")
    cached: dict[str, bool] = {}
    build_id = anchor.info.get("BUILD-ID", "").lower() if anchor else ""
    meta = store.load_meta(build_id) if store and build_id and re.fullmatch(r"[0-9a-f]{8,128}", build_id) \
        else None

    # --- the kallsyms tables, as kernel virtual addresses ---
    phys_tables: ks.KallsymsTables | None = None
    if anchor is not None:
        read_v = _image_reader(mem, anchor.phys)
        tables: ks.KallsymsTables | None = None
        if meta and "tables" in meta:
            with contextlib.suppress(AradiaError, KeyError, TypeError, ValueError):
                cand = ks.KallsymsTables.from_dict(meta["tables"]).shifted(START_KERNEL_MAP + anchor.slide)
                if ks.names_digest(read_v, cand) == meta.get("kallsyms_digest"):
                    tables = cand
                    cached["layout"] = True
        if tables is None and anchor.sym("kallsyms_names") is not None:
            tm.say("reading the kallsyms tables named by VMCOREINFO")
            with contextlib.suppress(AradiaError):  # bad symbols: fall back to scanning
                tables = ks.tables_from_symbols(read_v, anchor.sym)
        if tables is None:
            tm.say("scanning the kernel image for the kallsyms tables")
            stext = anchor.sym("_stext") or DEFAULT_START_KERNEL + anchor.slide
            lo = anchor.phys(stext)
            phys_tables = _scan_tables(mem, [(lo, lo + (96 << 20))], whole_ram=False)
            tables = phys_tables.shifted(_va_minus_pa(anchor))
        reader: ks.Reader = read_v
    else:
        tm.say("no VMCOREINFO: scanning RAM for the kallsyms token table")
        phys_tables = _scan_tables(mem, _kernel_windows(vm, mem))
        tables = phys_tables
        reader = mem.read
    tm.lap("locate")

    # --- names (cacheable) and addresses (per boot) ---
    names: ks.NameTable | None = None
    digest = ks.names_digest(reader, tables)
    if store and not build_id:
        bid = store.find_by_kallsyms(digest)
        if bid:
            build_id, meta = bid, store.load_meta(bid)
    if store and build_id:
        names = store.load_names(build_id, digest)
    cached["kallsyms"] = names is not None
    if names is None:
        tm.say(f"decoding {tables.count} kallsyms symbols")
        names = ks.decode_names(reader, tables)
    addrs = ks.read_addresses(reader, tables)
    symtab = ks.SymbolTable(addrs, names.types, names.names)
    tm.lap("kallsyms")

    # --- placement: slide and phys_base ---
    text_va = symtab.address("_text") or symtab.address("_stext")
    if text_va is None or text_va < KERNEL_HALF:
        raise GuestDataCorrupt("kallsyms has no _text symbol in the kernel half")
    if anchor is None:
        # kaslr_offset() is _text - __START_KERNEL; __START_KERNEL is 16 MiB into the kernel map
        # unless CONFIG_PHYSICAL_START was changed (then this is the slide plus that difference).
        slide = (text_va - DEFAULT_START_KERNEL) & MASK64
        assert phys_tables is not None
        phys_base, la57_found = _phys_base_by_scan(mem, symtab, phys_tables, text_va)
        anchor = _Anchor(slide & MASK64, phys_base, {}, None)
        tables = phys_tables.shifted(_va_minus_pa(anchor))
    else:
        la57_found = None
        _check_anchor(anchor, symtab)
    phys = anchor.phys
    release_from_info = anchor.info.get("OSRELEASE")

    # --- page tables, direct map ---
    root_va = (symtab.address("init_top_pgt") or anchor.sym("init_top_pgt")
               or symtab.address("swapper_pg_dir") or anchor.sym("swapper_pg_dir"))
    if root_va is None:
        raise UnsupportedKernel("no init_top_pgt/swapper_pg_dir symbol: not an x86-64 kernel?")
    root = phys(root_va)
    la57 = _paging_mode(mem, anchor, symtab, root, text_va, la57_found)
    pob_va = symtab.address("page_offset_base")
    page_offset_base = _read_u64(mem, phys(pob_va)) if pob_va else (DIRECT_MAP_5L if la57 else DIRECT_MAP_4L)
    if page_offset_base < KERNEL_HALF and not (la57 and page_offset_base >= 0xFF00_0000_0000_0000):
        raise GuestDataCorrupt(f"page_offset_base {page_offset_base:#x} is not a kernel address")

    # --- identity ---
    banner = _banner(mem, symtab, phys)
    release = release_from_info or (banner.split(" ")[2] if banner.count(" ") >= 2 else "")
    notes = _notes_build_id(mem, symtab, phys)
    build_id = notes or build_id
    if not build_id:
        raise UnsupportedKernel("the kernel has no build ID (neither .notes nor VMCOREINFO)")
    tm.lap("layout")

    # --- BTF ---
    btf: Btf | None = None
    if with_btf:
        start, stop = symtab.address("__start_BTF"), symtab.address("__stop_BTF")
        blob: bytes | None = None
        if btf_source is not None:
            tm.say(f"reading BTF from {btf_source}")
            kf = read_kernel_file_btf(btf_source)
            if kf.build_id is not None and kf.build_id != build_id:
                raise UnsupportedKernel(f"{btf_source} is kernel build {kf.build_id}; "
                                        f"the guest runs {build_id}")
            blob = kf.blob
        elif start is not None and stop is not None and stop > start:
            blob = mem.read(phys(start), stop - start)
        if blob is not None:
            index = store.load_btf_index(build_id) if store else None
            if index is None:
                tm.say("indexing BTF")
            btf = Btf(blob, index=index)
            cached["btf"] = index is not None and index.get("digest") == btf.digest
    tm.lap("btf")

    profile = KernelProfile(
        release=release, build_id=build_id, banner=banner, kaslr_offset=anchor.slide,
        phys_base=anchor.phys_base, la57=la57, page_offset_base=page_offset_base, kernel_root=root,
        symbols=symtab, kallsyms_tables=tables, btf=btf, vmcoreinfo=anchor.text,
        source="vmcoreinfo" if anchor.text else "scan", cached=cached)
    stale = meta is None or not cached.get("kallsyms") or (btf is not None and not cached.get("btf")) \
        or (anchor.text is not None and not cached.get("layout"))
    if store and stale:
        meta = {"format": PROFILE_FORMAT, "release": release, "build_id": build_id, "banner": banner,
                "tables": tables.shifted(-profile.kernel_base).to_dict(), "kallsyms_digest": names.digest,
                "btf_digest": btf.digest if btf else None}
        store.store(build_id, meta, None if cached.get("kallsyms") else names,
                    btf if btf is not None and not cached.get("btf") else None)
    tm.lap("cache")
    profile.timings = tm.total()
    return profile


def _image_reader(mem: PhysicalMemory, phys: Callable[[int], int]) -> ks.Reader:
    def read(vaddr: int, size: int) -> bytes:
        return mem.read(phys(vaddr), size)

    return read


def _va_minus_pa(a: _Anchor) -> int:
    """What to add to a kernel-image physical address to get its virtual address."""
    return (START_KERNEL_MAP - a.phys_base) & MASK64


def _scan_tables(mem: PhysicalMemory, windows: list[tuple[int, int]], *,
                 whole_ram: bool = True) -> ks.KallsymsTables:
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


def _anchor_plausible(vm: Any, mem: PhysicalMemory, a: _Anchor) -> bool:
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


def _check_anchor(a: _Anchor, symtab: ks.SymbolTable) -> None:
    for name in ("_stext", "init_uts_ns", "init_top_pgt"):
        want, got = a.sym(name), symtab.address(name)
        if want is not None and got is not None and want != got:
            raise GuestDataCorrupt(f"VMCOREINFO says {name} is at {want:#x}, kallsyms says {got:#x}")


def _phys_base_by_scan(mem: PhysicalMemory, symtab: ks.SymbolTable, t_phys: ks.KallsymsTables,
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
        a = _Anchor(0, phys_base, {}, None)
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


def _paging_mode(mem: PhysicalMemory, a: _Anchor, symtab: ks.SymbolTable, root: int, text_va: int,
                 known: bool | None) -> bool:
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
