"""A scripted SSH client session from the host (Debian's OpenSSH ``ssh``, one multiplexed connection
with a chosen cipher): commands run with ``ssh host cmd`` and an interactive shell, all over the one
connection, and the client's own record of it (each command and the bytes it printed, what was typed,
what the terminal showed)."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from aradia.lab.launcher import Guest
from waiting import wait_until


@dataclass
class ClientRecord:
    """What the client sent and got: (command, stdout) per ``ssh host cmd``, the interactive shell's
    typed bytes and the bytes its terminal received."""

    execs: list[tuple[str, bytes]] = field(default_factory=list)
    typed: bytes = b""
    shown: bytes = b""


class Connection:
    """One ssh master connection (ControlMaster) to the guest; sessions ride on it."""

    def __init__(self, guest: Guest, cipher: str, workdir: Path) -> None:
        argv = guest.ssh_argv()
        self.host = argv[-1]
        self.base = [*argv[:-1], "-o", f"ControlPath={workdir / 'ctl'}", "-o", "ControlMaster=no"]
        self.master = subprocess.Popen([*argv[:-1], "-o", f"ControlPath={workdir / 'ctl'}", "-M", "-N",
                                        "-c", cipher, self.host], stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.record = ClientRecord()

        def up() -> bool:
            if self.master.poll() is not None:
                raise AssertionError(f"ssh -c {cipher} failed: {self.master.stderr.read().decode()}")  # type: ignore[union-attr]
            return subprocess.run([*self.base, "-O", "check", self.host], capture_output=True).returncode == 0

        wait_until(up, 60, "the ssh master connection")

    def run(self, cmd: str) -> bytes:
        """``ssh host cmd`` over the connection; its stdout, recorded."""
        res = subprocess.run([*self.base, self.host, cmd], capture_output=True, timeout=60, check=True)
        self.record.execs.append((cmd, res.stdout))
        return res.stdout

    @contextmanager
    def shell(self) -> Iterator[Shell]:
        """An interactive shell on a terminal (``ssh -tt``); ended with ``exit`` after the block."""
        sh = Shell(subprocess.Popen([*self.base, "-tt", "-e", "none", self.host], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL))
        try:
            yield sh
            sh.send(b"exit\n")
            sh.proc.wait(60)
        finally:
            if sh.proc.poll() is None:
                sh.proc.kill()
            sh.reader.join(10)
        self.record.typed, self.record.shown = sh.typed, bytes(sh.shown)

    def close(self) -> None:
        """End the master connection."""
        subprocess.run([*self.base, "-O", "exit", self.host], capture_output=True, timeout=30)
        try:
            self.master.wait(30)
        finally:
            if self.master.poll() is None:
                self.master.kill()


class Shell:
    """An interactive ``ssh -tt`` session: what was typed and what its terminal showed."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc, self.typed, self.shown = proc, b"", bytearray()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := self.proc.stdout.read1(65536):
            self.shown += chunk

    def send(self, data: bytes) -> None:
        """Type ``data``."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()
        self.typed += data

    def type_line(self, line: str, expect: str, timeout: float = 60) -> None:
        """Type ``line`` and wait until the terminal shows ``expect``."""
        seen = len(self.shown)
        self.send(line.encode() + b"\n")
        wait_until(lambda: expect.encode() in self.shown[seen:], timeout, f"{expect!r} after {line!r}")
        time.sleep(0.2)  # let the prompt after it arrive too (part of what the client shows)
