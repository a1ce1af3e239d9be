"""The guest's file objects the guard decides on: paths resolved in the kernel's dentry cache to
(superblock, inode number) keys, and the test whether a dentry is, or lies under, a protected one.

A key names a file however it is reached (relative path, ``..``, symlink, hard link, bind mount,
``/proc/self/fd/N``): the kernel hands its security hooks the dentry and inode it resolved. A
directory tree is protected by its directory's key: a dentry is protected when it, or any dentry up
its ``d_parent`` chain to its filesystem's root, has a protected key, which stays true when the tree
or one of its parents is renamed. Keys of every file under a tree are kept too, so a hard link made
elsewhere (before the guard started) still leads to a protected inode.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import drgn
from drgn.helpers.linux.list import list_for_each_entry

from aradia.errors import AradiaError
from aradia.linux.bounds import Warnings, cstring
from aradia.linux.mounts import _mount_list
from aradia.linux.processes import find_task
from aradia.linux.walks import NAME_MAX, PATH_MAX

S_IFMT, S_IFDIR, S_IFLNK = 0o170000, 0o040000, 0o120000
MAX_DEPTH = 256  # d_parent steps in an ancestry walk
MAX_TREE = 200_000  # files under one protected tree
MAX_LINKS = 40  # symlinks followed in one lookup (the kernel's own limit)
DCACHE_MOUNTED = 0x10000

Key = tuple[int, int]
FMODE_WRITE = 0x2  # struct file's f_mode: opened for writing
"""(``struct super_block *`` address, inode number): one file of the guest."""


class NotFound(AradiaError):
    """A path that does not resolve in the guest's dentry cache."""


@dataclass(frozen=True)
class Resolved:
    """A resolved path: its key, device number, inode number, and whether it is a directory."""

    path: str
    key: Key
    dev: int
    ino: int
    directory: bool


def user_dev(s_dev: int) -> int:
    """A superblock's ``s_dev`` (kernel form) as ``stat`` shows ``st_dev`` (``new_encode_dev``)."""
    major, minor = s_dev >> 20, s_dev & 0xFFFFF
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def inode_key(inode: drgn.Object) -> Key:
    """The key of a ``struct inode *``."""
    return int(inode.i_sb.value_()), int(inode.i_ino)


def _children(dentry: drgn.Object) -> Iterator[drgn.Object]:
    """The child dentries of a directory dentry (6.8 moved them from a list to an hlist)."""
    if dentry.type_.type.has_member("d_subdirs"):
        yield from list_for_each_entry("struct dentry", dentry.d_subdirs.address_of_(), "d_child")
    else:
        from drgn.helpers.linux.list import hlist_for_each_entry

        yield from hlist_for_each_entry("struct dentry", dentry.d_children.address_of_(), "d_sib")


def _name(dentry: drgn.Object) -> bytes:
    n = int(dentry.d_name.len)
    if n > NAME_MAX:
        raise AradiaError(f"dentry {dentry.value_():#x}: name length {n}")
    return dentry.prog_.read(dentry.d_name.name.value_(), n) if n else b""


class Namespace:
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
            child = next((c for c in _children(dentry) if _name(c) == want and c.d_inode), None)
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

    def resolve(self, path: str) -> Resolved:
        """``path`` as a :class:`Resolved` (symlinks followed)."""
        _mnt, dentry = self.lookup(path)
        inode = dentry.d_inode
        return Resolved(path, inode_key(inode), user_dev(int(inode.i_sb.s_dev)), int(inode.i_ino),
                        int(inode.i_mode) & S_IFMT == S_IFDIR)

    def tree_keys(self, path: str) -> list[Key]:
        """Keys of every file under directory ``path`` (the directory's own first), through the
        dentry cache, at most :data:`MAX_TREE` of them."""
        _mnt, top = self.lookup(path)
        out, stack, seen = [], [top], set()
        while stack and len(out) < MAX_TREE:
            d = stack.pop()
            if d.value_() in seen:
                continue
            seen.add(d.value_())
            inode = d.d_inode
            if not inode:
                continue
            out.append(inode_key(inode))
            if int(inode.i_mode) & S_IFMT == S_IFDIR:
                stack.extend(c.read_() for c in _children(d))
        return out


def under(dentry: drgn.Object, keys: dict[Key, int]) -> tuple[int, Key] | None:
    """The value (a rule index) of the first protected key on ``dentry``'s way up to its filesystem's
    root, with that key; None when neither it nor any parent is protected."""
    d = dentry
    for _ in range(MAX_DEPTH):
        inode = d.d_inode
        if inode:
            k = (inode.i_sb.value_(), int(inode.i_ino))
            if k in keys:
                return keys[k], k
        parent = d.d_parent
        if parent.value_() == d.value_():
            return None
        d = parent
    return None


__all__ = ["Key", "Namespace", "NotFound", "Resolved", "inode_key", "under", "user_dev"]
