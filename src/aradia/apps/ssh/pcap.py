"""TCP streams from a pcap capture (as QEMU's ``filter-dump`` writes it: classic pcap, Ethernet frames).

Each TCP connection becomes two byte streams (client to server, server to client), reassembled by
sequence number: retransmitted and overlapping segments are kept once, out-of-order ones are put in
place, and a hole (a segment the capture missed) is reported, never papered over. A truncated capture
(its last record cut short, as when QEMU was killed) gives the records before the cut and a warning.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from aradia.errors import AradiaError

_MAGIC = {b"\xd4\xc3\xb2\xa1": ("<", 1e-6), b"\xa1\xb2\xc3\xd4": (">", 1e-6),
          b"\x4d\x3c\xb2\xa1": ("<", 1e-9), b"\xa1\xb2\x3c\x4d": (">", 1e-9)}
LINKTYPE_ETHERNET = 1
ETH_IPV4, ETH_IPV6, ETH_VLAN = 0x0800, 0x86DD, 0x8100
TCP = 6
SYN, ACK, FIN, RST = 0x02, 0x10, 0x01, 0x04
MAX_STREAM = 1 << 30  # bytes kept per direction: a hostile capture cannot make us hold more


@dataclass(frozen=True)
class Segment:
    """One TCP segment: capture time, endpoints, sequence number, flags and payload."""

    time: float
    src: tuple[str, int]
    dst: tuple[str, int]
    seq: int
    flags: int
    data: bytes


@dataclass
class Stream:
    """One direction of a connection, reassembled: its bytes, the capture time at which each chunk
    began (offset, time), and holes the capture missed (offset, length)."""

    data: bytearray = field(default_factory=bytearray)
    times: list[tuple[int, float]] = field(default_factory=list)
    holes: list[tuple[int, int]] = field(default_factory=list)

    def time_at(self, offset: int) -> float:
        """Capture time of the segment that carried byte ``offset``."""
        t = self.times[0][1] if self.times else 0.0
        for off, when in self.times:
            if off > offset:
                break
            t = when
        return t


@dataclass
class Connection:
    """A TCP connection: client and server endpoints (the client sent the SYN), both streams."""

    client: tuple[str, int]
    server: tuple[str, int]
    start: float
    to_server: Stream
    to_client: Stream
    saw_syn: bool


def _ip(addr: bytes) -> str:
    if len(addr) == 4:
        return ".".join(str(b) for b in addr)
    return ":".join(f"{addr[i] << 8 | addr[i + 1]:x}" for i in range(0, 16, 2))


def _tcp_segment(frame: bytes, when: float) -> Segment | None:
    """The TCP segment in an Ethernet frame, or None for anything else (ARP, UDP, fragments)."""
    if len(frame) < 14:
        return None
    etype, pos = struct.unpack_from(">H", frame, 12)[0], 14
    while etype == ETH_VLAN and len(frame) >= pos + 4:
        etype, pos = struct.unpack_from(">H", frame, pos + 2)[0], pos + 4
    if etype == ETH_IPV4 and len(frame) >= pos + 20:
        ihl = (frame[pos] & 0x0F) * 4
        total, frag, proto = struct.unpack_from(">H", frame, pos + 2)[0], struct.unpack_from(
            ">H", frame, pos + 6)[0], frame[pos + 9]
        if proto != TCP or frag & 0x1FFF or frag & 0x2000 or ihl < 20:
            return None
        src, dst = _ip(frame[pos + 12:pos + 16]), _ip(frame[pos + 16:pos + 20])
        end = min(len(frame), pos + total)
        pos += ihl
    elif etype == ETH_IPV6 and len(frame) >= pos + 40:
        if frame[pos + 6] != TCP:
            return None  # extension headers: not followed (SSH over them is not expected here)
        plen = struct.unpack_from(">H", frame, pos + 4)[0]
        src, dst = _ip(frame[pos + 8:pos + 24]), _ip(frame[pos + 24:pos + 40])
        end = min(len(frame), pos + 40 + plen)
        pos += 40
    else:
        return None
    if end < pos + 20:
        return None
    sport, dport, seq = struct.unpack_from(">HHI", frame, pos)
    off = (frame[pos + 12] >> 4) * 4
    flags = frame[pos + 13]
    if off < 20 or pos + off > end:
        return None
    return Segment(when, (src, sport), (dst, dport), seq, flags, bytes(frame[pos + off:end]))


def read_segments(path: Path, warnings: list[str]) -> list[Segment]:
    """Every TCP segment of the capture at ``path``, in capture order."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise AradiaError(f"cannot read the capture {path}: {e.strerror}") from e
    if len(raw) < 24 or raw[:4] not in _MAGIC:
        raise AradiaError(f"{path} is not a pcap capture (pcapng is not read: convert with editcap -F pcap)")
    order, unit = _MAGIC[raw[:4]]
    link = struct.unpack_from(order + "I", raw, 20)[0]
    if link != LINKTYPE_ETHERNET:
        raise AradiaError(f"{path}: link type {link}, only Ethernet (1) is read")
    segments, pos = [], 24
    while pos < len(raw):
        if pos + 16 > len(raw):
            warnings.append(f"capture truncated: a record header cut short at byte {pos}")
            break
        sec, frac, incl, _orig = struct.unpack_from(order + "IIII", raw, pos)
        if pos + 16 + incl > len(raw):
            warnings.append(f"capture truncated: the last record is cut short at byte {pos}")
            break
        seg = _tcp_segment(raw[pos + 16:pos + 16 + incl], sec + frac * unit)
        if seg is not None:
            segments.append(seg)
        pos += 16 + incl
    return segments


def _reassemble(segs: list[Segment], isn: int | None, label: str, warnings: list[str]) -> Stream:
    """One direction's bytes: from ``isn`` (the SYN's sequence + 1) or the lowest sequence seen."""
    stream = Stream()
    if not segs:
        return stream
    base = isn if isn is not None else segs[0].seq
    pieces = sorted(((s.seq - base) & 0xFFFFFFFF, s) for s in segs if s.data)
    for off, s in pieces:
        if off > 1 << 31:
            continue  # before the stream's start (a retransmission of the handshake's era)
        have = len(stream.data)
        if off > have:
            stream.holes.append((have, off - have))
            warnings.append(f"{label}: {off - have} byte(s) missing at stream offset {have} (not captured)")
            stream.data += bytes(off - have)
            have = off
        new = s.data[have - off:]
        if new:
            if len(stream.data) + len(new) > MAX_STREAM:
                warnings.append(f"{label}: stream longer than {MAX_STREAM} bytes; the rest is not read")
                break
            stream.times.append((have, s.time))
            stream.data += new
    return stream


def connections(segments: list[Segment], warnings: list[str]) -> list[Connection]:
    """The TCP connections in ``segments``, in order of their first segment, each reassembled."""
    flows: dict[tuple[tuple[str, int], tuple[str, int]], list[Segment]] = {}
    order: list[frozenset[tuple[str, int]]] = []
    for s in segments:
        key = frozenset((s.src, s.dst))
        if key not in order:
            order.append(key)
        flows.setdefault((s.src, s.dst), []).append(s)
    result = []
    for key in order:
        a, b = sorted(key)
        ab, ba = flows.get((a, b), []), flows.get((b, a), [])
        syn = next((s for s in ab + ba if s.flags & SYN and not s.flags & ACK), None)
        if syn is not None:
            client, server = syn.src, syn.dst
        else:  # no handshake captured: the lower port is taken as the server's
            client, server = (a, b) if a[1] > b[1] else (b, a)
        up, down = flows.get((client, server), []), flows.get((server, client), [])
        isn_up = next((s.seq + 1 for s in up if s.flags & SYN), None)
        isn_down = next((s.seq + 1 for s in down if s.flags & SYN), None)
        label = f"{client[0]}:{client[1]} -> {server[0]}:{server[1]}"
        result.append(Connection(client, server, min(s.time for s in up + down),
                                 _reassemble(up, isn_up, label, warnings),
                                 _reassemble(down, isn_down, label + " (reply)", warnings), syn is not None))
    return result


__all__ = ["Connection", "Segment", "Stream", "connections", "read_segments"]
