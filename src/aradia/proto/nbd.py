"""A small NBD client (fixed newstyle handshake, ``NBD_OPT_GO``, simple replies): reads only.

Enough to read a block device QEMU exports with ``block-export-add`` (``aradia.machine.disks``).
The protocol: https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md
"""

from __future__ import annotations

import contextlib
import io
import socket
import struct

from aradia.errors import NotAttached, ProtocolError

NBD_MAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
OPT_GO, REP_ACK, REP_INFO, INFO_EXPORT = 7, 1, 3, 0
CMD_READ, CMD_DISC = 0, 2
MAX_READ = 1 << 20  # bytes per request (QEMU accepts up to 32 MiB)
MAX_OPTION_REPLY = 1 << 16


class NBDClient:
    """One connection to one export of an NBD server (a unix socket path or ``host:port``)."""

    def __init__(self, address: str, export: str, *, timeout: float = 30.0) -> None:
        try:
            if ":" in address and not address.startswith("/"):
                host, port = address.rsplit(":", 1)
                self.sock = socket.create_connection((host, int(port)), timeout=timeout)
            else:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(timeout)
                self.sock.connect(address)
        except OSError as e:
            raise NotAttached(f"cannot connect to the NBD server at {address}: {e}") from e
        self._handle = 0
        try:
            self.size, self.flags = self._handshake(export)
        except BaseException:
            self.sock.close()
            raise

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except OSError as e:
                raise NotAttached(f"NBD connection failed: {e}") from e
            if not chunk:
                raise NotAttached("NBD server closed the connection")
            buf += chunk
        return bytes(buf)

    def _handshake(self, export: str) -> tuple[int, int]:
        magic, opt, hflags = struct.unpack(">8s8sH", self._recv(18))
        if magic != NBD_MAGIC or opt != IHAVEOPT or not hflags & FLAG_FIXED_NEWSTYLE:
            raise ProtocolError("not a fixed-newstyle NBD server")
        self.sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (hflags & FLAG_NO_ZEROES)))
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.sock.sendall(IHAVEOPT + struct.pack(">II", OPT_GO, len(data)) + data)
        size = flags = None
        for _ in range(64):
            rmagic, ropt, rtype, rlen = struct.unpack(">QIII", self._recv(20))
            if rmagic != OPT_REPLY_MAGIC or ropt != OPT_GO or rlen > MAX_OPTION_REPLY:
                raise ProtocolError("malformed NBD option reply")
            payload = self._recv(rlen)
            if rtype & 0x80000000:
                raise NotAttached(f"NBD export {export!r} refused: {payload.decode(errors='replace')}")
            info = struct.unpack(">H", payload[:2])[0] if len(payload) >= 12 else None
            if rtype == REP_INFO and info == INFO_EXPORT:
                size, flags = struct.unpack(">QH", payload[2:12])
            elif rtype == REP_ACK:
                if size is None or flags is None:
                    raise ProtocolError("NBD server acknowledged GO without the export's size")
                return size, flags
        raise ProtocolError("NBD server sent too many option replies")

    def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes of the export at ``offset`` (clipped to the export's size)."""
        size = max(0, min(size, self.size - offset))
        out = bytearray()
        while len(out) < size:
            n = min(MAX_READ, size - len(out))
            self._handle += 1
            self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, self._handle,
                                          offset + len(out), n))
            magic, error, handle = struct.unpack(">IIQ", self._recv(16))
            if magic != SIMPLE_REPLY_MAGIC or handle != self._handle:
                raise ProtocolError("malformed NBD read reply")
            if error:
                raise ProtocolError(f"NBD read at {offset + len(out)} failed with error {error}")
            out += self._recv(n)
        return bytes(out)

    def close(self) -> None:
        """Disconnect politely."""
        with contextlib.suppress(OSError):
            self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
        self.sock.close()

    def __enter__(self) -> NBDClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NBDFile(io.RawIOBase):
    """A read-only, seekable file object over an :class:`NBDClient` (what file-system parsers take)."""

    def __init__(self, client: NBDClient, base: int = 0) -> None:
        super().__init__()
        self.client = client
        self.base = base
        self.pos = 0

    def readable(self) -> bool:
        """Always: the file reads."""
        return True

    def seekable(self) -> bool:
        """Always: the file seeks."""
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move the position (``whence`` as for any file)."""
        end = self.client.size - self.base
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: end}[whence] + offset
        return self.pos

    def tell(self) -> int:
        """The current position."""
        return self.pos

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        """Fill ``buffer`` from the current position."""
        data = self.client.read(self.base + self.pos, len(buffer))
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


__all__ = ["NBDClient", "NBDFile"]
