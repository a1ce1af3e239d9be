"""Paths in the guest's dentry cache: lookup as pid 1 sees the file system, and directory listings.

What the kernel has cached is what can be found: a name never looked up (or whose dentry was
reclaimed) is :class:`NotFound`, a directory lists the children its dentry cache holds. Walks are
bounded (symlinks as the kernel's own limit, stacked mounts, children per directory).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import drgn
from drgn.helpers.linux.list import list_for_each_entry

from aradia.errors import AradiaError
from aradia.linux.bounds import GUEST_ERRORS, Warnings, bounded, cstring
from aradia.linux.mounts import _mount_list
from aradia.linux.processes import find_task
from aradia.linux.walks import NAME_MAX, PATH_MAX

S_IFMT, S_IFDIR, S_IFLNK, S_IFREG = 0o170000, 0o040000, 0o120000, 0o100000
MAX_LINKS = 40  # symlinks followed in one lookup (the kernel's own limit)
MAX_CHILDREN = 100_000  # children listed per directory
DCACHE_MOUNTED = 0x10000


class NotFound(AradiaError):
    """A path that does not resolve in the guest's dentry cache."""


def children(dentry: drgn.Object) -> Iterator[drgn.Object]:
    """The child dentries of a directory dentry (6.8 moved them from a list to an hlist)."""
    if dentry.type_.type.has_member("d_subdirs"):
        yield from list_for_each_entry("struct dentry", dentry.d_subdirs.address_of_(), "d_child")
    else:
        from drgn.helpers.linux.list import hlist_for_each_entry

        yield from hlist_for_each_entry("struct dentry", dentry.d_children.address_of_(), "d_sib")


def dentry_name(dentry: drgn.Object) -> bytes:
    """The name of a ``struct dentry *`` (its last path component)."""
    n = int(dentry.d_name.len)
    if n > NAME_MAX:
        raise AradiaError(f"dentry {dentry.value_():#x}: name length {n}")
    return dentry.prog_.read(dentry.d_name.name.value_(), n) if n else b""


def live(dentry: drgn.Object) -> bool:
    """Whether ``dentry`` names a file now: positive and hashed (an unlinked file still open keeps
    its dentry, unhashed, among its old directory's children)."""
    return bool(dentry.d_inode) and bool(dentry.d_hash.pprev)


class PathLookup:
    """Path lookup as pid 1 sees the file system (its root and the initial mount namespace)."""

    def __init__(self, prog: drgn.Program) -> None:
        self.prog = prog
        root = find_task(prog, 1).fs.root
        self.root = (drgn.container_of(root.mnt, "struct mount", "mnt").read_(), root.dentry.read_())
        self.mounts = [m for m in _mount_list(prog, Warnings()) if m.mnt.mnt_sb.value_()]

    def _mounted_on(self, mnt: drgn.Object, dentry: drgn.Object) -> tuple[drgn.Object, drgn.Object]:
        """Follow mounts stacked on ``dentry`` (last mounted wins, as the kernel does)."""
        for _ in range(64):
            if not int(dentry.d_flags) & DCACHE_MOUNTED:
                break
            top = [m for m in self.mounts if m.mnt_parent.value_() == mnt.value_()
                   and m.mnt_mountpoint.value_() == dentry.value_()]
            if not top:
                break
            mnt, dentry = top[-1], top[-1].mnt.mnt_root.read_()
        return mnt, dentry

    def _parent(self, mnt: drgn.Object, dentry: drgn.Object) -> tuple[drgn.Object, drgn.Object]:
        if (mnt.value_(), dentry.value_()) == (self.root[0].value_(), self.root[1].value_()):
            return mnt, dentry
        while dentry.value_() == mnt.mnt.mnt_root.value_() and mnt.mnt_parent.value_() != mnt.value_():
            mnt, dentry = mnt.mnt_parent.read_(), mnt.mnt_mountpoint.read_()
        return mnt, dentry.d_parent.read_()

    def lookup(self, path: str, *, follow: bool = True) -> tuple[drgn.Object, drgn.Object]:
        """The (``struct mount *``, ``struct dentry *``) of absolute ``path`` (symlinks followed,
        the last one only when ``follow``); :class:`NotFound` when it is not in the dentry cache."""
        if not path.startswith("/"):
            raise NotFound(f"{path}: not an absolute path")
        mnt, dentry = self.root
        todo = [p for p in path.split("/") if p]
        links = 0
        while todo:
            part = todo.pop(0)
            if part == ".":
                continue
            if part == "..":
                mnt, dentry = self._parent(mnt, dentry)
                continue
            want = part.encode()
            child = next((c for c in children(dentry) if dentry_name(c) == want and live(c)), None)
            if child is None:
                raise NotFound(f"{path}: {part!r} not found in the guest's dentry cache")
            inode = child.d_inode
            if int(inode.i_mode) & S_IFMT == S_IFLNK and (todo or follow):
                links += 1
                if links > MAX_LINKS or not inode.i_link:
                    raise NotFound(f"{path}: symlink {part!r} cannot be followed from outside")
                target = cstring(inode.i_link, PATH_MAX)
                if target.startswith("/"):
                    mnt, dentry = self.root
                todo = [p for p in target.split("/") if p] + todo
                continue
            mnt, dentry = self._mounted_on(mnt, child.read_())
        return mnt, dentry


@dataclass
class DirEntry:
    """A child of a directory as the dentry cache holds it: name, inode number, mode, size, pages in
    the page cache and whether it is a mount point."""

    name: str
    ino: int
    mode: int
    size: int
    cached_pages: int
    mounted: bool


def list_dir(dentry: drgn.Object, warnings: Warnings) -> list[DirEntry]:
    """The positive children of directory ``dentry`` in its dentry cache (names never looked up, or
    reclaimed, are not there), by name; at most :data:`MAX_CHILDREN`."""
    inode = dentry.d_inode
    if not inode or int(inode.i_mode) & S_IFMT != S_IFDIR:
        raise NotFound("not a directory")
    out = []
    for child in bounded(children(dentry), "directory listing", warnings, limit=MAX_CHILDREN,
                         key=lambda c: c.value_()):
        try:
            if not live(child):
                continue  # negative (a name looked up that does not exist) or unlinked
            ci = child.d_inode
            out.append(DirEntry(dentry_name(child).decode(errors="replace"), int(ci.i_ino), int(ci.i_mode),
                                int(ci.i_size), int(ci.i_mapping.nrpages),
                                bool(int(child.d_flags) & DCACHE_MOUNTED)))
        except GUEST_ERRORS as e:
            warnings.add(f"dentry {child.value_():#x} unreadable ({e}): skipped")
    return sorted(out, key=lambda e: e.name)
