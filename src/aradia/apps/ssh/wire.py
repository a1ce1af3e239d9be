"""The SSH transport protocol's plain parts (RFC 4253, 4254): the version line, unencrypted binary
packets, KEXINIT and what the two sides negotiate, and the fields of the messages we report.

Every reader checks lengths against the bytes it has: a capture is untrusted input.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from aradia.errors import AradiaError

MAX_PACKET = 256 * 1024  # RFC 4253 requires 35000 at least; implementations cap near 256 KiB
KEXINIT, NEWKEYS = 20, 21
STRICT_CLIENT, STRICT_SERVER = "kex-strict-c-v00@openssh.com", "kex-strict-s-v00@openssh.com"

MESSAGE_NAMES = {
    1: "DISCONNECT", 2: "IGNORE", 3: "UNIMPLEMENTED", 4: "DEBUG", 5: "SERVICE_REQUEST", 6: "SERVICE_ACCEPT",
    7: "EXT_INFO", 8: "NEWCOMPRESS", 20: "KEXINIT", 21: "NEWKEYS", 30: "KEX_ECDH_INIT", 31: "KEX_ECDH_REPLY",
    32: "KEX_DH_GEX_INIT", 33: "KEX_DH_GEX_REPLY", 34: "KEX_DH_GEX_REQUEST",
    50: "USERAUTH_REQUEST", 51: "USERAUTH_FAILURE", 52: "USERAUTH_SUCCESS", 53: "USERAUTH_BANNER",
    60: "USERAUTH_PK_OK", 61: "USERAUTH_INFO_RESPONSE", 80: "GLOBAL_REQUEST", 81: "REQUEST_SUCCESS",
    82: "REQUEST_FAILURE", 90: "CHANNEL_OPEN", 91: "CHANNEL_OPEN_CONFIRMATION", 92: "CHANNEL_OPEN_FAILURE",
    93: "CHANNEL_WINDOW_ADJUST", 94: "CHANNEL_DATA", 95: "CHANNEL_EXTENDED_DATA", 96: "CHANNEL_EOF",
    97: "CHANNEL_CLOSE", 98: "CHANNEL_REQUEST", 99: "CHANNEL_SUCCESS", 100: "CHANNEL_FAILURE",
}

MAC_LENGTHS = {"hmac-sha1": 20, "hmac-sha1-96": 12, "hmac-sha2-256": 32, "hmac-sha2-512": 64, "hmac-md5": 16,
               "hmac-md5-96": 12, "umac-64@openssh.com": 8, "umac-128@openssh.com": 16, "none": 0}


def mac_length(name: str) -> int:
    """Bytes of MAC after each packet for MAC algorithm ``name`` (``-etm@openssh.com`` variants too)."""
    base = name.removesuffix("-etm@openssh.com")
    if name != base and base.startswith("umac"):
        base += "@openssh.com"
    if base not in MAC_LENGTHS:
        raise AradiaError(f"MAC algorithm {name!r} is not known")
    return MAC_LENGTHS[base]


def is_etm(mac: str) -> bool:
    """Whether MAC ``mac`` is encrypt-then-MAC (the packet length stays in clear)."""
    return mac.endswith("-etm@openssh.com")


class Reader:
    """Sequential reads of SSH data types from one message's payload, bounds-checked."""

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data, self.pos = data, pos

    def take(self, n: int) -> bytes:
        """The next ``n`` bytes."""
        if n < 0 or self.pos + n > len(self.data):
            raise AradiaError(f"SSH message cut short: {n} bytes wanted at {self.pos} of {len(self.data)}")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def byte(self) -> int:
        """One byte."""
        return self.take(1)[0]

    def boolean(self) -> bool:
        """An SSH boolean."""
        return self.byte() != 0

    def uint32(self) -> int:
        """A big-endian 32-bit integer."""
        return struct.unpack(">I", self.take(4))[0]

    def string(self) -> bytes:
        """An SSH string (length-prefixed bytes)."""
        return self.take(self.uint32())

    def text(self) -> str:
        """An SSH string as text (UTF-8, undecodable bytes replaced)."""
        return self.string().decode("utf-8", "replace")

    def names(self) -> list[str]:
        """A comma-separated name-list."""
        s = self.text()
        return s.split(",") if s else []


def version_line(stream: bytes) -> tuple[str, int]:
    """The peer's version string (``SSH-2.0-...``) and the offset where binary packets begin; lines
    before it (a server's banner) are skipped."""
    pos = 0
    while pos < len(stream):
        end = stream.find(b"\n", pos, pos + 8192)
        if end < 0:
            break
        line = stream[pos:end].rstrip(b"\r")
        if line.startswith(b"SSH-"):
            return line.decode("ascii", "replace"), end + 1
        pos = end + 1
    raise AradiaError("no SSH version line in the stream (the capture began after the connection's start?)")


def plain_packet(stream: bytes, pos: int) -> tuple[bytes, int] | None:
    """The payload of the unencrypted packet at ``pos`` and the offset after it; None when the stream
    ends first."""
    if pos + 5 > len(stream):
        return None
    length, pad = struct.unpack_from(">IB", stream, pos)
    if not 5 <= length <= MAX_PACKET or pad + 1 > length:
        raise AradiaError(f"not an SSH packet at stream offset {pos} (length {length}, padding {pad})")
    if pos + 4 + length > len(stream):
        return None
    return stream[pos + 5:pos + 4 + length - pad], pos + 4 + length


@dataclass(frozen=True)
class KexInit:
    """The algorithm lists of one side's KEXINIT."""

    kex: list[str]
    host_key: list[str]
    enc_c2s: list[str]
    enc_s2c: list[str]
    mac_c2s: list[str]
    mac_s2c: list[str]
    comp_c2s: list[str]
    comp_s2c: list[str]


def parse_kexinit(payload: bytes) -> KexInit:
    """A KEXINIT message's lists."""
    r = Reader(payload, 1 + 16)
    lists = [r.names() for _ in range(10)]
    return KexInit(*lists[:8])


def _choose(client: list[str], server: list[str], what: str) -> str:
    for name in client:
        if name in server:
            return name
    raise AradiaError(f"no common {what} algorithm in the two KEXINITs")


@dataclass(frozen=True)
class Negotiated:
    """What one key exchange agreed: ciphers, MACs and compression per direction, and strict kex
    (sequence numbers start again at 0 after NEWKEYS)."""

    enc_c2s: str
    enc_s2c: str
    mac_c2s: str
    mac_s2c: str
    comp_c2s: str
    comp_s2c: str
    strict: bool


def negotiate(client: KexInit, server: KexInit, first: bool) -> Negotiated:
    """The algorithms a client and a server agree on (RFC 4253 7.1: the client's first that the server
    also lists); strict kex counts only in the first exchange."""
    return Negotiated(_choose(client.enc_c2s, server.enc_c2s, "cipher"),
                      _choose(client.enc_s2c, server.enc_s2c, "cipher"),
                      _choose(client.mac_c2s, server.mac_c2s, "MAC"),
                      _choose(client.mac_s2c, server.mac_s2c, "MAC"),
                      _choose(client.comp_c2s, server.comp_c2s, "compression"),
                      _choose(client.comp_s2c, server.comp_s2c, "compression"),
                      first and STRICT_CLIENT in client.kex and STRICT_SERVER in server.kex)


def describe(payload: bytes) -> dict[str, object]:
    """The fields worth reporting of one decrypted message: auth requests (user, method, password),
    channel opens and requests (exec command, subsystem, pty), data (decoded by the caller)."""
    kind = payload[0] if payload else -1
    out: dict[str, object] = {"type": kind, "name": MESSAGE_NAMES.get(kind, f"MSG_{kind}")}
    r = Reader(payload, 1)
    try:
        if kind == 50:
            out |= {"user": r.text(), "service": r.text(), "method": r.text()}
            if out["method"] == "password" and not r.boolean():
                out["password"] = r.text()
            elif out["method"] == "publickey":
                r.boolean()
                out["key_algorithm"] = r.text()
        elif kind == 90:
            out |= {"channel_type": r.text(), "channel": r.uint32()}
        elif kind == 91:
            out |= {"channel": r.uint32(), "peer_channel": r.uint32()}
        elif kind in (93, 94, 95, 96, 97, 99, 100):
            out["channel"] = r.uint32()
        elif kind == 98:
            out |= {"channel": r.uint32(), "request": r.text(), "want_reply": r.boolean()}
            if out["request"] == "exec":
                out["command"] = r.text()
            elif out["request"] == "subsystem":
                out["subsystem"] = r.text()
            elif out["request"] == "exit-status":
                out["status"] = r.uint32()
            elif out["request"] == "env":
                out["variable"], out["value"] = r.text(), r.text()
            elif out["request"] == "pty-req":
                out["term"] = r.text()
        elif kind == 5 or kind == 6:
            out["service"] = r.text()
        elif kind == 1:
            out["code"], out["description"] = r.uint32(), r.text()
        elif kind == 80:
            out["request"] = r.text()
    except AradiaError as e:
        out["error"] = str(e)
    return out


def channel_data(payload: bytes) -> tuple[int, int, bytes]:
    """(recipient channel, data type: 0 for CHANNEL_DATA, 1 for stderr..., data) of a data message."""
    r = Reader(payload, 1)
    channel = r.uint32()
    code = r.uint32() if payload[0] == 95 else 0
    return channel, code, r.string()


__all__ = ["KEXINIT", "MESSAGE_NAMES", "NEWKEYS", "KexInit", "Negotiated", "Reader", "channel_data",
           "describe",
           "is_etm", "mac_length", "negotiate", "parse_kexinit", "plain_packet", "version_line"]
