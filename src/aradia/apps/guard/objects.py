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

from dataclasses import dataclass

import drgn

from aradia.linux.dcache import S_IFDIR, S_IFMT, NotFound, PathLookup, children

MAX_DEPTH = 256  # d_parent steps in an ancestry walk
MAX_TREE = 200_000  # files under one protected tree

Key = tuple[int, int]
FMODE_WRITE = 0x2  # struct file's f_mode: opened for writing
"""(``struct super_block *`` address, inode number): one file of the guest."""


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


class Namespace(PathLookup):
    """Path lookup as pid 1 sees the file system, with the guard's keys."""

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
                stack.extend(c.read_() for c in children(d))
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
