"""The guardian's watchdog: a child process that holds a second descriptor of the tracer's GDB stub
connection and cleans up when the tracer ends without leaving the stub clean.

QEMU keeps breakpoints armed after an abrupt client disconnect and freezes the guest at the next hit.
The tracer talks to the stub itself (no process hop per breakpoint hit); this process inherits the
same connected socket and a private socketpair to the tracer, and sleeps on that socketpair (and on
the stub connection's close: when QEMU exits there is nothing left to clean, so it exits too). The
tracer notes each breakpoint before it arms it and says ``done`` once it left the stub clean itself
(breakpoints removed, detached or closed); the watchdog then closes its descriptor (QEMU sees the
client leave once both are closed) and exits. If the socketpair reaches end-of-file without
``done`` — the tracer was killed with SIGKILL, crashed, or a Ctrl-C cut an exchange short — the
connection is in an unknown state, so the watchdog :func:`rescue` s it: resynchronises (``\\x03``
stops a running VM, then a ``qC`` probe whose ``QC`` reply marks where the stream is), removes every
noted breakpoint, leaves physical-memory mode, and asks the run state (HMP ``info status`` through
``qRcmd``): a VM at a breakpoint or stopped by this resynchronisation gets ``D;1`` (QEMU resumes
it); a migrated source (``finish-migrate``, ``postmigrate``), a destination in ``inmigrate`` or a VM
paused by someone else is left as it is (closing without ``D`` leaves the run state alone).

The watchdog ignores SIGINT (a Ctrl-C in the tracer's terminal must not kill it before the cleanup)
and runs in its own session.
"""

from __future__ import annotations

import binascii
import contextlib
import json
import os
import select
import socket
import time

from aradia.errors import AradiaError
from aradia.proto.gdbwire import frame, is_console, is_stop_reply
from aradia.trace.runstate import INCOMING_STATES, MIGRATED_STATES, parse_info_status

#: Run states after which the VM must not be resumed through the stub (see the guardian).
NO_RESUME = MIGRATED_STATES | INCOMING_STATES
RESCUE_TIMEOUT = 5.0


class _Wire:
    """Packets on a connection whose state is unknown: acknowledges every frame, skips ``+``/``-``."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.buf = bytearray()
        self.stops = 0  # stop replies seen (a running VM stopped by our first byte sends one)

    def send(self, payload: bytes) -> None:
        self.sock.sendall(frame(payload))

    def packet(self, timeout: float = 1.0) -> bytes | None:
        """The next frame's payload, acknowledged; None after ``timeout`` (or the overall deadline)."""
        end = min(self.deadline, time.monotonic() + timeout)
        while True:
            start = self.buf.find(b"$")
            hash_at = self.buf.find(b"#", start + 1) if start >= 0 else -1
            if start >= 0 and hash_at >= 0 and len(self.buf) >= hash_at + 3:
                payload = bytes(self.buf[start + 1:hash_at])
                del self.buf[:hash_at + 3]
                self.sock.sendall(b"+")
                if is_stop_reply(payload):
                    self.stops += 1
                return payload
            left = end - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return None
            if not data:
                raise ConnectionError("the stub closed the connection")
            self.buf += data

    def reply(self, payload: bytes) -> bytes | None:
        """Send ``payload`` and return its reply (stop replies and console output skipped)."""
        self.send(payload)
        while (got := self.packet()) is not None:
            if not is_stop_reply(got) and not is_console(got):
                return got
        return None


def rescue(sock: socket.socket, breakpoints: list[tuple[int, int, int]],
           timeout: float = RESCUE_TIMEOUT) -> str:
    """Leave the stub behind ``sock`` clean (see the module docstring); what was done, in words."""
    wire = _Wire(sock, time.monotonic() + timeout)
    # \x03 stops a running VM, which says so with a stop reply (QEMU 7.2 and 10 alike; other bytes
    # stop it silently on QEMU >= 8.1); a stopped VM ignores it
    sock.sendall(b"\x03")
    synced = False
    for _ in range(3):
        wire.send(b"qC")
        while (got := wire.packet()) is not None:
            if got.startswith(b"QC"):
                synced = True
                break
        if synced:
            break
    if not synced:
        return "no answer from the stub: left as it is"
    stopped_by_us = wire.stops > 0
    for addr, kind, length in breakpoints:
        wire.reply(b"z%d,%x,%x" % (kind, addr, length))
    wire.reply(b"Qqemu.PhyMemMode:0")
    wire.send(b"qRcmd," + binascii.hexlify(b"info status"))
    text = b""
    while (got := wire.packet()) is not None:
        if is_console(got):
            text += binascii.unhexlify(got[1:])
        elif not is_stop_reply(got):
            break
    try:
        state = parse_info_status(text.decode(errors="replace"))
    except AradiaError:  # a stub that cannot say: resume, as the guardian always did then
        state = "debug"
    if state in NO_RESUME or (state not in ("debug", "running") and not stopped_by_us):
        return f"breakpoints removed; left {state} (no detach)"
    wire.reply(b"D;1")
    return f"breakpoints removed; detached ({state})"


def watch(ctl: socket.socket, stub: socket.socket) -> str:
    """Serve the tracer's notes on ``ctl`` until ``done`` or end-of-file (then :func:`rescue`), or
    until QEMU closes the stub connection (it exited: nothing is left to clean, and a watchdog that
    outlived its QEMU would only wait for the tracer's end)."""
    armed: dict[tuple[int, int, int], int] = {}
    poller = select.poll()
    poller.register(ctl, select.POLLIN)
    # never read here (the tracer reads the stub): only the peer's close is watched
    poller.register(stub, select.POLLRDHUP)
    buf = b""
    while True:
        ready = dict(poller.poll())
        if ready.get(stub.fileno(), 0) & (select.POLLRDHUP | select.POLLHUP | select.POLLERR):
            return "QEMU closed the stub connection: nothing left to clean"
        if not ready.get(ctl.fileno()):
            continue
        try:
            data = ctl.recv(65536)
        except OSError:
            data = b""
        if not data:
            break  # the tracer ended without a word: rescue
        buf += data
        *lines, buf = buf.split(b"\n")
        try:
            for line in lines:
                note = json.loads(line)
                key = tuple(note.get("bp", ()))
                if note.get("op") == "done":
                    return "the tracer left the stub clean"
                if note.get("op") == "break" and len(key) == 3:
                    armed[key] = armed.get(key, 0) + 1  # type: ignore[index]
                elif note.get("op") == "unbreak" and armed.get(key, 0) > 0:  # type: ignore[call-overload]
                    armed[key] -= 1  # type: ignore[index]
        except (ValueError, AttributeError):
            break  # a garbled note: the tracer's state is unknown, rescue
    try:
        return rescue(stub, [k for k, n in armed.items() if n > 0])  # type: ignore[misc]
    except (OSError, ConnectionError) as e:
        return f"rescue failed: {e}"


def serve(ctl_fd: int, stub_fd: int) -> int:
    """The watchdog process's body: say ready, watch, close both descriptors."""
    ctl = socket.socket(fileno=ctl_fd)
    stub = socket.socket(fileno=stub_fd)
    try:
        ctl.sendall(json.dumps({"pid": os.getpid()}).encode() + b"\n")
        watch(ctl, stub)
    finally:
        with contextlib.suppress(OSError):
            stub.close()
        with contextlib.suppress(OSError):
            ctl.close()
    return 0
