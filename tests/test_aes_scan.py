"""The AES schedule scanner on host buffers: known answers (FIPS-197), planted schedules with flipped
bits at every alignment and in both word orders, and no false positives over 256 MiB of random data.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from aradia.apps.extract.aes_expand import expand, key_from_window, schedule_bytes
from aradia.apps.extract.aes_scan import scan

pytestmark = pytest.mark.timeout(300)


def flip(data: bytes, bits: list[int]) -> bytes:
    out = bytearray(data)
    for b in bits:
        out[b // 8] ^= 1 << (b % 8)
    return bytes(out)


def test_expansion_known_answer() -> None:
    # FIPS-197 appendix A.1: the last round key of 2b7e1516...
    w = expand(bytes.fromhex("2b7e151628aed2a6abf7158809cf4f3c"))
    assert schedule_bytes(w)[-16:].hex() == "d014f9a8c9ee2589e13f0cc8b6630ca6"
    # A.2 (AES-192): the last word
    w = expand(bytes.fromhex("8e73b0f7da0e6452c810f32b809079e562f8ead2522c6b7b"))
    assert schedule_bytes(w)[-4:].hex() == "01002202"
    # A.3 (AES-256): the last word
    w = expand(bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4"))
    assert schedule_bytes(w)[-4:].hex() == "706c631e"
    for n in (16, 24, 32):
        key = random.Random(n).randbytes(n)
        w = expand(key)
        assert all(key_from_window(w, s, n // 4) == key for s in range(len(w) - n // 4 + 1))


@pytest.mark.parametrize("align", [0, 1, 2, 3])
def test_planted_schedules_with_flips_found(align: int) -> None:
    rng = random.Random(align)
    buf = bytearray(rng.randbytes(3 << 20))
    buf[2 << 20:(2 << 20) + (256 << 10)] = bytes(256 << 10)  # a zero region: no candidates
    planted = {}
    for i, n in enumerate((16, 24, 32, 16)):
        key = rng.randbytes(n)
        sched = schedule_bytes(expand(key))
        order = "bytes"
        if i == 3:  # OpenSSL's AES_KEY: big-endian words stored little-endian
            sched = b"".join(sched[k:k + 4][::-1] for k in range(0, len(sched), 4))
            order = "words"
        sched = flip(sched, rng.sample(range(len(sched) * 8), 5))
        at = 100_000 + i * 700_000 + align
        buf[at:at + len(sched)] = sched
        planted[at] = (n * 8, key.hex(), order)
    found = scan(buf, 0x1000)
    assert {k.address - 0x1000: (k.bits, k.key, k.order) for k in found} == planted
    assert [k.bit_errors for k in found] == [5, 5, 5, 5]
    # with no tolerance, flipped schedules are not keys
    assert scan(buf, 0, max_errors=4) == []


def test_schedule_across_block_boundary_and_at_end() -> None:
    rng = random.Random(7)
    key = rng.randbytes(32)
    sched = schedule_bytes(expand(key))
    buf = bytearray(rng.randbytes((1 << 20) + 4096))
    at = (1 << 20) - 100  # straddles the scanner's 1 MiB blocks
    buf[at:at + len(sched)] = sched
    buf[-len(sched):] = schedule_bytes(expand(key[:16]) + [0] * 16)[:len(sched)]
    found = scan(buf)
    assert [(k.address, k.bits, k.key) for k in found] == [(at, 256, key.hex()),
                                                           (len(buf) - len(sched), 128, key[:16].hex())]


def test_short_and_empty_buffers() -> None:
    assert scan(b"") == []
    assert scan(bytes(100)) == []
    key = random.Random(3).randbytes(16)
    assert [k.key for k in scan(schedule_bytes(expand(key)))] == [key.hex()]


def test_low_entropy_keys_are_not_reported() -> None:
    """As aeskeyfind's entropy test: a key with under 30 % (or over 70 %) of its bits set, or with
    few distinct bytes, is taken for a structure (counters, flags) and not reported; its schedule is
    still a valid schedule, which the random key beside it shows is found."""
    good = random.Random(4).randbytes(16)
    for weak in (bytes(range(16)), bytes(16), b"\xff" * 16, b"\x11\x22" * 8):
        buf = schedule_bytes(expand(weak)) + bytes(64) + schedule_bytes(expand(good))
        assert [k.key for k in scan(buf)] == [good.hex()]


def test_no_false_positives_over_256_mib_of_random_data() -> None:
    data = np.random.default_rng(14).bytes(256 << 20)
    assert scan(data) == []
