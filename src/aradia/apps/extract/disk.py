"""The guest's disk as the second source of a file's bytes: QEMU's own NBD export of the block node,
with ``dissect.extfs`` finding the file's blocks by its inode number.

The disk is read as it is now (what the guest's virtio disk wrote), not as the guest's page cache
holds it; file-system metadata committed to the ext4 journal but not yet checkpointed to its home
blocks is not seen (the in-memory inode is checked against the on-disk one: a disagreement is a
warning and the disk is not used for that file).
"""

from __future__ import annotations

import uuid
from typing import Any

import drgn

from aradia.errors import AradiaError, GuestDataCorrupt
from aradia.linux.bounds import GUEST_ERRORS, Warnings
from aradia.machine.disks import DiskExport
from aradia.machine.qemu import Qemu

EXT_TYPES = frozenset({"ext2", "ext3", "ext4"})
SECTOR = 512


class DiskUnavailable(AradiaError):
    """The file's disk cannot be read (no live QEMU, no disk, another file system)."""


def _import_extfs() -> Any:
    try:
        from dissect.extfs import ExtFS
    except ImportError as e:
        raise DiskUnavailable("reading the disk needs dissect.extfs (pip install 'aradia[extract]')") from e
    return ExtFS


def _partition_start(sb: drgn.Object) -> int:
    """Byte offset of the file system on its disk (0 for a whole disk)."""
    bdev = sb.s_bdev
    if not bdev:
        raise DiskUnavailable("the file system has no block device")
    for name in ("bd_start_sect",):
        if bdev.type_.type.has_member(name):
            return int(getattr(bdev, name)) * SECTOR
    part = bdev.bd_part  # before 5.11
    return int(part.start_sect) * SECTOR if part else 0


class DiskFiles:
    """Files of the guest's ext2/3/4 file systems read from its disk, one NBD export per object."""

    def __init__(self, qemu: Qemu | None, node: str | None = None) -> None:
        self.qemu = qemu
        self.node = node
        self._export: DiskExport | None = None
        self._fs: dict[int, Any] = {}

    def _filesystem(self, sb: drgn.Object) -> Any:
        key = sb.value_()
        if key in self._fs:
            return self._fs[key]
        if self.qemu is None:
            raise DiskUnavailable("the disk is read through a live QEMU (qmp:PATH), not a dump")
        ext_fs = _import_extfs()
        start = _partition_start(sb)
        if self._export is None:
            self._export = DiskExport(self.qemu, self.node)
        try:
            fs = ext_fs(self._export.file(start))
        except Exception as e:  # dissect's parser on untrusted bytes: any failure means "not this fs"
            raise DiskUnavailable(f"no ext file system at byte {start} of disk {self._export.node}: "
                                  f"{e}") from e
        mem_uuid = uuid.UUID(bytes=bytes(sb.s_uuid.b.read_()))
        if fs.uuid != mem_uuid:
            raise DiskUnavailable(f"disk {self._export.node} holds file system {fs.uuid}, the guest's is "
                                  f"{mem_uuid} (name the disk with --disk NODE)")
        self._fs[key] = fs
        return fs

    def opener(self, inode: drgn.Object, warnings: Warnings) -> tuple[Any, int] | None:
        """A readable, seekable stream of the on-disk file of ``inode`` and its on-disk size, or None
        (with a warning) when
        the disk cannot supply it."""
        try:
            fstype = inode.i_sb.s_type.name.string_().decode()
            if fstype not in EXT_TYPES:
                raise DiskUnavailable(f"{fstype} is not read from disk (ext2/3/4 are)")
            fs = self._filesystem(inode.i_sb)
            ino = int(inode.i_ino)
            try:
                disk_inode = fs.get_inode(ino)
                raw = disk_inode.inode
                gen, mode = int(raw.i_generation), int(raw.i_mode)
            except Exception as e:  # dissect on untrusted bytes
                raise GuestDataCorrupt(f"inode {ino} unreadable on disk: {e}") from e
            if gen != int(inode.i_generation) or mode != int(inode.i_mode):
                raise GuestDataCorrupt(f"inode {ino} on disk (generation {gen}, mode {mode:o}) is not the "
                                       f"guest's (generation {int(inode.i_generation)}, mode "
                                       f"{int(inode.i_mode):o}): not written back yet")
            return disk_inode.open(), int(disk_inode.size)
        except (*GUEST_ERRORS, AradiaError) as e:
            warnings.add(f"disk: {e}")
            return None

    def close(self) -> None:
        """Remove the NBD export (the guest never noticed it)."""
        if self._export is not None:
            self._export.close()
            self._export = None
        self._fs.clear()

    def __enter__(self) -> DiskFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["DiskFiles", "DiskUnavailable"]
