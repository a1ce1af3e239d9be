"""Start a QEMU with no guest kernel (SeaBIOS only) for protocol and memory-map tests; stop it by pid."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from aradia.machine.qemu import QEMU_BINARY


@dataclass
class BareQemu:
    """A running bare QEMU."""

    pid: int
    qmp_path: str
    shm_path: str | None
    proc: subprocess.Popen[bytes]


@contextlib.contextmanager
def bare_qemu(memory: str = "256M", *, shared: bool = False, smp: int = 1,
              extra: tuple[str, ...] = ()) -> Iterator[BareQemu]:
    """Run ``qemu-system-x86_64 -accel tcg`` with QMP on a unix socket; always killed afterwards.

    A missing QEMU fails the test with a clear message (never a skip): ``scripts/dev.sh`` installs it.
    """
    if shutil.which(QEMU_BINARY) is None:
        pytest.fail(f"{QEMU_BINARY} is not installed: run `bash scripts/dev.sh setup`", pytrace=False)
    tmp = tempfile.mkdtemp(prefix="aradia-bare-")
    qmp = os.path.join(tmp, "qmp.sock")
    shm = f"/dev/shm/aradia-test-{uuid.uuid4().hex[:8]}" if shared else None
    args = [QEMU_BINARY, "-accel", "tcg", "-display", "none", "-nodefaults", "-m", memory,
            "-smp", str(smp), "-qmp", f"unix:{qmp},server=on,wait=off", *extra]
    if shm:
        args += ["-object", f"memory-backend-file,id=m0,size={memory},mem-path={shm},share=on",
                 "-machine", "pc,memory-backend=m0"]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        # QEMU creates the socket file a moment before it listens: wait until a connection works
        # (a QMP connection that closes at once is harmless; QEMU listens again).
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"QEMU failed: {proc.stderr.read().decode() if proc.stderr else ''}")
            if time.monotonic() > deadline:
                raise RuntimeError("QEMU did not open its QMP socket")
            with socket.socket(socket.AF_UNIX) as probe:
                try:
                    probe.connect(qmp)
                    break
                except OSError:
                    pass
            time.sleep(0.02)
        yield BareQemu(proc.pid, qmp, shm, proc)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        if shm:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(shm)
        with contextlib.suppress(OSError):
            os.unlink(qmp)
        with contextlib.suppress(OSError):
            os.rmdir(tmp)
