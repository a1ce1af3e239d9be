"""Memory maps of a process (what ``/proc/<pid>/maps`` shows), and reads of its user memory."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import drgn
from drgn.helpers.linux.mm import access_remote_vm, for_each_vma, virt_to_phys

from aradia.errors import AradiaError
from aradia.linux.bounds import GUEST_ERRORS, Warnings, attempt, bounded, cstring
from aradia.linux.processes import find_task
from aradia.linux.walks import d_path, mt_entries

VM_READ, VM_WRITE, VM_EXEC, VM_MAYSHARE = 0x1, 0x2, 0x4, 0x80
MAX_USER_READ = 64 << 20


@dataclass
class Mapping:
    """One VMA: ``[start, end)``, ``rwxp``-style permissions, file offset and path (or a [name])."""

    start: int
    end: int
    perms: str
    offset: int
    path: str
    inode: int = 0


def _special_name(vma: drgn.Object, mm: drgn.Object, special_ops: set[int]) -> str:
    start, end = int(vma.vm_start), int(vma.vm_end)
    if vma.vm_ops.value_() in special_ops:
        sm = drgn.cast("struct vm_special_mapping *", vma.vm_private_data)
        return cstring(sm.name, 256)
    if start <= int(mm.brk) and end >= int(mm.start_brk):
        return "[heap]"
    if start <= int(mm.start_stack) <= end:
        return "[stack]"
    return ""


def _special_ops(prog: drgn.Program, mm: drgn.Object, warnings: Warnings) -> set[int]:
    """The ``vm_operations_struct`` addresses of special mappings (``[vdso]``, ``[vvar]``): from
    kallsyms or, where it lists no data (arm64), learnt from the VMA at ``mm->context.vdso`` (the
    vDSO the kernel installed with its special-mapping ops)."""
    out = set()
    for name in ("special_mapping_vmops", "legacy_special_mapping_vmops"):
        with contextlib.suppress(LookupError):
            out.add(prog.symbol(name).address)
    if out:
        return out
    with contextlib.suppress(*GUEST_ERRORS, AttributeError):
        vdso = int(mm.context.vdso)
        for vma in vmas(mm, "vdso", warnings):
            if int(vma.vm_start) == vdso and not vma.vm_file:
                out.add(vma.vm_ops.value_())
                break
    return out


def vmas(mm: drgn.Object, what: str, warnings: Warnings) -> Iterator[drgn.Object]:
    """The VMAs (``struct vm_area_struct *``) of ``mm`` in address order: the maple tree (6.1+)
    through a bounded walk, or the ``vm_next`` list before 6.1 (stop it with :func:`bounded`)."""
    try:
        mt = mm.mm_mt.address_of_()
    except AttributeError:
        yield from for_each_vma(mm)
        return
    vma_ptr = mm.prog_.type("struct vm_area_struct *")
    for _first, _last, entry in mt_entries(mt, what, warnings):
        yield drgn.Object(mm.prog_, vma_ptr, entry)


def maps(prog: drgn.Program, pid: int, *, warnings: Warnings | None = None) -> list[Mapping]:
    """The memory maps of process ``pid`` in address order; empty for a kernel thread."""
    warnings = Warnings() if warnings is None else warnings
    task = find_task(prog, pid)
    mm = task.mm
    if not mm:
        return []
    special = _special_ops(prog, mm, warnings)
    out = []
    for vma in bounded(vmas(mm, f"maps of {pid}", warnings), f"maps of {pid}", warnings, limit=1 << 20,
                       key=lambda v: v.value_()):
        try:
            flags = int(vma.vm_flags)
            perms = "".join((
                "r" if flags & VM_READ else "-", "w" if flags & VM_WRITE else "-",
                "x" if flags & VM_EXEC else "-", "s" if flags & VM_MAYSHARE else "p"))
            f = vma.vm_file
            if f:
                path = attempt(lambda f=f: d_path(f.f_path).decode(errors="replace"), "?",
                               f"maps of {pid}: path", warnings)
                out.append(Mapping(int(vma.vm_start), int(vma.vm_end), perms, int(vma.vm_pgoff) << 12,
                                   path, int(f.f_inode.i_ino)))
            else:
                out.append(Mapping(int(vma.vm_start), int(vma.vm_end), perms, 0,
                                   _special_name(vma, mm, special)))
        except GUEST_ERRORS as e:
            warnings.add(f"maps of {pid}: VMA at {vma.value_():#x} unreadable ({e})")
    return out


def user_root(prog: drgn.Program, pid: int) -> int:
    """The guest-physical address of process ``pid``'s page-table root (its ``mm->pgd``)."""
    task = find_task(prog, pid)
    if not task.mm:
        raise AradiaError(f"process {pid} is a kernel thread: it has no user memory")
    try:
        pgd = task.mm.pgd.value_()
        profile = prog.cache.get("aradia", {}).get("profile")
        # drgn 0.3 finds no direct-map offset for arm64 kernels without DWARF; the profile knows it
        return int(profile.direct_phys(pgd)) if profile is not None else int(virt_to_phys(task.mm.pgd))
    except drgn.FaultError as e:
        raise AradiaError(f"process {pid}: its mm is unreadable ({e})") from e


def read_user(prog: drgn.Program, pid: int, address: int, size: int) -> bytes:
    """Read ``size`` bytes of process ``pid``'s memory at user virtual ``address``."""
    if not 0 <= size <= MAX_USER_READ:
        raise AradiaError(f"read size {size} out of range (0..{MAX_USER_READ})")
    task = find_task(prog, pid)
    if not task.mm:
        raise AradiaError(f"process {pid} is a kernel thread: it has no user memory")
    try:
        return access_remote_vm(task.mm, address, size)
    except drgn.FaultError as e:
        raise AradiaError(f"process {pid}: address {address:#x}+{size:#x} is not mapped ({e})") from e
