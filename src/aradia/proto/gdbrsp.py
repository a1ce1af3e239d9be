"""A client for QEMU's GDB stub (the GDB remote serial protocol), all-stop mode: the commands.

:class:`GdbClient` is the class to use. It is the top of three layers: the connection (socket,
acknowledgements, packets, stop replies; :mod:`aradia.proto.gdbtransport`), run control (halt,
continue, interrupt, wait, single-step packets, leaving; :mod:`aradia.proto.gdbrun`) and, here, the
commands: the target description and registers, memory, breakpoints and watchpoints, single steps
that make progress, monitor commands. The wire format is :mod:`aradia.proto.gdbwire`, busy-stub
detection :mod:`aradia.proto.gdbconn`. It satisfies :class:`aradia.proto.gdbstub_api.GdbStub`, as
the guardian's :class:`~aradia.trace.guardian.GuardedStub` does.

What QEMU's stub does that shapes the commands (measured on QEMU 7.2, TCG):

* ``p``/``P`` answer empty until the client has read ``qXfer:features:read:target.xml``; its XML
  comments hide registers; ``g`` carries cr0..cr8 and efer on x86-64.
* ``Qqemu.PhyMemMode`` and ``Qqemu.sstep`` are global stub state that outlives a connection.
* ``m`` answers at most 2048 bytes (``PacketSize`` 0x1000 / 2); in physical mode unmapped addresses
  read as zeros (no error); in virtual mode an unmapped page answers ``E14``.
"""

from __future__ import annotations

import binascii
import contextlib
import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence

from aradia.errors import AradiaError, NotRAM, PageFault, ProtocolError
from aradia.proto.gdbconn import parse_address
from aradia.proto.gdbrun import GdbRunControl
from aradia.proto.gdbstub_api import (
    BP_HARDWARE,
    BP_SOFTWARE,
    BREAKPOINT_KINDS,
    WP_ACCESS,
    WP_READ,
    WP_WRITE,
    GdbStub,
)
from aradia.proto.gdbtransport import BUSY_TIMEOUT, DEFAULT_TIMEOUT, DEFAULT_WINDOW, PROBE, SIGINT
from aradia.proto.gdbwire import (
    RegisterInfo,
    StopEvent,
    checksum,
    decode_rle,
    escape,
    frame,
    g_decoder,
    is_error,
    is_stop_reply,
    parse_stop_reply,
    parse_target_xml,
    parse_version,
    unescape,
    with_g_offsets,
)

_MAX_XML = 1 << 20
_ERRNO = {0x01: "EPERM", 0x02: "ENOENT", 0x05: "EIO", 0x0E: "EFAULT", 0x16: "EINVAL"}
_BIG_ENDIAN_ARCHES = ("s390", "powerpc:common", "powerpc:e500", "sparc", "m68k", "mips", "hppa")


class GdbClient(GdbRunControl):
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
        """Connect to the stub at ``address`` (:class:`~aradia.errors.Busy` if another client holds it).

        ``clear_stale`` detaches once (QEMU then resumes the VM) if a vanished client's breakpoint
        holds the VM; ``window`` is how many packets a bulk read keeps in flight.
        """
        super().__init__(address, timeout=timeout, window=window, was_running=was_running)
        self._breakpoints: Counter[tuple[int, int, int]] = Counter()  # (addr, kind, length) -> count
        self._m_chunk = 2048
        self._x_supported: bool | None = None
        self.architecture = ""
        self.byteorder: str = "little"
        self._regs: list[RegisterInfo] = []
        self._reg_by_name: dict[str, RegisterInfo] = {}
        self._g_size = 0
        self._g_cache: tuple[list[RegisterInfo], Callable[[bytes], dict[str, int] | None]] | None = None
        self._phys: bool | None = None
        #: registers beyond the ``g`` packet that :meth:`registers` reads (with ``p``): None reads every
        #: one the target has (an arm64 ``-cpu max`` has ~250: SVE and system registers, ~2 ms a stop)
        self.extra_registers: frozenset[str] | None = None
        self._sstep_at_connect: int | None = None
        self._sstep_changed = False
        self._open(busy_timeout, check_busy, clear_stale)

    def _handshake(self) -> None:
        """After ``qSupported``: the target description, the stub's modes, QEMU's version and run state."""
        super()._handshake()
        self._m_chunk = max(256, min(self.packet_size // 2, 1 << 16))
        self.architecture, regs = parse_target_xml(self._read_annex)
        self.byteorder = "big" if self.architecture.startswith(_BIG_ENDIAN_ARCHES) else "little"
        g = self._request(b"g")
        self._check_hex(g, "g")
        self._g_size = len(g) // 2
        self._regs = with_g_offsets(regs, self._g_size)
        self._reg_by_name = {r.name: r for r in self._regs}
        mode = self._request(b"qqemu.PhyMemMode")
        self._phys = {b"1": True, b"0": False}.get(mode)
        current = self._request(PROBE)
        if current.startswith(b"QC") and len(current) > 2:
            self.stop_thread = current[2:].decode("ascii", "replace")
        sstep = self._request(b"qqemu.sstep")
        with contextlib.suppress(ValueError):
            self._sstep_at_connect = int(sstep.decode(), 16) if sstep else None
        with contextlib.suppress(AradiaError):
            self.qemu_version = parse_version(self.monitor("info version"))
        announced = bool(self.vm_was_running)
        self._settle_run_state(announced)
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

    # --- single steps ----------------------------------------------------------------------------
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
        if ev.signal == SIGINT and not ev.ended:
            ev = self._step_packet(tid, timeout)  # the VM ran after all: the step packet was eaten
        return ev

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
        return self.registers_and_monitor(thread)[0]

    def registers_and_monitor(self, thread: str | None = None,
                              commands: Sequence[str] = ()) -> tuple[dict[str, int], str | None]:
        """All registers of a vCPU and the output of monitor ``commands`` (HMP), in one round trip.

        The ``g`` and ``qRcmd`` packets go out together and are answered in order. The output is the
        commands' text run together ("" without commands), None if the stub refused one of them.
        """
        rcmds = [b"qRcmd," + binascii.hexlify(c.encode()) for c in commands]
        with self.halted():
            sel = self._select(thread)
            self._console.clear()
            self._console_size = 0
            replies = self._exchange([*sel, b"g", *rcmds], idempotent=not rcmds)
            text: str | None = b"".join(self._console).decode("utf-8", "replace").replace("\r\n", "\n")
            self._console.clear()
            self._console_size = 0
            if sel:
                self._check_ok(replies[0], "Hg")
                self._g_thread = thread
            g = replies[len(sel)]
            self._check_hex(g, "g")
            if any(r == b"" or (r != b"OK" and is_error(r)) for r in replies[len(sel) + 1:]):
                text = None
            out = self._decode_g(g)
            wanted = self.extra_registers
            extra = [r for r in self._regs if r.offset is None and (wanted is None or r.name in wanted)][:256]
            if extra:
                for r, reply in zip(extra, self._exchange([b"p%x" % r.regnum for r in extra]), strict=True):
                    if reply and not is_error(reply):
                        value = self._decode(r, reply)
                        if value is not None:
                            out[r.name] = value
            return out, text

    def _decode_g(self, g: bytes) -> dict[str, int]:
        """The registers a ``g`` reply carries, by name (one unpack; register by register where some
        are unavailable or the reply is short)."""
        cached = getattr(self, "_g_cache", None)
        if cached is None or cached[0] is not self._regs:
            cached = self._g_cache = (self._regs, g_decoder(self._regs, self.byteorder))
        out = cached[1](g)
        if out is not None:
            return out
        out = {}
        for r in self._regs:
            if r.offset is None or 2 * (r.offset + r.size) > len(g):
                continue
            value = self._decode(r, g[2 * r.offset: 2 * (r.offset + r.size)])
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

    def write_registers(self, values: dict[str, int], thread: str | None = None) -> None:
        """Set several registers of a vCPU in one round trip (the ``P`` packets go out together)."""
        packets: list[bytes] = []
        for name, value in values.items():
            reg = self._reg(name)
            if not 0 <= value < 1 << (8 * reg.size):
                raise AradiaError(f"value {value:#x} does not fit register {name} ({reg.bitsize} bits)")
            data = value.to_bytes(reg.size, self.byteorder)  # type: ignore[arg-type]
            packets.append(b"P%x=%s" % (reg.regnum, binascii.hexlify(data)))
        if not packets:
            return
        with self.halted():
            sel = self._select(thread)
            replies = self._exchange([*sel, *packets])
            if sel:
                self._check_ok(replies[0], "Hg")
                self._g_thread = thread
            for name, reply in zip(values, replies[len(sel):], strict=True):
                self._check_ok(reply, f"P{self._reg(name).regnum:x} ({name})")

    def resume(self, registers: dict[str, int] | None = None, thread: str | None = None) -> None:
        """Write ``registers`` of the stopped vCPU ``thread`` (none: nothing to write) and let every
        vCPU run; the next stop comes from :meth:`wait_stop`.

        Moving only the program counter of the vCPU that stopped (a breakpoint's usual exit) is one
        packet, ``c ADDR``: QEMU sets the PC of that vCPU (the one it reported stopping, its continue
        vCPU) and continues, with no reply to wait for. Other writes cost one round trip, then ``c``.
        """
        regs = dict(registers or {})
        with self._lock:
            pc = self._pc_name() if regs else ""
            if (regs.keys() == {pc} and not self.running and not self._halt_depth
                    and (thread is None or thread == self.stop_thread)):
                reg = self._reg(pc)
                if not 0 <= regs[pc] < 1 << (8 * reg.size):
                    raise AradiaError(f"value {regs[pc]:#x} does not fit register {pc} ({reg.bitsize} bits)")
                self._want_running = True
                self._connect_paused = False
                self._continue(regs[pc])
                return
            self.write_registers(regs, thread)
            self.cont()

    def wait_stop(self, timeout: float, *, registers: bool = False) -> StopEvent | None:
        """The next stop event (see :meth:`GdbRunControl.wait_stop`); with ``registers`` it carries the
        stopped vCPU's registers (:attr:`StopEvent.registers`): the expedited ones when the stop reply
        holds every register of the ``g`` packet, else read with ``g`` at once."""
        ev = super().wait_stop(timeout)
        if ev is None or not registers or ev.ended:
            return ev
        regs = self._decode_expedited(ev.expedited)
        if regs is None:
            regs = self.registers(ev.thread)
        return dataclasses.replace(ev, registers=regs)

    def _decode_expedited(self, expedited: dict[int, bytes]) -> dict[str, int] | None:
        """Registers by name from a stop reply's expedited values; None unless they cover every
        register the ``g`` packet carries (a partial set would leave the caller without cr3 or gs_base)."""
        if not expedited:
            return None
        out: dict[str, int] = {}
        for r in self._regs:
            hexdata = expedited.get(r.regnum)
            if hexdata is None or len(hexdata) != 2 * r.size:
                if r.offset is not None:
                    return None
                continue
            value = self._decode(r, hexdata)
            if value is not None:
                out[r.name] = value
        return out

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
                    if len(reply) != 2 * n or is_error(reply):
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
        if is_error(reply):
            code = reply[1:].decode("ascii", "replace")
            name = _ERRNO.get(int(code, 16), "") if len(code) == 2 else ""
            return AradiaError(f"{self._where()} refused the memory {what} at {addr:#x}+{size:#x}: "
                               f"E{code}{' (' + name + ')' if name else ''}")
        return ProtocolError(f"{self._where()} answered a memory {what} at {addr:#x} with {reply[:40]!r}")

    # --- breakpoints ---------------------------------------------------------------------------
    def set_breakpoint(self, addr: int, kind: int = BP_SOFTWARE, length: int = 1) -> None:
        """Insert a breakpoint or watchpoint at ``addr`` (``Z``): ``kind`` :data:`BP_SOFTWARE`,
        :data:`BP_HARDWARE`, or a watchpoint on ``length`` bytes: :data:`WP_WRITE`, :data:`WP_READ`,
        :data:`WP_ACCESS`.

        Addresses are guest-virtual. Under TCG a software breakpoint plants no 0xCC: it is invisible
        to the guest.
        """
        if kind not in BREAKPOINT_KINDS or addr < 0 or not 0 < length <= 1 << 20:
            raise AradiaError(f"bad breakpoint Z{kind},{addr:#x},{length:#x}")
        with self.halted():
            reply = self._request(b"Z%d,%x,%x" % (kind, addr, length), idempotent=False)
            if reply == b"":
                raise AradiaError(f"{self._where()} does not support breakpoints of kind {kind}")
            self._check_ok(reply, f"Z{kind} at {addr:#x}")
            self._breakpoints[(addr, kind, length)] += 1

    def remove_breakpoint(self, addr: int, kind: int = BP_SOFTWARE, length: int = 1) -> None:
        """Remove a breakpoint or watchpoint set with :meth:`set_breakpoint` (``z``)."""
        with self.halted():
            reply = self._request(b"z%d,%x,%x" % (kind, addr, length), idempotent=False)
            self._check_ok(reply, f"z{kind} at {addr:#x}")
            key = (addr, kind, length)
            if self._breakpoints[key] > 0:
                self._breakpoints[key] -= 1
            if self._breakpoints[key] <= 0:
                del self._breakpoints[key]

    @property
    def breakpoints(self) -> list[tuple[int, int, int]]:
        """The (address, kind, length) of breakpoints this client inserted, one entry per insertion
        (the arguments of :meth:`set_breakpoint`, in its order)."""
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
            self._check_monitor(reply, command)
            return text.replace("\r\n", "\n")

    def _check_monitor(self, reply: bytes, command: str) -> None:
        if reply == b"":
            raise AradiaError(f"{self._where()} does not support monitor commands")
        if reply != b"OK" and is_error(reply):
            raise AradiaError(f"{self._where()} refused monitor command {command!r}: {reply.decode()}")

    # --- helpers -------------------------------------------------------------------------------
    def _check_ok(self, reply: bytes, what: str) -> None:
        if reply != b"OK":
            said = reply[:40].decode("ascii", "replace") or "unsupported"
            raise AradiaError(f"{self._where()} refused {what}: {said}")

    def _check_hex(self, reply: bytes, what: str) -> None:
        if not reply or is_error(reply) or len(reply) % 2:
            said = reply[:40].decode("ascii", "replace") or "empty reply"
            raise AradiaError(f"{self._where()} refused {what}: {said}")

    # --- leaving -------------------------------------------------------------------------------
    def _cleanup(self) -> None:
        """Remove our breakpoints, leave physical mode, restore the single-step flags."""
        for addr, kind, length in list(self._breakpoints.elements()):
            with contextlib.suppress(AradiaError):
                self._check_ok(self._request(b"z%d,%x,%x" % (kind, addr, length), idempotent=False), "z")
        self._breakpoints.clear()
        if self._phys:
            with contextlib.suppress(AradiaError):
                self._set_phys(False)
        if self._sstep_changed and self._sstep_at_connect is not None:
            with contextlib.suppress(AradiaError):
                self._request(b"Qqemu.sstep=%x" % self._sstep_at_connect)


__all__ = [
    "BP_HARDWARE",
    "BP_SOFTWARE",
    "WP_ACCESS",
    "WP_READ",
    "WP_WRITE",
    "GdbClient",
    "GdbStub",
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
