"""The kernel log (what ``dmesg`` shows), from the printk ring buffer in guest memory.

Since 5.10 the log is the lockless ring buffer ``prb``: a ring of ``2^count_bits`` descriptors
(state and id, position of the text in the data ring) with a parallel ring of ``printk_info``
(sequence, time, level, text length), walked from the tail id to the head id. drgn's
``get_printk_records`` trusts those ids and walks every id between them: a corrupt head id makes
that 2^62 steps. :func:`dmesg` walks at most the ring's size (the newest records when the ids are
further apart, with a warning), validates each text block as the kernel's ``get_data`` does, and
skips an unreadable record with a warning instead of losing the whole log. Older kernels (the
structured ``log_buf``) go through drgn's helper.
"""

from __future__ import annotations

from dataclasses import dataclass

import drgn
from drgn.helpers.linux.printk import get_printk_records

from aradia.errors import GuestDataCorrupt
from aradia.linux.bounds import GUEST_ERRORS, Warnings

MAX_COUNT_BITS = 24  # the kernel's log_buf_len limit keeps this far lower; more means corruption
MAX_DATA_BITS = 31  # log_buf_len is an int
_FLAGS_SHIFT = 62
_ID_MASK = (1 << _FLAGS_SHIFT) - 1
_NO_LPOS = 0x3
_ID_SIZE = 8


@dataclass
class LogRecord:
    """One kernel log record."""

    timestamp: float  # seconds since boot
    level: int
    text: str


def dmesg(prog: drgn.Program, *, warnings: Warnings | None = None) -> list[LogRecord]:
    """Every record still in the kernel's log buffer, oldest first."""
    warnings = Warnings() if warnings is None else warnings
    try:
        if "prb" not in prog:
            return [LogRecord(r.timestamp / 1e9, int(r.level), r.text.decode(errors="replace"))
                    for r in get_printk_records(prog)]
        return _lockless(prog, prog["prb"], warnings)
    except GUEST_ERRORS as e:
        warnings.add(f"kernel log unreadable: {e}")
        return []


def _text_span(begin: int, end: int, size_bits: int) -> tuple[int, int] | None:
    """Offset and length of a record's text in the data ring (the kernel's ``get_data``), or None."""
    if begin & 1 and end & 1:  # data-less: no text (or a record that lost it)
        return (0, 0) if begin == end == _NO_LPOS else None
    size = 1 << size_bits
    if begin >> size_bits == end >> size_bits and begin < end:
        start, n = begin & (size - 1), end - begin
    elif (begin + size) >> size_bits == end >> size_bits:  # wraps: the block restarts at 0
        start, n = 0, end & (size - 1)
    else:
        raise GuestDataCorrupt(f"text block {begin:#x}..{end:#x} is not a block of a 2^{size_bits} ring")
    if begin % _ID_SIZE or end % _ID_SIZE or n < _ID_SIZE or start + n > size:
        raise GuestDataCorrupt(f"text block {begin:#x}..{end:#x} is malformed")
    return start + _ID_SIZE, n - _ID_SIZE


def _lockless(prog: drgn.Program, prb: drgn.Object, warnings: Warnings) -> list[LogRecord]:
    ring = prb.desc_ring.read_()
    bits = int(ring.count_bits)
    text = prb.text_data_ring.read_()
    size_bits = int(text.size_bits)
    if not 0 < bits <= MAX_COUNT_BITS or not 0 < size_bits <= MAX_DATA_BITS:
        warnings.add(f"kernel log unreadable: ring buffer claims 2^{bits} records of 2^{size_bits} bytes")
        return []
    count = 1 << bits
    descs, infos, data = ring.descs, ring.infos, text.data.value_()
    committed = {prog["desc_committed"].value_(), prog["desc_finalized"].value_()}
    head = int(ring.head_id.counter) & _ID_MASK
    tail = int(ring.tail_id.counter) & _ID_MASK
    ids: list[int]
    scan = (head - tail) & _ID_MASK >= count
    if scan:
        # Which id is wrong is unknown; every descriptor names its own id, and only those in
        # [tail, head] are committed (the kernel makes a descriptor reusable before the tail passes).
        warnings.add(f"kernel log: descriptor ids {tail:#x}..{head:#x} span more than the ring's {count} "
                     "slots (corrupt head or tail id); records found by scanning every descriptor")
        ids = _scan_ids(descs, count, warnings)
    else:
        ids = [(tail + k) & _ID_MASK for k in range(((head - tail) & _ID_MASK) + 1)]
    out: list[tuple[int, LogRecord]] = []
    for rid in ids:
        try:
            desc = descs[rid & (count - 1)].read_()
            state = int(desc.state_var.counter) & ((1 << 64) - 1)
            if state & _ID_MASK != rid or state >> _FLAGS_SHIFT not in committed:
                continue  # reserved, reused or not yet finished: not a record now
            span = _text_span(int(desc.text_blk_lpos.begin), int(desc.text_blk_lpos.next), size_bits)
            if span is None:
                continue
            info = infos[rid & (count - 1)].read_()
            n = min(int(info.text_len), span[1])
            raw = prog.read(data + span[0], n) if n else b""
            out.append((int(info.seq), LogRecord(int(info.ts_nsec) / 1e9, int(info.level),
                                                 raw.decode(errors="replace"))))
        except GUEST_ERRORS as e:
            warnings.add(f"kernel log record {rid:#x}: skipped ({e})")
    if scan:
        out.sort(key=lambda r: r[0])
    return [r for _seq, r in out]


def _scan_ids(descs: drgn.Object, count: int, warnings: Warnings) -> list[int]:
    """The id each descriptor of the ring holds (read in one go)."""
    prog = descs.prog_
    size = drgn.sizeof(descs.type_.type)
    at = drgn.offsetof(descs.type_.type, "state_var")
    try:
        raw = prog.read(descs.value_(), size * count)
    except GUEST_ERRORS as e:
        warnings.add(f"kernel log: descriptor ring unreadable ({e})")
        return []
    return [int.from_bytes(raw[i * size + at:i * size + at + 8], "little") & _ID_MASK for i in range(count)]
