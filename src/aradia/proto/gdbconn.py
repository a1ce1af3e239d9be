"""Finding out, before and after connecting, whether another client holds a GDB stub.

QEMU queues a second client silently and pauses the VM when it finally accepts it, so a busy stub
is detected from ``/proc/net`` and a queued socket is kept until it can leave the VM as it found it.
"""

from __future__ import annotations

import binascii
import contextlib
import ipaddress
import os
import socket
import time

from aradia.errors import AradiaError
from aradia.proto.gdbwire import MAX_PACKET, frame, is_console, is_stop_reply, parse_version


def parse_address(address: str | tuple[str, int]) -> tuple[int, object]:
    """``host:port``, ``tcp:host:port``, ``unix:/path`` or a path -> (address family, sockaddr)."""
    if isinstance(address, tuple):
        return socket.AF_INET, (address[0], int(address[1]))
    if address.startswith("unix:"):
        return socket.AF_UNIX, address[5:].split(",")[0]
    if address.startswith(("/", "./")):
        return socket.AF_UNIX, address
    rest = address[4:] if address.startswith("tcp:") else address
    rest = rest.split(",")[0]
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        raise AradiaError(f"bad GDB stub address {address!r} (want host:port, tcp:host:port or unix:PATH)")
    host = host.strip("[]") or "127.0.0.1"
    return socket.AF_INET, (host, int(port))


def _proc_net_tcp_busy(ip: str, port: int) -> bool:
    """Whether ``/proc/net/tcp*`` shows a connection to ``ip:port`` that QEMU holds or has queued."""
    want = ipaddress.ip_address(ip)
    if isinstance(want, ipaddress.IPv6Address) and want.ipv4_mapped:
        want = want.ipv4_mapped
    busy_states = {"01", "03", "08"}  # ESTABLISHED, SYN_RECV, CLOSE_WAIT
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines[:100000]:
            parts = line.split()
            if len(parts) < 4 or parts[3] not in busy_states:
                continue
            local_ip, _, local_port = parts[1].partition(":")
            try:
                if int(local_port, 16) != port:
                    continue
                raw = bytes.fromhex(local_ip)
                if len(raw) == 4:
                    addr: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(raw[::-1])
                else:
                    addr = ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
                    if addr.ipv4_mapped:
                        addr = addr.ipv4_mapped
            except ValueError:
                continue
            if addr == want:
                return True
    return False


def _proc_net_unix_busy(path: str) -> bool:
    """Whether ``/proc/net/unix`` shows an accepted or queued connection on the socket at ``path``."""
    names = {path, os.path.abspath(path)}
    with contextlib.suppress(OSError):
        names.add(os.path.realpath(path))
    try:
        with open("/proc/net/unix") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return False
    for line in lines[:100000]:
        parts = line.split(None, 7)
        if len(parts) == 8 and parts[7] in names:
            try:
                listening = int(parts[3], 16) & 0x10000  # __SO_ACCEPTCON
            except ValueError:
                continue
            if not listening:
                return True
    return False


def stub_held_elsewhere(family: int, sockaddr: object) -> bool:
    """Whether the kernel shows another client on this stub (only for stubs on this host)."""
    if family == socket.AF_UNIX:
        return _proc_net_unix_busy(str(sockaddr))
    host, port = sockaddr  # type: ignore[misc]
    try:
        ips = {ai[4][0] for ai in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)}
    except OSError:
        return False
    return any(_proc_net_tcp_busy(ip, port) for ip in ips)


def linger_queued(sock: socket.socket, lifetime: float) -> None:
    """Own a connection QEMU has not accepted yet; once it does, leave the VM as it was found.

    QEMU pauses the VM when it accepts a connection (7.2 says ``T02`` if it was running; 8.1 and
    later say nothing). A dead queued socket would leave the guest paused after the current client
    detaches. With a silent QEMU we cannot tell, and resume: a debugger that leaves usually lets
    the guest run, and a guest frozen for good is the worse mistake.
    """
    buf = bytearray()
    pos = 0
    was_running = asked = False
    deadline = time.monotonic() + lifetime

    def detach() -> None:
        sock.sendall(b"+" + frame(b"D;1"))
        time.sleep(0.2)

    try:
        sock.settimeout(1.0)
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            if not data or len(buf) > MAX_PACKET:
                return
            buf += data
            while True:
                start = buf.find(b"$", pos)
                end = buf.find(b"#", start + 1) if start >= 0 else -1
                if end < 0 or len(buf) < end + 3:
                    break
                payload = bytes(buf[start + 1:end])
                pos = end + 3
                if is_stop_reply(payload):
                    was_running = True
                elif not asked and (b"PacketSize" in payload or b"multiprocess" in payload):
                    if was_running:
                        detach()
                        return
                    asked = True
                    sock.sendall(b"+" + frame(b"qRcmd," + binascii.hexlify(b"info version")))
                elif asked and is_console(payload):
                    text = binascii.unhexlify(payload[1:]).decode("ascii", "replace")
                    if parse_version(text) >= (8, 1):
                        detach()
                    return
                elif asked:
                    return
    except OSError:
        return
    finally:
        sock.close()
