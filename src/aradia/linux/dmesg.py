"""The kernel log (what ``dmesg`` shows), from the printk ring buffer in guest memory."""

from __future__ import annotations

from dataclasses import dataclass

import drgn
from drgn.helpers.linux.printk import get_printk_records

from aradia.linux.guard import Warnings

MAX_COUNT_BITS = 24  # the kernel's log_buf_len limit keeps this far lower; more means corruption


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
        if "prb" in prog:
            bits = int(prog["prb"].desc_ring.count_bits)
            if not 0 < bits <= MAX_COUNT_BITS:
                warnings.add(f"kernel log unreadable: ring buffer claims 2^{bits} records")
                return []
        records = get_printk_records(prog)
    except (drgn.FaultError, ValueError, LookupError) as e:
        warnings.add(f"kernel log unreadable: {e}")
        return []
    return [LogRecord(r.timestamp / 1e9, int(r.level), r.text.decode(errors="replace")) for r in records]
