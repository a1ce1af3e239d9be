"""Disks for test guests: an ext4 image made on the host with ``mke2fs -d`` (no root, no loop device).

``make_ext4(path, {"dir/name": b"..."}, size_mib=64)`` writes a raw image whose file system holds
those files; :func:`aradia.lab.launcher.launch` attaches it with ``disks=[path]`` as a virtio-blk disk
(``/dev/vda`` in a guest of the ``disk`` image variant), under the QEMU block node name
``disk0`` (``disk1``...), which is what a QMP ``block-export-add`` names.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from aradia.lab import GuestError
from aradia.lab.debian import run_tool


def make_ext4(path: Path, files: dict[str, bytes], *, size_mib: int = 64, label: str = "aradia") -> Path:
    """Write a raw ext4 image of ``size_mib`` MiB at ``path`` holding ``files`` (relative paths)."""
    mke2fs = shutil.which("mke2fs") or "/usr/sbin/mke2fs"
    if not Path(mke2fs).exists():
        raise GuestError("mke2fs is not installed (Debian package e2fsprogs)")
    with tempfile.TemporaryDirectory(prefix="aradia-disk-") as tmp:
        root = Path(tmp)
        for rel, data in files.items():
            dest = root / rel.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
        path.unlink(missing_ok=True)
        run_tool([mke2fs, "-q", "-t", "ext4", "-b", "4096", "-L", label, "-d", str(root), str(path),
                  f"{size_mib}M"], timeout=120, what="mke2fs -d")
    return path


def disk_args(disks: list[Path]) -> list[str]:
    """QEMU arguments attaching each raw image as a virtio-blk disk, block nodes ``disk0``..."""
    args = []
    for i, disk in enumerate(disks):
        args += ["-blockdev", f"driver=raw,node-name=disk{i},file.driver=file,file.filename={disk}",
                 "-device", f"virtio-blk-pci,drive=disk{i}"]
    return args


__all__ = ["disk_args", "make_ext4"]
