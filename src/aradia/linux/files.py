"""Open files of a process (what ``/proc/<pid>/fd`` and ``/proc/<pid>/fdinfo`` show)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import drgn

from aradia.errors import AradiaError
from aradia.linux.bounds import GUEST_ERRORS, Warnings, attempt, bounded, cstring
from aradia.linux.processes import find_task
from aradia.linux.walks import MAX_FDS, NAME_MAX, d_path, open_files

O_CLOEXEC = 0o2000000

# Pseudo filesystems whose dentries name themselves (d_op->d_dname), as /proc/<pid>/fd shows them.
_DNAME = {
    "sockfs_dname": lambda d, ino: f"socket:[{ino}]",
    "pipefs_dname": lambda d, ino: f"pipe:[{ino}]",
    "anon_inodefs_dname": lambda d, ino: "anon_inode:" + cstring(d.d_name.name, NAME_MAX),
}


@dataclass
class OpenFile:
    """One open file descriptor: number, path as ``/proc/<pid>/fd`` shows it, flags (octal in fdinfo)."""

    fd: int
    path: str
    flags: int
    mode: int
    pos: int
    inode: int


def file_path(file: drgn.Object) -> str:
    """The path of a ``struct file *`` as ``readlink /proc/<pid>/fd/N`` shows it."""
    dentry = file.f_path.dentry
    d_op = dentry.d_op
    if d_op and d_op.d_dname:
        with contextlib.suppress(LookupError):
            name = file.prog_.symbol(d_op.d_dname.value_()).name
            if name in _DNAME:
                return _DNAME[name](dentry, int(file.f_inode.i_ino))
    path = d_path(file.f_path).decode(errors="replace")
    # Unlinked but still open: unhashed and not a root.
    if not dentry.d_hash.pprev and dentry.d_parent != dentry:
        path += " (deleted)"
    return path


def _close_on_exec(task: drgn.Object, fd: int) -> bool:
    fdt = task.files.fdt
    if fd >= int(fdt.max_fds):
        return False
    word = fdt.close_on_exec[fd // 64]
    return bool(int(word) >> (fd % 64) & 1)


def files(prog: drgn.Program, pid: int, *, warnings: Warnings | None = None) -> list[OpenFile]:
    """The open file descriptors of process ``pid``, by number."""
    warnings = Warnings() if warnings is None else warnings
    task = find_task(prog, pid)
    if not task.files:
        return []
    out = []
    for fd, file in bounded(open_files(task), f"files of {pid}", warnings, limit=MAX_FDS):
        try:
            flags = int(file.f_flags)
            if attempt(lambda fd=fd: _close_on_exec(task, fd), False, f"fd {fd} of {pid}", warnings):
                flags |= O_CLOEXEC
            path = attempt(lambda file=file: file_path(file), "?", f"fd {fd} of {pid}: path", warnings)
            out.append(OpenFile(int(fd), path, flags, int(file.f_mode), int(file.f_pos),
                                int(file.f_inode.i_ino)))
        except GUEST_ERRORS as e:
            warnings.add(f"fd {fd} of {pid}: unreadable ({e})")
    return out


# --- files as objects to read (aradia.apps.extract) --------------------------------------------------


@dataclass
class InodeInfo:
    """What the kernel's inode says about a file: number, size, mode, links, its file system type and
    device, and whether it is unlinked (no name left: deleted while open or running)."""

    ino: int
    size: int
    mode: int
    nlink: int
    fstype: str
    dev: str
    deleted: bool
    generation: int


def inode_info(inode: drgn.Object) -> InodeInfo:
    """An :class:`InodeInfo` for a ``struct inode *``."""
    sb = inode.i_sb
    fstype = cstring(sb.s_type.name, 64)
    dev = cstring(sb.s_id)
    nlink = int(inode.__i_nlink)
    return InodeInfo(int(inode.i_ino), int(inode.i_size), int(inode.i_mode), nlink, fstype, dev,
                     nlink == 0, int(inode.i_generation))


def fd_file(prog: drgn.Program, pid: int, fd: int) -> drgn.Object:
    """The ``struct file *`` of descriptor ``fd`` of process ``pid``; :class:`AradiaError` if not open."""
    task = find_task(prog, pid)
    if task.files:
        for n, file in bounded(open_files(task), f"files of {pid}", Warnings(), limit=MAX_FDS):
            if n == fd:
                return file
    raise AradiaError(f"process {pid} has no open file descriptor {fd}")


def exe_file(prog: drgn.Program, pid: int) -> drgn.Object:
    """The ``struct file *`` of process ``pid``'s executable (``/proc/PID/exe``)."""
    task = find_task(prog, pid)
    if not task.mm or not task.mm.exe_file:
        raise AradiaError(f"process {pid} has no executable (a kernel thread?)")
    return task.mm.exe_file


def mapped_files(prog: drgn.Program, pid: int, *, warnings: Warnings | None = None) -> list[drgn.Object]:
    """The ``struct file *`` of every distinct file process ``pid`` maps (its executable and libraries
    first by address), one per inode."""
    from aradia.linux.maps import vmas

    warnings = Warnings() if warnings is None else warnings
    task = find_task(prog, pid)
    if not task.mm:
        return []
    seen: set[int] = set()
    out = []
    for vma in bounded(vmas(task.mm, f"maps of {pid}", warnings), f"maps of {pid}", warnings, limit=1 << 20,
                       key=lambda v: v.value_()):
        try:
            f = vma.vm_file
            if f and f.f_inode.value_() not in seen:
                seen.add(f.f_inode.value_())
                out.append(f.read_())
        except GUEST_ERRORS as e:
            warnings.add(f"maps of {pid}: VMA at {vma.value_():#x} unreadable ({e})")
    return out
