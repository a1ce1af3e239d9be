"""A guest's disks read through QEMU itself: a read-only NBD export of a block node, over QMP.

``with DiskExport(qemu) as disk: disk.read(offset, n)`` starts QEMU's NBD server on a private unix
socket (``nbd-server-start``), exports one block node read-only (``block-export-add``, writable
false) and reads it with :class:`aradia.proto.nbd.NBDClient`; leaving the block removes the export
and stops the server. The guest is not involved and keeps running; QEMU serves the reads from the
same image the guest's virtio disk writes to (what the disk holds now, not what the guest's page
cache holds).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

from aradia.errors import AradiaError
from aradia.machine.qemu import Qemu
from aradia.proto.nbd import NBDClient, NBDFile
from aradia.proto.qmp import QMPCommandError


class NoDisk(AradiaError):
    """The VM has no block device that can be exported (or several, and none was named)."""


@dataclass(frozen=True)
class BlockDevice:
    """A QEMU block device with a medium: its device id or qdev path, its node name, read-only flag."""

    device: str
    node: str
    read_only: bool
    file: str


def block_devices(qemu: Qemu) -> list[BlockDevice]:
    """The block devices of the VM that hold a medium (``query-block``)."""
    out = []
    for dev in qemu.qmp.execute("query-block") or []:
        ins = dev.get("inserted")
        if not ins:
            continue
        out.append(BlockDevice(str(dev.get("device") or dev.get("qdev", "")), str(ins.get("node-name", "")),
                               bool(ins.get("ro")), str(ins.get("file", ""))))
    return out


def choose_node(qemu: Qemu, node: str | None = None) -> str:
    """The block node to export: ``node`` if given (checked), else the VM's only disk."""
    devices = block_devices(qemu)
    if node is not None:
        if not any(node in (d.node, d.device) for d in devices):
            raise NoDisk(f"the VM has no block node {node!r} (it has: "
                         f"{', '.join(d.node for d in devices) or 'none'})")
        return next(d.node for d in devices if node in (d.node, d.device))
    if len(devices) != 1:
        raise NoDisk("the VM has " + (f"{len(devices)} disks; name one with --disk NODE ("
                                      f"{', '.join(d.node for d in devices)})" if devices else "no disk"))
    return devices[0].node


class DiskExport:
    """A read-only NBD export of one block node of a live QEMU, for as long as the object is open."""

    def __init__(self, qemu: Qemu, node: str | None = None) -> None:
        self.qemu = qemu
        self.node = choose_node(qemu, node)
        self.export = f"aradia-{secrets.token_hex(4)}"
        self._dir = tempfile.mkdtemp(prefix="aradia-nbd-")
        os.chmod(self._dir, 0o700)
        self.path = os.path.join(self._dir, "nbd.sock")
        self._server = self._export = False
        self.client: NBDClient | None = None
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        try:
            self.qemu.qmp.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": self.path}}})
        except QMPCommandError as e:
            raise NoDisk(f"QEMU could not start an NBD server (one already running?): {e}") from e
        self._server = True
        args: dict[str, Any] = {"type": "nbd", "id": self.export, "node-name": self.node,
                                "name": self.export, "writable": False}
        try:
            self.qemu.qmp.execute("block-export-add", args)
        except QMPCommandError as e:
            raise NoDisk(f"QEMU could not export block node {self.node!r}: {e}") from e
        self._export = True
        self.client = NBDClient(self.path, self.export)

    @property
    def size(self) -> int:
        """The disk's size in bytes."""
        assert self.client is not None
        return self.client.size

    def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes of the disk at ``offset``."""
        assert self.client is not None
        return self.client.read(offset, size)

    def file(self, base: int = 0) -> NBDFile:
        """A seekable read-only file object over the disk, starting at byte ``base`` (a partition)."""
        assert self.client is not None
        return NBDFile(self.client, base)

    def close(self) -> None:
        """Disconnect, remove the export and stop the NBD server (each step even if another failed)."""
        if self.client is not None:
            self.client.close()
            self.client = None
        if self._export:
            with contextlib.suppress(AradiaError):
                self.qemu.qmp.execute("block-export-del", {"id": self.export, "mode": "hard"})
            self._export = False
        if self._server:
            with contextlib.suppress(AradiaError):
                self.qemu.qmp.execute("nbd-server-stop")
            self._server = False
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> DiskExport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["BlockDevice", "DiskExport", "NoDisk", "block_devices", "choose_node"]
