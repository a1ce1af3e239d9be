"""Units of the SSH forensics: pcap reading and TCP reassembly on hand-made frames (out of order,
retransmitted, missing, truncated), hostile keys files and captures, and the ciphers on packets built
here from the specifications (RFC 4253/4344 for CTR, RFC 5647 for GCM, OpenSSH's
PROTOCOL.chacha20poly1305) with ``cryptography``'s primitives."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.poly1305 import Poly1305

from aradia.apps.ssh.ciphers import BadPacket, ChachaCipher, CtrCipher, GcmCipher, ctr_starts
from aradia.apps.ssh.decrypt import load_keys
from aradia.apps.ssh.pcap import connections, read_segments
from aradia.errors import AradiaError
from cli_runner import run_cli

pytestmark = pytest.mark.timeout(60)

CLIENT, SERVER = ("10.0.2.2", 40000), ("10.0.2.15", 22)


def frame(src: tuple[str, int], dst: tuple[str, int], seq: int, flags: int, data: bytes = b"") -> bytes:
    """An Ethernet/IPv4/TCP frame."""
    tcp = struct.pack(">HHIIBBHHH", src[1], dst[1], seq, 0, 5 << 4, flags, 65535, 0, 0) + data
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0x4000, 64, 6, 0,
                     bytes(map(int, src[0].split("."))), bytes(map(int, dst[0].split("."))))
    return b"\x52\x54\x00\x12\x34\x56" * 2 + b"\x08\x00" + ip + tcp


def pcap(frames: list[bytes]) -> bytes:
    """A classic little-endian pcap file of Ethernet ``frames``, one per millisecond."""
    out = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
    for i, f in enumerate(frames):
        out += struct.pack("<IIII", 1000, i * 1000, len(f), len(f)) + f
    return out


def test_reassembly_puts_segments_in_place_once(tmp_path: Path) -> None:
    """Out of order and retransmitted (overlapping) segments give each byte once, in order; the
    client is the side that sent the SYN."""
    frames = [frame(SERVER, CLIENT, 900, 0x12), frame(CLIENT, SERVER, 100, 0x02),
              frame(CLIENT, SERVER, 101 + 5, 0x18, b"world"), frame(CLIENT, SERVER, 101, 0x18, b"hello"),
              frame(CLIENT, SERVER, 101 + 3, 0x18, b"loworld!"), frame(SERVER, CLIENT, 901, 0x18, b"ok")]
    (tmp_path / "c.pcap").write_bytes(pcap(frames))
    warnings: list[str] = []
    [c] = connections(read_segments(tmp_path / "c.pcap", warnings), warnings)
    assert (c.client, c.server, c.saw_syn) == (CLIENT, SERVER, True)
    assert bytes(c.to_server.data) == b"helloworld!" and bytes(c.to_client.data) == b"ok"
    assert warnings == [] and c.to_server.holes == []


def test_a_missing_segment_is_a_hole_not_glued(tmp_path: Path) -> None:
    """A segment the capture missed leaves a reported hole at its offset."""
    frames = [frame(CLIENT, SERVER, 100, 0x02), frame(CLIENT, SERVER, 101, 0x18, b"abc"),
              frame(CLIENT, SERVER, 101 + 7, 0x18, b"xyz")]
    (tmp_path / "h.pcap").write_bytes(pcap(frames))
    warnings: list[str] = []
    [c] = connections(read_segments(tmp_path / "h.pcap", warnings), warnings)
    assert c.to_server.holes == [(3, 4)] and bytes(c.to_server.data) == b"abc\0\0\0\0xyz"
    assert warnings == ["10.0.2.2:40000 -> 10.0.2.15:22: 4 byte(s) missing at stream offset 3 (not captured)"]


def test_truncated_capture_keeps_what_came_before(tmp_path: Path) -> None:
    """A capture cut inside its last record: the records before it are read, and a warning says so."""
    whole = pcap([frame(CLIENT, SERVER, 100, 0x02), frame(CLIENT, SERVER, 101, 0x18, b"first"),
                  frame(CLIENT, SERVER, 106, 0x18, b"second")])
    (tmp_path / "t.pcap").write_bytes(whole[:-3])
    warnings: list[str] = []
    [c] = connections(read_segments(tmp_path / "t.pcap", warnings), warnings)
    assert bytes(c.to_server.data) == b"first"
    assert len(warnings) == 1 and warnings[0].startswith("capture truncated: the last record is cut short")


def test_not_a_capture_is_a_clear_error(tmp_path: Path) -> None:
    """Garbage, a pcapng file and a missing file are refused with a message (exit 2 in the CLI, as every error)."""
    (tmp_path / "g").write_bytes(b"\x0a\x0d\x0d\x0a" + bytes(40))
    with pytest.raises(AradiaError, match="not a pcap capture"):
        read_segments(tmp_path / "g", [])
    (tmp_path / "keys.json").write_text(json.dumps({"keys": []}))
    r = run_cli("decrypt", "ssh", str(tmp_path / "missing.pcap"), "--keys", str(tmp_path / "keys.json"))
    assert r.returncode == 2 and "cannot read the capture" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "ok.pcap").write_bytes(pcap([]))
    r = run_cli("decrypt", "ssh", str(tmp_path / "ok.pcap"), "--keys", str(tmp_path / "keys.json"))
    assert r.returncode == 1 and "no SSH connection in the capture" in r.stdout, r.stdout


@pytest.mark.parametrize(("doc", "message"), [
    ("[1, 2]", 'has no "keys" list'),
    ('{"keys": [{"pid": 1}]}', "key 0 lacks fields"),
    ('{"keys": [{"pid": 1, "comm": "sshd", "source": "x", "cipher": "aes128-ctr", "key": "zz", "iv": "",'
     ' "iv_is": "none", "address": 0}]}', "must be hex strings"),
    ('{"keys": [{"pid": 1, "comm": "sshd", "source": "x", "cipher": "aes128-ctr", "key": "00", "iv": "",'
     ' "iv_is": "later", "address": 0}]}', "iv_is initial, counter or none"),
    ("{not json", "is not JSON"),
])
def test_hostile_keys_files_are_refused(tmp_path: Path, doc: str, message: str) -> None:
    """Each malformed keys file is an error naming what is wrong; a well-formed one loads."""
    (tmp_path / "k.json").write_text(doc)
    with pytest.raises(AradiaError, match=message):
        load_keys(tmp_path / "k.json")
    good = {"pid": 1, "comm": "sshd", "source": "sshenc", "cipher": "aes128-ctr", "key": "00" * 16,
            "iv": "11" * 16, "iv_is": "counter", "address": 4096}
    (tmp_path / "k.json").write_text(json.dumps({"keys": [good]}))
    assert [k.key for k in load_keys(tmp_path / "k.json")] == ["00" * 16]


KEY16, IV16 = bytes(range(16)), bytes(range(100, 116))


def ssh_packet(payload: bytes, block: int, aad: bool) -> bytes:
    """An unencrypted SSH packet with RFC 4253 padding (length excluded from the alignment when it
    is sent in clear: ``aad``)."""
    pad = block - (len(payload) + 1 + (0 if aad else 4)) % block
    pad += block if pad < 4 else 0
    return struct.pack(">IB", len(payload) + 1 + pad, pad) + payload + bytes(range(pad))


def test_ctr_counter_is_walked_back_to_the_stream_start() -> None:
    """Three CTR packets (no MAC here); a counter read after them is walked back to the IV that
    decrypts the first, and the payloads come out in order; a wrong key is refused."""
    payloads = [b"\x05" + b"\0\0\0\x0cssh-userauth", b"\x5e" + bytes(4) + b"\0\0\0\x03ls\n", b"\x60" + bytes(4)]
    plain = b"".join(ssh_packet(p, 16, False) for p in payloads)
    stream = Cipher(algorithms.AES(KEY16), modes.CTR(IV16)).encryptor().update(plain)
    now = int.from_bytes(IV16, "big") + len(plain) // 16
    starts = list(ctr_starts(KEY16, now, stream, 0, False, len(stream) // 16))
    assert int.from_bytes(IV16, "big") in starts
    c, pos, got = CtrCipher(KEY16, int.from_bytes(IV16, "big"), 0, False), 0, []
    while (r := c.packet(stream, pos, 0)) is not None:
        got.append(r[0])
        pos = r[1]
    assert got == payloads and pos == len(stream)
    with pytest.raises(BadPacket):
        CtrCipher(bytes(16), int.from_bytes(IV16, "big"), 0, False).packet(stream, 0, 0)


def test_gcm_and_chacha_packets_verify_their_tags() -> None:
    """A GCM and a chacha20-poly1305 packet decrypt with the right key and nonce; one bit flipped in
    the ciphertext, or the wrong sequence number, is refused."""
    payload = b"\x5e" + bytes(4) + b"\0\0\0\x05hello"
    pkt = ssh_packet(payload, 16, True)
    iv = bytes(range(12))
    gcm = pkt[:4] + AESGCM(KEY16).encrypt(iv, pkt[4:], pkt[:4])
    assert GcmCipher(KEY16, iv[:4], int.from_bytes(iv[4:], "big")).packet(gcm, 0, 0) == (payload, len(gcm))
    bad = gcm[:10] + bytes([gcm[10] ^ 1]) + gcm[11:]
    with pytest.raises(BadPacket, match="GCM tag"):
        GcmCipher(KEY16, iv[:4], int.from_bytes(iv[4:], "big")).packet(bad, 0, 0)

    key = bytes(range(64))
    seqnr = 7
    pkt = ssh_packet(payload, 8, True)

    def chacha(k: bytes, block: int, data: bytes) -> bytes:
        nonce = block.to_bytes(8, "little") + seqnr.to_bytes(8, "big")
        return Cipher(algorithms.ChaCha20(k, nonce), None).encryptor().update(data)

    enc = chacha(key[32:], 0, pkt[:4]) + chacha(key[:32], 1, pkt[4:])
    tag = Poly1305.generate_tag(chacha(key[:32], 0, bytes(32)), enc)
    assert ChachaCipher(key).packet(enc + tag, 0, seqnr) == (payload, len(enc) + 16)
    with pytest.raises(BadPacket):
        ChachaCipher(key).packet(enc + tag, 0, seqnr + 1)
