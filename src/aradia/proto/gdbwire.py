"""The GDB remote serial protocol on the wire: framing, escapes, stop replies, target descriptions.

Pure functions over bytes, shared by the GDB client's layers (:mod:`aradia.proto.gdbtransport`,
:mod:`aradia.proto.gdbrun`, :mod:`aradia.proto.gdbrsp`).
"""

from __future__ import annotations

import binascii
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from aradia.errors import ProtocolError

_MAX_XML_FILES = 32
MAX_PACKET = 1 << 20  # a frame longer than this is not from a sane stub
_HEX = b"0123456789abcdefABCDEF"
_STOP_RE = re.compile(rb"^(?:[TS][0-9a-fA-F]{2}|[WX][0-9a-fA-F]{2}(?:;|$))")
_ERROR_RE = re.compile(rb"^E(?:[0-9a-fA-F]{2}$|\.)")


def checksum(payload: bytes) -> int:
    """The RSP checksum: sum of the payload bytes modulo 256.

    Summing 4 KiB in Python costs more than the rest of a packet's handling, so long payloads are
    summed by zlib: the low half of Adler-32 is ``1 + sum mod 65521``, exact while a chunk's sum
    stays below 65521 (512 ASCII bytes, 256 arbitrary bytes).
    """
    n = len(payload)
    if n < 128:
        return sum(payload) & 0xFF
    step = 512 if payload.isascii() else 256
    adler = zlib.adler32
    total = sum([adler(payload[i:i + step]) & 0xFFFF for i in range(0, n, step)])
    return (total - (n + step - 1) // step) & 0xFF


def frame(payload: bytes) -> bytes:
    """``$payload#cs`` — the caller escapes binary data first (see :func:`escape`)."""
    return b"$%s#%02x" % (payload, checksum(payload))


def escape(data: bytes) -> bytes:
    """Escape ``#``, ``$``, ``}`` and ``*`` as ``}`` followed by the byte XOR 0x20 (binary packets)."""
    if not any(c in data for c in b"#$}*"):
        return data
    out = bytearray()
    for c in data:
        if c in b"#$}*":
            out += bytes((0x7D, c ^ 0x20))
        else:
            out.append(c)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    """Undo :func:`escape` (binary replies such as ``qXfer``)."""
    if b"}" not in data:
        return data
    out = bytearray()
    it = iter(data)
    for c in it:
        if c == 0x7D:
            nxt = next(it, None)
            if nxt is None:
                raise ProtocolError("GDB stub sent a binary reply ending in an escape byte")
            out.append(nxt ^ 0x20)
        else:
            out.append(c)
    return bytes(out)


def decode_rle(payload: bytes, limit: int = MAX_PACKET) -> bytes:
    """Expand run-length encoding: ``X*n`` repeats ``X`` ``ord(n) - 29`` more times."""
    if b"*" not in payload:
        return payload
    out = bytearray()
    i = 0
    while i < len(payload):
        c = payload[i]
        if c == 0x2A:
            if not out or i + 1 >= len(payload):
                raise ProtocolError("GDB stub sent a malformed run-length encoding")
            count = payload[i + 1] - 29
            if count < 0:
                raise ProtocolError("GDB stub sent a negative run length")
            out += bytes((out[-1],)) * count
            i += 2
        else:
            out.append(c)
            i += 1
        if len(out) > limit:
            raise ProtocolError("GDB stub sent a run-length-encoded reply that expands beyond limits")
    return bytes(out)


def is_stop_reply(payload: bytes) -> bool:
    """Whether a payload is a stop reply (``T05...``, ``S05``, ``W00``, ``X09``)."""
    return bool(_STOP_RE.match(payload))


def is_error(payload: bytes) -> bool:
    """Whether a reply is an error: ``ENN`` (two hex digits, an errno) or ``E.text``."""
    return bool(_ERROR_RE.match(payload))


def resumes(packet: bytes) -> bool:
    """Whether a packet lets the VM run (after it, any byte we send would stop the VM again)."""
    return packet[:1] in (b"c", b"C", b"s", b"S", b"D") or packet.startswith(b"vCont;")


def is_console(payload: bytes) -> bool:
    """``O<hex>`` console output (``OK`` is not: K is no hex digit)."""
    return (len(payload) > 1 and payload[0] == 0x4F and len(payload) % 2 == 1
            and not payload[1:].translate(None, _HEX))


@dataclass(frozen=True)
class StopEvent:
    """A stop reply: why the VM stopped (or that it ended)."""

    #: ``"signal"`` (T/S packets), ``"exited"`` (W) or ``"terminated"`` (X).
    kind: str
    #: The signal number (5 = SIGTRAP: breakpoint/step, 2 = SIGINT: interrupted), or the exit status.
    signal: int
    #: The stopped vCPU's thread id (``p01.02``) when the stub names it.
    thread: str | None
    #: Other ``key:value`` pairs (``watch``, ``rwatch``, ``awatch``, ``swbreak``, register numbers, ...).
    info: dict[str, str] = field(default_factory=dict)
    raw: str = ""
    #: The stopped vCPU's registers by name, when they came with the stop: all of them, either
    #: expedited in the stop reply or fetched by the client right at the stop (``wait_stop(...,
    #: registers=True)``); None when nobody fetched them.
    registers: dict[str, int] | None = field(default=None, compare=False)

    @property
    def expedited(self) -> dict[int, bytes]:
        """Registers the stub expedited in the stop reply (``T05 06:0000..;07:...``): register
        number -> the value's hex digits in target byte order. Empty when it sent none (QEMU does not)."""
        return expedited_registers(self.info)

    @property
    def watch_address(self) -> int | None:
        """The data address of a watchpoint hit, if this stop is one."""
        for key in ("watch", "rwatch", "awatch"):
            if key in self.info:
                try:
                    return int(self.info[key], 16)
                except ValueError:
                    return None
        return None

    @property
    def watch_kind(self) -> str | None:
        """``watch`` (write), ``rwatch`` (read) or ``awatch`` (access) for a watchpoint hit, else None."""
        return next((key for key in ("watch", "rwatch", "awatch") if key in self.info), None)

    @property
    def ended(self) -> bool:
        """Whether the VM (the debugged process) is gone."""
        return self.kind in ("exited", "terminated")


def expedited_registers(info: dict[str, str]) -> dict[int, bytes]:
    """The ``NN:hexvalue`` pairs of a stop reply's fields: register number -> hex digits.

    A key is a register number when it is all hex digits (``watch``, ``thread``, ``core``... are not;
    a key such as ``ab`` would be, which the protocol rules out by naming no other field that way).
    A value that is not an even number of hex digits (``xx`` marks an unavailable byte) is skipped.
    """
    out: dict[int, bytes] = {}
    for key, value in info.items():
        if not key or len(key) > 8 or key.strip("0123456789abcdefABCDEF"):
            continue
        raw = value.encode("ascii", "replace")
        if raw and len(raw) % 2 == 0 and not raw.translate(None, _HEX):
            out[int(key, 16)] = raw
    return out


def parse_stop_reply(payload: bytes) -> StopEvent:
    """Parse a stop reply; :class:`ProtocolError` if it is not one."""
    if not is_stop_reply(payload):
        raise ProtocolError(f"not a GDB stop reply: {payload[:60]!r}")
    text = payload.decode("ascii", "replace")
    code = int(text[1:3], 16)
    kind = {"T": "signal", "S": "signal", "W": "exited", "X": "terminated"}[text[0]]
    info: dict[str, str] = {}
    thread = None
    rest = text[3:]
    for part in rest.split(";")[:64]:
        if not part:
            continue
        key, _, value = part.partition(":")
        if key == "thread":
            thread = value
        else:
            info[key] = value
    return StopEvent(kind, code, thread, info, text)


@dataclass(frozen=True)
class RegisterInfo:
    """One register of the target description."""

    name: str
    regnum: int
    bitsize: int
    type: str = ""
    group: str = ""
    #: Byte offset in the ``g`` packet, or None if ``g`` does not carry it (read it with ``p``).
    offset: int | None = None

    @property
    def size(self) -> int:
        """Size in bytes."""
        return (self.bitsize + 7) // 8


_COMMENT = re.compile(rb"<!--.*?-->", re.S)
_TAG = re.compile(rb"<\s*(reg|xi:include|architecture)\b([^>]*)>(?:([^<]*)</architecture>)?", re.S)
_ATTR = re.compile(rb"""([\w:.-]+)\s*=\s*(?:"([^"]*)"|'([^']*)')""")


def parse_target_xml(read: Callable[[str], bytes],
                     annex: str = "target.xml") -> tuple[str, list[RegisterInfo]]:
    """Build (architecture, registers) from a target description, following ``xi:include``.

    ``read(annex)`` returns the raw XML of one annex. XML comments are stripped first: QEMU's x86
    description comments out ``cs_base``..``es_base`` inside a comment that spans several ``<reg>``.
    """
    arch = ""
    regs: list[RegisterInfo] = []
    seen: set[str] = set()
    next_num = 0

    def walk(name: str, depth: int) -> None:
        nonlocal arch, next_num
        if depth > 8 or len(seen) >= _MAX_XML_FILES or name in seen:
            raise ProtocolError(f"GDB target description includes too many files (at {name})")
        seen.add(name)
        text = _COMMENT.sub(b"", read(name))
        for m in _TAG.finditer(text):
            attrs = {a.group(1).decode(): (a.group(2) if a.group(2) is not None else a.group(3)).decode()
                     for a in _ATTR.finditer(m.group(2))}
            tag = m.group(1)
            if tag == b"architecture":
                arch = (m.group(3) or b"").decode().strip()
            elif tag == b"xi:include":
                href = attrs.get("href", "")
                if not re.fullmatch(r"[\w.+-]+", href):
                    raise ProtocolError(f"GDB target description includes a strange annex {href!r}")
                walk(href, depth + 1)
            else:
                try:
                    num = int(attrs["regnum"], 0) if "regnum" in attrs else next_num
                    bits = int(attrs["bitsize"])
                    reg_name = attrs["name"].lower()
                except (KeyError, ValueError) as e:
                    raise ProtocolError(f"GDB target description has a bad <reg> ({e})") from e
                if not 0 < bits <= 4096 or not 0 <= num < 100000:
                    raise ProtocolError(f"GDB target description has an absurd register {reg_name}")
                regs.append(RegisterInfo(reg_name, num, bits, attrs.get("type", ""), attrs.get("group", "")))
                next_num = num + 1

    walk(annex, 0)
    regs.sort(key=lambda r: r.regnum)
    return arch, regs


def with_g_offsets(regs: list[RegisterInfo], g_size: int) -> list[RegisterInfo]:
    """Assign ``g``-packet offsets to registers numbered contiguously from 0 that fit in ``g_size``."""
    out = []
    offset = 0
    expect = 0
    for r in regs:
        if r.regnum == expect and offset + r.size <= g_size:
            out.append(RegisterInfo(r.name, r.regnum, r.bitsize, r.type, r.group, offset))
            offset += r.size
            expect += 1
        else:
            expect = -1
            out.append(r)
    return out


def g_decoder(regs: list[RegisterInfo], byteorder: str) -> Callable[[bytes], dict[str, int] | None]:
    """A decoder of ``g`` replies for the registers that have a ``g`` offset (:func:`with_g_offsets`).

    It unpacks the whole reply with one :class:`struct.Struct` (about 4x faster than one
    ``int.from_bytes`` per register, which a breakpoint hit pays for all 66 x86-64 registers); it
    returns None where it cannot serve (a reply with unavailable ``xx`` bytes, or shorter than the
    layout), and the caller decodes register by register instead.
    """
    placed = sorted((r for r in regs if r.offset is not None), key=lambda r: r.offset or 0)
    fmt, names, wide, at = ["<" if byteorder == "little" else ">"], [], [], 0
    for r in placed:
        assert r.offset is not None
        if r.offset < at:  # overlapping registers: no single layout
            return lambda _g: None
        fmt.append("x" * (r.offset - at) + {1: "B", 2: "H", 4: "I", 8: "Q"}.get(r.size, f"{r.size}s"))
        names.append(r.name)
        if r.size not in (1, 2, 4, 8):
            wide.append(r.name)
        at = r.offset + r.size
    layout = struct.Struct("".join(fmt))

    def decode(hexdata: bytes) -> dict[str, int] | None:
        try:
            raw = binascii.unhexlify(hexdata)
        except binascii.Error:  # "xx": a register the stub cannot read
            return None
        if len(raw) < layout.size:
            return None
        out = dict(zip(names, layout.unpack_from(raw), strict=True))
        for name in wide:
            out[name] = int.from_bytes(out[name], byteorder)  # type: ignore[arg-type]
        return out

    return decode


def parse_version(text: str) -> tuple[int, ...]:
    """``7.2.22 (Debian 1:7.2+dfsg-7+deb12u18)`` -> (7, 2, 22)."""
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(x) for x in m.groups() if x is not None) if m else ()
