"""A running test guest and the ways to talk to it: the console, ttyS1, ``Guest.run`` and ssh.

:func:`aradia.lab.launcher.launch` starts QEMU and hands back a :class:`Guest`: the console (ttyS0)
is a unix-socket chardev the launcher keeps one connection open to (everything it prints goes to
``console.log``), ttyS1 is written to a file as a clean ground-truth channel (:meth:`Guest.run`
sends a command on the console and reads its output and exit status from ttyS1; on arm64 the channel
is the virtio console ``hvc0``, written to the same file), and ssh is
forwarded to a local port. A :class:`Guest` always tears QEMU down: on :meth:`Guest.stop`, on
leaving a ``with`` block, on garbage collection and at interpreter exit.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from aradia.lab import GuestError
from aradia.lab.images import GuestImage
from aradia.lab.memhold import MemHold

_RUN_CHUNK = 1500  # base64 characters per console line: far below the tty's 4 KiB line buffer


@dataclass
class Resources:
    """A guest's QEMU process and what the launcher made for it: everything teardown needs.

    Deliberately holds no reference to the :class:`Guest` itself (its finalizer holds this).
    """

    proc: subprocess.Popen[bytes] | None = None
    console: socket.socket | None = None
    reader: threading.Thread | None = None
    shm_path: Path | None = None
    workdir: Path | None = None
    remove_workdir: bool = False
    stderr: IO[bytes] | None = None
    closed: threading.Event = field(default_factory=threading.Event)


def _teardown(res: Resources) -> None:
    """Stop QEMU (SIGTERM, then SIGKILL, by pid) and remove what the launcher created."""
    res.closed.set()
    proc = res.proc
    if proc is not None and proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
    if res.console is not None:
        with contextlib.suppress(OSError):
            res.console.shutdown(socket.SHUT_RDWR)
        res.console.close()
    if res.reader is not None and res.reader is not threading.current_thread():
        res.reader.join(timeout=5)
    if res.stderr is not None:
        res.stderr.close()
    if res.shm_path is not None:
        with contextlib.suppress(FileNotFoundError):
            res.shm_path.unlink()
    if res.remove_workdir and res.workdir is not None:
        shutil.rmtree(res.workdir, ignore_errors=True)


def pump_console(sock: socket.socket, log_path: Path, closed: threading.Event) -> None:
    """Copy everything the console prints into the console log until the socket closes."""
    with open(log_path, "ab", buffering=0) as log:
        while not closed.is_set():
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            log.write(data)


class Guest:
    """A running QEMU guest started by :func:`launch`; a context manager that stops it on exit."""

    def __init__(self, image: GuestImage, workdir: Path, res: Resources) -> None:
        self.image = image
        self.workdir = workdir
        self.qmp_path = workdir / "qmp.sock"
        self.console_path = workdir / "console.sock"
        self.console_log = workdir / "console.log"
        self.ttys1_path = workdir / "ttyS1.log"
        self.qemu_log = workdir / "qemu.log"
        self.gdb_port: int | None = None
        self.ssh_port: int | None = None
        self.shm_path: Path | None = res.shm_path
        self.memory_size = 0
        self.boot_seconds = 0.0
        self.boot_retries: list[str] = []  # why earlier boots of this guest were given up
        self.args: list[str] = []
        self._res = res
        self._run_lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _teardown, res)

    @property
    def pid(self) -> int:
        """The QEMU process id."""
        assert self._res.proc is not None
        return self._res.proc.pid

    @property
    def alive(self) -> bool:
        """Whether the QEMU process is still running."""
        return self._res.proc is not None and self._res.proc.poll() is None

    def stop(self) -> None:
        """Stop QEMU (SIGTERM, then SIGKILL) and clean up; safe to call twice."""
        self._finalizer()

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.alive else "stopped"
        return f"<Guest {self.image.release} pid={self._res.proc.pid if self._res.proc else None} {state}>"

    # -- the console and the ground-truth serial line -----------------------------------------------

    def console_text(self) -> str:
        """Everything the guest console has printed so far."""
        try:
            return self.console_log.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def send_console(self, data: bytes | str) -> None:
        """Type raw bytes into the guest console."""
        if isinstance(data, str):
            data = data.encode()
        sock = self._res.console
        if sock is None or not self.alive:
            raise GuestError("the guest is not running")
        try:
            sock.sendall(data)
        except OSError as exc:
            raise GuestError(f"console write failed: {exc}") from exc

    def _ttys1_size(self) -> int:
        try:
            return self.ttys1_path.stat().st_size
        except FileNotFoundError:
            return 0

    def wait_ttys1(
        self, start: int, marker: re.Pattern[bytes], timeout: float
    ) -> tuple[bytes, re.Match[bytes]]:
        """Wait until ttyS1's output from byte ``start`` on matches ``marker``; (that output, the match).

        Raises :class:`TimeoutError` (with the output so far) after ``timeout`` seconds and
        :class:`GuestError` when QEMU exits first.
        """
        deadline = time.monotonic() + timeout
        while not self.ttys1_path.exists():  # QEMU creates it a moment after the console socket
            if not self.alive or time.monotonic() > deadline:
                raise GuestError(f"QEMU did not create {self.ttys1_path}:\n{self.tail()}")
            time.sleep(0.01)
        with open(self.ttys1_path, "rb") as fh:
            fh.seek(start)
            buf = bytearray()
            while True:
                chunk = fh.read()
                if chunk:
                    # markers are short: only rescan the tail that could hold one split across reads
                    scan_from = max(0, len(buf) - 256)
                    buf += chunk
                    m = marker.search(buf, scan_from)
                    if m:
                        return bytes(buf), m
                elif not self.alive:
                    raise GuestError(f"QEMU exited while waiting for the guest:\n{self.tail()}")
                elif time.monotonic() > deadline:
                    raise TimeoutError(buf.decode(errors="replace"))
                else:
                    time.sleep(0.01)

    def tail(self, n: int = 2000) -> str:
        """The last ``n`` characters of the console and of QEMU's stderr (for error messages)."""
        text = self.console_text()[-n:]
        with contextlib.suppress(OSError):
            text += "\n--- qemu stderr ---\n" + self.qemu_log.read_text(errors="replace")[-n:]
        return text

    def run(self, cmd: str, timeout: float = 30, check: bool = True) -> str:
        """Run ``cmd`` with bash in the guest (as root, stdin /dev/null) and return its output.

        Output (stdout and stderr) travels over ttyS1, never over the echoing console, so kernel
        messages and the echo cannot mix in. Raises :class:`GuestError` (with the output) on a
        non-zero exit status unless ``check`` is false, and on timeout (after sending Ctrl-C).
        """
        nonce = secrets.token_hex(8)
        script = f"/tmp/.aradia-run-{nonce}"
        encoded = base64.b64encode(cmd.encode()).decode()
        end = re.compile(rb"@@ARADIA-END " + nonce.encode() + rb" (\d+)@@\n?")
        tty = self.image.guest_arch.truth_tty
        with self._run_lock:
            deadline = time.monotonic() + timeout
            chunks = [encoded[i:i + _RUN_CHUNK] for i in range(0, len(encoded), _RUN_CHUNK)] or [""]
            for i, chunk in enumerate(chunks[:-1]):
                ack = re.compile(rb"@@ARADIA-ACK " + nonce.encode() + b" %d@@\n" % i)
                start = self._ttys1_size()
                self.send_console(f"\x15printf %s {chunk} >> {script}.b64; echo '@@ARADIA-ACK {nonce} {i}@@'"
                                  f" >{tty}\n")
                try:
                    self.wait_ttys1(start, ack, max(1.0, deadline - time.monotonic()))
                except TimeoutError as exc:
                    raise GuestError(f"guest did not take command input within {timeout}s") from exc
            start = self._ttys1_size()
            self.send_console(
                f"\x15printf %s {chunks[-1]} >> {script}.b64; base64 -d {script}.b64 > {script};"
                f" bash {script} </dev/null >{tty} 2>&1; echo \"@@ARADIA-END {nonce} $?@@\" >{tty};"
                f" rm -f {script} {script}.b64\n"
            )
            try:
                buf, m = self.wait_ttys1(start, end, max(1.0, deadline - time.monotonic()))
            except TimeoutError as exc:
                self.send_console(b"\x03")
                # let the interrupted command's end marker land now rather than in the next output
                with contextlib.suppress(TimeoutError, GuestError):
                    self.wait_ttys1(start, end, 3.0)
                raise GuestError(f"guest command timed out after {timeout}s: {cmd!r}; output so far:\n"
                                 f"{exc.args[0][-2000:]}") from None
        output = buf[: m.start()].decode(errors="replace")
        status = int(m.group(1))
        if check and status != 0:
            raise GuestError(f"guest command failed (exit {status}): {cmd!r}\n{output[-4000:]}")
        return output

    # -- ssh --------------------------------------------------------------------------------------

    def ssh_argv(self, *, password: bool = False) -> list[str]:
        """The ``ssh`` command line (up to the remote command) that logs in as root.

        Key authentication with the image's key unless ``password`` is true; the host key is pinned
        to the one generated when the image was built.
        """
        if self.ssh_port is None:
            raise GuestError("this guest was launched with ssh=False")
        known = self.workdir / "known_hosts"
        if not known.exists():
            known.write_text(f"[127.0.0.1]:{self.ssh_port} {self.image.host_key_line}\n")
        argv = ["ssh", "-F", "/dev/null", "-p", str(self.ssh_port),
                "-o", f"UserKnownHostsFile={known}", "-o", "GlobalKnownHostsFile=/dev/null",
                "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR",
                "-o", "ServerAliveInterval=10"]
        if password:
            argv += ["-o", "PubkeyAuthentication=no", "-o", "NumberOfPasswordPrompts=1",
                     "-o", "PreferredAuthentications=password,keyboard-interactive"]
        else:
            if self.image.ssh_key is None:
                raise GuestError("the image has no ssh client key (ssh-keygen was missing when it was built)")
            argv += ["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "PasswordAuthentication=no",
                     "-i", str(self.image.ssh_key)]
        return [*argv, "root@127.0.0.1"]

    def _askpass_env(self) -> dict[str, str]:
        script = self.workdir / "askpass.sh"
        if not script.exists():
            script.write_text(f"#!/bin/sh\necho '{self.image.root_password}'\n")
            script.chmod(0o700)
        return {**os.environ, "SSH_ASKPASS": str(script), "SSH_ASKPASS_REQUIRE": "force",
                "DISPLAY": os.environ.get("DISPLAY", ":0")}

    def ssh(self, cmd: str, timeout: float = 30, check: bool = True, password: bool = False) -> str:
        """Run ``cmd`` over ssh (key auth, or password auth via ``SSH_ASKPASS``); returns stdout.

        Connection refusals right after boot (sshd still starting) are retried until ``timeout``.
        """
        argv = [*self.ssh_argv(password=password), cmd]
        env = self._askpass_env() if password else None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise GuestError(f"ssh command timed out after {timeout}s: {cmd!r}")
            try:
                res = subprocess.run(argv, capture_output=True, timeout=left, env=env,
                                     stdin=subprocess.DEVNULL, check=False)
            except subprocess.TimeoutExpired:
                raise GuestError(f"ssh command timed out after {timeout}s: {cmd!r}") from None
            stderr = res.stderr.decode(errors="replace")
            # 255 is ssh's own failure; retry only while sshd may still be coming up.
            transient = res.returncode == 255 and any(
                s in stderr for s in ("Connection refused", "Connection reset", "Connection closed",
                                      "kex_exchange_identification", "timed out"))
            if transient and time.monotonic() + 0.5 < deadline and self.alive:
                time.sleep(0.5)
                continue
            out = res.stdout.decode(errors="replace")
            if check and res.returncode != 0:
                raise GuestError(f"ssh command failed (exit {res.returncode}): {cmd!r}\n"
                                 f"{out[-2000:]}{stderr[-2000:]}")
            return out

    # -- the memhold helper program -------------------------------------------------------------------

    def start_memhold(self, seed: int, size: int = 1 << 20, timeout: float = 30) -> MemHold:
        """Start ``memhold`` in the guest (in the background) and return a handle to it."""
        tag = secrets.token_hex(4)
        fifo, out = f"/tmp/memhold-{tag}.cmd", f"/tmp/memhold-{tag}.out"
        self.run(f"memhold {seed} {size} --fifo {fifo} > {out} 2>&1 &", timeout=timeout)
        text = self.run(f"for i in $(seq 600); do grep -q '^ready$' {out} && break;"
                        f" grep -q memhold: {out} && break; sleep 0.05; done; cat {out}", timeout=timeout)
        return MemHold.parse(self, text, fifo, out)


__all__ = ["Guest", "Resources", "pump_console"]
