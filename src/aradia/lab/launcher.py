"""Launch a QEMU guest from a :class:`~aradia.lab.images.GuestImage` and talk to it.

``launch(image)`` starts ``qemu-system-x86_64`` (TCG by default) with QMP on a unix socket, the
console (ttyS0) on a unix-socket chardev the launcher keeps one connection open to (everything it
prints goes to ``console.log``), ttyS1 written to a file as a clean ground-truth channel, user-mode
networking with ssh forwarded to a free local port, and optionally a GDB stub and guest RAM in a
shared ``/dev/shm`` file. The returned :class:`Guest` always tears QEMU down: on :meth:`Guest.stop`,
on leaving a ``with`` block, on garbage collection and at interpreter exit.
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
import struct
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from aradia.lab import GuestError
from aradia.lab.images import GuestImage
from aradia.machine.qemu import QEMU_BINARY
from aradia.machine.stubaddress import free_port

_SUN_PATH_MAX = 107
_RUN_CHUNK = 1500  # base64 characters per console line: far below the tty's 4 KiB line buffer
_SIZE_RE = re.compile(r"^(\d+)([KMGT]?)B?$", re.IGNORECASE)


def memory_bytes(memory: str | int) -> int:
    """QEMU's ``-m`` value (``"256M"``, ``"4G"``, a bare number = MiB, or an int of bytes) in bytes."""
    if isinstance(memory, int):
        return memory
    m = _SIZE_RE.match(memory.strip())
    if not m:
        raise GuestError(f"cannot parse memory size {memory!r}")
    shift = {"": 20, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2).upper()]
    return int(m.group(1)) << shift


@dataclass
class _Resources:
    """Everything teardown needs; deliberately holds no reference to the Guest itself."""

    proc: subprocess.Popen[bytes] | None = None
    console: socket.socket | None = None
    reader: threading.Thread | None = None
    shm_path: Path | None = None
    workdir: Path | None = None
    remove_workdir: bool = False
    stderr: IO[bytes] | None = None
    closed: threading.Event = field(default_factory=threading.Event)


def _teardown(res: _Resources) -> None:
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


def _pump_console(sock: socket.socket, log_path: Path, closed: threading.Event) -> None:
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

    def __init__(self, image: GuestImage, workdir: Path, res: _Resources) -> None:
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

    def _wait_ttys1(
        self, start: int, marker: re.Pattern[bytes], timeout: float
    ) -> tuple[bytes, re.Match[bytes]]:
        deadline = time.monotonic() + timeout
        while not self.ttys1_path.exists():  # QEMU creates it a moment after the console socket
            if not self.alive or time.monotonic() > deadline:
                raise GuestError(f"QEMU did not create {self.ttys1_path}:\n{self._tail()}")
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
                    raise GuestError(f"QEMU exited while waiting for the guest:\n{self._tail()}")
                elif time.monotonic() > deadline:
                    raise TimeoutError(buf.decode(errors="replace"))
                else:
                    time.sleep(0.01)

    def _tail(self, n: int = 2000) -> str:
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
        with self._run_lock:
            deadline = time.monotonic() + timeout
            chunks = [encoded[i:i + _RUN_CHUNK] for i in range(0, len(encoded), _RUN_CHUNK)] or [""]
            for i, chunk in enumerate(chunks[:-1]):
                ack = re.compile(rb"@@ARADIA-ACK " + nonce.encode() + b" %d@@\n" % i)
                start = self._ttys1_size()
                self.send_console(f"\x15printf %s {chunk} >> {script}.b64; echo '@@ARADIA-ACK {nonce} {i}@@'"
                                  f" >/dev/ttyS1\n")
                try:
                    self._wait_ttys1(start, ack, max(1.0, deadline - time.monotonic()))
                except TimeoutError as exc:
                    raise GuestError(f"guest did not take command input within {timeout}s") from exc
            start = self._ttys1_size()
            self.send_console(
                f"\x15printf %s {chunks[-1]} >> {script}.b64; base64 -d {script}.b64 > {script};"
                f" bash {script} </dev/null >/dev/ttyS1 2>&1; echo \"@@ARADIA-END {nonce} $?@@\" >/dev/ttyS1;"
                f" rm -f {script} {script}.b64\n"
            )
            try:
                buf, m = self._wait_ttys1(start, end, max(1.0, deadline - time.monotonic()))
            except TimeoutError as exc:
                self.send_console(b"\x03")
                # let the interrupted command's end marker land now rather than in the next output
                with contextlib.suppress(TimeoutError, GuestError):
                    self._wait_ttys1(start, end, 3.0)
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


def memhold_pattern(seed: int, offset: int, length: int) -> bytes:
    """The bytes ``memhold SEED`` fills its region with, for ``region[offset:offset+length]``."""
    first, last = offset // 8, (offset + length + 7) // 8
    words = (((seed ^ (i * 0x9E3779B97F4A7C15)) & 0xFFFFFFFFFFFFFFFF) for i in range(first, last))
    blob = b"".join(struct.pack("<Q", w) for w in words)
    return blob[offset - first * 8: offset - first * 8 + length]


@dataclass
class MemHold:
    """A ``memhold`` process in a guest: where its pattern-filled, mlocked region lives."""

    guest: Guest
    pid: int
    vaddr: int
    size: int
    seed: int
    pages: list[int]  # guest-physical address of each 4 KiB page (0 if pagemap hid it)
    fifo: str
    out: str

    @classmethod
    def parse(cls, guest: Guest, text: str, fifo: str, out: str) -> MemHold:
        """Parse memhold's start-up report."""
        fields: dict[str, str] = {}
        pages: list[int] = []
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 4 and parts[0] == "page":
                pages.append(int(parts[3], 16))
            elif len(parts) == 2:
                fields[parts[0]] = parts[1]
        if "ready" not in text.split() or not {"pid", "vaddr", "size", "seed"} <= fields.keys():
            raise GuestError(f"memhold did not start:\n{text[-2000:]}")
        return cls(guest, int(fields["pid"]), int(fields["vaddr"], 16), int(fields["size"]),
                   int(fields["seed"]), pages, fifo, out)

    def command(self, line: str, timeout: float = 30) -> list[str]:
        """Send one command line; returns the answer lines before ``ok`` (raises on ``err``)."""
        script = (f"before=$(wc -c < {self.out}); echo '{line}' > {self.fifo};"
                  f" for i in $(seq 2000); do tail -c +$((before+1)) {self.out} | grep -qE '^(ok|err)'"
                  f" && break; sleep 0.02; done; tail -c +$((before+1)) {self.out}")
        lines = self.guest.run(script, timeout=timeout).splitlines()
        if not lines or lines[-1] != "ok":
            raise GuestError(f"memhold {line.split()[0]!r} failed: {lines[-3:]}")
        return lines[:-1]

    def dump(self, offset: int, length: int) -> bytes:
        """What the guest process currently sees at ``region[offset:offset+length]``."""
        (line,) = self.command(f"dump {offset} {length}")
        return bytes.fromhex(line.removeprefix("data "))

    def poke(self, offset: int, data: bytes) -> None:
        """Let the guest process write ``data`` at ``offset``."""
        self.command(f"poke {offset} {data.hex()}")

    def check(self) -> tuple[int, int]:
        """(number of 8-byte words differing from the pattern, offset of the first or -1)."""
        (line,) = self.command("check")
        _, count, first = line.split()
        return int(count), int(first)

    def expected(self, offset: int = 0, length: int | None = None) -> bytes:
        """The original pattern for ``region[offset:offset+length]``."""
        return memhold_pattern(self.seed, offset, self.size - offset if length is None else length)

    @contextlib.contextmanager
    def spinning(self, seconds: int, timeout: float = 60) -> Iterator[None]:
        """Keep the process busy-looping in user mode (on a vCPU) for the block, at most ``seconds``.

        Lets a test catch the process on a vCPU and take its page-table root from the registers.
        """
        before = int(self.guest.run(f"wc -c < {self.out}").strip() or 0)
        self.guest.run(f"echo 'spin {seconds}' > {self.fifo}")
        try:
            yield
        finally:
            self.guest.run(f"for i in $(seq {int(timeout * 20)}); do tail -c +{before + 1} {self.out}"
                           f" | grep -q '^ok' && break; sleep 0.05; done", timeout=timeout + 5)

    def stop(self) -> None:
        """Ask memhold to exit."""
        self.guest.run(f"echo quit > {self.fifo}; sleep 0.1; rm -f {self.fifo}", check=False)


def _qemu_args(image: GuestImage, guest: Guest, *, accel: str, smp: int, memory: str, cpu: str | None,
               machine: str, append: str, plugins: Iterable[str], vmcoreinfo: bool,
               extra_args: Sequence[str], incoming: str | None = None) -> list[str]:
    machine_opt = machine
    args = [QEMU_BINARY, "-name", f"aradia-{image.series}", "-accel", accel, "-m", memory, "-smp", str(smp),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", str(image.kernel_path), "-initrd", str(image.initrd_path),
            "-append", f"console=ttyS0 quiet panic=-1 {append}".strip(),
            "-chardev", f"socket,id=con0,path={guest.console_path},server=on,wait=on",
            "-serial", "chardev:con0", "-serial", f"file:{guest.ttys1_path}",
            "-qmp", f"unix:{guest.qmp_path},server=on,wait=off"]
    if cpu:
        args += ["-cpu", cpu]
    if guest.shm_path is not None:
        args += ["-object", f"memory-backend-file,id=m0,size={guest.memory_size},"
                            f"mem-path={guest.shm_path},share=on"]
        machine_opt += ",memory-backend=m0"
    args += ["-machine", machine_opt]
    hostfwd = f",hostfwd=tcp:127.0.0.1:{guest.ssh_port}-:22" if guest.ssh_port else ""
    args += ["-netdev", f"user,id=n0{hostfwd}", "-device", "virtio-net-pci,netdev=n0",
             "-device", "virtio-rng-pci"]
    if guest.gdb_port is not None:
        args += ["-gdb", f"tcp:127.0.0.1:{guest.gdb_port}"]
    if vmcoreinfo:
        args += ["-device", "vmcoreinfo"]
    for plugin in plugins:
        args += ["-plugin", plugin]
    if incoming is not None:
        args += ["-incoming", incoming]
    return [*args, *extra_args]


def _dies_with_us() -> list[str]:
    """A prefix that SIGKILLs QEMU if this process dies without cleaning up (main thread only).

    PR_SET_PDEATHSIG fires when the *thread* that forked exits, so it is only safe from the main
    thread, whose end is the end of the process.
    """
    setpriv = shutil.which("setpriv")
    if setpriv and threading.current_thread() is threading.main_thread():
        return [setpriv, "--pdeathsig", "KILL", "--"]
    return []


def launch(image: GuestImage, *, accel: str = "tcg", smp: int = 1, memory: str = "256M",
           cpu: str | None = None, machine: str = "pc", gdb: bool = False, shared_memory: bool = False,
           ssh: bool = True, plugins: Iterable[str] = (), extra_args: Sequence[str] = (),
           workdir: Path | str | None = None, boot_timeout: float = 60, append: str = "",
           vmcoreinfo: bool = False, incoming: str | None = None) -> Guest:
    """Boot ``image`` in a new QEMU and wait until its init reports ready; returns the :class:`Guest`.

    ``accel`` is QEMU's accelerator (``"tcg"``; ``"kvm"`` where available), ``append`` adds to the
    kernel command line, ``plugins`` are ``-plugin`` values (``"lib.so,arg=v"``). Ports for ssh and
    the GDB stub are picked free at random; a start that loses a port race is retried.

    ``incoming`` (``"unix:/path"``, ``"tcp:127.0.0.1:PORT"``, ``"defer"``) starts a live-migration
    *destination* instead (QEMU's ``-incoming``; the other options must match the source's): nothing
    boots, so this returns as soon as QEMU's QMP socket exists, with the VM in run state
    ``inmigrate``. Once a source migrated into it the guest runs on, and :meth:`Guest.run` works.
    """
    plugins = tuple(plugins)
    last_error: GuestError | None = None
    for _attempt in range(3):
        try:
            return _launch_once(image, accel=accel, smp=smp, memory=memory, cpu=cpu, machine=machine, gdb=gdb,
                                shared_memory=shared_memory, ssh=ssh, plugins=plugins, extra_args=extra_args,
                                workdir=workdir, boot_timeout=boot_timeout, append=append,
                                vmcoreinfo=vmcoreinfo, incoming=incoming)
        except _PortRace as exc:
            last_error = GuestError(str(exc))
    assert last_error is not None
    raise last_error


class _PortRace(GuestError):
    """QEMU could not bind a port another process took after we picked it."""


def _launch_once(image: GuestImage, *, accel: str, smp: int, memory: str, cpu: str | None, machine: str,
                 gdb: bool, shared_memory: bool, ssh: bool, plugins: tuple[str, ...],
                 extra_args: Sequence[str], workdir: Path | str | None, boot_timeout: float, append: str,
                 vmcoreinfo: bool, incoming: str | None = None) -> Guest:
    if shutil.which(QEMU_BINARY) is None:
        raise GuestError(f"{QEMU_BINARY} is not installed (Debian package qemu-system-x86)")
    res = _Resources()
    if workdir is None:
        wd = Path(tempfile.mkdtemp(prefix="aradia-vm-"))
        res.remove_workdir = True
    else:
        wd = Path(workdir).absolute()  # QEMU runs in wd: relative paths would resolve twice
        wd.mkdir(parents=True, exist_ok=True)
    res.workdir = wd
    if shared_memory:
        res.shm_path = Path(f"/dev/shm/aradia-{os.getpid()}-{secrets.token_hex(4)}")
    guest = Guest(image, wd, res)
    try:
        if len(str(guest.console_path)) > _SUN_PATH_MAX:
            raise GuestError(f"workdir {wd} is too long for unix socket paths")
        for stale in (guest.console_path, guest.qmp_path, guest.ttys1_path, guest.console_log):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        guest.memory_size = memory_bytes(memory)
        guest.ssh_port = free_port() if ssh else None
        guest.gdb_port = free_port() if gdb else None
        guest.args = _qemu_args(image, guest, accel=accel, smp=smp, memory=memory, cpu=cpu, machine=machine,
                                append=append, plugins=plugins, vmcoreinfo=vmcoreinfo, extra_args=extra_args,
                                incoming=incoming)
        started = time.monotonic()
        res.stderr = open(guest.qemu_log, "wb")  # noqa: SIM115 (closed by _teardown)
        res.proc = subprocess.Popen([*_dies_with_us(), *guest.args], stdin=subprocess.DEVNULL,
                                    stdout=res.stderr, stderr=res.stderr, cwd=wd)
        res.console = _connect_console(guest, started + 30)
        res.reader = threading.Thread(target=_pump_console, args=(res.console, guest.console_log, res.closed),
                                      name=f"aradia-console-{res.proc.pid}", daemon=True)
        res.reader.start()
        if incoming is not None:
            _wait_qmp_socket(guest, started + boot_timeout)
            guest.boot_seconds = time.monotonic() - started
            return guest
        marker = re.compile(re.escape(image.ready_marker.encode()) + rb" (\S+)\n")
        try:
            _, m = guest._wait_ttys1(0, marker, boot_timeout - (time.monotonic() - started))
        except TimeoutError:
            raise GuestError(f"guest {image.release} did not boot within {boot_timeout}s; console tail:\n"
                             f"{guest._tail()}") from None
        if m.group(1).decode() != image.release:
            raise GuestError(f"guest booted kernel {m.group(1).decode()!r}, expected {image.release!r}")
        guest.boot_seconds = time.monotonic() - started
        return guest
    except BaseException as exc:
        log = ""
        with contextlib.suppress(OSError):
            log = guest.qemu_log.read_text(errors="replace")
        guest.stop()
        if isinstance(exc, GuestError) and any(s in log for s in ("hostfwd", "host forwarding", "gdbstub",
                                                                   "Address already in use")):
            raise _PortRace(f"QEMU lost a port race: {log[-500:]}") from exc
        raise


def _wait_qmp_socket(guest: Guest, deadline: float) -> None:
    """Wait until QEMU created its QMP socket (a migration destination prints nothing to wait for)."""
    proc = guest._res.proc
    assert proc is not None
    while not guest.qmp_path.exists():
        if proc.poll() is not None:
            raise GuestError(f"QEMU exited at start (status {proc.returncode}):\n{guest._tail()}")
        if time.monotonic() > deadline:
            raise GuestError(f"QEMU did not create its QMP socket:\n{guest._tail()}")
        time.sleep(0.01)


def _connect_console(guest: Guest, deadline: float) -> socket.socket:
    """Connect to the console socket as soon as QEMU creates it (QEMU waits for us with wait=on)."""
    proc = guest._res.proc
    assert proc is not None
    while True:
        if proc.poll() is not None:
            raise GuestError(f"QEMU exited at start (status {proc.returncode}):\n{guest._tail()}")
        if guest.console_path.exists():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(guest.console_path))
                return sock
            except OSError:
                sock.close()
        if time.monotonic() > deadline:
            raise GuestError(f"QEMU did not create its console socket:\n{guest._tail()}")
        time.sleep(0.01)
