"""The honeypot's pieces that need no guest: session attribution, the asciicast writer, the report,
the daemons' public-key log lines, and the command line's errors (one line, exit status 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aradia.apps.honeypot.cast import Cast, read_cast
from aradia.apps.honeypot.pubkey import pubkey_attempt
from aradia.apps.honeypot.report import auth_text, report
from aradia.apps.honeypot.sessions import SessionTable
from aradia.errors import AradiaError
from aradia.trace.hooks import return_now
from cli_runner import run_cli

FP = "SHA256:" + "Ab+/" * 10 + "xyz"


@pytest.mark.timeout(30)
def test_public_key_log_lines() -> None:
    """The lines as the daemons' own format strings make them (``strings`` of Debian 12's dropbear and
    sshd), and lines that only look alike."""
    dropbear_ok = f"Pubkey auth succeeded for 'root' with ssh-ed25519 key {FP} from 10.0.2.2:40000"
    assert pubkey_attempt("%s", dropbear_ok) == {"user": "root", "key_type": "ssh-ed25519", "fingerprint": FP,
                                                 "accepted": True}
    bad = pubkey_attempt("%s", f"Pubkey auth bad signature for 'ad min' with key {FP} from 10.0.2.2:40000")
    assert bad == {"user": "ad min", "key_type": None, "fingerprint": FP, "accepted": False}
    sshd_ok = f"Accepted publickey for root from 10.0.2.2 port 40000 ssh2: ECDSA {FP}"
    assert pubkey_attempt("%.500s", sshd_ok) == {"user": "root", "key_type": "ECDSA", "fingerprint": FP,
                                                 "accepted": True}
    failed = pubkey_attempt("%.500s", f"Failed publickey for invalid user eve from 10.0.2.2 port 1 ssh2: "
                                      f"RSA {FP}")
    assert failed == {"user": "eve", "key_type": "RSA", "fingerprint": FP, "accepted": False}
    assert auth_text({"method": "publickey", **failed}) == f"RSA key {FP} for eve: rejected"
    for fmt, line in (("%d", dropbear_ok), ("%s", "Accepted password for root from 10.0.2.2 port 1 ssh2"),
                      ("%s", "user typed: " + dropbear_ok), ("%s", sshd_ok + " trailing"), ("%s", None),
                      ("%.500s", "Pubkey auth succeeded for 'root' with ssh-ed25519 key SHA256 from x")):
        assert pubkey_attempt(fmt, line) is None, (fmt, line)


@pytest.mark.timeout(30)
def test_sessions_follow_forks_and_terminals() -> None:
    t = SessionTable()
    a = t.open(100, "dropbear", 1000.0, 5.0, {"client": "10.0.2.2", "client_port": 4000, "server": "10.0.2.15",
                                              "server_port": 22})
    b = t.open(200, "dropbear", 1001.0, 6.0, None)
    assert t.join(101, 100) is a and t.join(102, 101) is a and t.join(201, 200) is b
    assert t.join(300, 1) is None and t.of(300) is None  # a fork outside any session
    assert t.pts(0, 102) is a and t.pts(1, 201) is b
    assert t.pts(0, 9999) is a and t.pts(1, 0) is b  # a kernel worker's echo: the terminal's session
    assert t.pts(2, 9999) is None
    assert t.leave(102) is a and t.of(102) is None and t.pts(0, 0) is a  # not the root: terminal kept
    assert t.leave(100) is a and t.pts(0, 0) is None and t.pts(1, 0) is b  # the root: its terminal freed
    assert [s.sid for s in t.open_sessions()] == ["s1-100", "s2-200"]  # ended only when the monitor says
    assert (a.client, a.client_port, a.server_port, b.client) == ("10.0.2.2", 4000, 22, None)


@pytest.mark.timeout(30)
def test_cast_keeps_split_characters_whole(tmp_path: Path) -> None:
    c = Cast(tmp_path / "s.cast", 1000.0, 10.0, "t")
    text = "héllo ✓\r\n"
    raw = text.encode()
    for i, byte in enumerate(raw):  # one byte per write: every multi-byte character split
        c.add(10.0 + i / 100, "o", bytes([byte]), 100, 30)
    c.add(11.0, "i", b"ls\n", 100, 30)
    header, events = read_cast(tmp_path / "s.cast")
    assert header == {"version": 2, "width": 100, "height": 30, "timestamp": 1000, "title": "t"}
    assert "".join(e[2] for e in events if e[1] == "o") == text
    assert [e for e in events if e[1] == "i"] == [(1.0, "i", "ls\n")]
    times = [e[0] for e in events]
    assert times == sorted(times) and times[0] == 0.0
    # a lone invalid byte is replaced, not an error
    c.add(12.0, "o", b"\xff", 100, 30)
    assert read_cast(tmp_path / "s.cast")[1][-1] == (2.0, "o", "\ufffd")


@pytest.mark.timeout(30)
def test_return_now_sets_a_value_or_an_errno() -> None:
    regs = {"rsp": 0x1000}
    assert return_now(regs, 0x4242, None, 0x7FFF0000) == {"rax": 0x7FFF0000, "rip": 0x4242, "rsp": 0x1008}
    assert return_now(regs, 0x4242, 1)["rax"] == (1 << 64) - 1
    with pytest.raises(ValueError):
        return_now(regs, 0x4242, 5000)


def _summary(**kw: object) -> dict[str, object]:
    s: dict[str, object] = {"session": "s1-7", "daemon": "sshd", "daemon_pid": 7, "client": "10.0.2.2",
                            "client_port": 5555, "server": "10.0.2.15", "server_port": 22, "start": 0.0,
                            "end": 2.5, "user": "root", "auth": [], "commands": [], "lines": [], "files": [],
                            "net": [], "ttys": [], "cast": None}
    s.update(kw)
    return s


@pytest.mark.timeout(30)
def test_report_of_a_directory(tmp_path: Path) -> None:
    (tmp_path / "sessions").mkdir()
    (tmp_path / "sessions" / "s1-7.json").write_text(json.dumps(_summary(
        auth=[{"user": "root", "password": "x'y", "accepted": False, "forced": False},
              {"user": "root", "password": "pw", "accepted": True, "forced": True}],
        commands=[{"argv": ["ls", "a b"], "cwd": "/tmp"}], lines=[{"line": "ls 'a b'"}],
        files=[{"op": "rename", "path": "/b", "from": "/a", "size": None, "sha256": None}],
        net=[{"syscall": "connect", "addr": {"family": "inet", "address": "1.2.3.4", "port": 80}}],
        cast="sessions/s1-7.cast")))
    text = report(tmp_path)
    assert text.splitlines() == [
        "session s1-7: root from 10.0.2.2:5555 to port 22 (sshd pid 7), 1970-01-01T00:00:00Z, 2.5 s",
        "  password \"x'y\" for root: rejected",
        "  password 'pw' for root: accepted (forced)",
        "  exec [/tmp] ls 'a b'",
        "  typed: ls 'a b'",
        "  file rename /b (from /a): None bytes, sha256 None",
        "  connect 1.2.3.4:80",
        "  terminal: sessions/s1-7.cast"]
    empty = tmp_path / "empty"
    (empty / "sessions").mkdir(parents=True)
    assert report(empty) == "no sessions recorded"
    with pytest.raises(AradiaError, match="no sessions/ directory"):
        report(tmp_path / "nothing")
    (tmp_path / "sessions" / "s2-8.json").write_text("{not json")
    with pytest.raises(AradiaError, match="not a session summary"):
        report(tmp_path)
    (tmp_path / "sessions" / "s2-8.json").write_text(json.dumps({"session": "s2-8"}))
    with pytest.raises(AradiaError, match="lacks"):
        report(tmp_path)


@pytest.mark.timeout(60)
def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    for argv, needle in ((["honeypot", "report", str(tmp_path / "nope")], "holds no honeypot output"),
                         (["honeypot", "report"], "usage: aradia honeypot"),
                         (["honeypot", "bogus", "x"], "usage: aradia honeypot"),
                         (["honeypot"], "--vm SPEC is required"),
                         (["honeypot", "--vm", str(tmp_path / "missing.elf")], "missing.elf"),
                         (["honeypot", "--vm", "web1", "--server", "https://127.0.0.1:9"], "start it as an app")):
        r = run_cli(*argv, timeout=60)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (argv, r.stderr)
        assert needle in r.stderr.strip().splitlines()[-1], (argv, r.stderr)
    (tmp_path / "sessions").mkdir()
    r = run_cli("honeypot", "report", str(tmp_path), timeout=60)
    assert (r.returncode, r.stdout) == (0, "no sessions recorded\n"), r
