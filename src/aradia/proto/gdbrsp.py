"""A client for QEMU's GDB stub (the GDB remote serial protocol), all-stop mode.

What QEMU's stub does that shapes this client (measured on QEMU 7.2, TCG):

* One client at a time; a second connection waits silently in the listen backlog, and when the
  holder leaves QEMU accepts it and *pauses the VM* (even if that client is long gone). So before
  connecting we look for an established connection to the stub in ``/proc/net``; if the stub still
  stays silent we raise :class:`Busy` and keep the queued socket in a daemon thread that, once QEMU
  accepts it, leaves the VM in the state it found (``D;1`` if the VM was running).
* Connecting pauses a running VM and announces it with a ``T02`` stop reply before anything else;
  a paused VM says nothing. ``D`` always resumes the VM, whatever its state before.
* While the VM runs, the first byte the stub receives stops it (``T02``) and is dropped: a packet
  sent to a running VM is *eaten*. ``\\x03`` sent to a stopped VM is ignored. So "make sure it is
  stopped" is ``\\x03`` followed by a ``qC`` probe, and any unexpected stop reply makes the client
  resynchronise with the probe and redo idempotent requests.
* ``Qqemu.PhyMemMode`` and ``Qqemu.sstep`` are global stub state that outlives a connection.
* ``m`` answers at most 2048 bytes (``PacketSize`` 0x1000 / 2); in physical mode unmapped addresses
  read as zeros (no error); in virtual mode an unmapped page answers ``E14``.
* The stub serves pipelined packets in order; keeping a window of requests in flight roughly
  doubles the throughput of bulk reads. Small writes need ``TCP_NODELAY`` or Nagle's algorithm and
  delayed ACKs cost 40 ms per exchange.
"""

from __future__ import annotations

import binascii
import contextlib
import re
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence

from aradia.errors import AradiaError, Busy, NotAttached, NotRAM, PageFault, ProtocolError
from aradia.proto.gdbconn import linger_queued, parse_address, stub_held_elsewhere
from aradia.proto.gdbwire import (
    MAX_PACKET,
    RegisterInfo,
    StopEvent,
    checksum,
    decode_rle,
    escape,
    frame,
    is_console,
    is_stop_reply,
    parse_stop_reply,
    parse_target_xml,
    parse_version,
    resumes,
    unescape,
    with_g_offsets,
)

DEFAULT_TIMEOUT = 5.0
BUSY_TIMEOUT = 3.0
DEFAULT_WINDOW = 16
#: Silence after which an exchange checks (with a probe) whether a running VM ate its packet.
STALL_PROBE = 0.25
#: How long a socket left queued behind another client waits to clean up after itself.
QUEUED_SOCKET_LIFETIME = 3600.0

# Breakpoint kinds of the Z/z packets.
BP_SOFTWARE = 0
BP_HARDWARE = 1
WP_WRITE = 2
WP_READ = 3
WP_ACCESS = 4
_BP_KINDS = {BP_SOFTWARE, BP_HARDWARE, WP_WRITE, WP_READ, WP_ACCESS}

_SIGINT = 2
_PROBE = b"qC"  # its "QC..." reply cannot be confused with any other reply we wait for
_MAX_XML = 1 << 20
_MAX_CONSOLE = 1 << 20
_ERR_RE = re.compile(rb"^E(?:[0-9a-fA-F]{2}$|\.)")
_ERRNO = {0x01: "EPERM", 0x02: "ENOENT", 0x05: "EIO", 0x0E: "EFAULT", 0x16: "EINVAL"}
_BIG_ENDIAN_ARCHES = ("s390", "powerpc:common", "powerpc:e500", "sparc", "m68k", "mips", "hppa")





class _Timeout(Exception):
    """Internal: the stub did not answer before the deadline."""


class _Disturbed(Exception):
    """Internal: a stop reply, silence, NAK or corrupt frame interrupted an exchange; resynchronise."""

    def __init__(self, why: str, transmission: bool = False) -> None:
        super().__init__(why)
        #: A transmission error (NAK, bad checksum) rather than a sign that the VM was running.
        self.transmission = transmission


class GdbClient:
    """A thread-safe client for QEMU's GDB stub.

    ``address`` is ``host:port``, ``tcp:host:port``, ``unix:/path``, a socket path or ``(host, port)``.
    Connecting pauses a running VM (QEMU does); :attr:`vm_was_running` tells whether it ran, and
    :meth:`restore_run_state` continues it. QEMU 7.2 announces that pause with a ``T02``; QEMU 8.1
    and later say nothing, so there the caller passes ``was_running`` (QMP ``query-status`` just
    before connecting) or the VM is taken as paused. Memory and register calls work whether the
    VM runs or not: on a running VM they stop it, do their work and continue it (:meth:`halted`).
    """

    def __init__(self, address: str | tuple[str, int], *, timeout: float = DEFAULT_TIMEOUT,
                 busy_timeout: float = BUSY_TIMEOUT, window: int = DEFAULT_WINDOW,
                 check_busy: bool = True, clear_stale: bool = True,
                 was_running: bool | None = None) -> None:
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
        self._g_thread: str | None = None
        self._halt_depth = 0
        self._resume_on_exit = False
        self._breakpoints: Counter[tuple[int, int, int]] = Counter()
        self._m_chunk = 2048
        self._x_supported: bool | None = None
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
        self.architecture = ""
        self.byteorder: str = "little"
        self._regs: list[RegisterInfo] = []
        self._reg_by_name: dict[str, RegisterInfo] = {}
        self._g_size = 0
        self._phys: bool | None = None
        self._sstep_at_connect: int | None = None
        self._sstep_changed = False
        self.stop_thread: str | None = None
        #: QEMU's run state when we connected, from HMP ``info status`` ("running", "paused",
        #: "paused (debug)", "paused (prelaunch)", ...).
        self.state_at_connect = ""
        #: Whether a vanished client's breakpoint held the VM when we connected (we cleared it).
        self.cleared_stale = False
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

    # --- connection ----------------------------------------------------------------------------
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
        self._m_chunk = max(256, min(self.packet_size // 2, 1 << 16))
        if self.features.get("QStartNoAckMode") == "+" and self._request(b"QStartNoAckMode") == b"OK":
            self._ack_mode = False
            self._acks_owed = 0
        self.architecture, regs = parse_target_xml(self._read_annex)
        self.byteorder = "big" if self.architecture.startswith(_BIG_ENDIAN_ARCHES) else "little"
        g = self._request(b"g")
        self._check_hex(g, "g")
        self._g_size = len(g) // 2
        self._regs = with_g_offsets(regs, self._g_size)
        self._reg_by_name = {r.name: r for r in self._regs}
        mode = self._request(b"qqemu.PhyMemMode")
        self._phys = {b"1": True, b"0": False}.get(mode)
        current = self._request(_PROBE)
        if current.startswith(b"QC") and len(current) > 2:
            self.stop_thread = current[2:].decode("ascii", "replace")
        sstep = self._request(b"qqemu.sstep")
        with contextlib.suppress(ValueError):
            self._sstep_at_connect = int(sstep.decode(), 16) if sstep else None
        with contextlib.suppress(AradiaError):
            self.qemu_version = parse_version(self.monitor("info version"))
        announced = self.vm_was_running
        if self._was_running_hint is not None:
            self.vm_was_running = self._was_running_hint
        elif not announced and self.qemu_version >= (8, 1):
            self.vm_was_running = None  # QEMU >= 8.1 pauses a running VM on connect silently
        self._want_running = self._connect_paused = bool(self.vm_was_running)
        if announced:
            self.state_at_connect = "running"
        else:
            with contextlib.suppress(AradiaError):
                status = self.monitor("info status")
                self.state_at_connect = status.partition("VM status:")[2].strip() or status.strip()

    def _read_annex(self, annex: str) -> bytes:
        out = bytearray()
        chunk = max(256, self.packet_size - 5)
        while len(out) <= _MAX_XML:
            reply = self._request(b"qXfer:features:read:%s:%x,%x" % (annex.encode(), len(out), chunk))
            if not reply or reply[:1] not in (b"m", b"l"):
                raise ProtocolError(f"{self._where()} cannot read target description {annex}: {reply[:40]!r}")
            data = unescape(reply[1:])
            out += data
            if reply[:1] == b"l":
                return bytes(out)
            if not data:
                raise ProtocolError(f"{self._where()} sent an empty, unfinished {annex}")
        raise ProtocolError(f"{self._where()}: target description {annex} is larger than {_MAX_XML} bytes")

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
            raise _Timeout
        if self._pos and self._pos > len(self._buf) // 2:
            del self._buf[: self._pos]
            self._pos = 0
        try:
            sock.settimeout(left)
            data = sock.recv(1 << 18)
        except TimeoutError:
            raise _Timeout from None
        except OSError as e:
            self._drop(f"{self._where()} went away ({e.strerror or e}); did QEMU exit?")
            raise NotAttached(self._broken or "") from e
        if not data:
            self._drop(f"{self._where()} closed the connection (QEMU exited or the stub was removed)")
            raise NotAttached(self._broken or "")
        self._buf += data

    def _read_frame(self, deadline: float) -> bytes:
        """The next packet from the stub; acks are skipped, a NAK or bad checksum -> _Disturbed."""
        while True:
            buf, pos = self._buf, self._pos
            start = buf.find(b"$", pos)
            junk = buf[pos:start if start >= 0 else len(buf)]
            if b"-" in junk:
                self._pos = start if start >= 0 else len(buf)
                raise _Disturbed("the stub rejected a packet (NAK)", transmission=True)
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
                        raise _Disturbed("a packet from the stub had a bad checksum", transmission=True)
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
        self._g_thread = None
        self.stop_thread = ev.thread or self.stop_thread
        if ev.ended:
            self._events.append(ev)
            self._drop(f"{self._where()}: the VM has ended ({ev.raw})")
            raise NotAttached(self._broken or "")
        if provoked and ev.signal == _SIGINT:
            self._resume_on_exit = True
        else:
            if ev.signal == _SIGINT:
                self._want_running = False  # paused elsewhere (QMP stop): leave it paused
            self._events.append(ev)

    def _sync(self, interrupt: bool, deadline: float) -> list[bytes]:
        """Send ``\\x03`` (optionally) and the probe; return the replies that came before the probe's."""
        replies: list[bytes] = []
        self._send((b"\x03" if interrupt else b"") + frame(_PROBE))
        for _ in range(100000):
            try:
                payload = self._read_frame(deadline)
            except _Disturbed:
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
                    except _Disturbed as e:
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
            except _Timeout:
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
            except _Timeout:
                if time.monotonic() >= deadline:
                    raise
                raise _Disturbed("no answer yet: maybe eaten by a running VM") from None
            if is_stop_reply(payload):
                self._on_stop(parse_stop_reply(payload), provoked=True)
                raise _Disturbed("stop reply")
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
            except _Timeout:
                break
            except _Disturbed:
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
        except _Timeout:
            self._drop(f"{self._where()} did not stop the VM within {self.timeout:g} s; QEMU hung?")
            raise NotAttached(self._broken or "") from None
        stopped_it = self._resume_on_exit
        self._resume_on_exit = before or stopped_it
        self.running = False
        return stopped_it

    def _continue(self) -> None:
        self._g_thread = None
        self._send(frame(b"c"), acks_first=True)
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
                return StopEvent("signal", _SIGINT, self.stop_thread, {}, "T02")
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
                except _Timeout:
                    payload = None
                except _Disturbed:
                    payload = None
                if payload is not None:
                    if is_stop_reply(payload):
                        self._on_stop(parse_stop_reply(payload), provoked=False)
                    elif is_console(payload):
                        self._note_console(payload)
            time.sleep(0)

    def step(self, thread: str | None = None, *, timeout: float | None = None,
             until_pc_changes: bool = False, max_attempts: int = 8) -> StopEvent:
        """Single-step one vCPU (``vCont;s:TID``) and return the stop reply.

        QEMU sometimes returns from a step with the PC unchanged; with ``until_pc_changes`` the step
        is repeated (at most ``max_attempts`` times) until it moved.
        """
        with self._lock:
            if self.running:
                raise AradiaError("the VM is running: interrupt() it before stepping")
            tid = thread or self.stop_thread
            pc = self._pc_name()
            before = self.read_register(pc, tid) if until_pc_changes else None
            ev = None
            for _ in range(max(1, max_attempts)):
                ev = self._step_once(tid, self.timeout if timeout is None else timeout)
                if before is None or ev.ended or self.read_register(pc, ev.thread or tid) != before:
                    break
            assert ev is not None
            return ev

    def _pc_name(self) -> str:
        for name in ("rip", "pc", "eip"):
            if name in self._reg_by_name:
                return name
        raise AradiaError(f"{self._where()}: no program counter in the register map")

    def _step_once(self, tid: str | None, timeout: float) -> StopEvent:
        ev = self._step_packet(tid, timeout)
        if ev.signal == _SIGINT and not ev.ended:
            ev = self._step_packet(tid, timeout)  # the VM ran after all: the step packet was eaten
        return ev

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
                elif payload == b"" or _ERR_RE.match(payload):
                    self.running = False
                    raise ProtocolError(f"{self._where()} refused {packet.decode()}: {payload!r}")
        except _Disturbed:
            pass
        except _Timeout:
            self._ensure_stopped()
            self._resume_on_exit = False
            raise AradiaError(f"single step on {tid or 'the current vCPU'} did not finish within "
                              f"{timeout:g} s (vCPU halted with interrupts masked?); VM stopped") from None
        raise ProtocolError(f"{self._where()}: garbled reply to a single step")

    def sstep_bits(self) -> dict[str, int]:
        """QEMU's single-step flag names and values (``qqemu.sstepbits``): ENABLE, NOIRQ, NOTIMER."""
        reply = self.request(b"qqemu.sstepbits").decode("ascii", "replace")
        out = {}
        for item in reply.split(",")[:32]:
            k, _, v = item.partition("=")
            with contextlib.suppress(ValueError):
                out[k] = int(v.removeprefix("0x"), 16)
        return out

    def sstep_flags(self) -> int:
        """The current single-step flags (``qqemu.sstep``)."""
        reply = self.request(b"qqemu.sstep")
        try:
            return int(reply.decode(), 16)
        except ValueError:
            raise ProtocolError(f"{self._where()} answered qqemu.sstep with {reply[:40]!r}") from None

    def set_sstep_flags(self, flags: int) -> None:
        """Set the single-step flags (``Qqemu.sstep=``); restored on close."""
        self._check_ok(self.request(b"Qqemu.sstep=%x" % flags), "Qqemu.sstep")
        self._sstep_changed = True

    # --- threads and registers -----------------------------------------------------------------
    def threads(self) -> list[str]:
        """The vCPU thread ids (``p01.01``, ``p01.02``, ...)."""
        out: list[str] = []
        with self.halted():
            reply = self._request(b"qfThreadInfo")
            for _ in range(4096):
                if not reply.startswith(b"m"):
                    break
                out += [t for t in reply[1:].decode("ascii", "replace").split(",") if t]
                reply = self._request(b"qsThreadInfo")
        return out

    def _select(self, thread: str | None) -> list[bytes]:
        if thread is None or thread == self._g_thread:
            return []
        return [b"Hg%s" % thread.encode()]

    @property
    def register_map(self) -> list[RegisterInfo]:
        """The registers of the target description, by number."""
        return list(self._regs)

    def _decode(self, reg: RegisterInfo, hexdata: bytes) -> int | None:
        if b"x" in hexdata:
            return None
        return int.from_bytes(binascii.unhexlify(hexdata), self.byteorder)  # type: ignore[arg-type]

    def registers(self, thread: str | None = None) -> dict[str, int]:
        """All registers of a vCPU (``g``, decoded with the target description; cr0..cr8, efer on x86)."""
        with self.halted():
            sel = self._select(thread)
            replies = self._exchange([*sel, b"g"])
            if sel:
                self._check_ok(replies[0], "Hg")
                self._g_thread = thread
            g = replies[-1]
            self._check_hex(g, "g")
            out: dict[str, int] = {}
            for r in self._regs:
                if r.offset is None or 2 * (r.offset + r.size) > len(g):
                    continue
                value = self._decode(r, g[2 * r.offset: 2 * (r.offset + r.size)])
                if value is not None:
                    out[r.name] = value
            extra = [r for r in self._regs if r.offset is None][:256]
            if extra:
                for r, reply in zip(extra, self._exchange([b"p%x" % r.regnum for r in extra]), strict=True):
                    if reply and not _ERR_RE.match(reply):
                        value = self._decode(r, reply)
                        if value is not None:
                            out[r.name] = value
            return out

    def _reg(self, name: str) -> RegisterInfo:
        try:
            return self._reg_by_name[name.lower()]
        except KeyError:
            raise AradiaError(f"{self._where()} has no register {name!r}") from None

    def read_register(self, name: str, thread: str | None = None) -> int:
        """One register of a vCPU (``p``)."""
        reg = self._reg(name)
        with self.halted():
            sel = self._select(thread)
            replies = self._exchange([*sel, b"p%x" % reg.regnum])
            if sel:
                self._check_ok(replies[0], "Hg")
                self._g_thread = thread
            reply = replies[-1]
            self._check_hex(reply, f"p{reg.regnum:x} ({name})")
            value = self._decode(reg, reply)
            if value is None:
                raise AradiaError(f"{self._where()}: register {name} is unavailable")
            return value

    def write_register(self, name: str, value: int, thread: str | None = None) -> None:
        """Set one register of a vCPU (``P``)."""
        reg = self._reg(name)
        if not 0 <= value < 1 << (8 * reg.size):
            raise AradiaError(f"value {value:#x} does not fit register {name} ({reg.bitsize} bits)")
        data = value.to_bytes(reg.size, self.byteorder)  # type: ignore[arg-type]
        with self.halted():
            sel = self._select(thread)
            replies = self._exchange([*sel, b"P%x=%s" % (reg.regnum, binascii.hexlify(data))])
            if sel:
                self._check_ok(replies[0], "Hg")
                self._g_thread = thread
            self._check_ok(replies[-1], f"P{reg.regnum:x} ({name})")

    # --- memory --------------------------------------------------------------------------------
    def _set_phys(self, physical: bool) -> None:
        if self._phys is physical or (self._phys is None and not physical):
            return  # None: the stub has no physical mode, so it always reads virtual addresses
        reply = self._request(b"Qqemu.PhyMemMode:%d" % int(physical))
        if reply != b"OK":
            raise AradiaError(f"{self._where()} has no physical-memory mode "
                              f"(Qqemu.PhyMemMode answered {reply[:40]!r})")
        self._phys = physical

    def read_memory(self, addr: int, size: int, *, physical: bool = False) -> bytes:
        """Read guest memory, virtual (through the selected vCPU's page tables) or physical.

        Physical reads of addresses that are not RAM return zeros on QEMU 7.2 (the stub reports no
        error): check addresses against the RAM map (see :class:`~aradia.sources.gdbstub.GdbMemory`).
        """
        if size < 0 or addr < 0 or addr + size > 1 << 64:
            raise AradiaError(f"bad memory range {addr:#x}+{size:#x}")
        if size == 0:
            return b""
        out = bytearray()
        with self.halted():
            self._set_phys(physical)
            chunk = self._m_chunk
            batch = chunk * 512  # bounded batches: memory stays ~ the result, not 3x it
            for start in range(addr, addr + size, batch):
                stop = min(addr + size, start + batch)
                pieces = [(a, min(chunk, stop - a)) for a in range(start, stop, chunk)]
                replies = self._exchange([b"m%x,%x" % piece for piece in pieces])
                if chunk > 2048 and replies[0] == b"E22":
                    self._m_chunk = 2048  # a stub advertising a bigger PacketSize than its m limit
                    return self.read_memory(addr, size, physical=physical)
                for (a, n), reply in zip(pieces, replies, strict=True):
                    if len(reply) != 2 * n or _ERR_RE.match(reply):
                        raise self._memory_error(a, n, reply, physical)
                try:
                    out += binascii.unhexlify(b"".join(replies))
                except binascii.Error:
                    raise ProtocolError(f"{self._where()} sent non-hex memory near {start:#x}") from None
        return bytes(out)

    def write_memory(self, addr: int, data: bytes, *, physical: bool = False) -> None:
        """Write guest memory (``X`` with escaping if the stub has it, else hex ``M``).

        Under TCG such writes also invalidate code QEMU already translated from those bytes.
        """
        if addr < 0 or addr + len(data) > 1 << 64:
            raise AradiaError(f"bad memory range {addr:#x}+{len(data):#x}")
        if not data:
            return
        with self.halted():
            self._set_phys(physical)
            if self._x_supported is None:
                self._x_supported = self._request(b"X%x,0:" % addr) == b"OK"
            room = self.packet_size - 40
            packets: list[bytes] = []
            pos = 0
            while pos < len(data):
                a = addr + pos
                if self._x_supported:
                    n, body = self._fit_escaped(data, pos, room)
                    packets.append(b"X%x,%x:" % (a, n) + body)
                else:
                    n = min(room // 2, len(data) - pos)
                    packets.append(b"M%x,%x:%s" % (a, n, binascii.hexlify(data[pos:pos + n])))
                pos += n
            replies = self._exchange(packets)
            for pkt, reply in zip(packets, replies, strict=True):
                if reply != b"OK":
                    a, n = (int(x, 16) for x in pkt[1:pkt.index(b":")].split(b","))
                    raise self._memory_error(a, n, reply, physical, write=True)

    @staticmethod
    def _fit_escaped(data: bytes, pos: int, room: int) -> tuple[int, bytes]:
        n = min(room, len(data) - pos)
        body = escape(data[pos:pos + n])
        while len(body) > room:
            n = max(1, n * room // len(body) - 1)
            body = escape(data[pos:pos + n])
        return n, body

    def _memory_error(self, addr: int, size: int, reply: bytes, physical: bool,
                      write: bool = False) -> AradiaError:
        what = "write" if write else "read"
        if reply == b"E14" or reply == b"E0e":
            if physical:
                return NotRAM(addr, size, f"GDB stub {what} failed with EFAULT")
            root = 0
            with contextlib.suppress(AradiaError):
                root = self.read_register("cr3", self._g_thread) if "cr3" in self._reg_by_name else 0
            return PageFault(addr, root, f"GDB stub {what} of {size:#x} bytes (EFAULT)")
        if _ERR_RE.match(reply):
            code = reply[1:].decode("ascii", "replace")
            name = _ERRNO.get(int(code, 16), "") if len(code) == 2 else ""
            return AradiaError(f"{self._where()} refused the memory {what} at {addr:#x}+{size:#x}: "
                               f"E{code}{' (' + name + ')' if name else ''}")
        return ProtocolError(f"{self._where()} answered a memory {what} at {addr:#x} with {reply[:40]!r}")

    # --- breakpoints ---------------------------------------------------------------------------
    def set_breakpoint(self, kind: int, addr: int, length: int = 1) -> None:
        """Insert a breakpoint/watchpoint: ``kind`` 0 sw, 1 hw, 2 write, 3 read, 4 access (``Z``).

        Addresses are guest-virtual. Under TCG, kind 0 plants no 0xCC: it is invisible to the guest.
        """
        if kind not in _BP_KINDS or addr < 0 or not 0 < length <= 1 << 20:
            raise AradiaError(f"bad breakpoint Z{kind},{addr:#x},{length:#x}")
        with self.halted():
            reply = self._request(b"Z%d,%x,%x" % (kind, addr, length), idempotent=False)
            if reply == b"":
                raise AradiaError(f"{self._where()} does not support breakpoints of kind {kind}")
            self._check_ok(reply, f"Z{kind} at {addr:#x}")
            self._breakpoints[(kind, addr, length)] += 1

    def remove_breakpoint(self, kind: int, addr: int, length: int = 1) -> None:
        """Remove a breakpoint set with :meth:`set_breakpoint` (``z``)."""
        with self.halted():
            reply = self._request(b"z%d,%x,%x" % (kind, addr, length), idempotent=False)
            self._check_ok(reply, f"z{kind} at {addr:#x}")
            key = (kind, addr, length)
            if self._breakpoints[key] > 0:
                self._breakpoints[key] -= 1
            if self._breakpoints[key] <= 0:
                del self._breakpoints[key]

    @property
    def breakpoints(self) -> list[tuple[int, int, int]]:
        """The (kind, address, length) of breakpoints this client inserted, one entry per insertion."""
        return list(self._breakpoints.elements())

    # --- monitor -------------------------------------------------------------------------------
    def monitor(self, command: str, timeout: float | None = None) -> str:
        """Run a QEMU HMP command through the stub (``qRcmd``) and return its output."""
        with self.halted():
            self._console.clear()
            self._console_size = 0
            reply = self._exchange([b"qRcmd," + binascii.hexlify(command.encode())], idempotent=False,
                                   timeout=timeout)[0]
            text = b"".join(self._console).decode("utf-8", "replace")
            self._console.clear()
            self._console_size = 0
            if reply == b"":
                raise AradiaError(f"{self._where()} does not support monitor commands")
            if reply != b"OK" and _ERR_RE.match(reply):
                raise AradiaError(f"{self._where()} refused monitor command {command!r}: {reply.decode()}")
            return text.replace("\r\n", "\n")

    # --- helpers -------------------------------------------------------------------------------
    def _check_ok(self, reply: bytes, what: str) -> None:
        if reply != b"OK":
            said = reply[:40].decode("ascii", "replace") or "unsupported"
            raise AradiaError(f"{self._where()} refused {what}: {said}")

    def _check_hex(self, reply: bytes, what: str) -> None:
        if not reply or _ERR_RE.match(reply) or len(reply) % 2:
            said = reply[:40].decode("ascii", "replace") or "empty reply"
            raise AradiaError(f"{self._where()} refused {what}: {said}")

    # --- leaving -------------------------------------------------------------------------------
    def _cleanup(self) -> None:
        for kind, addr, length in list(self._breakpoints.elements()):
            with contextlib.suppress(AradiaError):
                self._check_ok(self._request(b"z%d,%x,%x" % (kind, addr, length), idempotent=False), "z")
        self._breakpoints.clear()
        if self._phys:
            with contextlib.suppress(AradiaError):
                self._set_phys(False)
        if self._sstep_changed and self._sstep_at_connect is not None:
            with contextlib.suppress(AradiaError):
                self._request(b"Qqemu.sstep=%x" % self._sstep_at_connect)

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

    def __enter__(self) -> GdbClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def console_output(self) -> bytes:
        """Console text the stub sent in ``O`` packets outside monitor commands (bounded)."""
        return b"".join(self._console)


__all__ = [
    "BP_HARDWARE",
    "BP_SOFTWARE",
    "WP_ACCESS",
    "WP_READ",
    "WP_WRITE",
    "GdbClient",
    "RegisterInfo",
    "StopEvent",
    "checksum",
    "decode_rle",
    "escape",
    "frame",
    "is_stop_reply",
    "parse_address",
    "parse_stop_reply",
    "parse_target_xml",
    "unescape",
]
