"""The connection to QEMU's GDB stub: socket, acknowledgements, packets, and exchanges that survive
a VM resumed behind our back. The lowest of the GDB client's three layers (this one, run control in
:mod:`aradia.proto.gdbrun`, the commands in :mod:`aradia.proto.gdbrsp`, whose :class:`GdbClient` is
the class to use).

What QEMU's stub does that shapes this layer (measured on QEMU 7.2, TCG):

* One client at a time; a second connection waits silently in the listen backlog, and when the
  holder leaves QEMU accepts it and *pauses the VM* (even if that client is long gone). So before
  connecting we look for an established connection to the stub in ``/proc/net``; if the stub still
  stays silent we raise :class:`Busy` and keep the queued socket in a daemon thread that, once QEMU
  accepts it, leaves the VM in the state it found (``D;1`` if the VM was running).
* Connecting pauses a running VM and announces it with a ``T02`` stop reply before anything else;
  a paused VM says nothing.
* While the VM runs, the first byte the stub receives stops it (``T02``) and is dropped: a packet
  sent to a running VM is *eaten*. ``\\x03`` sent to a stopped VM is ignored. So "make sure it is
  stopped" is ``\\x03`` followed by a ``qC`` probe, and any unexpected stop reply makes the client
  resynchronise with the probe and redo idempotent requests.
* The stub serves pipelined packets in order; keeping a window of requests in flight roughly
  doubles the throughput of bulk reads. Small writes need ``TCP_NODELAY`` or Nagle's algorithm and
  delayed ACKs cost 40 ms per exchange.
"""

from __future__ import annotations

import binascii
import contextlib
import socket
import threading
import time
from collections import deque
from collections.abc import Sequence

from aradia.errors import Busy, NotAttached, ProtocolError
from aradia.proto.gdbconn import linger_queued, parse_address, stub_held_elsewhere
from aradia.proto.gdbwire import (
    MAX_PACKET,
    StopEvent,
    checksum,
    decode_rle,
    frame,
    is_console,
    is_stop_reply,
    parse_stop_reply,
    resumes,
)

DEFAULT_TIMEOUT = 5.0
BUSY_TIMEOUT = 3.0
DEFAULT_WINDOW = 16
#: Silence after which an exchange checks (with a probe) whether a running VM ate its packet.
STALL_PROBE = 0.25
#: How long a socket left queued behind another client waits to clean up after itself.
QUEUED_SOCKET_LIFETIME = 3600.0
#: The signal of a stop that ``\\x03`` (or QEMU pausing the VM) caused.
SIGINT = 2
#: The signal of a stop at a breakpoint, watchpoint or single step.
SIGTRAP = 5
#: The resynchronisation probe: its ``QC...`` reply cannot be confused with any other reply we wait for.
PROBE = b"qC"
_MAX_CONSOLE = 1 << 20


class StubTimeout(Exception):
    """Internal to the GDB client's layers: the stub did not answer before the deadline."""


class Disturbed(Exception):
    """Internal to the GDB client's layers: a stop reply, silence, NAK or corrupt frame interrupted
    an exchange; resynchronise."""

    def __init__(self, why: str, transmission: bool = False) -> None:
        super().__init__(why)
        #: A transmission error (NAK, bad checksum) rather than a sign that the VM was running.
        self.transmission = transmission


class GdbTransport:
    """One connection to a GDB stub: connect, exchange packets, note the stops the stub reports.

    The layers above build on its protected methods: :meth:`_exchange` (a window of packets in
    flight, redone or resynchronised when the VM turns out to have been running), :meth:`_request`,
    :meth:`_read_frame` and :meth:`_send`. They provide two hooks: :meth:`_handshake` (what to learn
    right after connecting; here only ``qSupported``) and :meth:`_cleanup` (what to undo before
    leaving). The run state (``running``, the stop queue, whether to continue after a block) lives
    here because every exchange can change it; :mod:`aradia.proto.gdbrun` acts on it.
    """

    def __init__(self, address: str | tuple[str, int], *, timeout: float = DEFAULT_TIMEOUT,
                 window: int = DEFAULT_WINDOW, was_running: bool | None = None) -> None:
        """Set up the state; :meth:`_open` connects (the most derived class calls it last)."""
        self.address = address
        self.timeout = timeout
        self.window = max(1, int(window))
        self._lock = threading.RLock()
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._pos = 0
        self._ack_mode = True
        self._acks_owed = 0
        self._broken: str | None = None
        self._events: deque[StopEvent] = deque(maxlen=4096)
        self._console: deque[bytes] = deque()
        self._console_size = 0
        self._g_thread: str | None = None  # the vCPU ``Hg`` selected (QEMU moves it at a breakpoint stop)
        self._resume_on_exit = False
        #: Whether the VM is believed running (we continued it and saw no stop since).
        self.running = False
        #: Whether the VM ran when we connected (QEMU paused it then); None if nobody can tell.
        self.vm_was_running: bool | None = False
        self._was_running_hint = was_running
        #: QEMU's version (major, minor, micro) from HMP ``info version``, () if unknown.
        self.qemu_version: tuple[int, ...] = ()
        self._want_running = False
        self._connect_paused = False
        self.features: dict[str, str] = {}
        self.stop_thread: str | None = None
        #: QEMU's run state when we connected, from HMP ``info status`` ("running", "paused",
        #: "paused (debug)", "paused (prelaunch)", ...).
        self.state_at_connect = ""
        #: Whether a vanished client's breakpoint held the VM when we connected (we cleared it).
        self.cleared_stale = False

    # --- connection ----------------------------------------------------------------------------
    def _open(self, busy_timeout: float, check_busy: bool, clear_stale: bool) -> None:
        """Connect; with ``clear_stale``, clear a breakpoint stop a vanished client left behind."""
        self._connect(busy_timeout, check_busy)
        if clear_stale and "debug" in self.state_at_connect:
            self._clear_stale(busy_timeout)

    def _clear_stale(self, busy_timeout: float) -> None:
        """Detach and reconnect: a client that vanished left the VM stopped at its breakpoint.

        QEMU keeps such breakpoints armed and offers no way to list them; ``D`` removes them all
        and resumes the VM, which is what the vanished client's guest was doing before.
        """
        with self._lock:
            self._request(b"D;1" if self.multiprocess else b"D", idempotent=False)
            self._drop("detached to clear a stale breakpoint stop")
        self._broken = None
        self._buf.clear()
        self._pos = 0
        self._acks_owed = 0
        self._ack_mode = True
        self.features.clear()
        self._was_running_hint = True  # D resumed it; QEMU >= 8.1 will not say so on connect
        self._connect(busy_timeout, True)
        self.cleared_stale = True

    def _where(self) -> str:
        return f"GDB stub {self.address}"

    def _connect(self, busy_timeout: float, check_busy: bool) -> None:
        family, sockaddr = parse_address(self.address)
        if check_busy:
            grace = time.monotonic() + min(busy_timeout, 1.0)  # a client that just left may linger
            while stub_held_elsewhere(family, sockaddr):
                if time.monotonic() > grace:
                    raise Busy(f"{self._where()} is already held by another client "
                               "(QEMU serves one GDB client at a time)")
                time.sleep(0.02)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(sockaddr)  # type: ignore[arg-type]
            if family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as e:
            sock.close()
            raise NotAttached(f"cannot connect to {self._where()}: {e.strerror or e}") from e
        self._sock = sock
        hello = b"qSupported:multiprocess+;swbreak+;hwbreak+;vContSupported+"
        try:
            sock.sendall(frame(hello))
            sock.settimeout(busy_timeout)
            first = sock.recv(65536)
        except TimeoutError:
            self._sock = None
            threading.Thread(target=linger_queued, args=(sock, QUEUED_SOCKET_LIFETIME),
                             name="aradia-gdb-queued", daemon=True).start()
            raise Busy(f"{self._where()} did not answer within {busy_timeout:g} s: another client holds it "
                       "(QEMU serves one GDB client at a time)") from None
        except OSError as e:
            self._drop(f"connection to {self._where()} failed: {e.strerror or e}")
            raise NotAttached(self._broken or "") from e
        if not first:
            self._drop(f"{self._where()} closed the connection at once")
            raise NotAttached(self._broken or "")
        self._buf += first
        try:
            with self._lock:
                self._handshake()
        except BaseException:
            if self.vm_was_running and self._sock is not None:
                with contextlib.suppress(Exception):  # give back the VM our connect paused
                    self._sock.settimeout(1.0)
                    self._sock.sendall(b"+" + frame(b"D;1"))
            self._drop("handshake failed")
            raise

    def _handshake(self) -> None:
        """Read the answer to ``qSupported`` (noting the stop that connecting caused) and its features.

        Layers above extend this to learn more before the connection is handed out.
        """
        deadline = time.monotonic() + self.timeout
        while True:
            payload = self._read_frame(deadline)
            if is_stop_reply(payload):
                ev = parse_stop_reply(payload)
                if ev.ended:
                    raise NotAttached(f"{self._where()}: the VM has ended ({ev.raw})")
                self.vm_was_running = self._want_running = self._connect_paused = True
                self.stop_thread = ev.thread
                continue
            if is_console(payload):
                continue
            break
        for item in payload.decode("ascii", "replace").split(";"):
            if item.endswith(("+", "-")):
                self.features[item[:-1]] = item[-1]
            elif "=" in item:
                k, _, v = item.partition("=")
                self.features[k] = v
        if "PacketSize" not in self.features and "qXfer:features:read" not in self.features:
            raise ProtocolError(f"{self._where()} answered qSupported with {payload[:80]!r}")
        if self.features.get("QStartNoAckMode") == "+" and self._request(b"QStartNoAckMode") == b"OK":
            self._ack_mode = False
            self._acks_owed = 0

    def _settle_run_state(self, announced: bool) -> None:
        """Decide whether the VM ran when we connected, once :attr:`qemu_version` is known.

        ``announced``: the stub sent a stop reply on connect (QEMU 7.2 does for a running VM). The
        caller's ``was_running`` wins; QEMU >= 8.1 pauses a running VM on connect silently, so there
        nobody can tell without it.
        """
        if self._was_running_hint is not None:
            self.vm_was_running = self._was_running_hint
        elif not announced and self.qemu_version >= (8, 1):
            self.vm_was_running = None  # QEMU >= 8.1 pauses a running VM on connect silently
        self._want_running = self._connect_paused = bool(self.vm_was_running)

    def _cleanup(self) -> None:
        """Undo what this connection changed in the stub, before leaving it (layers above extend it)."""

    @property
    def packet_size(self) -> int:
        """The largest packet the stub accepts (``PacketSize`` of ``qSupported``)."""
        try:
            return max(256, min(int(self.features.get("PacketSize", "1000"), 16), 1 << 20))
        except ValueError:
            return 0x1000

    @property
    def multiprocess(self) -> bool:
        """Whether the stub agreed to multiprocess thread ids (``p01.02``)."""
        return self.features.get("multiprocess") == "+"

    @property
    def ack_mode(self) -> bool:
        """Whether packets are acknowledged (QEMU 7.2 always; stubs offering QStartNoAckMode not)."""
        return self._ack_mode

    def _drop(self, why: str) -> None:
        self._broken = self._broken or why
        sock, self._sock = self._sock, None
        self.running = False
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def fileno(self) -> int:
        """The connection's socket descriptor: for a second holder of the same connection that cleans
        up if this process cannot (see :mod:`aradia.trace.watchdog`)."""
        return self._alive().fileno()

    def abandon(self) -> None:
        """Close this process's descriptor of the connection without a word to the stub (no cleanup,
        no detach): for when another holder of the connection takes over."""
        with self._lock:
            self._drop("abandoned")

    def _alive(self) -> socket.socket:
        if self._sock is None:
            raise NotAttached(self._broken or f"not connected to {self._where()}")
        return self._sock

    # --- bytes on the wire ---------------------------------------------------------------------
    def _send(self, data: bytes, *, acks_first: bool = False) -> None:
        """Send bytes with the acks we owe: after ordinary packets, before run-control ones.

        Any byte reaching a running VM stops it. A trailing ack never comes first, so if the VM
        was resumed behind our back it is our ``$`` that stops it (and is eaten) — which the
        exchange notices. After ``c`` the VM runs, so there the acks must come first.
        """
        sock = self._alive()
        if self._acks_owed:
            acks = b"+" * self._acks_owed
            data = acks + data if acks_first else data + acks
            self._acks_owed = 0
        try:
            sock.sendall(data)
        except OSError as e:
            self._drop(f"{self._where()} went away ({e.strerror or e}); did QEMU exit?")
            raise NotAttached(self._broken or "") from e

    def _fill(self, deadline: float) -> None:
        sock = self._alive()
        left = deadline - time.monotonic()
        if left <= 0:
            raise StubTimeout
        if self._pos and self._pos > len(self._buf) // 2:
            del self._buf[: self._pos]
            self._pos = 0
        try:
            sock.settimeout(left)
            data = sock.recv(1 << 18)
        except TimeoutError:
            raise StubTimeout from None
        except OSError as e:
            self._drop(f"{self._where()} went away ({e.strerror or e}); did QEMU exit?")
            raise NotAttached(self._broken or "") from e
        if not data:
            self._drop(f"{self._where()} closed the connection (QEMU exited or the stub was removed)")
            raise NotAttached(self._broken or "")
        self._buf += data

    def _read_frame(self, deadline: float) -> bytes:
        """The next packet from the stub; acks are skipped, a NAK or bad checksum -> Disturbed."""
        while True:
            buf, pos = self._buf, self._pos
            start = buf.find(b"$", pos)
            junk = buf[pos:start if start >= 0 else len(buf)]
            if b"-" in junk:
                self._pos = start if start >= 0 else len(buf)
                raise Disturbed("the stub rejected a packet (NAK)", transmission=True)
            if start < 0:
                self._pos = len(buf)
            else:
                self._pos = start
                end = buf.find(b"#", start + 1)
                if end >= 0 and len(buf) >= end + 3:
                    payload = bytes(buf[start + 1:end])
                    sent_sum = bytes(buf[end + 1:end + 3])
                    self._pos = end + 3
                    if self._ack_mode:
                        self._acks_owed += 1
                    try:
                        good = int(sent_sum, 16) == checksum(payload)
                    except ValueError:
                        good = False
                    if not good:
                        raise Disturbed("a packet from the stub had a bad checksum", transmission=True)
                    return decode_rle(payload)
                if end < 0 and len(buf) - start > MAX_PACKET:
                    self._drop(f"{self._where()} sent a packet longer than {MAX_PACKET} bytes")
                    raise ProtocolError(self._broken or "")
            self._fill(deadline)

    def _note_console(self, payload: bytes) -> None:
        text = binascii.unhexlify(payload[1:])
        self._console.append(text)
        self._console_size += len(text)
        while self._console_size > _MAX_CONSOLE and self._console:
            self._console_size -= len(self._console.popleft())

    def _on_stop(self, ev: StopEvent, provoked: bool) -> None:
        """Record a stop: ours (a SIGINT we provoked) or an event for :meth:`wait_stop`."""
        self.running = False
        # QEMU points the stub's register vCPU (Hg) at the vCPU that hit a breakpoint, watchpoint or
        # step (gdb_set_stop_cpu sets g_cpu with c_cpu): no Hg needed to read its registers
        self._g_thread = ev.thread if ev.signal == SIGTRAP and ev.kind == "signal" else None
        self.stop_thread = ev.thread or self.stop_thread
        if ev.ended:
            self._events.append(ev)
            self._drop(f"{self._where()}: the VM has ended ({ev.raw})")
            raise NotAttached(self._broken or "")
        if provoked and ev.signal == SIGINT:
            self._resume_on_exit = True
        else:
            if ev.signal == SIGINT:
                self._want_running = False  # paused elsewhere (QMP stop): leave it paused
            self._events.append(ev)

    def _sync(self, interrupt: bool, deadline: float) -> list[bytes]:
        """Send ``\\x03`` (optionally) and the probe; return the replies that came before the probe's."""
        replies: list[bytes] = []
        self._send((b"\x03" if interrupt else b"") + frame(PROBE))
        for _ in range(100000):
            try:
                payload = self._read_frame(deadline)
            except Disturbed:
                continue
            if payload.startswith(b"QC"):
                return replies
            if is_stop_reply(payload):
                self._on_stop(parse_stop_reply(payload), provoked=True)
            elif is_console(payload):
                self._note_console(payload)
            else:
                replies.append(payload)
        raise ProtocolError(f"{self._where()} flooded the connection while resynchronising")

    def _exchange(self, packets: Sequence[bytes], *, idempotent: bool = True,
                  timeout: float | None = None) -> list[bytes]:
        """Send packets (a window of them in flight) and return their replies, in order.

        If the VM turns out to have been running (a stop reply arrives, so a packet may have been
        eaten) the exchange resynchronises with the probe. Replies that all arrived are kept; if
        some are missing, a lone packet is resent and a batch of idempotent packets is redone.
        """
        with self._lock:
            deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
            done: list[bytes] = []
            try:
                for _attempt in range(8):
                    todo = packets[len(done):]
                    replies: list[bytes] = []
                    progress = [0]
                    try:
                        self._pump(todo, replies, deadline, progress)
                        done += replies
                        return done
                    except Disturbed as e:
                        replies += self._sync(interrupt=True, deadline=deadline)
                        if len(replies) < progress[0] and not e.transmission:
                            # a packet reached a running VM: it stopped it and was eaten (QEMU
                            # >= 8.1 says nothing; 7.2 sent T02, already noted): it ran, so resume
                            self._resume_on_exit = True
                            self.running = False
                    if len(replies) == progress[0]:
                        done += replies  # nothing was lost: go on with the rest
                    elif len(replies) > progress[0]:
                        raise ProtocolError(f"{self._where()} sent more replies than requests")
                    elif len(todo) > 1 and not idempotent:
                        raise ProtocolError(f"{self._where()}: lost track of non-idempotent packets")
                    if len(done) == len(packets):
                        return done
            except StubTimeout:
                what = packets[len(done)][:40].decode("ascii", "replace") if packets else "?"
                self._drop(f"{self._where()} did not answer {what!r} in time; QEMU hung or stopped?")
                raise NotAttached(self._broken or "") from None
            raise ProtocolError(f"{self._where()}: could not complete an exchange (VM kept resuming?)")

    def _pump(self, packets: Sequence[bytes], replies: list[bytes], deadline: float,
              progress: list[int]) -> None:
        """Keep up to ``window`` packets in flight; ``progress[0]`` counts the packets sent."""
        n = len(packets)
        window = self.window
        refill = max(1, window // 2)  # one send per half window: each send costs ~25 us on loopback
        sent = min(window, n)
        progress[0] = sent
        self._send(b"".join([frame(p) for p in packets[:sent]]), acks_first=resumes(packets[0]))
        while len(replies) < n:
            try:
                payload = self._read_frame(min(deadline, time.monotonic() + STALL_PROBE))
            except StubTimeout:
                if time.monotonic() >= deadline:
                    raise
                raise Disturbed("no answer yet: maybe eaten by a running VM") from None
            if is_stop_reply(payload):
                self._on_stop(parse_stop_reply(payload), provoked=True)
                raise Disturbed("stop reply")
            if is_console(payload):
                self._note_console(payload)
                continue
            replies.append(payload)
            if sent < n and sent - len(replies) <= window - refill:
                more = min(n, len(replies) + window)
                self._send(b"".join([frame(p) for p in packets[sent:more]]))
                sent = more
                progress[0] = sent

    def _request(self, packet: bytes, *, idempotent: bool = True) -> bytes:
        return self._exchange([packet], idempotent=idempotent)[0]

    @property
    def console_output(self) -> bytes:
        """Console text the stub sent in ``O`` packets outside monitor commands (bounded)."""
        return b"".join(self._console)
