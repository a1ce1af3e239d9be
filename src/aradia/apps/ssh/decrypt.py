"""Decrypting captured SSH connections with keys taken from the daemon's memory.

For each TCP connection in the capture: the version lines and the plain key exchange are read, the two
KEXINITs say which cipher and MAC each direction uses, and after each NEWKEYS the key candidates are
tried on the first packets of that direction; the one that decrypts them (AEAD tags verify; CTR
packets are well-formed) decrypts the rest. A rekey (a second KEXINIT/NEWKEYS) starts a new search.
The result holds every message (type, fields: exec commands, passwords, channel requests), and each
channel's data in both directions, byte for byte.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from aradia.apps.ssh.ciphers import (
    AES_CTR,
    AES_GCM,
    CHACHA,
    SUPPORTED,
    BadPacket,
    ChachaCipher,
    CtrCipher,
    GcmCipher,
    PacketCipher,
    ctr_starts,
)
from aradia.apps.ssh.keys import SshKey
from aradia.apps.ssh.pcap import Connection, Stream, connections, read_segments
from aradia.apps.ssh.wire import (
    KEXINIT,
    MESSAGE_NAMES,
    NEWKEYS,
    KexInit,
    channel_data,
    describe,
    is_etm,
    mac_length,
    negotiate,
    parse_kexinit,
    plain_packet,
    version_line,
)
from aradia.errors import AradiaError

PROBE_PACKETS = 64  # CTR candidates are scored by how many packets in a row they decrypt, up to this
# and the best must decrypt this many: a wrong key or counter gives a well-formed packet about once in
# six, and a few million are tried (keys x counters walked back), so ten in a row is not chance
CTR_MIN_PACKETS = 10
CTR_SHORT_PACKETS = 6  # a stream with fewer packets than that cannot prove a CTR key
FIRST_MESSAGES = {"c2s": (5, 7), "s2c": (6, 7)}  # SERVICE_REQUEST / SERVICE_ACCEPT, or EXT_INFO first
# How far a counter taken mid-session is walked back, at least (more if the capture holds more): the
# traffic up to the moment of ``keys ssh`` may exceed what was captured (a capture cut short).
CTR_BACK = 1 << 16  # blocks: 1 MiB of one direction's traffic beyond what was captured
GCM_BACK = 1 << 16  # packets


@dataclass
class _Direction:
    name: str
    stream: Stream
    pos: int
    data: bytes = b""  # the stream's bytes, copied once (keys and counters are tried against it often)
    seqnr: int = 0
    cipher: PacketCipher | None = None
    kexinit: KexInit | None = None
    ended: bool = False
    payloads: list[tuple[float, int, bytes]] = field(default_factory=list)


def _next_epoch(d: _Direction, errors: list[str]) -> bool:
    """Read ``d``'s packets up to and including its next NEWKEYS; False when the stream ends first."""
    data = d.data
    while not d.ended:
        try:
            got = plain_packet(data, d.pos) if d.cipher is None else d.cipher.packet(data, d.pos, d.seqnr)
        except (BadPacket, AradiaError) as e:
            errors.append(f"{d.name}: packet {d.seqnr} at stream offset {d.pos} does not decrypt ({e})")
            d.ended = True
            return False
        if got is None:
            if d.pos < len(data):
                errors.append(f"{d.name}: the capture ends inside a packet ({len(data) - d.pos} bytes left)")
            d.ended = True
            return False
        payload, end = got
        d.payloads.append((d.stream.time_at(d.pos), d.seqnr, payload))
        d.pos, d.seqnr = end, d.seqnr + 1
        if payload[0] == KEXINIT:
            d.kexinit = parse_kexinit(payload)
        elif payload[0] == NEWKEYS:
            return True
    return False


def _score(cipher: PacketCipher, data: bytes, pos: int, seqnr: int, cap: int) -> tuple[int, bool, int]:
    """How many packets in a row ``cipher`` decrypts from ``pos`` (at most ``cap``); whether the run
    ended cleanly (exactly at the stream's end, or at a rekey's NEWKEYS: what follows has other keys);
    the first packet's message type (-1: none)."""
    got, first, kexinit = 0, -1, False
    try:
        while got < cap:
            r = cipher.packet(data, pos, seqnr + got)
            if r is None:
                return got, pos == len(data), first
            kind = r[0][0]
            pos, got, first = r[1], got + 1, kind if first < 0 else first
            kexinit |= kind == KEXINIT
            if kind == NEWKEYS:
                return got, kexinit, first
    except BadPacket:
        return got, False, first
    return got, False, first


def _candidates(d: _Direction, enc: str, mac: str, key: SshKey) -> Iterator[tuple[PacketCipher, int, str]]:
    """(fresh cipher, sequence number, initial IV in hex) to try for candidate ``key``."""
    raw, data = bytes.fromhex(key.key), d.data
    if enc in AES_CTR:
        etm, maclen = is_etm(mac), mac_length(mac)
        if key.iv_is == "initial":
            starts: Iterator[int] | list[int] = [int(key.iv, 16)]
        else:
            back = max(CTR_BACK, (len(data) - d.pos) // 16)
            starts = ctr_starts(raw, int(key.iv, 16), data, d.pos, etm, back, maclen)
        for start in starts:
            yield CtrCipher(raw, start, maclen, etm), d.seqnr, f"{start % (1 << 128):032x}"
    elif enc in AES_GCM and len(key.iv) == 24:
        iv = bytes.fromhex(key.iv)
        invocation = int.from_bytes(iv[4:], "big")
        # A saved counter is that many packets on from the epoch's start: each packet is >= 36 bytes.
        back = 0 if key.iv_is == "initial" else max(GCM_BACK, (len(data) - d.pos) // 36)
        for i in range(invocation, invocation - back - 1, -1):
            yield GcmCipher(raw, iv[:4], i % (1 << 64)), d.seqnr, iv[:4].hex() + f"{i % (1 << 64):016x}"
    elif enc == CHACHA:
        for seqnr in dict.fromkeys((d.seqnr, 0)):  # strict kex resets it; tried both if in doubt
            yield ChachaCipher(raw), seqnr, ""


Chosen = tuple[PacketCipher, int, dict[str, Any]]


def _choose_key(d: _Direction, enc: str, mac: str, keys: list[SshKey], first: bool) -> Chosen | str:
    """The cipher state for ``d``'s next key epoch, or why there is none."""
    if enc not in SUPPORTED:
        return f"cipher {enc} is not supported (only {', '.join(SUPPORTED)})"
    data = d.data
    if d.pos >= len(data):
        return "no encrypted packets were captured"
    tried, best, best_score = 0, None, 0
    for key in keys:
        if key.cipher != enc:
            continue
        tried += 1
        for cipher, seqnr, iv in _candidates(d, enc, mac, key):
            if not isinstance(cipher, CtrCipher):  # an AEAD tag that verifies is proof enough
                if _score(copy.copy(cipher), data, d.pos, seqnr, 1)[0]:
                    return cipher, seqnr, _used(enc, mac, key, iv)
                continue
            # CTR has no tag here: of every key and counter, the one that decrypts the longest run,
            # if that is long enough not to be chance, or ends exactly where the stream or epoch does
            got, clean, kind = _score(copy.copy(cipher), data, d.pos, seqnr, PROBE_PACKETS)
            # a short stream is believed only if it decrypts whole, and, after the first key
            # exchange, starts as every SSH session does (the service request, or extension info)
            opening = kind in (FIRST_MESSAGES[d.name] if first else MESSAGE_NAMES)
            believed = got >= CTR_MIN_PACKETS or (clean and opening and got >= CTR_SHORT_PACKETS)
            if believed and got > best_score:
                best, best_score = (cipher, seqnr, _used(enc, mac, key, iv)), got
    if best is not None:
        return best
    return f"none of {tried} {enc} key candidate(s) decrypts it"


def _used(enc: str, mac: str, key: SshKey, iv: str) -> dict[str, Any]:
    return {"cipher": enc, "mac": mac if enc in AES_CTR else "(implicit)", "source": key.source,
            "pid": key.pid, "comm": key.comm, "key": key.key, "iv": iv}





Ordered = list[tuple[float, str, int, bytes]]


def _ordered(dirs: list[_Direction]) -> Ordered:
    """Both directions' messages in capture order (a reply is never captured before its request)."""
    both = [(when, d.name, seqnr, p) for d in dirs for when, seqnr, p in d.payloads]
    return sorted(both, key=lambda m: (m[0], m[1] != "c2s", m[2]))


def _messages(ordered: Ordered) -> list[dict[str, Any]]:
    out = []
    for when, name, seqnr, payload in ordered:
        m = {"time": when, "dir": name, "seq": seqnr, **describe(payload)}
        if payload[0] in (94, 95):
            try:
                _, code, data = channel_data(payload)
            except AradiaError as e:
                m["error"] = str(e)
            else:
                m["data"] = data.decode("utf-8", "backslashreplace")
                if code:
                    m["data_type"] = code
        out.append(m)
    return out


def _channels(ordered: Ordered) -> list[dict[str, Any]]:
    """Each channel from its open to its close, in order of opening: type, the client's and the
    server's ids (both sides reuse ids of closed channels), requests, and its data both ways."""
    chans: list[dict[str, Any]] = []
    by_side: dict[str, dict[int, dict[str, Any]]] = {"c2s": {}, "s2c": {}}  # by the receiver's own id
    for _, d, _, p in ordered:
        kind, other = p[0], "s2c" if d == "c2s" else "c2s"
        if kind not in (90, 91, 94, 95, 97, 98):
            continue
        f = describe(p)
        if "channel" not in f:
            continue
        ident = int(f["channel"])  # type: ignore[call-overload]
        if kind == 90:  # the opener's id, by which the peer will address it
            ch = {"client_channel": ident if d == "c2s" else None,
                  "server_channel": ident if d == "s2c" else None,
                  "opened_by": "client" if d == "c2s" else "server", "type": f["channel_type"],
                  "requests": [], "sent": bytearray(), "received": bytearray(), "stderr": bytearray(),
                  "closed": set()}
            chans.append(ch)
            by_side[other][ident] = ch
            continue
        ch = by_side[d].get(ident)  # a message names the channel by its receiver's id
        if ch is None:
            continue
        if kind == 91:
            peer = int(f["peer_channel"])  # type: ignore[call-overload]
            ch["server_channel" if d == "s2c" else "client_channel"] = peer
            by_side[other][peer] = ch
        elif kind == 98:
            ch["requests"].append({k: v for k, v in f.items() if k not in ("type", "name", "channel")})
        elif kind == 97:
            ch["closed"].add(d)
            if len(ch["closed"]) == 2:  # both sides closed it: its ids may be reused
                for side in by_side.values():
                    for i in [i for i, c in side.items() if c is ch]:
                        del side[i]
        else:
            with contextlib.suppress(AradiaError):  # a malformed one is shown in messages, with its error
                _, code, data = channel_data(p)
                ch["sent" if d == "c2s" else "stderr" if code else "received"] += data
    for ch in chans:
        ch["closed"] = len(ch["closed"]) == 2
        for k in ("sent", "received", "stderr"):
            ch[k + "_b64"] = base64.b64encode(bytes(ch[k])).decode()
            ch[k] = bytes(ch[k]).decode("utf-8", "backslashreplace")
    return chans


def decrypt_connection(conn: Connection, keys: list[SshKey]) -> dict[str, Any]:
    """One captured connection, decrypted as far as the keys allow."""
    errors: list[str] = []
    rec: dict[str, Any] = {"client": f"{conn.client[0]}:{conn.client[1]}",
                           "server": f"{conn.server[0]}:{conn.server[1]}", "start": conn.start,
                           "handshake_captured": conn.saw_syn, "holes": len(conn.to_server.holes)
                           + len(conn.to_client.holes), "epochs": [], "errors": errors}
    try:
        rec["client_version"], c_pos = version_line(bytes(conn.to_server.data))
        rec["server_version"], s_pos = version_line(bytes(conn.to_client.data))
    except AradiaError as e:
        errors.append(str(e))
        rec |= {"messages": [], "channels": [], "complete": False}
        return rec
    c2s = _Direction("c2s", conn.to_server, c_pos, bytes(conn.to_server.data))
    s2c = _Direction("s2c", conn.to_client, s_pos, bytes(conn.to_client.data))
    epoch = 0
    while True:
        fresh = [d for d in (c2s, s2c) if _next_epoch(d, errors)]
        if not fresh:
            break
        if c2s.kexinit is None or s2c.kexinit is None:
            errors.append("NEWKEYS without both sides' KEXINIT in the capture")
            break
        neg = negotiate(c2s.kexinit, s2c.kexinit, epoch == 0)
        used: dict[str, Any] = {"epoch": epoch + 1, "strict_kex": neg.strict}
        for d in fresh:
            enc, mac, comp = ((neg.enc_c2s, neg.mac_c2s, neg.comp_c2s) if d is c2s
                              else (neg.enc_s2c, neg.mac_s2c, neg.comp_s2c))
            if comp != "none":
                errors.append(f"{d.name}: compression {comp} is negotiated; its payloads are not inflated")
            if neg.strict:
                d.seqnr = 0
            chosen = _choose_key(d, enc, mac, keys, epoch == 0)
            if isinstance(chosen, str):
                errors.append(f"{d.name} after NEWKEYS ({enc}): {chosen}")
                used[d.name] = {"cipher": enc, "key": None}
                d.ended = True
                continue
            d.cipher, d.seqnr, used[d.name] = chosen
        rec["epochs"].append(used)
        c2s.kexinit = s2c.kexinit = None
        epoch += 1
    ordered = _ordered([c2s, s2c])
    rec["messages"] = _messages(ordered)
    rec["channels"] = _channels(ordered)
    rec["complete"] = not errors and not rec["holes"]
    return rec


def _looks_ssh(conn: Connection) -> bool:
    return any(s.data[:8192].find(b"SSH-") >= 0 for s in (conn.to_server, conn.to_client))


def decrypt_capture(path: Path, keys: list[SshKey]) -> dict[str, Any]:
    """Every SSH connection of the pcap at ``path``, decrypted with ``keys``; other TCP connections
    are counted, problems with the capture itself are listed under ``warnings``."""
    warnings: list[str] = []
    conns = connections(read_segments(path, warnings), warnings)
    ssh = [c for c in conns if _looks_ssh(c)]
    return {"capture": str(path), "connections": [decrypt_connection(c, keys) for c in ssh],
            "other_connections": len(conns) - len(ssh), "warnings": warnings}


def load_keys(path: Path) -> list[SshKey]:
    """Key candidates from a file ``aradia keys ssh --json`` wrote (its ``keys`` list)."""
    try:
        doc = json.loads(path.read_text())
    except OSError as e:
        raise AradiaError(f"cannot read {path}: {e.strerror}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AradiaError(f"{path} is not JSON ({e})") from e
    items = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise AradiaError(f"{path} has no \"keys\" list (write it with aradia keys ssh --json)")
    names = {f.name: f.type for f in fields(SshKey)}
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not set(names) <= set(item):
            missing = ", ".join(sorted(set(names) - set(item if isinstance(item, dict) else {})))
            raise AradiaError(f"{path}: key {i} lacks fields ({missing})")
        k = SshKey(**{n: item[n] for n in names})
        try:
            bytes.fromhex(k.key), bytes.fromhex(k.iv)
        except (TypeError, ValueError) as e:
            raise AradiaError(f"{path}: key {i}: key and iv must be hex strings") from e
        if not isinstance(k.cipher, str) or k.iv_is not in ("initial", "counter", "none"):
            raise AradiaError(f"{path}: key {i}: cipher must be a name and iv_is initial, counter or none")
        out.append(k)
    return out


__all__ = ["decrypt_capture", "decrypt_connection", "load_keys"]
