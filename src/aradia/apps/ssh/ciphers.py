"""Decrypting SSH binary packets: AES-CTR (with any MAC, encrypt-then-MAC or not), AES-GCM and
chacha20-poly1305 as OpenSSH defines them (PROTOCOL.chacha20poly1305), with ``cryptography``'s
primitives.

A cipher object holds one direction's running state (CTR's counter, GCM's invocation counter) and
decrypts one packet at a time. AEAD ciphers check each packet's tag, so a wrong key or IV is refused
outright; CTR (whose MAC key we do not look for) is checked by the packet's own structure: a length
the stream can hold, padding of 4 to 255 bytes, a block-aligned packet, a known message type.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.poly1305 import Poly1305

from aradia.apps.ssh.wire import MAX_PACKET, MESSAGE_NAMES

AES_CTR = {"aes128-ctr": 16, "aes192-ctr": 24, "aes256-ctr": 32}
AES_GCM = {"aes128-gcm@openssh.com": 16, "aes256-gcm@openssh.com": 32}
CHACHA = "chacha20-poly1305@openssh.com"
SUPPORTED = (*AES_CTR, *AES_GCM, CHACHA)


class BadPacket(Exception):
    """The bytes at this position do not decrypt to an SSH packet with this key (wrong key, IV or
    alignment, or damaged data)."""


class PacketCipher(Protocol):
    """One direction's decryption state."""

    def packet(self, stream: bytes, pos: int, seqnr: int) -> tuple[bytes, int] | None:
        """The payload of the packet at ``pos`` and the offset after it (MAC included); None when the
        stream ends before the packet does; :class:`BadPacket` when it does not decrypt."""
        ...


def key_length(cipher: str) -> int:
    """Bytes of key material ``cipher`` takes (chacha20-poly1305: two 256-bit keys)."""
    return AES_CTR.get(cipher) or AES_GCM.get(cipher) or (64 if cipher == CHACHA else 0)


def _payload(plain: bytes, start: int, length: int) -> bytes:
    """The payload of a decrypted packet whose padding-length byte is ``plain[start]`` and whose
    length field says ``length``; refuses what no SSH implementation sends."""
    pad = plain[start]
    if not 4 <= pad <= 255 or pad + 1 >= length:
        raise BadPacket(f"padding length {pad} impossible in a packet of {length}")
    payload = plain[start + 1:start + length - pad]
    if not payload or payload[0] not in MESSAGE_NAMES:
        raise BadPacket(f"unknown message type {payload[:1].hex()}")
    return payload


def _aes_ctr(key: bytes, counter: int, data: bytes) -> bytes:
    dec = Cipher(algorithms.AES(key), modes.CTR((counter % (1 << 128)).to_bytes(16, "big"))).decryptor()
    return dec.update(data)


@dataclass
class CtrCipher:
    """AES-CTR; ``counter`` is the next block's counter (the IV, at the start of a key epoch)."""

    key: bytes
    counter: int
    mac_len: int
    etm: bool

    def packet(self, stream: bytes, pos: int, seqnr: int) -> tuple[bytes, int] | None:
        """See :class:`PacketCipher`."""
        if self.etm:
            if pos + 4 > len(stream):
                return None
            length = struct.unpack_from(">I", stream, pos)[0]
            if not 16 <= length <= MAX_PACKET or length % 16:
                raise BadPacket(f"length {length} impossible for encrypt-then-MAC AES")
            end = pos + 4 + length + self.mac_len
            if end > len(stream):
                return None
            plain = _aes_ctr(self.key, self.counter, stream[pos + 4:pos + 4 + length])
            payload = _payload(plain, 0, length)
            self.counter += length // 16
            return payload, end
        if pos + 16 > len(stream):
            return None
        first = _aes_ctr(self.key, self.counter, stream[pos:pos + 16])
        length = struct.unpack_from(">I", first)[0]
        if not 12 <= length <= MAX_PACKET or (length + 4) % 16:
            raise BadPacket(f"length {length} impossible for AES")
        end = pos + 4 + length + self.mac_len
        if end > len(stream):
            return None
        plain = _aes_ctr(self.key, self.counter, stream[pos:pos + 4 + length])
        payload = _payload(plain, 4, length)
        self.counter += (length + 4) // 16
        return payload, end


@dataclass
class GcmCipher:
    """AES-GCM as RFC 5647 and OpenSSH use it: a 4-byte fixed field and a 64-bit invocation counter
    that grows by one per packet; the clear length is the associated data."""

    key: bytes
    fixed: bytes
    invocation: int

    def packet(self, stream: bytes, pos: int, seqnr: int) -> tuple[bytes, int] | None:
        """See :class:`PacketCipher`."""
        if pos + 4 > len(stream):
            return None
        length = struct.unpack_from(">I", stream, pos)[0]
        if not 16 <= length <= MAX_PACKET or length % 16:
            raise BadPacket(f"length {length} impossible for AES-GCM")
        end = pos + 4 + length + 16
        if end > len(stream):
            return None
        nonce = self.fixed + (self.invocation % (1 << 64)).to_bytes(8, "big")
        try:
            plain = AESGCM(self.key).decrypt(nonce, stream[pos + 4:end], stream[pos:pos + 4])
        except InvalidTag:
            raise BadPacket("GCM tag does not verify") from None
        self.invocation += 1
        return _payload(plain, 0, length), end


def _chacha(key: bytes, seqnr: int, block: int, data: bytes) -> bytes:
    nonce = block.to_bytes(8, "little") + (seqnr % (1 << 64)).to_bytes(8, "big")
    return Cipher(algorithms.ChaCha20(key, nonce), None).encryptor().update(data)


@dataclass
class ChachaCipher:
    """chacha20-poly1305@openssh.com: the second 32 bytes of the key encrypt the length, the first the
    packet and (block 0) the Poly1305 key; the nonce is the packet's sequence number."""

    key: bytes

    def packet(self, stream: bytes, pos: int, seqnr: int) -> tuple[bytes, int] | None:
        """See :class:`PacketCipher`."""
        if pos + 4 > len(stream):
            return None
        length = struct.unpack(">I", _chacha(self.key[32:], seqnr, 0, stream[pos:pos + 4]))[0]
        if not 8 <= length <= MAX_PACKET:
            raise BadPacket(f"length {length} impossible")
        end = pos + 4 + length + 16
        if end > len(stream):
            return None
        poly_key = _chacha(self.key[:32], seqnr, 0, bytes(32))
        try:
            Poly1305.verify_tag(poly_key, stream[pos:pos + 4 + length], stream[end - 16:end])
        except InvalidSignature:
            raise BadPacket("Poly1305 tag does not verify") from None
        plain = _chacha(self.key[:32], seqnr, 1, stream[pos + 4:pos + 4 + length])
        return _payload(plain, 0, length), end


_KNOWN_TYPES = np.array(sorted(MESSAGE_NAMES), dtype=np.uint8)
_BE32 = np.array([1 << 24, 1 << 16, 1 << 8, 1], dtype=np.int64)
KEXINIT_TYPE, NEWKEYS_TYPE = 20, 21
CTR_DEPTH = 12  # packets a walked-back CTR counter is checked against
CTR_KEEP = 64  # best candidates handed on to be tried in full


def _add(first: int, minus: np.ndarray, plus: np.ndarray) -> bytes:
    """The 128-bit big-endian counter blocks ``first - minus[k] + plus[k]`` (wrapping)."""
    lo0, hi0 = np.uint64(first & (2**64 - 1)), np.uint64(first >> 64 & (2**64 - 1))
    lo = lo0 - minus  # numpy wraps unsigned arithmetic: a borrow shows as minus > lo0
    hi = hi0 - (minus > lo0).astype(np.uint64)
    lo2 = lo + plus
    hi = hi + (lo2 < lo).astype(np.uint64)  # the carry
    return np.stack([hi, lo2], axis=1).astype(">u8").tobytes()


def ctr_starts(key: bytes, counter: int, stream: bytes, pos: int, etm: bool, back: int, mac_len: int = 0,
               depth: int = CTR_DEPTH) -> Iterator[int]:
    """Counters, from ``counter + 1`` down to ``counter - back``, that decrypt the packets from
    ``pos`` on, best first: how a counter read from a live cipher state (advanced by the blocks
    already processed) is taken back to the start of the key epoch.

    A candidate scores the packets in a row whose first block is well-formed (length, padding, known
    message type), up to ``depth``, the stream's end or a NEWKEYS after a KEXINIT (a rekey). One
    packet passes by chance about once in six, so over a million candidates the true counter, which
    passes every packet, comes first. Vectorised: one ECB pass per packet over the candidates still
    standing; at most :data:`CTR_KEEP` are yielded, by score then nearness to ``counter``."""
    first, n = (counter + 1) % (1 << 128), back + 2
    data = np.frombuffer(stream, dtype=np.uint8)
    cand = np.arange(n, dtype=np.uint64)  # candidate k starts at first - k
    off = np.zeros(n, dtype=np.uint64)  # blocks from the start to the packet being checked
    at = np.full(n, pos, dtype=np.int64)  # the stream offset of that packet
    kex = np.zeros(n, dtype=bool)  # a KEXINIT among its packets so far
    scored: list[tuple[np.ndarray, int]] = []  # (candidates, packets they passed)
    lane = np.arange(16, dtype=np.int64)
    with np.errstate(over="ignore"):
        for passed in range(depth):
            head = at + (4 if etm else 0)
            more = head + 16 <= len(stream)
            if passed:
                scored.append((cand[~more], passed))
            cand, off, at, head, kex = cand[more], off[more], at[more], head[more], kex[more]
            if not len(cand):
                break
            keystream = Cipher(algorithms.AES(key), modes.ECB()).encryptor().update(_add(first, cand, off))
            plain = np.frombuffer(keystream, dtype=np.uint8).reshape(-1, 16) ^ data[head[:, None] + lane]
            if etm:
                length = data[at[:, None] + lane[:4]].astype(np.int64) @ _BE32
                pad, kind = plain[:, 0].astype(np.int64), plain[:, 1]
                ok = (length % 16 == 0) & (length >= 16) & (length <= MAX_PACKET)
                blocks = length // 16
            else:
                length = plain[:, :4].astype(np.int64) @ _BE32
                pad, kind = plain[:, 4].astype(np.int64), plain[:, 5]
                ok = ((length + 4) % 16 == 0) & (length >= 12) & (length <= MAX_PACKET)
                blocks = (length + 4) // 16
            ok &= (pad >= 4) & (pad < length) & np.isin(kind, _KNOWN_TYPES)
            ends = at + 4 + length + mac_len
            # the last packet to check: a rekey's NEWKEYS (what follows has other keys), or one the
            # capture holds only in part
            last = ok & (((kind == NEWKEYS_TYPE) & kex) | (ends > len(stream)))
            scored.append((cand[last], passed + 1))
            scored.append((cand[~ok], passed))
            keep = ok & ~last
            kex = kex[keep] | (kind[keep] == KEXINIT_TYPE)
            cand, off, at = cand[keep], off[keep] + blocks[keep].astype(np.uint64), ends[keep]
        scored.append((cand, depth))
    best = sorted(((-score, int(k)) for ks, score in scored if score for k in ks[:CTR_KEEP]))[:CTR_KEEP]
    for _, k in best:
        yield (first - k) % (1 << 128)


__all__ = ["AES_CTR", "AES_GCM", "CHACHA", "SUPPORTED", "BadPacket", "ChachaCipher", "CtrCipher", "GcmCipher",
           "PacketCipher", "ctr_starts", "key_length"]
