"""What to extract, named as a user names it: a path, a process's descriptor or executable, or every
file a process maps; each resolved to the kernel's ``struct inode *``."""

from __future__ import annotations

import os
from dataclasses import dataclass

import drgn

from aradia.linux.bounds import Warnings
from aradia.linux.dcache import DirEntry, PathLookup, list_dir
from aradia.linux.files import exe_file, fd_file, file_path, mapped_files


@dataclass
class Target:
    """A file to extract: the name it is known by (a path, ``(deleted)`` marked) and its inode."""

    name: str
    inode: drgn.Object


def by_path(prog: drgn.Program, path: str) -> Target:
    """The file at absolute ``path`` as pid 1 sees the file system (through the dentry cache)."""
    _mnt, dentry = PathLookup(prog).lookup(path)
    return Target(path, dentry.d_inode.read_())


def by_fd(prog: drgn.Program, pid: int, fd: int) -> Target:
    """The file open as descriptor ``fd`` of process ``pid`` (deleted files included)."""
    f = fd_file(prog, pid, fd)
    return Target(file_path(f), f.f_inode.read_())


def by_exe(prog: drgn.Program, pid: int) -> Target:
    """The executable of process ``pid`` (also when it was deleted after the process started)."""
    f = exe_file(prog, pid)
    return Target(file_path(f), f.f_inode.read_())


def all_mapped(prog: drgn.Program, pid: int, warnings: Warnings) -> list[Target]:
    """Every distinct file process ``pid`` maps (executable, libraries, mapped data files)."""
    return [Target(file_path(f), f.f_inode.read_()) for f in mapped_files(prog, pid, warnings=warnings)]


def output_name(target: Target) -> str:
    """A file name for ``target`` inside an output directory: its path with ``/`` as ``_``."""
    name = target.name.removesuffix(" (deleted)").strip("/").replace("/", "_")
    return os.path.basename(name) or f"inode-{int(target.inode.i_ino)}"


def listing(prog: drgn.Program, path: str, warnings: Warnings) -> list[DirEntry]:
    """The children of directory ``path`` the guest's dentry cache holds."""
    _mnt, dentry = PathLookup(prog).lookup(path)
    return list_dir(dentry, warnings)


__all__ = ["Target", "all_mapped", "by_exe", "by_fd", "by_path", "listing", "output_name"]
