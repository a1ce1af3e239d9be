"""How a second process asks the owner of a traced VM to migrate it (``aradia migrate`` -> ``aradia trace``).

QEMU serves one QMP client and one GDB-stub client, so the process that traces a VM is its owner
until it ends, and only it can drive a migration that keeps the trace going. A local ``aradia trace``
therefore listens on a unix socket named after the VM's QMP socket (:func:`control_path`: under
``$XDG_RUNTIME_DIR`` or ``/tmp``, from a hash of the QMP socket's real path) for one-line JSON
requests ``{"op": "migrate", "to": "qmp:DST", "uri": "unix:PATH", "timeout": S}``; it answers one
line, ``{"ok": {...}}`` (:meth:`MigrationResult.as_dict`) or ``{"error": text, "kind": class}``. After a
migration it listens under the destination's name, so the VM can be moved on (or back).
``aradia migrate`` with no owner listening migrates the VM itself (through an empty tracer: the same
stop, arm-before-run and hand-over, with nothing armed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any

from aradia.errors import AradiaError, Busy, MigrationFailed, NotAttached
from aradia.trace.migration import DESTINATION_TIMEOUT, Migration, qmp_path
from aradia.trace.tracer import Tracer

MAX_REQUEST = 1 << 16


def control_path(spec: str) -> Path:
    """The owner's control socket for the VM whose QMP socket is ``spec`` (``qmp:PATH`` or PATH)."""
    real = os.path.realpath(qmp_path(spec))
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"aradia-owner-{hashlib.sha256(real.encode()).hexdigest()[:16]}.sock"


class MigrationControl:
    """The owner's side: serves migration requests for the VM ``tracer`` traces, in a thread."""

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer
        self._sock: socket.socket | None = None
        self._path: Path | None = None
        self._closed = threading.Event()
        self._listen()
        self._thread = threading.Thread(target=self._accept, name="aradia-migrate-control", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        machine = self.tracer.vm.machine
        assert machine is not None
        path = control_path(str(machine.path))
        if path.exists():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
                raise Busy(f"another aradia process owns {machine.path} (its control socket {path} answers)")
            except OSError:
                path.unlink(missing_ok=True)  # stale: its owner died
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(4)
        old, self._sock, self._path = self._sock, sock, path
        if old is not None:
            self._unlisten(old)

    def _unlisten(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            sock = self._sock
            if sock is None:
                return
            try:
                sock.settimeout(0.5)
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._closed.is_set():
                    return
                continue
            with conn:
                self._serve(conn)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(None)
        line = conn.makefile("rb").readline(MAX_REQUEST)
        try:
            req = json.loads(line)
            if req.get("op") != "migrate":
                raise AradiaError(f"unknown request {req.get('op')!r}")
            old_path = self._path
            timeout = float(req.get("timeout", 120))
            result = Migration(self.tracer, str(req["to"]), str(req["uri"]), timeout=timeout,
                               destination_timeout=min(timeout, DESTINATION_TIMEOUT)).run()
            self._listen()  # now the owner of the destination
            if old_path is not None and old_path != self._path:
                old_path.unlink(missing_ok=True)
            reply: dict[str, Any] = {"ok": result.as_dict()}
        except AradiaError as e:
            reply = {"error": str(e), "kind": type(e).__name__}
        except (ValueError, KeyError, TypeError) as e:
            reply = {"error": f"bad request: {e}", "kind": "AradiaError"}
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps(reply).encode() + b"\n")

    def close(self) -> None:
        """Stop listening (removes the control socket)."""
        self._closed.set()
        if self._sock is not None:
            self._unlisten(self._sock)
        if self._path is not None:
            self._path.unlink(missing_ok=True)
        self._thread.join(timeout=5)

    def __enter__(self) -> MigrationControl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def request_migration(spec: str, to: str, uri: str, timeout: float = 120.0) -> dict[str, Any] | None:
    """Ask the owner of VM ``spec`` to migrate it; its result, or None when no owner listens."""
    path = control_path(spec)
    if not path.exists():
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.connect(str(path))
        except OSError:
            return None  # a stale socket of an owner that died
        sock.sendall(json.dumps({"op": "migrate", "to": to, "uri": uri, "timeout": timeout}).encode() + b"\n")
        line = sock.makefile("rb").readline(MAX_REQUEST)
    finally:
        sock.close()
    if not line:
        raise NotAttached(f"the owner of {spec} closed the connection without an answer")
    msg = json.loads(line)
    if "error" in msg:
        kind = {"MigrationFailed": MigrationFailed, "Busy": Busy, "NotAttached": NotAttached}.get(
            msg.get("kind", ""), AradiaError)
        raise kind(msg["error"])
    return dict(msg["ok"])


__all__ = ["MigrationControl", "control_path", "request_migration"]
