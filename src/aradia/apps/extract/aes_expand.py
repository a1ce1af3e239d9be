"""AES key expansion (FIPS-197 section 5.2) and its inverse, on 32-bit words in byte order.

A word holds 4 schedule bytes ``b0 b1 b2 b3`` as the little-endian integer ``b0 | b1<<8 | ...``
(how they lie in memory read as ``<u4``). Used to verify and repair schedules the scanner found.
"""

from __future__ import annotations


def _sbox() -> list[int]:
    """The AES S-box, computed (multiplicative inverse in GF(2^8), then the affine map)."""
    box = [0] * 256
    p = q = 1
    while True:
        p = (p ^ (p << 1) ^ (0x1B if p & 0x80 else 0)) & 0xFF  # p * 3
        for shift in (1, 2, 4):  # q / 3
            q ^= q << shift
        q &= 0xFF
        if q & 0x80:
            q ^= 0x09
        x = q ^ _rotl8(q, 1) ^ _rotl8(q, 2) ^ _rotl8(q, 3) ^ _rotl8(q, 4)
        box[p] = x ^ 0x63
        if p == 1:
            break
    box[0] = 0x63
    return box


def _rotl8(x: int, n: int) -> int:
    return ((x << n) | (x >> (8 - n))) & 0xFF


SBOX = _sbox()
RCON = [0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0x1B, 0x36, 0x6C, 0xD8, 0xAB, 0x4D]
ROUNDS = {4: 10, 6: 12, 8: 14}
"""Key words (Nk) -> rounds (Nr); a schedule has 4 * (Nr + 1) words."""


def schedule_words(nk: int) -> int:
    """Words in the schedule of a key of ``nk`` words."""
    return 4 * (ROUNDS[nk] + 1)


def sub_word(w: int) -> int:
    """SubWord: the S-box on each byte."""
    return SBOX[w & 0xFF] | SBOX[w >> 8 & 0xFF] << 8 | SBOX[w >> 16 & 0xFF] << 16 | SBOX[w >> 24] << 24


def rot_word(w: int) -> int:
    """RotWord: bytes ``b0 b1 b2 b3`` -> ``b1 b2 b3 b0``."""
    return (w >> 8) | (w & 0xFF) << 24


def g(prev: int, j: int, nk: int) -> int:
    """What word ``j - 1`` contributes to word ``j`` (``w[j] = w[j - nk] ^ g(w[j - 1], j)``)."""
    if j % nk == 0:
        return sub_word(rot_word(prev)) ^ RCON[j // nk - 1]
    if nk == 8 and j % nk == 4:
        return sub_word(prev)
    return prev


def expand(key: bytes) -> list[int]:
    """The schedule of ``key`` (16, 24 or 32 bytes) as words."""
    nk = len(key) // 4
    if nk not in ROUNDS or len(key) % 4:
        raise ValueError(f"an AES key is 16, 24 or 32 bytes, not {len(key)}")
    w = [int.from_bytes(key[4 * i:4 * i + 4], "little") for i in range(nk)]
    for j in range(nk, schedule_words(nk)):
        w.append(w[j - nk] ^ g(w[j - 1], j, nk))
    return w


def key_from_window(words: list[int], start: int, nk: int) -> bytes:
    """The key whose schedule has ``words[start:start + nk]`` at positions ``start..``: the expansion
    run backwards (``w[j - nk] = w[j] ^ g(w[j - 1], j)``)."""
    w: dict[int, int] = {start + k: words[start + k] for k in range(nk)}
    for j in range(start + nk - 1, nk - 1, -1):
        w[j - nk] = w[j] ^ g(w[j - 1], j, nk)
    return b"".join(w[i].to_bytes(4, "little") for i in range(nk))


def schedule_bytes(words: list[int]) -> bytes:
    """A schedule as it lies in memory."""
    return b"".join(x.to_bytes(4, "little") for x in words)


__all__ = ["RCON", "ROUNDS", "SBOX", "expand", "g", "key_from_window", "rot_word", "schedule_bytes",
           "schedule_words", "sub_word"]
