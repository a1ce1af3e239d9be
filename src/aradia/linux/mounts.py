"""Mounted filesystems (what ``/proc/mounts`` shows for the initial mount namespace)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import drgn
from drgn.helpers.linux.list import list_for_each_entry

from aradia.linux.bounds import GUEST_ERRORS, Warnings, bounded, cstring
from aradia.linux.walks import NAME_MAX, PATH_MAX, d_path, rb_inorder

MNT_READONLY = 0x40
SB_RDONLY = 0x1


@dataclass
class Mount:
    """One mount: source device, mount point, filesystem type and whether it is read-only."""

    source: str
    target: str
    fstype: str
    readonly: bool


def _mount_list(prog: drgn.Program, warnings: Warnings) -> Iterator[drgn.Object]:
    """Every ``struct mount *`` of the initial mount namespace, cursors included (as drgn's
    ``for_each_mount`` walks them, but yielding every entry so that :func:`bounded` sees a cycle)."""
    ns = prog["init_task"].nsproxy.mnt_ns
    # 6.8 moved a namespace's mounts from a list to a red-black tree.
    if ns.type_.type.has_member("list"):
        yield from list_for_each_entry("struct mount", ns.list.address_of_(), "mnt_list")
        return
    mount = prog.type("struct mount")
    for node in rb_inorder(ns.mounts.address_of_(), "mount tree", warnings):
        yield drgn.container_of(node, mount, "mnt_node")


def mounts(prog: drgn.Program, *, warnings: Warnings | None = None) -> list[Mount]:
    """The mounts of the initial mount namespace, in mount order."""
    warnings = Warnings() if warnings is None else warnings
    out = []
    for mnt in bounded(_mount_list(prog, warnings), "mount list", warnings, limit=1 << 16,
                       key=lambda m: m.value_()):
        try:
            sb = mnt.mnt.mnt_sb.read_()
            if not sb:
                continue  # a cursor (5.8 - 6.8), not a mount
            ro = bool(int(mnt.mnt.mnt_flags) & MNT_READONLY or int(sb.s_flags) & SB_RDONLY)
            fstype = cstring(sb.s_type.name, NAME_MAX)
            if sb.s_subtype:
                sub = cstring(sb.s_subtype, NAME_MAX)
                fstype += f".{sub}" if sub else ""
            out.append(Mount(cstring(mnt.mnt_devname, PATH_MAX),
                             d_path(mnt.mnt.address_of_(), mnt.mnt.mnt_root).decode(errors="replace"),
                             fstype, ro))
        except GUEST_ERRORS as e:
            warnings.add(f"mount at {mnt.value_():#x}: unreadable ({e})")
    return out
