"""A minimal GDB remote-protocol client, independent of aradia: the baseline of ``trace.py``'s
"bare client" phase, the least a stub client can do per breakpoint hit.

It imports nothing from aradia. Per hit it reads the stop reply, acknowledges it, writes the PC past
the NOP at the function's entry (``P``), reads the ``OK`` and continues (``c``); the socket
has ``TCP_NODELAY`` (without it Nagle's algorithm and delayed ACKs cost ~40 ms per exchange).
QEMU 7.2's stub answers ``p``/``P`` only once the client has read the target description, and
stops a running VM on connect (announced with a stop reply, drained here).

What differs between guest architectures is the caller's to say: the PC's register number in the
stub's target description (x86-64 ``rip`` 0x10, the default; aarch64 ``pc`` 0x20), its size and byte
order, and how many bytes of NOP to skip (x86-64 5, arm64 4).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Literal

RIP = 0x10  # x86-64 register number of rip in QEMU's target description (the default PC)


class BareRsp:
    """One connection to a GDB stub: ``host``/``port``; a VM running before stays running after.

    ``pc``, ``pc_size`` and ``byteorder``: the program counter's register number, size in bytes and
    byte order in the stub's target description (default: x86-64's ``rip``).
    """

    def __init__(self, host: str, port: int, timeout: float = 5.0, *, pc: int = RIP, pc_size: int = 8,
                 byteorder: Literal["little", "big"] = "little") -> None:
        self.pc, self.pc_size, self.byteorder = pc, pc_size, byteorder
        self.sock = socket.create_connection((host, port), timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.send(b"qSupported:multiprocess+")
        while (reply := self.packet(timeout)).startswith((b"T", b"S")):  # the stop connecting caused
            pass
        annex = self.request(b"qXfer:features:read:target.xml:0,ffb")  # unlocks p/P
        if not annex.startswith((b"m", b"l")):
            raise RuntimeError(f"no target description: {reply[:40]!r} / {annex[:40]!r}")

    def send(self, payload: bytes) -> None:
        """Send one packet, acknowledging the stub's last one first."""
        self.sock.sendall(b"+$%s#%02x" % (payload, sum(payload) & 0xFF))

    def packet(self, timeout: float | None = None) -> bytes:
        """The next packet's payload (acks skipped; no escapes or run-length codes expected)."""
        self.sock.settimeout(timeout)
        while (end := self.buf.find(b"#")) < 0 or len(self.buf) < end + 3:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the stub closed the connection")
            self.buf += data
        start = self.buf.index(b"$")
        payload, self.buf = self.buf[start + 1:end], self.buf[end + 3:]
        return payload

    def request(self, payload: bytes) -> bytes:
        """Send one packet and return the reply."""
        self.send(payload)
        return self.packet(5.0)

    def hits(self, addr: int, skip: int, done: Callable[[], bool]) -> list[float]:
        """Break at ``addr`` and take hits (the PC moved ``skip`` bytes on, past the entry NOP) until
        ``done()`` (asked when a quarter second passes without a hit); the host time of each hit.
        Leaves the breakpoint removed and the VM running."""
        if self.request(b"Z0,%x,1" % addr) != b"OK":
            raise RuntimeError("the stub refused the breakpoint")
        times: list[float] = []
        pc = (addr + skip).to_bytes(self.pc_size, self.byteorder).hex().encode()
        self.send(b"c")
        while True:
            try:
                stop = self.packet(0.25)
            except TimeoutError:
                if done():
                    break
                continue
            times.append(time.monotonic())
            if not stop.startswith(b"T05") or self.request(b"P%x=%s" % (self.pc, pc)) != b"OK":
                raise RuntimeError(f"unexpected stop or refused P: {stop[:40]!r}")
            self.send(b"c")
        self.sock.sendall(b"\x03")  # stop the VM, then leave it as it was: breakpoint out, running
        while not self.packet(5.0).startswith(b"T"):
            pass
        if self.request(b"z0,%x,1" % addr) != b"OK":
            raise RuntimeError("the stub refused to remove the breakpoint")
        self.send(b"c")
        return times

    def close(self) -> None:
        """Close the connection (the VM keeps running; nothing is left armed)."""
        self.sock.close()
