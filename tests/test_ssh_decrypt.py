"""``aradia keys ssh`` and ``aradia decrypt ssh`` against real daemons (dropbear, OpenSSH) in a guest:
the host's OpenSSH client, forced to one cipher, runs commands and an interactive shell over one
connection while QEMU captures the guest's network (``aradia capture``); the keys are taken from the
daemon's memory while the connection is up; the decryption must give back every command and every
byte the client received, compared with the client's own record."""

from __future__ import annotations

import base64
import json
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aradia.lab import GuestError
from aradia.lab.images import build_guest
from aradia.lab.launcher import Guest, launch
from cli_runner import run_cli
from ssh_scene import ClientRecord, Connection

pytestmark = pytest.mark.timeout(600)

CIPHERS = {"dropbear": ["aes128-ctr", "aes256-ctr", "chacha20-poly1305@openssh.com"],
           "openssh": ["aes128-ctr", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com"]}
COMMANDS = ["echo hello from $(hostname)", "uname -s; id -u", "printf 'a\\tb\\x01\\n'; seq 1 300"]
#: typed lines and what the terminal shows once each has run (computed, so the echo of the typing
#: itself does not match)
LINES = [("cd /tmp; echo in-$((6*7))", "in-42"), ("echo secret-$((40+2)) > f.txt; cat f.txt", "secret-42"),
         ("uname -r; echo done-$((1+1))", "done-2")]


@pytest.fixture(scope="module", params=list(CIPHERS))
def guest(request: pytest.FixtureRequest) -> Iterator[Guest]:
    """The module's guest, once per ssh daemon."""
    try:
        image = build_guest("6.1", variant=request.param)
    except GuestError as exc:
        pytest.fail(f"building the 6.1 {request.param} guest failed: {exc}", pytrace=False)
    g = launch(image, shared_memory=True)
    try:
        yield g
    finally:
        g.stop()


def _vm(guest: Guest) -> str:
    return f"qmp:{guest.qmp_path}"


def scene(guest: Guest, cipher: str, tmp: Path) -> tuple[ClientRecord, Path, Path]:
    """Capture, one connection with ``cipher`` (commands, then a shell), keys taken while the shell is
    open; returns the client's record, the capture and the keys file."""
    cap, keys = tmp / "cap.pcap", tmp / "keys.json"
    r = run_cli("capture", "start", "--vm", _vm(guest), "-o", str(cap))
    assert r.returncode == 0 and "capturing netdev n0" in r.stdout, r.stderr
    conn = Connection(guest, cipher, tmp)
    try:
        for cmd in COMMANDS:
            conn.run(cmd)
        with conn.shell() as sh:
            for line, expect in LINES:
                sh.type_line(line, expect)
            r = run_cli("keys", "ssh", "--vm", _vm(guest), "--json", "-o", str(keys))
            assert r.returncode == 0, r.stderr
    finally:
        conn.close()
        r = run_cli("capture", "stop", "--vm", _vm(guest))
        assert r.returncode == 0 and "ended aradia-cap-0" in r.stdout, (r.stdout, r.stderr)
    return conn.record, cap, keys


def _inside_a_record(pcap: bytes, near: int) -> int:
    """A cut in the middle of the data of the pcap record at or after offset ``near`` (a cut on a
    record boundary leaves a well-formed, shorter capture: nothing to detect)."""
    pos = 24
    while pos < len(pcap):
        incl = struct.unpack_from("<I", pcap, pos + 8)[0]
        if pos >= near and incl > 1:
            return pos + 16 + incl // 2
        pos += 16 + incl
    raise AssertionError("no record to cut after the middle of the capture")


def decrypted(cap: Path, keys: Path) -> tuple[int, dict[str, Any]]:
    """``aradia decrypt ssh --json``: exit status and document."""
    r = run_cli("decrypt", "ssh", str(cap), "--keys", str(keys), "--json")
    assert "Traceback" not in r.stderr, r.stderr
    return r.returncode, json.loads(r.stdout)


def test_decrypt_recovers_every_command_and_byte(guest: Guest, tmp_path: Path) -> None:
    """For each cipher the daemon offers: the exec commands and their output, the typed shell input
    and what the terminal showed, byte for byte as the client recorded them."""
    for cipher in CIPHERS[guest.image.ssh_daemon]:
        work = tmp_path / cipher.split("@")[0]
        work.mkdir()
        record, cap, keys = scene(guest, cipher, work)
        code, doc = decrypted(cap, keys)
        assert code == 0 and len(doc["connections"]) == 1, (cipher, doc)
        c = doc["connections"][0]
        assert c["complete"] and c["errors"] == [], (cipher, c["errors"])
        assert [e[d]["cipher"] for e in c["epochs"] for d in ("c2s", "s2c")] == [cipher, cipher]
        execs = [(q["command"], base64.b64decode(ch["received_b64"])) for ch in c["channels"]
                 for q in ch["requests"] if q["request"] == "exec"]
        assert execs == [(cmd, out) for cmd, out in record.execs], cipher
        assert len(execs) == len(COMMANDS) and all(out for _, out in execs)
        shells = [ch for ch in c["channels"] if any(q["request"] == "shell" for q in ch["requests"])]
        assert len(shells) == 1, cipher
        assert base64.b64decode(shells[0]["sent_b64"]) == record.typed
        assert base64.b64decode(shells[0]["received_b64"]) == record.shown
        assert b"secret-42" in record.shown and b"done-2" in record.shown


def test_keys_belong_to_live_connections_only(guest: Guest, tmp_path: Path) -> None:
    """Keys of a connection that has ended are gone with its process; a capture decrypted with
    another connection's keys is refused, said so, exit 1."""
    cipher = CIPHERS[guest.image.ssh_daemon][0]
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    _, cap_a, keys_a = scene(guest, cipher, first)
    _, cap_b, keys_b = scene(guest, cipher, second)
    key_a = {k["key"] for k in json.loads(keys_a.read_text())["keys"]}
    key_b = {k["key"] for k in json.loads(keys_b.read_text())["keys"]}
    assert key_a and key_b and not key_a & key_b
    r = run_cli("keys", "ssh", "--vm", _vm(guest), "--json")
    assert not {k["key"] for k in json.loads(r.stdout)["keys"]} & (key_a | key_b)
    assert r.returncode == 1 and "0 key" not in r.stdout  # --json: the document, no summary line
    code, doc = decrypted(cap_a, keys_b)
    assert code == 1 and not doc["connections"][0]["complete"]
    assert any("key candidate(s) decrypts it" in e for e in doc["connections"][0]["errors"]), doc
    for cap, keys in ((cap_a, keys_a), (cap_b, keys_b)):
        code, doc = decrypted(cap, keys)
        assert code == 0 and doc["connections"][0]["complete"]
    # A capture cut short (QEMU killed mid-write): what came before the cut still decrypts.
    cut = tmp_path / "cut.pcap"
    data = cap_b.read_bytes()
    cut.write_bytes(data[:_inside_a_record(data, len(data) * 2 // 3)])
    code, doc = decrypted(cut, keys_b)
    assert code == 1 and any(w.startswith("capture truncated") for w in doc["warnings"]), doc["warnings"]
    sent = [m["command"] for m in doc["connections"][0]["messages"] if "command" in m]
    assert sent and sent == COMMANDS[:len(sent)]


def test_dropbear_offers_no_gcm(guest: Guest) -> None:
    """Debian 12's dropbear is built without AES-GCM; OpenSSH offers it (the cipher list above)."""
    ssh = ["LogLevel=INFO" if a == "LogLevel=ERROR" else a for a in guest.ssh_argv()]  # ssh says why
    argv = [*ssh[:-1], "-c", "aes256-gcm@openssh.com", ssh[-1], "true"]
    res = subprocess.run(argv, capture_output=True, timeout=60)
    if guest.image.ssh_daemon == "dropbear":
        assert res.returncode == 255 and b"no matching cipher" in res.stderr, res.stderr
    else:
        assert res.returncode == 0, res.stderr
