"""The kernel's own symbol table (kallsyms), recovered from guest memory.

One module past 500 lines on purpose: decoding the tables and finding them in RAM both rest on the
same layout knowledge below (table order per kernel version, alignment, marker spacing), which
changes in one place when a kernel changes it.

``scripts/kallsyms`` compiles every vmlinux symbol into a few ``.rodata`` tables; ``/proc/kallsyms``
(the vmlinux part) prints them back in table order, which is address order. The tables, all aligned
to 8 bytes, as Linux 5.10 to 6.12 lay them out:

* ``kallsyms_offsets`` (s32 each; base-relative kernels, every x86-64 one since 4.6) followed by
  ``kallsyms_relative_base`` (u64), or ``kallsyms_addresses`` (u64 each) on kernels without
  ``CONFIG_KALLSYMS_BASE_RELATIVE``. With ``--absolute-percpu`` (x86-64 SMP) an offset ``>= 0`` is
  an absolute value (a per-CPU offset) and a negative one means ``relative_base - 1 - off``; without
  it the offset is unsigned and added to the base.
* ``kallsyms_num_syms`` (u32), ``kallsyms_names``: per symbol a length (one byte, or two when
  ``len & 0x80``: ULEB128, the "big symbol" encoding of 6.1+) and that many token indexes. The
  first character of the expanded name is the type letter ``/proc/kallsyms`` prints.
* ``kallsyms_markers``: the names offset of every 256th symbol (u32; u64 on old kernels).
* ``kallsyms_seqs_of_names`` (6.2+, and the 6.1.y backport): the name-sorted permutation; 3 bytes
  per symbol at first, a u32 later. Not needed for decoding.
* ``kallsyms_token_table``: 256 NUL-terminated tokens, ``kallsyms_token_index``: 256 u16 offsets.

Up to 6.11 they come in the order above (offsets first); 6.12 (Debian's, measured) emits
``num_syms``, names, markers, token table and index first and the offsets and relative base after
them. :func:`locate_tables` accepts either order.

Every count and length read from the guest is bounded, and the decoded table is checked (markers
agree with the names stream, addresses are sorted, type letters are letters), so corrupt memory
gives :class:`~aradia.errors.GuestDataCorrupt` naming what is wrong instead of a wrong table.
"""

from __future__ import annotations

import bisect
import hashlib
import re
import struct
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import NamedTuple

from aradia.errors import AradiaError, GuestDataCorrupt
from aradia.sources.base import PhysicalMemory

Reader = Callable[[int, int], bytes]
"""``read(address, size) -> bytes`` in whatever address space the tables were located in."""

MAX_SYMS = 1 << 21
MAX_WALK = 1 << 24  # names-stream entries walked over all wrong guesses while locating the tables
MAX_NAMES_BYTES = 64 << 20
MAX_TOKEN_TABLE = 64 << 10
KSYM_NAME_LEN = 512
TYPE_CHARS = frozenset(b"AaBbCcDdGgIiNnPpRrSsTtUuVvWw?-")
DIGIT_TOKENS = b"".join(b"%d\0" % d for d in range(10))  # tokens '0'..'9' sit at indexes 0x30..0x39
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


class KallsymsError(GuestDataCorrupt):
    """The kallsyms tables in memory are missing or do not decode consistently."""


class KSym(NamedTuple):
    """One line of ``/proc/kallsyms``: address, type letter and name."""

    address: int
    type: str
    name: str


@dataclass(frozen=True)
class KallsymsTables:
    """Where the kallsyms tables are, in the address space of the reader that found them."""

    num_syms: int
    names: int
    markers: int
    token_table: int
    token_index: int
    offsets: int | None = None
    relative_base: int | None = None
    addresses: int | None = None
    seqs_of_names: int | None = None
    count: int = 0
    marker_size: int = 4

    def shifted(self, delta: int) -> KallsymsTables:
        """The same tables ``delta`` bytes further (e.g. physical -> virtual)."""
        def s(v: int | None) -> int | None:
            return None if v is None else (v + delta) & 0xFFFF_FFFF_FFFF_FFFF

        def m(v: int) -> int:
            return (v + delta) & 0xFFFF_FFFF_FFFF_FFFF

        return replace(self, num_syms=m(self.num_syms), names=m(self.names),
                       markers=m(self.markers), token_table=m(self.token_table),
                       token_index=m(self.token_index), offsets=s(self.offsets),
                       relative_base=s(self.relative_base), addresses=s(self.addresses),
                       seqs_of_names=s(self.seqs_of_names))

    def to_dict(self) -> dict[str, int | None]:
        """Plain fields (for the profile cache)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict[str, int | None]) -> KallsymsTables:
        """Inverse of :meth:`to_dict`."""
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})  # type: ignore[arg-type]


@dataclass
class NameTable:
    """The decoded names and type letters, independent of where the kernel was loaded (cacheable)."""

    names: list[str]
    types: str
    digest: str  # of the token table and the names stream: identifies the table in memory


def _align8(x: int) -> int:
    return (x + 7) & ~7


def read_tokens(read: Reader, token_table: int, token_index: int) -> list[bytes]:
    """The 256 expanded tokens."""
    size = token_index - token_table
    if not 0 < size <= MAX_TOKEN_TABLE:
        raise KallsymsError(f"kallsyms token table size {size} is implausible")
    table = read(token_table, size)
    index = struct.unpack("<256H", read(token_index, 512))
    tokens = []
    for i, off in enumerate(index):
        end = table.find(b"\0", off)
        if off >= size or end < 0 or end - off > KSYM_NAME_LEN:
            raise KallsymsError(f"kallsyms token {i} at offset {off} is outside the token table")
        tokens.append(table[off:end])
    return tokens


def _check_token_index(table: bytes, index: tuple[int, ...]) -> bool:
    """Whether ``index`` describes ``table`` (consecutive NUL-terminated tokens from offset 0)."""
    if index[0] != 0:
        return False
    pos = 0
    for off in index:
        if off != pos:
            return False
        end = table.find(b"\0", pos)
        if end < 0 or end - pos > KSYM_NAME_LEN:
            return False
        pos = end + 1
    return pos == len(table)


class _BadStream(KallsymsError):
    """A names stream that does not decode; ``at`` is how many symbols were walked first."""

    def __init__(self, msg: str, at: int) -> None:
        super().__init__(msg)
        self.at = at


def _skip_names(stream: bytes | memoryview, count: int, tokens: list[bytes] | None,
                heads: list[int] | None = None) -> tuple[list[int], int]:
    """Walk ``count`` entries of a names stream; returns (marker offsets, end offset).

    With ``tokens``, every entry's first token must expand to a valid type letter (cheap rejection
    of a wrong guess at where the stream starts). ``heads`` receives the offset of every length byte.
    """
    pos = 0
    n = len(stream)
    ok = [True] * 256 if tokens is None else [bool(t) and t[0] in TYPE_CHARS for t in tokens]
    starts = [0] * count
    i = 0
    try:
        for i in range(count):
            starts[i] = pos
            length = stream[pos]
            if length & 0x80:
                length = (length & 0x7F) | (stream[pos + 1] << 7)
                pos += 2
            else:
                pos += 1
            if not length or not ok[stream[pos]]:
                raise _BadStream(f"kallsyms symbol {i} has no type letter or a zero length", i)
            pos += length
    except IndexError:
        raise _BadStream(f"kallsyms names stream ends inside symbol {i} of {count}", i) from None
    if pos > n:
        raise _BadStream(f"kallsyms names stream ends inside symbol {count - 1} of {count}", count)
    if heads is not None:
        heads.extend(starts)
    return starts[::256], pos


_SEP, _SKIP = 256, 257  # pseudo-tokens: a newline before each symbol, nothing for a 2nd length byte


def decode_names(read: Reader, t: KallsymsTables) -> NameTable:
    """Decode every name and type letter (the expensive, KASLR-independent part)."""
    count = t.count
    if not 0 < count <= MAX_SYMS:
        raise KallsymsError(f"kallsyms_num_syms = {count} is implausible")
    size = t.markers - t.names
    if not 0 < size <= MAX_NAMES_BYTES:
        raise KallsymsError(f"kallsyms names stream size {size} is implausible")
    tokens = read_tokens(read, t.token_table, t.token_index)
    if any(b"\n" in tok for tok in tokens):
        raise KallsymsError("a kallsyms token contains a newline")
    stream = read(t.names, size)
    heads: list[int] = []
    marks, end = _skip_names(stream, count, tokens, heads)
    if _align8(t.names + end) != t.markers:
        raise KallsymsError(f"kallsyms names end at {t.names + end:#x}, markers start at {t.markers:#x}")
    _check_markers(read, t, marks)
    # Expand the whole stream in one pass: length bytes become newlines (or nothing), every other
    # byte its token; then split. Much faster than expanding symbol by symbol.
    codes = array("H", iter(stream[:end]))
    for p in heads:
        if codes[p] & 0x80:
            codes[p + 1] = _SKIP
        codes[p] = _SEP
    table = [*tokens, b"\n", b""]
    text = b"".join(map(table.__getitem__, codes)).decode("utf-8", "replace")
    lines = text.split("\n")
    if len(lines) != count + 1 or lines[0]:
        raise KallsymsError("kallsyms names do not expand to one line per symbol")
    del lines[0]
    if "" in lines:
        raise KallsymsError("a kallsyms name expands to nothing")
    types = "".join([s[0] for s in lines])
    names = [s[1:] for s in lines]
    return NameTable(names, types, _digest(read, t, stream))


def _digest(read: Reader, t: KallsymsTables, stream: bytes | None = None) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(struct.pack("<I", t.count))
    h.update(read(t.token_table, t.token_index + 512 - t.token_table))
    h.update(stream if stream is not None else read(t.names, t.markers - t.names))
    return h.hexdigest()


def names_digest(read: Reader, t: KallsymsTables) -> str:
    """The digest :func:`decode_names` gives (of the token tables and the names stream), without
    decoding: a cached :class:`NameTable` with this digest is the table at ``t``."""
    size = t.markers - t.names
    if not 0 < size <= MAX_NAMES_BYTES or not 0 < t.token_index - t.token_table <= MAX_TOKEN_TABLE:
        raise KallsymsError("kallsyms table layout is implausible")
    return _digest(read, t)


def _check_markers(read: Reader, t: KallsymsTables, marks: list[int]) -> None:
    raw = read(t.markers, len(marks) * t.marker_size)
    fmt = f"<{len(marks)}{'I' if t.marker_size == 4 else 'Q'}"
    found = list(struct.unpack(fmt, raw))
    if found != marks:
        bad = next(i for i, (a, b) in enumerate(zip(found, marks, strict=True)) if a != b)
        raise KallsymsError(f"kallsyms_markers[{bad}] = {found[bad]:#x} but the names stream has "
                            f"symbol {bad * 256} at {marks[bad]:#x}")


def read_addresses(read: Reader, t: KallsymsTables) -> list[int]:
    """Every symbol's address, in table order (checked to be sorted, as the kernel emits them)."""
    n = t.count
    if not 0 < n <= MAX_SYMS:
        raise KallsymsError(f"kallsyms_num_syms = {n} is implausible")
    if t.addresses is not None:
        addrs = list(array("Q", read(t.addresses, 8 * n)))
    elif t.offsets is not None and t.relative_base is not None:
        base = _U64.unpack(read(t.relative_base, 8))[0]
        offs = array("i", read(t.offsets, 4 * n))
        # Absolute-percpu layout: off >= 0 is a value, off < 0 is base - 1 - off. Plain
        # base-relative: base + (u32)off. The right reading is the one that gives sorted addresses.
        addrs = [o if o >= 0 else base - 1 - o for o in offs] if min(offs) < 0 else []
        if not addrs or not _sorted(addrs):
            plain = [base + (o & 0xFFFFFFFF) for o in offs]
            if _sorted(plain) or not addrs:
                addrs = plain
        if max(addrs) >= 1 << 64 or min(addrs) < 0:
            raise KallsymsError("kallsyms offsets give addresses outside 64 bits")
    else:
        raise KallsymsError("kallsyms tables have neither offsets nor addresses")
    if not _sorted(addrs):
        bad = next(i for i in range(1, n) if addrs[i] < addrs[i - 1])
        raise KallsymsError(f"kallsyms addresses are not sorted (symbol {bad}: {addrs[bad]:#x} after "
                            f"{addrs[bad - 1]:#x})")
    return addrs


def _sorted(a: list[int]) -> bool:
    return a == sorted(a)


def symbols(names: NameTable, addrs: list[int]) -> list[KSym]:
    """Combine names and addresses into ``/proc/kallsyms`` lines."""
    if len(addrs) != len(names.names):
        raise KallsymsError(f"{len(addrs)} kallsyms addresses for {len(names.names)} names")
    return list(map(KSym, addrs, names.types, names.names))


class SymbolTable:
    """The kallsyms table: addresses (sorted), type letters and names, with lookups both ways."""

    def __init__(self, addresses: list[int], types: str, names: list[str]) -> None:
        if not len(addresses) == len(types) == len(names):
            raise KallsymsError("kallsyms addresses, types and names differ in length")
        self.addresses = addresses
        self.types = types
        self.names = names
        self._first: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> KSym:
        return KSym(self.addresses[i], self.types[i], self.names[i])

    def __iter__(self) -> Iterator[KSym]:
        return map(KSym, self.addresses, self.types, self.names)

    def _index(self) -> dict[str, int]:
        if self._first is None:
            n = len(self.names)
            # dict() keeps the last value of a repeated key: feed it backwards to keep the first.
            self._first = dict(zip(reversed(self.names), range(n - 1, -1, -1), strict=True))
        return self._first

    def index_of(self, name: str) -> int | None:
        """Index of the first symbol called ``name`` (``/proc/kallsyms`` order), or None."""
        return self._index().get(name)

    def address(self, name: str) -> int | None:
        """Address of the first symbol called ``name``, or None."""
        i = self._index().get(name)
        return None if i is None else self.addresses[i]

    def all_named(self, name: str) -> list[int]:
        """Indexes of every symbol called ``name``."""
        if name not in self._index():
            return []
        return [i for i, n in enumerate(self.names) if n == name]

    def size(self, i: int) -> int:
        """Distance to the next higher address (0 for the last symbol)."""
        a = self.addresses[i]
        j = bisect.bisect_right(self.addresses, a, lo=i)
        return self.addresses[j] - a if j < len(self.addresses) else 0

    def containing(self, address: int) -> list[int]:
        """Indexes of the symbols whose ``[address, next address)`` range contains ``address``."""
        j = bisect.bisect_right(self.addresses, address)
        if j == 0 or j >= len(self.addresses):
            return []
        start = self.addresses[j - 1]
        i = bisect.bisect_left(self.addresses, start)
        return list(range(i, j))

    def proc_kallsyms(self) -> str:
        """The text ``cat /proc/kallsyms`` prints for vmlinux."""
        return format_proc_kallsyms(list(self))


def read_kallsyms(read: Reader, t: KallsymsTables) -> list[KSym]:
    """Decode the whole table at ``t``: what ``/proc/kallsyms`` prints for vmlinux, in order."""
    return symbols(decode_names(read, t), read_addresses(read, t))


def format_proc_kallsyms(syms: list[KSym]) -> str:
    """The text ``cat /proc/kallsyms`` prints for these symbols."""
    return "".join(f"{s.address:016x} {s.type} {s.name}\n" for s in syms)


# --- locating the tables -----------------------------------------------------------------------------

def tables_from_symbols(read: Reader, sym: Callable[[str], int | None]) -> KallsymsTables:
    """Tables from known symbol addresses (VMCOREINFO's ``SYMBOL(kallsyms_*)``, 6.0+)."""
    need = {k: sym(f"kallsyms_{k}") for k in ("names", "num_syms", "token_table", "token_index")}
    missing = [k for k, v in need.items() if v is None]
    if missing:
        raise KallsymsError("VMCOREINFO lacks " + ", ".join(f"kallsyms_{k}" for k in missing))
    count = _U32.unpack(read(need["num_syms"], 4))[0]  # type: ignore[arg-type]
    if not 0 < count <= MAX_SYMS:
        raise KallsymsError(f"kallsyms_num_syms = {count} is implausible")
    names = need["names"]
    assert names is not None and need["token_table"] is not None and need["token_index"] is not None
    t = KallsymsTables(num_syms=need["num_syms"], names=names, markers=0,  # type: ignore[arg-type]
                       token_table=need["token_table"], token_index=need["token_index"],
                       offsets=sym("kallsyms_offsets"), relative_base=sym("kallsyms_relative_base"),
                       addresses=sym("kallsyms_addresses"), count=count)
    return _find_markers(read, t, need["token_table"])


def _find_markers(read: Reader, t: KallsymsTables, limit: int, tokens: list[bytes] | None = None,
                  stream: bytes | memoryview | None = None) -> KallsymsTables:
    """Fill in the markers (right after the names stream) by walking the stream."""
    if tokens is None:
        tokens = read_tokens(read, t.token_table, t.token_index)
    if stream is None:
        span = limit - t.names if limit > t.names else MAX_NAMES_BYTES
        stream = read(t.names, min(span, MAX_NAMES_BYTES))
    marks, end = _skip_names(stream, t.count, tokens)
    markers = _align8(t.names + end)
    for size in (4, 8):
        cand = replace(t, markers=markers, marker_size=size)
        try:
            _check_markers(read, cand, marks)
        except AradiaError:
            continue
        after = _align8(markers + size * len(marks))
        seqs = after if after < t.token_table else None
        return replace(cand, seqs_of_names=seqs)
    raise KallsymsError("kallsyms_markers do not follow the names stream")


def find_token_tables(mem: PhysicalMemory, *, limit: int = 64) -> Iterator[tuple[int, int]]:
    """(token_table, token_index) physical addresses of every valid token table in RAM.

    The single-character tokens '0'..'9' sit at indexes 0x30..0x39 (every digit occurs in some
    symbol, so no compressed token takes their slots): find that run, skip the remaining 208 tokens
    to the index that follows the table, and check the index describes the table exactly.
    """
    for hit in mem.search(DIGIT_TOKENS, limit=limit):
        found = token_table_at(mem, hit)
        if found is not None:
            yield found


def token_table_at(mem: PhysicalMemory, hit: int) -> tuple[int, int] | None:
    """(token_table, token_index) if the digit tokens at ``hit`` belong to a valid token table."""
    n = MAX_TOKEN_TABLE + 1024
    while n > 4096 and not mem.is_ram(hit, n):
        n //= 2
    after = mem.read(hit, n)
    pos = 0
    for _ in range(256 - 0x30):
        end = after.find(b"\0", pos)
        if end < 0 or end - pos > KSYM_NAME_LEN:
            return None
        pos = end + 1
    index_at = _align8(hit + pos)
    if not mem.is_ram(index_at, 512):
        return None
    index = struct.unpack("<256H", mem.read(index_at, 512))
    start = hit - index[0x30]
    if index[0x30] > MAX_TOKEN_TABLE or not mem.is_ram(start, index_at - start):
        return None
    table = mem.read(start, hit + pos - start)
    if not _check_token_index(table, index) or _align8(start + len(table)) != index_at:
        return None
    return start, index_at


# num_syms preceded by a kernel address (relative_base, or the last of kallsyms_addresses)
_COUNT_AFTER_BASE = re.compile(rb"(?s)\xff\xff\xff\xff(?=.{3}\x00{5})")


def locate_tables(mem: PhysicalMemory, token_table: int, token_index: int,
                  *, window: int = 24 << 20) -> KallsymsTables:
    """Find the other tables around a token table in physical memory (no symbols needed).

    ``kallsyms_num_syms`` + names + markers (+ seqs_of_names) end at the token table; the first of
    them is found by trying count words in the ``window`` before it and accepting the first whose
    names stream decodes and agrees with its markers. Tried first: counts that fit markers ending
    right at the token table (no seqs_of_names in between: 5.10, 6.12), then counts right after a
    kernel address (``kallsyms_relative_base``: the 5.10-6.11 order), then every other word.
    """
    lo = max(0, token_table - window)
    while lo < token_table and not mem.is_ram(lo, token_table - lo):
        lo += 4096 - (lo & 4095)
    data = mem.read(lo, token_table - lo)
    view = memoryview(data)
    tokens = read_tokens(mem.read, token_table, token_index)
    probe = KallsymsTables(0, 0, 0, token_table, token_index)
    after_base = [m.start() + 4 for m in _COUNT_AFTER_BASE.finditer(data)]
    after_base.reverse()
    everything = range(((lo + len(data) - 16) & ~7) - lo, 0, -8)
    tried = work = 0
    for cands in (_before_markers(data), after_base, everything):
        for off in cands:
            if (lo + off) & 7 or off + 8 > len(data):
                continue
            count, pad = struct.unpack_from("<II", data, off)
            if not 256 <= count <= MAX_SYMS or pad:
                continue
            tried += 1
            if tried > 100000:
                raise KallsymsError("kallsyms tables not found near the token table (too many candidates)")
            t = replace(probe, num_syms=lo + off, names=lo + off + 8, count=count)
            try:
                t = _find_markers(mem.read, t, token_table, tokens, view[off + 8:])
            except _BadStream as e:
                work += e.at
                if work > MAX_WALK:
                    raise KallsymsError("kallsyms tables not found near the token table (search budget "
                                        "exhausted: corrupt or hostile memory?)") from None
                continue
            except AradiaError:
                continue
            return _with_addresses(mem, t)
    raise KallsymsError(f"no kallsyms names stream found before the token table at {token_table:#x}")


def _before_markers(data: bytes) -> list[int]:
    """Offsets in ``data`` (which ends at the token table) where ``kallsyms_num_syms`` can be if the
    u32 markers end right before the token table: walk the markers back to their leading 0, then
    the names stream ends there and its 256-symbol blocks give the count to within 256."""
    p = len(data) - 4
    if p < 8:
        return []
    if struct.unpack_from("<I", data, p)[0] == 0:
        p -= 4  # alignment padding
    vals: list[int] = []
    while p >= 0 and len(vals) <= MAX_SYMS // 256:
        v = struct.unpack_from("<I", data, p)[0]
        if vals and v >= vals[-1]:
            return []
        vals.append(v)
        if v == 0:
            break
        p -= 4
    if len(vals) < 2 or vals[-1] != 0:
        return []
    markers, blocks, last = p, len(vals), vals[0]
    hi = (markers - last) & ~7  # names start at most here (the last block holds >= 1 symbol)
    out = []
    for names in range(hi, max(8, hi - 256 * (KSYM_NAME_LEN + 2)), -8):
        count, pad = struct.unpack_from("<II", data, names - 8)
        if 256 * (blocks - 1) < count <= 256 * blocks and not pad:
            out.append(names - 8)
    return out


def _with_addresses(mem: PhysicalMemory, t: KallsymsTables) -> KallsymsTables:
    """Add where the addresses are: offsets + relative_base before num_syms (5.10-6.11), the same
    after the token index (6.12), or an absolute kallsyms_addresses table before num_syms."""
    base_before = t.num_syms - 8
    offsets_after = _align8(t.token_index + 512)
    cands = [
        replace(t, relative_base=base_before, offsets=base_before - _align8(4 * t.count)),
        replace(t, offsets=offsets_after, relative_base=_align8(offsets_after + 4 * t.count)),
        replace(t, addresses=t.num_syms - 8 * t.count),
    ]
    for cand in cands:
        try:
            if cand.relative_base is not None:
                base = _U64.unpack(mem.read(cand.relative_base, 8))[0]
                if base >> 47 != 0x1FFFF:
                    continue
            addrs = read_addresses(mem.read, cand)
        except AradiaError:
            continue
        if addrs[-1] >> 47 == 0x1FFFF:
            return cand
    raise KallsymsError("kallsyms addresses not found next to the names and token tables")
