"""Mounted filesystems (what ``/proc/mounts`` shows for the initial mount namespace)."""

from __future__ import annotations

from dataclasses import dataclass

import drgn
from drgn.helpers.linux.fs import for_each_mount, mount_dst, mount_fstype, mount_src

from aradia.linux.guard import Warnings, bounded

MNT_READONLY = 0x40
SB_RDONLY = 0x1


@dataclass
class Mount:
    """One mount: source device, mount point, filesystem type and whether it is read-only."""

    source: str
    target: str
    fstype: str
    readonly: bool


def mounts(prog: drgn.Program, *, warnings: Warnings | None = None) -> list[Mount]:
    """The mounts of the initial mount namespace, in mount order."""
    warnings = Warnings() if warnings is None else warnings
    out = []
    for mnt in bounded(for_each_mount(prog), "mount list", warnings, limit=1 << 16, key=lambda m: m.value_()):
        try:
            ro = bool(int(mnt.mnt.mnt_flags) & MNT_READONLY or int(mnt.mnt.mnt_sb.s_flags) & SB_RDONLY)
            out.append(Mount(mount_src(mnt).decode(errors="replace"), mount_dst(mnt).decode(errors="replace"),
                             mount_fstype(mnt).decode(errors="replace"), ro))
        except (drgn.FaultError, ValueError) as e:
            warnings.add(f"mount at {mnt.value_():#x}: unreadable ({e})")
    return out
