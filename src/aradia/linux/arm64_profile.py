"""The kernel profile of an arm64 guest, from its RAM alone: placement, kallsyms, BTF and the data
symbols kallsyms lacks.

Debian's arm64 kernels are built without ``CONFIG_KALLSYMS_ALL``: kallsyms lists functions only, so
neither ``__start_BTF`` nor ``init_task`` nor ``modules`` has an address there. What
:func:`find_arm64_profile` does instead, each step checked before it is believed:

1. **Placement** from the VMCOREINFO text (:mod:`aradia.linux.arm64_layout`): ``kimage_voffset``,
   ``PHYS_OFFSET``, ``VA_BITS``, the KASLR slide, ``swapper_pg_dir`` and the kallsyms tables.
2. **The image's extent** from the kernel's own page tables: the runs ``swapper_pg_dir`` maps with
   ``virtual - physical == kimage_voffset``, from ``_stext`` upwards (across the hole the freed init
   sections leave), end at ``_end`` (the image header page below ``_stext`` is unmapped once booted,
   so its ``image_size`` is not readable).
3. **BTF**: the ``.BTF`` section lies between ``_etext`` and ``__init_begin`` (in ``.rodata``): the
   blob is found by its header (magic ``0xeB9F``, version 1, header length 24) and must parse.
4. **Data symbols** (:data:`RECOVERED`): ``init_task`` is the one ``struct task_struct`` in the
   image's data whose ``comm`` is ``swapper/0``, whose pid is 0 and whose ``tasks`` list links back to
   it; what hangs off it is read through it (``init_pid_ns`` from its pid, ``init_nsproxy``,
   ``init_net``, ``init_ipc_ns``, ``init_mm``, ``init_user_ns``); ``modules`` is the one
   ``list_head`` in the image's data whose neighbours are ``struct module`` list nodes in the module
   area that link back to it (an empty list cannot be told from any other empty list: with no
   module loaded it stays unknown, and ``lsmod`` says so).

Linear-map addresses translate as ``va - PAGE_OFFSET + PHYS_OFFSET`` with ``PAGE_OFFSET`` =
``-(1 << VA_BITS)`` (the kernel's ``__va``/``__pa`` once ``memstart_addr`` is known: VMCOREINFO's
``PHYS_OFFSET`` is that variable).
"""

from __future__ import annotations

import contextlib
import struct
from typing import NamedTuple

import drgn

from aradia.errors import AradiaError, GuestDataCorrupt, UnsupportedKernel
from aradia.linux.arm64_layout import Arm64Layout, find_layout, kallsyms_with_tables
from aradia.linux.btf import Btf, BtfError, DrgnTypes
from aradia.linux.kernel_profile import KernelProfile
from aradia.linux.profile_cache import PROFILE_FORMAT, ProfileCache, valid_build_id
from aradia.machine.arch import Arm64
from aradia.machine.arch.base import MASK64
from aradia.machine.handle import VMHandle
from aradia.machine.paging import mappings
from aradia.progress import Progress, StepTimer

MAX_IMAGE = 512 << 20  # no arm64 kernel image is larger; bounds the extent walk
MAX_IMAGE_GAP = 64 << 20  # the init sections, unmapped once freed (4.5 MiB on Debian's 6.1)
BTF_HEADER = struct.Struct("<HBBIIIII")
BTF_PREFIX = b"\x9f\xeb\x01\x00\x18\x00\x00\x00"  # magic, version 1, flags 0, header length 24
MAX_LIST_STEPS = 4096
SWAPPER_COMM = b"swapper/0\0"
MAX_MODULE_CANDIDATES = 1 << 14

RECOVERED = ("init_task", "init_pid_ns", "init_struct_pid", "init_nsproxy", "init_net", "init_ipc_ns",
             "init_mm", "init_user_ns", "init_cred", "modules")
"""Data symbols an arm64 profile recovers from RAM (the others of VMCOREINFO are taken as it states)."""

# (not mem_section: VMCOREINFO prints that pointer's value, not its address)
_VMCOREINFO_SYMBOLS = ("init_uts_ns", "prb", "printk_rb_static", "clear_seq", "vmap_area_list",
                       "node_online_map", "swapper_pg_dir")


def platform_aarch64() -> drgn.Platform:
    """drgn's AArch64 platform."""
    return drgn.Platform(drgn.Architecture.AARCH64,
                         drgn.PlatformFlags.IS_64_BIT | drgn.PlatformFlags.IS_LITTLE_ENDIAN)


class Area(NamedTuple):
    """Bytes of the kernel image read once (``.rodata``, or the data after ``__init_begin``) and the
    kernel virtual address they start at."""

    start: int
    data: bytes


class KernelMemory:
    """Reads of arm64 kernel virtual memory: the image and the linear map physically, the rest (module
    area, vmalloc) through ``swapper_pg_dir``."""

    def __init__(self, vm: VMHandle, layout: Arm64Layout, image: tuple[int, int]) -> None:
        self.vm, self.layout = vm, layout
        self.image = image
        self.page_offset = page_offset(layout.va_bits)
        self.root = layout.kernel_root

    def phys(self, vaddr: int) -> int | None:
        """Physical address of an image or linear-map address (None: elsewhere, needs a walk)."""
        lo, hi = self.image
        if lo <= vaddr < hi:
            return self.layout.phys(vaddr)
        if self.page_offset <= vaddr < self.page_offset + (1 << (self.layout.va_bits - 1)):
            return vaddr - self.page_offset + self.layout.phys_offset
        return None

    def read(self, vaddr: int, size: int) -> bytes:
        """``size`` bytes at kernel virtual ``vaddr`` (NotRAM/PageFault when unreadable)."""
        p = self.phys(vaddr)
        if p is not None:
            return self.vm.memory.read(p, size)
        return self.vm.translator.read(self.root, vaddr, size)

    def u64(self, vaddr: int) -> int:
        """One little-endian u64."""
        return int.from_bytes(self.read(vaddr, 8), "little")

    def area(self, start: int, stop: int) -> Area:
        """``[start, stop)`` of the image, read once for the scans that look at it."""
        return Area(start, self.read(start, stop - start))


def page_offset(va_bits: int) -> int:
    """The first linear-map address of a kernel with ``va_bits`` of VA (arm64 ``PAGE_OFFSET``)."""
    return (-(1 << va_bits)) & MASK64


def image_extent(vm: VMHandle, layout: Arm64Layout, arch: Arm64, stext: int) -> tuple[int, int]:
    """``(_stext, _end)``: the image as the kernel maps it (runs at ``kimage_voffset`` from ``_stext``)."""
    end = stext
    for run in mappings(vm.memory, layout.kernel_root, False, stext, stext + MAX_IMAGE, arch=arch):
        if (run.vaddr - run.paddr) & MASK64 != layout.kimage_voffset:
            if run.vaddr > end:
                break
            continue
        if run.vaddr > end + MAX_IMAGE_GAP:  # the freed init sections leave a hole; wider is not ours
            break
        end = max(end, run.end)
    if end == stext:
        raise GuestDataCorrupt(f"swapper_pg_dir does not map _stext {stext:#x} at kimage_voffset")
    return stext, end


def find_btf(rodata: Area) -> tuple[int, bytes] | None:
    """``(address, blob)`` of the vmlinux BTF in ``.rodata``, or None."""
    start, area = rodata
    best: tuple[int, bytes] | None = None
    at = area.find(BTF_PREFIX)
    while at >= 0:
        _m, _v, _f, hdr, _to, tlen, soff, slen = BTF_HEADER.unpack_from(area, at)
        size = hdr + max(tlen, soff + slen)
        if at + size <= len(area) and (best is None or size > len(best[1])):
            blob = area[at:at + size]
            with contextlib.suppress(BtfError):
                Btf(blob)  # the header is consistent
                best = (start + at, blob)
        at = area.find(BTF_PREFIX, at + 8)
    return best


class _Offsets:
    """Member offsets from BTF (through drgn's types, converted lazily)."""

    def __init__(self, btf: Btf) -> None:
        self.prog = drgn.Program(platform_aarch64())
        self.prog.register_type_finder("aradia-btf", DrgnTypes(self.prog, btf).finder, enable_index=-1)

    def __call__(self, struct_name: str, member: str) -> int:
        return int(drgn.offsetof(self.prog.type(f"struct {struct_name}"), member))


def recover_symbols(mem: KernelMemory, btf: Btf, data: Area) -> dict[str, int]:
    """The :data:`RECOVERED` data symbols found in ``data`` (the image after ``__init_begin``) and
    through ``init_task``; raises GuestDataCorrupt when no ``init_task`` holds together."""
    off = _Offsets(btf)
    out: dict[str, int] = {}
    task = _init_task(mem, off, data)
    out["init_task"] = task
    pid = mem.u64(task + off("task_struct", "thread_pid"))
    out["init_struct_pid"] = pid
    out["init_pid_ns"] = mem.u64(pid + off("pid", "numbers") + off("upid", "ns"))
    nsproxy = mem.u64(task + off("task_struct", "nsproxy"))
    out["init_nsproxy"] = nsproxy
    out["init_net"] = mem.u64(nsproxy + off("nsproxy", "net_ns"))
    out["init_ipc_ns"] = mem.u64(nsproxy + off("nsproxy", "ipc_ns"))
    init_mm = _init_mm(mem, off, data)
    if init_mm is not None:
        out["init_mm"] = init_mm
    cred = mem.u64(task + off("task_struct", "real_cred"))
    out["init_cred"] = cred
    out["init_user_ns"] = mem.u64(cred + off("cred", "user_ns"))
    lo, hi = mem.image
    for name in ("init_pid_ns", "init_nsproxy", "init_net", "init_ipc_ns", "init_user_ns",
                 "init_cred", "init_struct_pid"):
        if not lo <= out[name] < hi:
            raise GuestDataCorrupt(f"init_task's {name} {out[name]:#x} is not in the kernel image")
    modules = _modules_head(mem, off, data)
    if modules is not None:
        out["modules"] = modules
    return out


def _init_task(mem: KernelMemory, off: _Offsets, data: Area) -> int:
    comm, tasks, pid = off("task_struct", "comm"), off("task_struct", "tasks"), off("task_struct", "pid")
    at = data.data.find(SWAPPER_COMM)
    tried = 0
    while at >= 0 and tried < 64:
        tried += 1
        task = data.start + at - comm
        with contextlib.suppress(AradiaError):
            if (task & 7) == 0 and _links_back(mem, task + tasks) and \
                    int.from_bytes(mem.read(task + pid, 4), "little") == 0:
                return task
        at = data.data.find(SWAPPER_COMM, at + 1)
    raise GuestDataCorrupt(f"no init_task (a task called swapper/0 whose task list links back to it) "
                           f"in the kernel's data ({tried} candidates)")


def _init_mm(mem: KernelMemory, off: _Offsets, data: Area) -> int | None:
    """``init_mm``: the ``mm_struct`` in the image's data whose ``pgd`` is ``swapper_pg_dir`` and whose
    ``mm_users`` is positive and below 2**20 (idle tasks borrow other mms lazily, so
    ``init_task.active_mm`` is not it)."""
    pgd = mem.layout.sym("swapper_pg_dir")
    if pgd is None:
        return None
    pgd_off = off("mm_struct", "pgd")
    users = off("mm_struct", "mm_users")
    for at in _aligned_hits(data.data, pgd, 64):
        mm = data.start + at - pgd_off
        with contextlib.suppress(AradiaError):
            if 0 < int.from_bytes(mem.read(mm + users, 4), "little") < 1 << 20:
                return mm
    return None


def _links_back(mem: KernelMemory, head: int) -> bool:
    """Whether the list at ``head`` is a well-formed cycle through ``head`` (next->prev checks)."""
    node = head
    for _ in range(MAX_LIST_STEPS):
        nxt = mem.u64(node)
        if mem.u64(nxt + 8) != node:
            return False
        node = nxt
        if node == head:
            return True
    return False


def _modules_head(mem: KernelMemory, off: _Offsets, data: Area) -> int | None:
    """The ``modules`` list head: in the image's data, its next and prev in the module or vmalloc
    area (with KASLR, arm64 places modules near the kernel image, not only in ``MODULES_VADDR``..),
    each a ``struct module`` (state 0-3, a printable name) on a list that links back to the head."""
    info = mem.layout.info
    try:
        lo = int(info["NUMBER(MODULES_VADDR)"], 0)
        hi = int(info["NUMBER(VMALLOC_END)"], 0)
    except (KeyError, ValueError):
        return None
    list_off, name_off = off("module", "list"), off("module", "name")
    words = memoryview(data.data)[:len(data.data) & ~7].cast("Q")
    img_lo, img_hi = mem.image
    tried = 0
    prev_inside = False
    for i, w in enumerate(words):
        inside = lo <= w < hi and not img_lo <= w < img_hi
        if inside and prev_inside:
            tried += 1
            if tried > MAX_MODULE_CANDIDATES:
                break
            head = data.start + (i - 1) * 8
            with contextlib.suppress(AradiaError):
                if _is_module(mem, words[i - 1] - list_off, name_off) and _links_back(mem, head):
                    return head
        prev_inside = inside
    return None


def _is_module(mem: KernelMemory, mod: int, name_off: int) -> bool:
    state = int.from_bytes(mem.read(mod, 4), "little")
    name = mem.read(mod + name_off, 56).split(b"\0", 1)[0]
    return state <= 3 and 0 < len(name) < 56 and all(c == 0x5F or c == 0x2D or chr(c).isalnum()
                                                       for c in name)


def find_arm64_profile(vm: VMHandle, progress: Progress | None = None, *,
                       cache: ProfileCache | bool | None = True, with_btf: bool = True) -> KernelProfile:
    """The :class:`~aradia.linux.profile.KernelProfile` of the arm64 kernel in ``vm`` (see the module
    docstring; :func:`~aradia.linux.profile.find_profile` comes here for arm64 VMs). Only the BTF
    index is cached (kallsyms decodes in a tenth of a second). Raises KernelNotFound,
    GuestDataCorrupt or UnsupportedKernel."""
    tm = StepTimer(progress)
    tm.say("looking for the arm64 VMCOREINFO")
    layout = find_layout(vm)
    arch = vm.arch if isinstance(vm.arch, Arm64) else Arm64()
    if arch.va_bits != layout.va_bits:
        raise UnsupportedKernel(f"the kernel's VMCOREINFO says VA_BITS={layout.va_bits} but the VM is "
                                f"walked with {arch.va_bits} bits")
    tm.lap("vmcoreinfo")
    tm.say("reading kallsyms")
    tables, symtab = kallsyms_with_tables(vm, layout)
    tm.lap("kallsyms")
    stext = symtab.address("_stext") or layout.sym("_stext")
    etext, init = symtab.address("_etext"), symtab.address("__init_begin")
    if stext is None or etext is None or init is None or not stext < etext < init:
        raise GuestDataCorrupt("arm64 kallsyms lacks _stext < _etext < __init_begin")
    image = image_extent(vm, layout, arch, stext)
    mem = KernelMemory(vm, layout, image)
    try:
        rodata = mem.area(etext, init)
    except AradiaError:
        if with_btf:
            raise
        rodata = Area(etext, b"")  # then only the banner is missing
    tm.lap("layout")
    build_id = layout.info.get("BUILD-ID", "").lower()
    store = ProfileCache() if cache is True else (cache or None)
    btf: Btf | None = None
    recovered: dict[str, int] = {}
    cached_btf = False
    if with_btf:
        tm.say("looking for BTF in the kernel's rodata")
        found = find_btf(rodata)
        if found is None:
            raise UnsupportedKernel("the arm64 kernel has no BTF in its image (CONFIG_DEBUG_INFO_BTF)")
        index = store.load_btf_index(build_id) if store and valid_build_id(build_id) else None
        btf = Btf(found[1], index=index)
        cached_btf = index is not None and index.get("digest") == btf.digest
        if store and valid_build_id(build_id) and not cached_btf:
            store.store(build_id, {"format": PROFILE_FORMAT, "arch": "arm64", "release": layout.info.get(
                "OSRELEASE", ""), "build_id": build_id, "btf_digest": btf.digest}, None, btf)
        tm.lap("btf")
        tm.say("recovering init_task and the module list")
        recovered = recover_symbols(mem, btf, mem.area(init, image[1]))
        states = _task_state_array(rodata)
        if states is not None:
            recovered["task_state_array"] = states
        recovered["__start_BTF"], recovered["__stop_BTF"] = found[0], found[0] + len(found[1])
    for name in _VMCOREINFO_SYMBOLS:
        addr = layout.sym(name)
        if addr is not None:
            recovered.setdefault(name, addr)
    recovered["_end"] = image[1]
    tm.lap("symbols")
    release = layout.info.get("OSRELEASE", "")
    return KernelProfile(
        release=release, build_id=build_id, banner=_banner(rodata, release),
        kaslr_offset=layout.kaslr_offset, phys_base=layout.phys_offset, la57=False,
        page_offset_base=mem.page_offset, kernel_root=layout.kernel_root, symbols=symtab,
        kallsyms_tables=tables, btf=btf, vmcoreinfo=layout.text, source="vmcoreinfo",
        cached={"btf": cached_btf}, timings=tm.total(), arch="arm64", kimage_voffset=layout.kimage_voffset,
        recovered=recovered)


def _task_state_array(rodata: Area) -> int | None:
    """``task_state_array`` in ``.rodata``: the pointer array whose first entry is ``"R (running)"``
    and whose second is ``"S (sleeping)"``."""
    start, area = rodata
    at = area.find(b"R (running)\0")
    while at >= 0:
        for ptr in _aligned_hits(area, start + at, 16):
            second = int.from_bytes(area[ptr + 8:ptr + 16], "little") - start
            if 0 <= second < len(area) and area[second:second + 13] == b"S (sleeping)\0":
                return start + ptr
        at = area.find(b"R (running)\0", at + 1)
    return None


def _aligned_hits(area: bytes, value: int, limit: int) -> list[int]:
    """Offsets of up to ``limit`` 8-byte-aligned little-endian u64s equal to ``value`` in ``area``."""
    needle = value.to_bytes(8, "little")
    out: list[int] = []
    at = area.find(needle)
    while at >= 0 and len(out) < limit:
        if at % 8 == 0:
            out.append(at)
        at = area.find(needle, at + 1)
    return out


def _banner(rodata: Area, release: str) -> str:
    """``linux_banner`` in ``.rodata`` (``Linux version <release> ...``), or ""."""
    area = rodata.data
    at = area.find(f"Linux version {release} ".encode())
    if at < 0:
        return ""
    return area[at:at + 512].split(b"\0", 1)[0].decode("ascii", "replace").rstrip("\n")

