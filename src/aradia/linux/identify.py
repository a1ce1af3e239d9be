"""Identify the guest kernel from raw physical memory: its banner and its VMCOREINFO text.

Both live in RAM with no help from the guest: ``linux_banner`` (the text ``/proc/version`` prints) in
the kernel's read-only data and in the kernel log, and VMCOREINFO (``OSRELEASE=...``) in the page the
kernel fills at boot for crash dumps.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator

from aradia.errors import AradiaError
from aradia.sources.base import PhysicalMemory

BANNER_PREFIX = b"Linux version "
_BANNER = re.compile(rb"^Linux version (\S+) \(.+\) .*#\S+.*$")
_VMCOREINFO_LINE = re.compile(rb"^[A-Za-z0-9_()\[\].\-]+=[ -~]*$")
MAX_BANNER = 512
MAX_VMCOREINFO = 4096  # the kernel keeps it in one page


class KernelNotFound(AradiaError):
    """No Linux kernel could be identified in the memory."""


def _banner_at(mem: PhysicalMemory, addr: int) -> bytes | None:
    n = MAX_BANNER
    while n >= 64 and not mem.is_ram(addr, n):
        n //= 2
    if n < 64:
        return None
    raw = mem.read(addr, n)
    end = min((i for i in (raw.find(b"\n"), raw.find(b"\0")) if i >= 0), default=-1)
    if end < 0:
        return None
    text = raw[:end]
    if not all(32 <= c < 127 for c in text) or not _BANNER.match(text):
        return None
    return text


def find_banner(mem: PhysicalMemory, release: str | None = None, *, enough: int = 3,
                max_hits: int = 4096) -> str:
    """The kernel banner (``/proc/version`` without its newline) found in physical memory.

    Every well-formed ``Linux version ...`` string is a candidate; the most frequent wins (the kernel's
    own copy and the log's copy agree, stray fragments do not). ``release`` (e.g. from VMCOREINFO)
    filters candidates. Stops once one candidate has been seen ``enough`` times.
    """
    seen: Counter[bytes] = Counter()
    for addr in mem.search(BANNER_PREFIX, limit=max_hits):
        text = _banner_at(mem, addr)
        if text is None:
            continue
        if release is not None and text.split(b" ")[2].decode() != release:
            continue
        seen[text] += 1
        if seen[text] >= enough:
            break
    if not seen:
        raise KernelNotFound("no Linux kernel banner in physical memory")
    return seen.most_common(1)[0][0].decode()


def find_vmcoreinfo_texts(mem: PhysicalMemory, *, max_hits: int = 64) -> Iterator[tuple[int, str]]:
    """(physical address, text) of every well-formed VMCOREINFO text in RAM, in address order."""
    for addr in mem.search(b"OSRELEASE=", limit=max_hits):
        n = MAX_VMCOREINFO - (addr & 0xFFF)  # the text sits in one page buffer or note
        if not mem.is_ram(addr, n):
            continue
        raw = mem.read(addr, n).split(b"\0", 1)[0]
        lines = raw.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        if len(lines) < 3 or not all(_VMCOREINFO_LINE.match(x) for x in lines):
            continue
        if not any(x.startswith(b"PAGESIZE=") for x in lines):
            continue
        yield addr, raw.decode("ascii")


def find_vmcoreinfo(mem: PhysicalMemory) -> str | None:
    """The kernel's VMCOREINFO text from physical memory (the fullest copy), or None."""
    best: str | None = None
    for _addr, text in find_vmcoreinfo_texts(mem):
        if best is None or len(text) > len(best):
            best = text
        if "\nKERNELOFFSET=" in text:
            break
    return best


def vmcoreinfo_symbol(info: dict[str, str], name: str) -> int | None:
    """The address a parsed VMCOREINFO gives for ``SYMBOL(name)``, or None (absent or not hex)."""
    v = info.get(f"SYMBOL({name})")
    try:
        return int(v, 16) if v else None
    except ValueError:
        return None


def parse_vmcoreinfo(text: str) -> dict[str, str]:
    """VMCOREINFO text as a dict (``SYMBOL(init_top_pgt)`` keys kept as written)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key] = value
    return out
