"""A real nats-server with JetStream for bus tests: its own store dir and free port, killable, restartable.

``NatsServer(store_dir)``: ``.start()`` runs Debian's ``nats-server -js -sd DIR -p PORT -a 127.0.0.1``
and waits until it accepts; ``.stop()`` (SIGTERM), ``.kill()`` (SIGKILL); ``.start()`` again reuses the
same port and store dir, so JetStream data persists. The fixture ``nats_server`` yields a started one
and always kills it. A missing nats-server fails the test (never a skip): ``scripts/dev.sh`` installs it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

NATS_SERVER_PATHS = ("/usr/sbin/nats-server", "/usr/bin/nats-server")


def nats_server_binary() -> str:
    """The nats-server binary; fails the test with how to install it if there is none."""
    found = shutil.which("nats-server") or next((p for p in NATS_SERVER_PATHS if os.access(p, os.X_OK)), None)
    if found is None:
        pytest.fail("nats-server is not installed: run `bash scripts/dev.sh setup`", pytrace=False)
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NatsServer:
    """One nats-server process with JetStream on ``store_dir``; the port stays the same across restarts."""

    def __init__(self, store_dir: Path, port: int | None = None) -> None:
        self.binary = nats_server_binary()
        self.store_dir = Path(store_dir)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.store_dir.parent / f"nats-{self.port}.log"

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:PORT``."""
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 20.0) -> NatsServer:
        """Start (or restart) the server and wait until it accepts connections and JetStream is up."""
        if self.running:
            raise RuntimeError("nats-server is already running")
        self.store_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")     # noqa: SIM115 - the child keeps it; closed when it ends
        self.proc = subprocess.Popen(
            [self.binary, "-js", "-sd", str(self.store_dir), "-p", str(self.port), "-a", "127.0.0.1",
            ],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"nats-server did not accept within {timeout} s: {self.log_tail()}")
            if self._answers_info():
                return self
            time.sleep(0.02)

    def _answers_info(self) -> bool:
        with socket.socket() as s:
            s.settimeout(1.0)
            try:
                s.connect(("127.0.0.1", self.port))
                return s.recv(4096).startswith(b"INFO ")
            except OSError:
                return False

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM and wait (a clean shutdown)."""
        self._signal(signal.SIGTERM, timeout)

    def kill(self, timeout: float = 20.0) -> None:
        """SIGKILL and wait (a crash: nothing flushed by the server itself)."""
        self._signal(signal.SIGKILL, timeout)

    def _signal(self, sig: int, timeout: float) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)
        self.proc.wait(timeout=timeout)

    def log_tail(self, lines: int = 20) -> str:
        """The end of the server's log (for failure messages)."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A started nats-server with JetStream in ``tmp_path``; killed after the test."""
    server = NatsServer(tmp_path / "jetstream")
    server.start()
    try:
        yield server
    finally:
        server.kill()
