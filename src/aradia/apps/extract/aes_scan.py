"""AES key schedules in a buffer, vectorised with numpy, tolerant of flipped bits (as aeskeyfind).

An expanded AES key is over-determined: most words of the schedule are the XOR of two earlier ones
(``w[j] = w[j - Nk] ^ w[j - 1]`` when ``j`` is not a multiple of ``Nk``), whatever the byte order.
So, at every byte offset (four alignments of 32-bit words) and for each key size, the scanner

1. sums the popcounts of six such linear relations (numpy over 1 MiB blocks at once) and keeps
   positions whose sum is small (runs of equal words, as in zero pages, are penalised) and whose key
   looks random (aeskeyfind's entropy test: 30-70 % of its bits set, at least ``2 * Nk`` distinct
   bytes; so a deliberately weak key such as ``00 01 02 ... 0f`` is not reported);
2. for each survivor, in both byte orders, rebuilds the key from every window of ``Nk``
   consecutive words (running the expansion backwards), expands it again and keeps the window whose
   schedule differs least from memory: a schedule with a few flipped bits still has a clean window,
   which gives the true key, and the difference is the number of flipped bits;
3. accepts it when at most ``max_errors`` bits differ, keeping the best of overlapping finds.

Random data passes step 1 with probability ~1e-16 per position and never step 3; a guest's RAM
(page tables, counters, sparse structures) leaves ~1 candidate in 2 MiB for step 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aradia.apps.extract.aes_expand import expand, g, key_from_window, schedule_words

KEY_WORDS = (4, 6, 8)
# The first six linear relations of each key size, as offsets p - i of w[p + Nk] ^ w[p + Nk - 1] ^ w[p].
_LINEAR = {4: (1, 2, 3, 5, 6, 7), 6: (1, 2, 3, 4, 5, 7), 8: (1, 2, 3, 5, 6, 7)}
MAX_SCHEDULE = 4 * schedule_words(8)  # bytes: 240
DEFAULT_MAX_ERRORS = 10  # as aeskeyfind's default threshold


@dataclass(frozen=True)
class AesKey:
    """An AES key schedule found at ``address``: key size in bits, the key, the number of bits of the
    schedule in memory that differ from the key's true schedule, and the byte order of its words
    (``bytes``: as FIPS-197 lists them; ``words``: 32-bit big-endian words in little-endian memory,
    as OpenSSL's ``AES_KEY`` holds them)."""

    address: int
    bits: int
    key: str
    bit_errors: int
    order: str

    @property
    def end(self) -> int:
        """First address after the schedule."""
        return self.address + 4 * schedule_words(self.bits // 32)


RESIDUAL_PER_ERROR = 10  # a flipped bit disturbs at most 1 + 1 + 8 bits of the relations


def _residual(words: list[int], nk: int) -> int:
    """Bits by which ``words`` break the expansion's relations (0 for a clean schedule)."""
    return sum((words[j] ^ words[j - nk] ^ g(words[j - 1], j, nk)).bit_count() for j in range(nk, len(words)))


def _best_window(words: list[int], nk: int) -> tuple[int, bytes]:
    """(bit errors, key) of the key rebuilt from the window that explains ``words`` best."""
    best = (1 << 30, b"")
    for start in range(0, len(words) - nk + 1):
        key = key_from_window(words, start, nk)
        errors = sum((a ^ b).bit_count() for a, b in zip(expand(key), words, strict=True))
        if errors < best[0]:
            best = (errors, key)
            if errors == 0:
                break
    return best


def _candidates(w: np.ndarray, d: np.ndarray, nk: int, n: int, pre_threshold: int) -> np.ndarray:
    """Word indices below ``n`` where a schedule of ``nk`` key words may start (``w`` and ``d`` reach
    at least ``n + nk + 8`` words)."""
    m = n + 8
    # e[p] = popcount(w[p + nk] ^ w[p + nk - 1] ^ w[p]): zero where a linear relation holds; plus a
    # penalty where w[p] == w[p + 1] (zero pages and other runs of equal words satisfy every relation)
    e = np.bitwise_count(d[nk - 1:nk - 1 + m] ^ w[:m])
    e += (d[:m] == 0).view(np.uint8) << 5
    s = e[_LINEAR[nk][0]:_LINEAR[nk][0] + n].astype(np.uint16)  # six of up to 64: past a byte
    for off in _LINEAR[nk][1:]:
        s += e[off:off + n]
    cand = np.flatnonzero(s <= pre_threshold)
    if len(cand):
        # the key looks random (aeskeyfind's entropy test, in two parts): 30-70 % of its bits set,
        # and at least 2 * nk distinct bytes among its 4 * nk (counters, flags and sparse words are
        # structures, not keys; a random key fails either part with p < 1e-5)
        key = w[cand[:, None] + np.arange(nk)]
        bits = np.bitwise_count(key).sum(axis=1, dtype=np.int32)
        kb = np.sort(key.view(np.uint8), axis=1)
        distinct = 1 + (kb[:, 1:] != kb[:, :-1]).sum(axis=1)
        cand = cand[(bits >= 10 * nk) & (bits <= 22 * nk) & (distinct >= 2 * nk)]
    return cand


BLOCK = 1 << 20  # bytes scanned at once (numpy's temporaries stay in the CPU cache)
OVERLAP = MAX_SCHEDULE + 64


def scan(buf: bytes | bytearray | memoryview, base: int = 0, *,
         max_errors: int = DEFAULT_MAX_ERRORS) -> list[AesKey]:
    """The AES-128/192/256 key schedules in ``buf`` (whose first byte is at address ``base``), at
    any byte offset, with at most ``max_errors`` flipped bits each; by address."""
    data = np.frombuffer(buf, dtype=np.uint8)
    pre = min(3 * max_errors, 40)
    found: list[AesKey] = []
    for start in range(0, max(len(data) - OVERLAP, 1), BLOCK):
        block = data[start:start + BLOCK + OVERLAP]
        last = start + BLOCK + OVERLAP >= len(data)
        real = len(block)
        if last:  # zeros after the end: they satisfy no relation (equal words are penalised)
            block = np.concatenate([block, np.zeros(OVERLAP, dtype=np.uint8)])
        for align in range(4):
            nwords = (len(block) - align) // 4
            w = block[align:align + 4 * nwords].copy().view("<u4")  # a copy is aligned: faster
            d = w[1:] ^ w[:-1]
            for nk in KEY_WORDS:
                total = schedule_words(nk)
                # positions whose schedule fits in the buffer; in a block that is not the last, only
                # those before the next block's start (the overlap is the next block's to scan)
                n = (real - align) // 4 - total + 1
                if not last:
                    n = min(n, -(-(BLOCK - align) // 4))
                if n <= 0:
                    continue
                for i in _candidates(w, d, nk, n, pre).tolist():
                    address = base + start + align + 4 * i
                    if any(k.address <= address < k.end for k in found[-8:]):
                        continue  # a later round of a schedule already found (its relations hold too)
                    found += _verify(w[i:i + total].tolist(), nk, address, max_errors)
    return _best_of_overlaps(found)


def _verify(words: list[int], nk: int, address: int, max_errors: int) -> list[AesKey]:
    """The schedule at ``address``, in whichever byte order explains it, if it has few enough errors."""
    out = []
    swapped = [int.from_bytes(x.to_bytes(4, "little"), "big") for x in words]
    for order, ws in (("bytes", words), ("words", swapped)):
        if _residual(ws, nk) > RESIDUAL_PER_ERROR * max(max_errors, 1):
            continue
        errors, key = _best_window(ws, nk)
        if errors <= max_errors:
            out.append(AesKey(address, 32 * nk, key.hex(), errors, order))
    return out


def _best_of_overlaps(found: list[AesKey]) -> list[AesKey]:
    """Drop finds that overlap a better one (fewer bit errors, then the larger key)."""
    kept: list[AesKey] = []
    for k in sorted(found, key=lambda k: (k.bit_errors, -k.bits, k.address)):
        if all(k.end <= o.address or o.end <= k.address for o in kept):
            kept.append(k)
    return sorted(kept, key=lambda k: k.address)


__all__ = ["DEFAULT_MAX_ERRORS", "MAX_SCHEDULE", "AesKey", "scan"]
