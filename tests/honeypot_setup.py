"""The honeypot's test scene: ``aradia honeypot`` running against a guest while a scripted attacker
(paramiko, from the host, through the guest's forwarded ssh port) logs in and acts. Ground truth is
the attacker's own record (its socket's port, the bytes its client received, the host's HTTP payload)
and what the guest itself prints inside the session (``$SSH_CLIENT``, ``$PPID``, ``sha256sum``)."""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko

from aradia.lab.launcher import Guest
from cli_runner import cli_argv, interrupt
from waiting import wait_until


@dataclass
class Monitor:
    """A running ``aradia honeypot --json``: its process, the records it printed so far, its output dir."""

    proc: subprocess.Popen[str]
    out: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    stderr: str = ""

    def named(self, name: str) -> list[dict[str, Any]]:
        """The records of one name (``session.start``, ``auth``, ``exec``...)."""
        return [r for r in self.records if r["name"] == name]

    def wait_ended(self, n: int, timeout: float = 120) -> None:
        """Wait until ``n`` sessions have ended."""
        wait_until(lambda: len(self.named("session.end")) >= n, timeout, f"{n} session.end records")

    def sessions(self) -> dict[str, dict[str, Any]]:
        """The session summaries written under ``--out``, by session id."""
        return {p.stem: json.loads(p.read_text()) for p in (self.out / "sessions").glob("*.json")}


@contextmanager
def monitoring(guest: Guest, out: Path, *extra: str) -> Iterator[Monitor]:
    """``aradia honeypot --json`` against the guest while the block runs (armed when it starts);
    ended with SIGINT afterwards, its exit status checked."""
    p = subprocess.Popen(cli_argv("honeypot", "--vm", f"qmp:{guest.qmp_path}", "--out", str(out), "--json",
                                  *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    m = Monitor(p, out)
    assert p.stderr is not None and p.stdout is not None
    line = p.stderr.readline()
    while line.startswith("aradia:") and "error" not in line:
        line = p.stderr.readline()
    assert line.startswith(f"honeypot on qmp:{guest.qmp_path}, recording into {out}"), line + p.stderr.read()

    def read() -> None:
        assert p.stdout is not None
        for text in p.stdout:
            m.records.append(json.loads(text))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield m
    finally:
        interrupt(p)
        reader.join(10)
        m.stderr = p.stderr.read()
    assert p.returncode == 0 and "Traceback" not in m.stderr, (p.returncode, m.stderr)


# --- the attacker -----------------------------------------------------------------------------------------
@dataclass
class Login:
    """One ssh connection: its socket's local port, the passwords tried and whether the last worked."""

    transport: paramiko.Transport
    port: int
    tried: list[str]
    ok: bool
    started: float  # wall clock before connecting


def login(guest: Guest, passwords: list[str], user: str = "root") -> Login:
    """Connect and try ``passwords`` in order on the one connection, until one works."""
    started = time.time()
    sock = socket.create_connection(("127.0.0.1", guest.ssh_port), timeout=120)
    t = paramiko.Transport(sock)
    t.banner_timeout = t.auth_timeout = 120
    t.start_client(timeout=120)
    ok = False
    for pw in passwords:
        try:
            t.auth_password(user, pw)
            ok = True
            break
        except paramiko.AuthenticationException:
            continue
    return Login(t, sock.getsockname()[1], passwords, ok, started)


def login_keys(guest: Guest, keys: list[paramiko.PKey], user: str = "root") -> tuple[paramiko.Transport, int, int]:
    """Connect and offer ``keys`` in order on the one connection, until one works: the transport,
    its socket's local port and how many keys were offered (the last one worked; all did not if it
    is ``len(keys) + 1``)."""
    sock = socket.create_connection(("127.0.0.1", guest.ssh_port), timeout=120)
    t = paramiko.Transport(sock)
    t.banner_timeout = t.auth_timeout = 120
    t.start_client(timeout=120)
    for n, key in enumerate(keys, 1):
        try:
            t.auth_publickey(user, key)
            return t, sock.getsockname()[1], n
        except paramiko.AuthenticationException:
            continue
    return t, sock.getsockname()[1], len(keys) + 1


def interactive(lg: Login, lines: list[str], timeout: float = 180) -> bytes:
    """Type ``lines`` (and ``exit``) into a login shell on a pty (80x24); every byte the client received."""
    ch = lg.transport.open_session()
    ch.get_pty(term="vt100", width=80, height=24)
    ch.invoke_shell()
    ch.settimeout(timeout)
    for line in [*lines, "exit"]:
        ch.sendall((line + "\n").encode())
    got = b""
    while chunk := ch.recv(65536):
        got += chunk
    ch.close()
    return got


def run(lg: Login, cmd: str, timeout: float = 180) -> tuple[int, str]:
    """``ssh host cmd``: (exit status, stdout)."""
    ch = lg.transport.open_session()
    ch.settimeout(timeout)
    ch.exec_command(cmd)
    out = b""
    while chunk := ch.recv(65536):
        out += chunk
    rc = ch.recv_exit_status()
    ch.close()
    return rc, out.decode(errors="replace")


@contextmanager
def http_payload(data: bytes) -> Iterator[int]:
    """A loopback HTTP server on the host serving ``data`` at ``/payload`` (the guest reaches the host's
    loopback as 10.0.2.2); its port."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/payload":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
