"""Run control of QEMU's GDB stub: hold the VM stopped for a block, continue it, interrupt it, wait
for its stops, single-step one vCPU, and leave it as found. The middle of the GDB client's three
layers (over the connection of :mod:`aradia.proto.gdbtransport`, under the commands of
:mod:`aradia.proto.gdbrsp`).

What QEMU's stub does that shapes this layer (measured on QEMU 7.2, TCG): a packet reaching a
running VM stops it and is eaten, so every command runs inside :meth:`GdbRunControl.halted`, which
stops a running VM first and continues it afterwards. ``D`` (detach) always resumes the VM, whatever
its state before, so a VM found paused is left by closing the connection without ``D``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Self

from aradia.errors import AradiaError, NotAttached, ProtocolError
from aradia.proto.gdbtransport import (
    DEFAULT_TIMEOUT,
    DEFAULT_WINDOW,
    SIGINT,
    Disturbed,
    GdbTransport,
    StubTimeout,
)
from aradia.proto.gdbwire import StopEvent, frame, is_console, is_error, is_stop_reply, parse_stop_reply


class GdbRunControl(GdbTransport):
    """Run control over a :class:`GdbTransport`; use :class:`aradia.proto.gdbrsp.GdbClient`."""

    def __init__(self, address: str | tuple[str, int], *, timeout: float = DEFAULT_TIMEOUT,
                 window: int = DEFAULT_WINDOW, was_running: bool | None = None) -> None:
        """Set up the state (see :class:`GdbTransport`); nothing is connected yet."""
        super().__init__(address, timeout=timeout, window=window, was_running=was_running)
        self._halt_depth = 0  # nesting of halted() blocks

    # --- packets with the VM held -------------------------------------------------------------
    def request(self, packet: str | bytes) -> bytes:
        """Send one packet (a query or command with a single reply) and return the reply payload.

        Not for packets answered by a stop reply (``c``, ``s``, ``vCont``, ``?``): see :meth:`cont`,
        :meth:`step`. The VM is stopped for the exchange and continued afterwards if it ran.
        """
        data = packet.encode() if isinstance(packet, str) else packet
        with self.halted():
            return self._request(data, idempotent=False)

    # --- run state -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def halted(self) -> Iterator[None]:
        """Hold the VM stopped (and the client locked) for the block; continue it after if it ran."""
        with self._lock:
            outer = self._halt_depth == 0
            if outer:
                self._resume_on_exit = False
                self._drain_async()
                if self.running:
                    self._ensure_stopped()
            self._halt_depth += 1
            try:
                yield
            finally:
                self._halt_depth -= 1
                if outer and self._resume_on_exit and self._sock is not None:
                    self._resume_on_exit = False
                    self._continue()

    def _drain_async(self) -> None:
        """Take in stop replies that arrived unread (a QMP ``stop``, a breakpoint hit): not ours.

        Without this, a stop made elsewhere just before our ``\\x03`` would look like our own
        interrupt and we would continue a VM someone else paused.
        """
        sock = self._sock
        if sock is None:
            return
        try:
            sock.setblocking(False)
            for _ in range(64):
                data = sock.recv(1 << 18)
                if not data:
                    self._drop(f"{self._where()} closed the connection (QEMU exited or the stub was removed)")
                    raise NotAttached(self._broken or "")
                self._buf += data
        except BlockingIOError:
            pass
        except OSError as e:
            self._drop(f"{self._where()} went away ({e.strerror or e}); did QEMU exit?")
            raise NotAttached(self._broken or "") from e
        for _ in range(4096):
            try:
                payload = self._read_frame(0.0)
            except StubTimeout:
                break
            except Disturbed:
                continue
            if is_stop_reply(payload):
                self._on_stop(parse_stop_reply(payload), provoked=False)
            elif is_console(payload):
                self._note_console(payload)

    def _ensure_stopped(self) -> bool:
        """Stop the VM if it runs; True if it was running (a SIGINT stop of ours came back)."""
        before = self._resume_on_exit
        self._resume_on_exit = False
        try:
            self._sync(interrupt=True, deadline=time.monotonic() + self.timeout)
        except StubTimeout:
            self._drop(f"{self._where()} did not stop the VM within {self.timeout:g} s; QEMU hung?")
            raise NotAttached(self._broken or "") from None
        stopped_it = self._resume_on_exit
        self._resume_on_exit = before or stopped_it
        self.running = False
        return stopped_it

    def _continue(self, at: int | None = None) -> None:
        """``c``, or ``c ADDR``: continue with the PC of the stub's continue vCPU (the one that
        stopped last) set to ``at``."""
        self._g_thread = None
        self._send(frame(b"c" if at is None else b"c%x" % at), acks_first=True)
        self.running = True

    def interrupt(self) -> StopEvent | None:
        """Stop the VM (``\\x03``); return the stop it reported, or None if it was not running."""
        with self._lock:
            self._want_running = False
            self._connect_paused = False
            self._resume_on_exit = False
            self._drain_async()
            self._ensure_stopped()
            stopped = self._resume_on_exit
            self._resume_on_exit = False
            if stopped:
                return StopEvent("signal", SIGINT, self.stop_thread, {}, "T02")
            return None

    def cont(self) -> None:
        """Continue all vCPUs (``c``); the next stop comes from :meth:`wait_stop`."""
        with self._lock:
            self._want_running = True
            self._connect_paused = False
            if self._halt_depth:
                self._resume_on_exit = True  # let the enclosing halted() block continue it
                return
            if not self.running:
                self._continue()

    def restore_run_state(self) -> None:
        """Continue the VM if only our connecting paused it (QEMU stops a running VM on connect)."""
        with self._lock:
            if self._connect_paused and not self.running and not self._halt_depth:
                self._connect_paused = False
                self._continue()

    def wait_stop(self, timeout: float) -> StopEvent | None:
        """The next stop event (breakpoint, watchpoint, stop from elsewhere); None after ``timeout``.

        Returns at once with None if the VM is stopped and no event is pending. The client stays
        usable from other threads meanwhile (the lock is released between short waits).
        """
        end = time.monotonic() + max(0.0, timeout)
        while True:
            with self._lock:
                if self._events:
                    return self._events.popleft()
                if not self.running:
                    return None
                now = time.monotonic()
                if now >= end:
                    return None
                try:
                    payload = self._read_frame(min(end, now + 0.05))
                except StubTimeout:
                    payload = None
                except Disturbed:
                    payload = None
                if payload is not None:
                    if is_stop_reply(payload):
                        self._on_stop(parse_stop_reply(payload), provoked=False)
                        if self._events:
                            return self._events.popleft()  # at once: yielding the CPU here costs a hit
                    elif is_console(payload):
                        self._note_console(payload)
            time.sleep(0)  # (lock released: another thread may take its turn)

    def _step_packet(self, tid: str | None, timeout: float) -> StopEvent:
        packet = b"vCont;s:%s" % tid.encode() if tid else b"s"
        self._g_thread = None
        deadline = time.monotonic() + timeout
        self._send(frame(packet), acks_first=True)
        self.running = True
        try:
            for _ in range(100000):
                payload = self._read_frame(deadline)
                if is_stop_reply(payload):
                    ev = parse_stop_reply(payload)
                    self.running = False
                    self._g_thread = None
                    self.stop_thread = ev.thread or self.stop_thread
                    if ev.ended:
                        self._on_stop(ev, provoked=False)
                    return ev
                if is_console(payload):
                    self._note_console(payload)
                elif payload == b"" or is_error(payload):
                    self.running = False
                    raise ProtocolError(f"{self._where()} refused {packet.decode()}: {payload!r}")
        except Disturbed:
            pass
        except StubTimeout:
            self._ensure_stopped()
            self._resume_on_exit = False
            raise AradiaError(f"single step on {tid or 'the current vCPU'} did not finish within "
                              f"{timeout:g} s (vCPU halted with interrupts masked?); VM stopped") from None
        raise ProtocolError(f"{self._where()}: garbled reply to a single step")

    # --- leaving -------------------------------------------------------------------------------
    def detach(self) -> None:
        """Remove our breakpoints, restore stub modes and detach (``D;1``); QEMU then resumes the VM."""
        self._leave(resume=True)

    def close(self, resume: bool | None = None) -> None:
        """Leave the stub clean: breakpoints removed, physical mode and step flags restored.

        ``resume`` None leaves the VM running if it ran when we connected or was continued since
        (and nobody else paused it meanwhile), paused otherwise. A paused VM is left by closing
        the connection without ``D``, because ``D`` always resumes the VM.
        """
        self._leave(resume)

    def _leave(self, resume: bool | None) -> None:
        with self._lock:
            if self._sock is None:
                return
            try:
                self._drain_async()  # a QMP stop we have not read yet decides what "as found" means
                self._resume_on_exit = False
                if self.running:
                    self._ensure_stopped()
                self._cleanup()  # its packets may find the VM resumed behind our back: that counts
                ran = self._resume_on_exit
                self._resume_on_exit = False
                if (self._want_running or ran) if resume is None else resume:
                    reply = self._request(b"D;1" if self.multiprocess else b"D", idempotent=False)
                    if reply != b"OK":
                        raise ProtocolError(f"{self._where()} refused to detach: {reply[:40]!r}")
            except NotAttached:
                if resume:
                    raise
            finally:
                self._drop("closed")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

