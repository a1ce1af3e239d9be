"""Open files of a process (what ``/proc/<pid>/fd`` and ``/proc/<pid>/fdinfo`` show)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import drgn

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
