"""Reading a VM's disk through QEMU itself (``aradia.machine.disks``: QMP ``nbd-server-start`` and
``block-export-add``, aradia's NBD client), on bare QEMUs (no guest kernel) with raw disk images made
here; the bytes read must be the image's, and the export must be gone afterwards."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from aradia.errors import NotAttached, ProtocolError
from aradia.lab.disk import disk_args
from aradia.machine.disks import DiskExport, NoDisk
from aradia.machine.qemu import Qemu
from aradia.proto.nbd import NBDClient
from bare_qemu import bare_qemu

pytestmark = pytest.mark.timeout(120)


def images(tmp_path: Path, n: int) -> list[Path]:
    out = []
    for i in range(n):
        p = tmp_path / f"d{i}.img"
        p.write_bytes(os.urandom(1 << 20) + bytes([i]) * (1 << 20))
        out.append(p)
    return out


def test_reads_the_disk_and_removes_the_export(tmp_path: Path) -> None:
    (img,) = images(tmp_path, 1)
    with bare_qemu(extra=tuple(disk_args([img]))) as q:
        qemu = Qemu(q.qmp_path)
        try:
            with DiskExport(qemu) as disk:
                assert disk.node == "disk0" and disk.size == 2 << 20
                data = img.read_bytes()
                assert disk.read(0, 4096) == data[:4096]
                assert disk.read(12345, 3 << 20) == data[12345:]  # clipped at the end, > one request
                f = disk.file(base=4096)
                f.seek(100)
                assert f.read(50) == data[4196:4246]
                assert [e["id"] for e in qemu.qmp.execute("query-block-exports")] == [disk.export]
            assert qemu.qmp.execute("query-block-exports") == []
            # the NBD server is stopped too: a second export starts one again
            with DiskExport(qemu, "disk0") as again:
                assert again.read(0, 16) == data[:16]
        finally:
            qemu.close()


def test_no_disk_and_several_disks_are_clear_errors(tmp_path: Path) -> None:
    with bare_qemu() as q:
        qemu = Qemu(q.qmp_path)
        try:
            with pytest.raises(NoDisk, match="the VM has no disk"):
                DiskExport(qemu)
        finally:
            qemu.close()
    imgs = images(tmp_path, 2)
    with bare_qemu(extra=tuple(disk_args(imgs))) as q:
        qemu = Qemu(q.qmp_path)
        try:
            with pytest.raises(NoDisk, match=r"2 disks; name one with --disk NODE \(disk0, disk1\)"):
                DiskExport(qemu)
            with pytest.raises(NoDisk, match="no block node 'disk7'"):
                DiskExport(qemu, "disk7")
            with DiskExport(qemu, "disk1") as disk:
                assert disk.read((1 << 20) + 5, 3) == b"\x01\x01\x01"
            assert qemu.qmp.execute("query-block-exports") == []
        finally:
            qemu.close()


def test_nbd_client_refuses_what_is_not_nbd(tmp_path: Path) -> None:
    path = str(tmp_path / "fake.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        conn.sendall(b"SSH-2.0-not-nbd\r\n" + bytes(32))
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    with pytest.raises(ProtocolError, match="not a fixed-newstyle NBD server"):
        NBDClient(path, "x", timeout=5)
    t.join(5)
    server.close()
    with pytest.raises(NotAttached, match="cannot connect"):
        NBDClient(str(tmp_path / "missing.sock"), "x", timeout=5)
