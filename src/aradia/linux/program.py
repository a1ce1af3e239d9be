"""A drgn ``Program`` over a VM's memory with no DWARF: kallsyms symbols, BTF types, typed globals.

:func:`make_program` builds a ``drgn.Program`` for x86-64 or arm64 and gives it

* **memory**: every guest RAM range as a physical segment, and kernel virtual memory as three
  virtual segments -- the kernel image (``_text``..``_end``, physically contiguous: ``__pa_symbol``),
  the direct map (``page_offset_base`` + physical address) and everything else in the kernel half
  through the kernel's own page tables (``init_top_pgt``) with aradia's walker;
* **VMCOREINFO** (``set_linux_kernel_custom``): the kernel's own text from RAM, or one synthesised
  from the profile when the guest has none;
* **symbols**: the kallsyms table (a symbol finder over :class:`~aradia.linux.kallsyms.SymbolTable`);
* **types**: BTF, converted lazily (:class:`~aradia.linux.btf.DrgnTypes`);
* **objects**: enum constants from BTF; functions (BTF ``FUNC`` + kallsyms address); per-CPU
  variables (BTF ``VAR`` + kallsyms); other globals from :data:`GLOBAL_TYPES`.

**How globals get their types.** BTF describes only per-CPU variables; an ordinary global has an
address (kallsyms) but no type. A wrong type would make drgn read garbage that looks plausible, so
a global is only offered when its type is *known*: :data:`GLOBAL_TYPES` names the C type of the
globals drgn's helpers and aradia's views use (``init_task`` is a ``struct task_struct``,
``modules`` a ``struct list_head``, ``prb`` a ``struct printk_ringbuffer *``, ...). These are
declarations that have not changed across 5.10-6.12; an entry is skipped when its type is not in
the kernel's BTF. Any other data symbol is not found (``KeyError``), as drgn's helpers expect for
a missing global; its address stays available through ``prog.symbol(name)``.

**Freshness.** drgn 0.3 keeps no copy of target memory: every value read calls the segment's read
function, which reads guest RAM now (physical and direct-map reads are plain reads; page-table walks
go through the VM's :class:`~aradia.machine.paging.Translator`, which caches walks only while the
guest stays paused in one epoch). What drgn does cache -- types, symbols, and helper values in
``prog.cache`` derived from boot-time constants (``page_offset_base``, ``vmemmap_base``) -- is fixed
for the life of a boot. So one Program stays valid across pause/resume of the same boot; values a
caller already read (``Object.value_()``) are snapshots of the moment they were read, and a
consistent multi-object view still needs ``vm.paused()``. After a guest reboot (new KASLR) build a
new profile and Program.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import drgn

from aradia.errors import AradiaError, NotRAM, PageFault
from aradia.linux.arm64_profile import platform_aarch64
from aradia.linux.btf import DATASEC, FUNC, VAR, DrgnTypes
from aradia.linux.placement import KERNEL_HALF
from aradia.linux.profile import KernelProfile, find_profile
from aradia.machine.handle import VMHandle
from aradia.progress import Progress

KERNEL_HALF_5L = 0xFF00_0000_0000_0000
_TOP = 1 << 64

GLOBAL_TYPES: dict[str, str] = {
    # tasks, namespaces, credentials
    "init_task": "struct task_struct",
    "init_mm": "struct mm_struct",
    "init_pid_ns": "struct pid_namespace",
    "init_uts_ns": "struct uts_namespace",
    "init_ipc_ns": "struct ipc_namespace",
    "init_user_ns": "struct user_namespace",
    "init_time_ns": "struct time_namespace",
    "init_cgroup_ns": "struct cgroup_namespace",
    "init_nsproxy": "struct nsproxy",
    "init_net": "struct net",
    "init_fs": "struct fs_struct",
    "init_files": "struct files_struct",
    "init_struct_pid": "struct pid",
    "init_cred": "struct cred",
    "init_css_set": "struct css_set",
    "cad_pid": "struct pid *",
    "pid_max": "int",
    "nr_threads": "int",
    "total_forks": "unsigned long",
    "uidhash_table": "struct hlist_head []",
    "cgrp_dfl_root": "struct cgroup_root",
    "root_task_group": "struct task_group",
    "init_thread_union": "union thread_union",
    "task_struct_cachep": "struct kmem_cache *",
    "thread_stack_cache": "struct kmem_cache *",
    # modules
    "modules": "struct list_head",
    "mod_tree": "struct mod_tree_root",
    # printk
    "prb": "struct printk_ringbuffer *",
    "printk_rb_static": "struct printk_ringbuffer",
    "log_buf": "char *",
    "log_buf_len": "u32",
    # memory
    "page_offset_base": "unsigned long",
    "vmemmap_base": "unsigned long",
    "vmalloc_base": "unsigned long",
    "phys_base": "unsigned long",
    "max_pfn": "unsigned long",
    "max_low_pfn": "unsigned long",
    "min_low_pfn": "unsigned long",
    "high_memory": "void *",
    "_totalram_pages": "atomic_long_t",
    "totalreserve_pages": "unsigned long",
    "mem_section": "struct mem_section **",
    "node_data": "struct pglist_data *[]",
    "node_states": "nodemask_t []",
    "contig_page_data": "struct pglist_data",
    "vm_node_stat": "atomic_long_t []",
    "vm_zone_stat": "atomic_long_t []",
    "vm_numa_event": "atomic_long_t []",
    "memblock": "struct memblock",
    "init_top_pgt": "pgd_t []",
    "swapper_pg_dir": "pgd_t []",
    "slab_caches": "struct list_head",
    "vmap_area_list": "struct list_head",
    "vmap_area_root": "struct rb_root",
    "nr_swapfiles": "unsigned int",
    "swap_info": "struct swap_info_struct *[]",
    "total_swap_pages": "long",
    "nr_swap_pages": "atomic_long_t",
    "swapper_spaces": "struct address_space *[]",
    "nr_swapper_spaces": "unsigned int []",
    "vm_committed_as": "struct percpu_counter",
    "sysctl_overcommit_ratio": "int",
    "sysctl_overcommit_kbytes": "unsigned long",
    "hstates": "struct hstate []",
    "hugetlb_max_hstate": "int",
    "iomem_resource": "struct resource",
    "ioport_resource": "struct resource",
    # CPUs, time, IRQs
    "__per_cpu_offset": "unsigned long []",
    "nr_cpu_ids": "unsigned int",
    "nr_node_ids": "unsigned int",
    "__cpu_online_mask": "struct cpumask",
    "__cpu_possible_mask": "struct cpumask",
    "__cpu_present_mask": "struct cpumask",
    "__cpu_active_mask": "struct cpumask",
    "jiffies": "volatile unsigned long",
    "jiffies_64": "u64",
    "avenrun": "unsigned long [3]",
    "nr_irqs": "int",
    "idt_table": "gate_desc []",
    "irq_desc_tree": "struct radix_tree_root",  # up to 6.4
    "sparse_irqs": "struct maple_tree",  # 6.5+
    # file systems
    "super_blocks": "struct list_head",
    "mount_hashtable": "struct hlist_head *",
    "dentry_hashtable": "struct hlist_bl_head *",
    "inode_hashtable": "struct hlist_head *",
    "blockdev_superblock": "struct super_block *",
    "chrdevs": "struct char_device_struct *[255]",
    "major_names": "struct blk_major_name *[255]",
    "cdev_map": "struct kobj_map *",
    "proc_root": "struct proc_dir_entry",
    "sysfs_root_kn": "struct kernfs_node *",
    # networking
    "net_namespace_list": "struct list_head",
    "tcp_hashinfo": "struct inet_hashinfo",
    "udp_table": "struct udp_table",
    "udplite_table": "struct udp_table",
    # devices, bpf
    "pci_root_buses": "struct list_head",
    "devices_kset": "struct kset *",
    "pci_bus_type": "struct bus_type",
    "device_ktype": "struct kobj_type",
    "driver_ktype": "struct kobj_type",
    "bus_ktype": "struct kobj_type",
    "class_ktype": "struct kobj_type",
    "module_ktype": "struct kobj_type",
    "block_class": "struct class",
    "class_kset": "struct kset *",
    "bus_kset": "struct kset *",
    "prog_idr": "struct idr",
    "map_idr": "struct idr",
    "btf_idr": "struct idr",
    "link_idr": "struct idr",
    # misc
    "linux_banner": "const char []",
    "saved_command_line": "char *",
    "boot_command_line": "char []",
    "tainted_mask": "unsigned long",
    "taint_flags": "const struct taint_flag []",
    "gfpflag_names": "const struct trace_print_flags []",
    "kptr_restrict": "int",
    "vmcoreinfo_data": "unsigned char *",
    "kernel_config_data": "char []",
    "system_state": "enum system_states",
}
"""Ordinary (non-per-CPU) globals whose C type aradia vouches for; see the module docstring."""

STRING_ARRAYS: dict[str, int] = {"task_state_array": 32}
"""Globals that are arrays of ``const char *`` whose *length* helpers need (``len()``), with a bound.

The length is what memory shows: the entries from the symbol up to the next symbol that point into
the kernel image at a short printable string (the array is followed by padding or other data)."""

_FUNC_LETTERS = frozenset("tTwW")
_DATA_LETTERS = frozenset("dDbBrRvVgGsSaA")


def platform_x86_64() -> drgn.Platform:
    """drgn's x86-64 platform."""
    return drgn.Platform(drgn.Architecture.X86_64,
                         drgn.PlatformFlags.IS_64_BIT | drgn.PlatformFlags.IS_LITTLE_ENDIAN)


def _binding_kind(letter: str) -> tuple[drgn.SymbolBinding, drgn.SymbolKind]:
    if letter in "wWvV":
        binding = drgn.SymbolBinding.WEAK
    elif letter.isupper():
        binding = drgn.SymbolBinding.GLOBAL
    else:
        binding = drgn.SymbolBinding.LOCAL
    if letter in "tT":
        kind = drgn.SymbolKind.FUNC
    elif letter.lower() in "dbrvgsa":
        kind = drgn.SymbolKind.OBJECT
    else:
        kind = drgn.SymbolKind.UNKNOWN
    return binding, kind


class KernelFinders:
    """The symbol and object finders of one Program (all lookups lazy and memoised)."""

    def __init__(self, prog: drgn.Program, profile: KernelProfile, types: DrgnTypes | None) -> None:
        self.prog = prog
        self.profile = profile
        self.types = types
        self.symtab = profile.symbols
        self._objects: dict[tuple[str, int], drgn.Object | None] = {}

    # --- symbols ---------------------------------------------------------------------------------
    def _symbol(self, i: int) -> drgn.Symbol:
        t = self.symtab
        binding, kind = _binding_kind(t.types[i])
        return drgn.Symbol(t.names[i], t.addresses[i], t.size(i), binding, kind)

    def find_symbols(self, prog: drgn.Program, name: str | None, address: int | None,
                     one: bool) -> Sequence[drgn.Symbol]:
        """drgn symbol finder: ``(prog, name, address, one) -> [Symbol]``."""
        t = self.symtab
        if name is not None:
            idx = t.all_named(name) if not one else [i for i in [t.index_of(name)] if i is not None]
            if address is not None:
                idx = [i for i in idx if t.addresses[i] <= address < t.addresses[i] + max(1, t.size(i))]
            elif not idx and name in self.profile.recovered:
                return [drgn.Symbol(name, self.profile.recovered[name], 0, drgn.SymbolBinding.GLOBAL,
                                    drgn.SymbolKind.OBJECT)]
        elif address is not None:
            # Lower-half values are user addresses, never the absolute per-CPU offsets kallsyms
            # lists at 0.. (which would otherwise "contain" every small number).
            idx = [i for i in t.containing(address) if t.addresses[i] >= KERNEL_HALF_5L]
            if one and idx:
                # The best match: a global over a local over a weak one, then the last defined.
                idx = [max(idx, key=lambda i: (t.types[i].isupper() and t.types[i] not in "WV", i))]
        else:
            idx = range(len(t))
        if one:
            idx = list(idx)[:1]
        return [self._symbol(i) for i in idx]

    # --- objects ---------------------------------------------------------------------------------
    def find_object(self, prog: drgn.Program, name: str, flags: drgn.FindObjectFlags,
                    filename: str | None) -> drgn.Object | None:
        """drgn object finder: ``(prog, name, flags, filename) -> Object | None``."""
        if filename is not None:
            return None
        key = (name, flags.value)
        if key in self._objects:
            return self._objects[key]
        obj = self._find(name, flags)
        if len(self._objects) < 1 << 16:
            self._objects[key] = obj
        return obj

    def _find(self, name: str, flags: drgn.FindObjectFlags) -> drgn.Object | None:
        btf = self.types.btf if self.types else None
        if btf is not None and flags & drgn.FindObjectFlags.CONSTANT:
            hit = btf.enumerator(name)
            if hit is not None:
                return drgn.Object(self.prog, self.types.convert(hit[0]), value=hit[1])  # type: ignore[union-attr]
        want_func = bool(flags & drgn.FindObjectFlags.FUNCTION)
        want_var = bool(flags & drgn.FindObjectFlags.VARIABLE)
        if not (want_func or want_var):
            return None
        if btf is not None:
            for tid in btf.ids_by_name(name):
                kind = btf.kind(tid)
                if (kind == FUNC and want_func) or (kind == VAR and want_var):
                    addr = self._address(name, _FUNC_LETTERS if kind == FUNC else _DATA_LETTERS)
                    if addr is not None:
                        return drgn.Object(self.prog, self.types.convert(tid), address=addr)  # type: ignore[union-attr]
        if want_var and name in STRING_ARRAYS:
            return self._string_array(name, STRING_ARRAYS[name])
        if want_var and name in GLOBAL_TYPES:
            addr = self._address(name, _DATA_LETTERS)
            if addr is not None:
                try:
                    typ = self.prog.type(GLOBAL_TYPES[name])
                except LookupError:
                    return None
                return drgn.Object(self.prog, typ, address=addr)
        return None

    def _string_array(self, name: str, limit: int) -> drgn.Object | None:
        t = self.symtab
        i = t.index_of(name)
        text, end = _image(self.profile)
        addr = self.profile.symbol(name)
        if addr is None or text is None or end is None:
            return None
        n = min(limit, t.size(i) // 8) if i is not None else limit  # recovered: up to the strings
        count = 0
        with contextlib.suppress(drgn.FaultError):
            raw = self.prog.read(addr, 8 * n)
            for k in range(n):
                p = int.from_bytes(raw[8 * k:8 * k + 8], "little")
                if not text <= p < end:
                    break
                s = self.prog.read(p, 64).split(b"\0", 1)
                if len(s) < 2 or not s[0] or not all(32 <= c < 127 for c in s[0]):
                    break
                count += 1
        if not count:
            return None
        elem = self.prog.pointer_type(self.prog.type("char").qualified(drgn.Qualifiers.CONST)).qualified(
            drgn.Qualifiers.CONST)
        return drgn.Object(self.prog, self.prog.array_type(elem, count), address=addr)

    def _address(self, name: str, letters: frozenset[str]) -> int | None:
        t = self.symtab
        i = t.index_of(name)
        if i is None:
            return self.profile.recovered.get(name) if letters is _DATA_LETTERS else None
        if t.types[i] in letters:
            return t.addresses[i]
        for j in t.all_named(name):
            if t.types[j] in letters:
                return t.addresses[j]
        return None


class _Reader:
    """drgn segment read functions over the VM's memory, raising drgn.FaultError on holes."""

    def __init__(self, vm: VMHandle, profile: KernelProfile) -> None:
        self.vm = vm
        self.mem = vm.memory
        self.profile = profile
        self.root = profile.kernel_root
        self.la57 = profile.la57
        self.translator = vm.translator
        self.direct_base = profile.direct_phys(profile.page_offset_base)  # RAM the direct map starts at
        self.reads = 0

    def physical(self, address: int, count: int, offset: int, physical: bool) -> bytes:
        self.reads += 1
        try:
            return self.mem.read(address, count)
        except NotRAM as e:
            raise drgn.FaultError(str(e), e.address) from None

    def image(self, address: int, count: int, offset: int, physical: bool) -> bytes:
        self.reads += 1
        try:
            return self.mem.read(self.profile.kernel_phys(address), count)
        except NotRAM as e:
            raise drgn.FaultError(f"kernel image address {address:#x}: {e}", address) from None

    def direct(self, address: int, count: int, offset: int, physical: bool) -> bytes:
        self.reads += 1
        try:
            return self.mem.read(self.direct_base + offset, count)
        except NotRAM as e:
            raise drgn.FaultError(f"direct-map address {address:#x}: {e}", address) from None

    def paged(self, address: int, count: int, offset: int, physical: bool) -> bytes:
        self.reads += 1
        try:
            return self.translator.read(self.root, address, count, la57=self.la57)
        except PageFault as e:
            raise drgn.FaultError(str(e), e.vaddr) from None
        except NotRAM as e:
            raise drgn.FaultError(f"virtual address {address:#x}: {e}", address) from None


def make_program(vm: VMHandle, profile: KernelProfile | None = None, *,
                 progress: Progress | None = None) -> drgn.Program:
    """A drgn Program for the kernel running in ``vm`` (live or a dump), with no DWARF.

    ``profile`` defaults to :func:`~aradia.linux.profile.find_profile` (cached). The program's
    ``prog.cache["aradia"]`` holds the profile, the finders and the reader (for statistics).
    """
    if profile is None:
        profile = find_profile(vm, progress)
    prog = drgn.Program(platform_aarch64() if profile.arch == "arm64" else platform_x86_64())
    reader = _Reader(vm, profile)
    for r in vm.memory.ranges():
        prog.add_memory_segment(r.start, r.size, reader.physical, True)
    try:
        prog.set_linux_kernel_custom(profile.vmcoreinfo_text(), bool(getattr(vm, "live", False)))
    except ValueError as e:
        raise AradiaError(f"drgn rejected the kernel's VMCOREINFO: {e}") from e
    # arm64's kernel half starts where its linear map does
    half = profile.page_offset_base if profile.arch == "arm64" else KERNEL_HALF_5L if profile.la57 \
        else KERNEL_HALF
    # Later segments take precedence: generic page walk first, then the two linear regions.
    prog.add_memory_segment(half, _TOP - half, reader.paged, False)
    top = max((r.end for r in vm.memory.ranges()), default=0)
    if top > reader.direct_base:
        prog.add_memory_segment(profile.page_offset_base, top - reader.direct_base, reader.direct, False)
    text, end = _image(profile)
    if text is not None and end is not None and 0 < end - text < 1 << 30:
        prog.add_memory_segment(text, end - text, reader.image, False)
    types, finders = add_finders(prog, profile)
    prog.cache["aradia"] = {"profile": profile, "finders": finders, "reader": reader, "types": types}
    return prog


def add_finders(prog: drgn.Program, profile: KernelProfile) -> tuple[DrgnTypes | None, KernelFinders]:
    """Register ``profile``'s BTF types, kallsyms symbols and typed globals as ``prog``'s last finders
    (any drgn finds itself, such as DWARF, are asked first)."""
    types = DrgnTypes(prog, profile.btf) if profile.btf is not None else None
    if types is not None:
        prog.register_type_finder("aradia-btf", types.finder, enable_index=-1)
    finders = KernelFinders(prog, profile, types)
    prog.register_symbol_finder("aradia-kallsyms", finders.find_symbols, enable_index=-1)
    prog.register_object_finder("aradia", finders.find_object, enable_index=-1)
    return types, finders


def _image(profile: KernelProfile) -> tuple[int | None, int | None]:
    """The kernel image's ``[_text, _end)`` (arm64 lists neither: ``_stext`` and the recovered end)."""
    return profile.symbol("_text") or profile.symbol("_stext"), profile.symbol("_end")


def percpu_variables(profile: KernelProfile) -> list[str]:
    """Names of the per-CPU variables BTF describes (its ``.data..percpu`` DATASEC)."""
    btf = profile.btf
    if btf is None:
        return []
    out: list[str] = []
    for tid in range(1, btf.count + 1):
        if btf.kind(tid) == DATASEC:
            for m in btf.type(tid).members:
                with contextlib.suppress(AradiaError):
                    out.append(btf.type(m.type).name)
    return out

