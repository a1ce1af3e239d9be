"""SSH session keys in the memory of a guest's SSH daemon, found without debug symbols.

Three shapes, each checked by something the data must satisfy, not by offsets of one build:

- **OpenSSH's ``struct sshenc``** (one per direction, kept for the session's life: OpenSSH leaves
  ``enc->key`` and ``enc->iv`` in place after ``cipher_init``): the three ``u_int`` fields
  ``key_len, iv_len, block_size`` of a cipher it supports, preceded by a pointer to the cipher's name
  (a string that must read back as that cipher) and followed by pointers to the key and the IV. This
  gives the key of each direction, for every cipher, and an IV: the epoch's first in the process
  that made the keys, but in the session process that took them over after authentication the
  counter as it stood when they were handed over (``newkeys_to_blob`` saves the cipher's current IV),
  so it too is a ``counter``.
- **A CTR state beside its key schedule** (libtomcrypt's ``symmetric_CTR`` in dropbear, OpenSSL's
  CTR context): a 16-byte counter block whose encryption under an AES key found nearby (by the
  schedule scanner of :mod:`aradia.apps.extract.aes_scan`) also lies nearby, as the pad the cipher
  XORs with next. This gives the key and the *current* counter; ``aradia decrypt ssh`` walks it back
  to the start of the stream by decrypting the captured traffic.
- **ChaCha20 states** (libtomcrypt's ``chacha_state`` in dropbear): the 16 bytes ``expand 32-byte k``
  followed by the 32-byte key; dropbear's chacha20-poly1305 holds the packet key's state and the length
  key's state one after the other, so neighbouring states make a 64-byte key.

A candidate is only a candidate: ``aradia decrypt ssh`` keeps the one that decrypts the captured
packets (tags verify for GCM and chacha20-poly1305).
"""

from __future__ import annotations

import itertools
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

import drgn
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from aradia.apps.extract.aes_keys import process_runs
from aradia.apps.extract.aes_scan import scan
from aradia.apps.ssh.ciphers import AES_CTR, AES_GCM, CHACHA
from aradia.errors import AradiaError
from aradia.linux.kernel import LinuxVM
from aradia.linux.maps import read_user
from aradia.linux.processes import processes

DAEMONS = ("sshd", "sshd-session", "sshd-auth", "dropbear")
CHACHA_CONSTANT = b"expand 32-byte k"
NEIGHBOURHOOD = 1024  # bytes either side of a key schedule searched for its CTR state
USER_TOP = 1 << 47


@dataclass(frozen=True)
class SshKey:
    """One key candidate: the process it lives in, how it was found (``sshenc``, ``ctr-state``,
    ``chacha-state``), the cipher, key and IV in hex, and what the IV is: ``initial`` (the start of
    the key epoch), ``counter`` (a CTR counter as it stands now) or ``none`` (chacha20-poly1305)."""

    pid: int
    comm: str
    source: str
    cipher: str
    key: str
    iv: str
    iv_is: str
    address: int


@dataclass
class KeyScan:
    """The candidates found, the processes searched and the bytes read."""

    keys: list[SshKey]
    pids: list[int]
    scanned: int
    seconds: float


# (key_len, iv_len, block_size) of each cipher OpenSSH's sshenc may describe.
_SHAPES = {**{n: (k, 16, 16) for n, k in AES_CTR.items()}, **{n: (k, 12, 16) for n, k in AES_GCM.items()},
           CHACHA: (64, 0, 8)}


def _pointer(value: int) -> bool:
    return 0x1000 <= value < USER_TOP


def _sshenc(prog: drgn.Program, pid: int, comm: str, base: int, data: bytes) -> Iterator[SshKey]:
    for cipher, (key_len, iv_len, block) in _SHAPES.items():
        pattern = struct.pack("<III", key_len, iv_len, block)
        at = data.find(pattern, 20)
        while at >= 0:
            if (base + at - 20) % 8 == 0 and at + 28 <= len(data):
                name_ptr = struct.unpack_from("<Q", data, at - 20)[0]
                key_ptr, iv_ptr = struct.unpack_from("<QQ", data, at + 12)
                if _pointer(name_ptr) and _pointer(key_ptr) and (iv_len == 0 or _pointer(iv_ptr)):
                    try:
                        name = read_user(prog, pid, name_ptr, len(cipher) + 1)
                        if name == cipher.encode() + b"\0":
                            key = read_user(prog, pid, key_ptr, key_len)
                            iv = read_user(prog, pid, iv_ptr, iv_len) if iv_len else b""
                            yield SshKey(pid, comm, "sshenc", cipher, key.hex(), iv.hex(),
                                         "counter" if iv_len else "none", base + at - 20)
                    except AradiaError:
                        pass  # pointers into unmapped memory: not an sshenc
            at = data.find(pattern, at + 1)


def _chacha_states(pid: int, comm: str, base: int, data: bytes) -> Iterator[SshKey]:
    states = []
    at = data.find(CHACHA_CONSTANT)
    while at >= 0:
        if at + 48 <= len(data) and (base + at) % 4 == 0:
            states.append((at, bytes(data[at + 16:at + 48])))
        at = data.find(CHACHA_CONSTANT, at + 1)
    for (a, main), (b, header) in itertools.pairwise(states):
        if b - a <= 256:  # one dropbear_chachapoly_state: the packet key's state, then the length key's
            yield SshKey(pid, comm, "chacha-state", CHACHA, (main + header).hex(), "", "none", base + a)


def _ctr_states(pid: int, comm: str, base: int, data: bytes) -> Iterator[SshKey]:
    for found in scan(data, base):
        key = bytes.fromhex(found.key)
        lo = max(0, (found.address - base - NEIGHBOURHOOD) & ~3)
        hi = min(len(data) - 16, found.address - base + 240 + NEIGHBOURHOOD)
        offsets = range(lo, hi, 4)
        if not offsets:
            continue
        blocks = b"".join(data[o:o + 16] for o in offsets)
        encrypted = Cipher(algorithms.AES(key), modes.ECB()).encryptor().update(blocks)
        nearby = set(blocks[16 * i:16 * i + 16] for i in range(len(offsets)))
        for i, o in enumerate(offsets):
            pad = encrypted[16 * i:16 * i + 16]
            counter = blocks[16 * i:16 * i + 16]
            if pad in nearby and any(counter) and pad != counter:
                yield SshKey(pid, comm, "ctr-state", f"aes{found.bits}-ctr", found.key, counter.hex(),
                             "counter", base + o)


def daemon_pids(vm: LinuxVM) -> list[tuple[int, str]]:
    """(pid, comm) of every SSH daemon process of the guest (OpenSSH's and dropbear's)."""
    return [(p.pid, p.comm) for p in processes(vm.load_kernel().prog) if p.comm in DAEMONS]


def find_keys(vm: LinuxVM, pids: list[tuple[int, str]] | None = None) -> KeyScan:
    """SSH key candidates in the memory of ``pids`` (default: every SSH daemon process)."""
    prog = vm.load_kernel().prog
    targets = daemon_pids(vm) if pids is None else pids
    started = time.perf_counter()
    found: dict[tuple[str, str, str], SshKey] = {}
    scanned = 0
    for pid, comm in targets:
        for base, data in process_runs(vm, prog, pid):
            scanned += len(data)
            for k in (*_sshenc(prog, pid, comm, base, data), *_chacha_states(pid, comm, base, data),
                      *_ctr_states(pid, comm, base, data)):
                found.setdefault((k.cipher, k.key, k.iv), k)  # a run's overlap may find one twice
    order = {"sshenc": 0, "chacha-state": 1, "ctr-state": 2}
    keys = sorted(found.values(), key=lambda k: (k.pid, order[k.source], k.address))
    return KeyScan(keys, [p for p, _ in targets], scanned, time.perf_counter() - started)


__all__ = ["DAEMONS", "KeyScan", "SshKey", "daemon_pids", "find_keys"]
