"""Bounded walks over untrusted guest data: caps, cycle detection and a list of what was skipped.

A guest can hand us cyclic lists, wild pointers and absurd lengths. Every view walks through
:func:`bounded` and :func:`attempt`, so a corrupt structure costs a warning, never a hang or a crash.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import drgn

from aradia.errors import AradiaError

T = TypeVar("T")
#: Errors reading guest data raises: drgn faults and bad values, aradia's own (NotRAM, PageFault).
GUEST_ERRORS = (drgn.FaultError, drgn.ObjectAbsentError, ValueError, LookupError, OverflowError, AradiaError)


class Warnings(list[str]):
    """What a view skipped or cut short, in words a user can act on."""

    def add(self, msg: str) -> None:
        """Record one warning (at most 1000 are kept)."""
        if len(self) < 1000:
            self.append(msg)


def bounded(items: Iterable[T], what: str, warnings: Warnings, *, limit: int = 1 << 20,
            key: Callable[[T], int] | None = None) -> Iterator[T]:
    """Yield from ``items`` until ``limit`` items, a repeated ``key`` (a cycle) or a read fault."""
    seen: set[int] = set()
    it = iter(items)
    n = 0
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except GUEST_ERRORS as e:
            warnings.add(f"{what}: walk stopped after {n} entries: unreadable guest data ({e})")
            return
        if key is not None:
            try:
                k = key(item)
            except GUEST_ERRORS as e:
                warnings.add(f"{what}: walk stopped after {n} entries: {e}")
                return
            if k in seen:
                warnings.add(f"{what}: cycle detected after {n} entries (entry {k:#x} seen twice)")
                return
            seen.add(k)
        n += 1
        if n > limit:
            warnings.add(f"{what}: more than {limit} entries; the rest were skipped")
            return
        yield item


def attempt(fn: Callable[[], T], default: T, what: str, warnings: Warnings) -> T:
    """``fn()``, or ``default`` with a warning when guest data is unreadable or corrupt."""
    try:
        return fn()
    except GUEST_ERRORS as e:
        warnings.add(f"{what}: {e}")
        return default


def read_cstring(read: Callable[[int, int], bytes], addr: int, limit: int = 4096, *,
                 partial: bool = False) -> str:
    """A NUL-terminated string at ``addr`` through ``read(addr, n)``, at most ``limit`` bytes.

    Read a page at a time so a string that ends just before an unmapped page is still read whole;
    with ``partial`` a fault after the first page returns what was read instead of raising.
    """
    out = b""
    while len(out) < limit:
        n = min(4096 - (addr & 0xFFF), limit - len(out))
        try:
            chunk = read(addr, n)
        except GUEST_ERRORS:
            if partial and out:
                break
            raise
        nul = chunk.find(b"\0")
        if nul >= 0:
            return (out + chunk[:nul]).decode(errors="replace")
        out += chunk
        addr += n
    return out.decode(errors="replace")


def cstring(obj: drgn.Object, limit: int = 4096) -> str:
    """A C string from guest memory (a ``char`` array or pointer), at most ``limit`` bytes."""
    if obj.type_.kind == drgn.TypeKind.ARRAY:
        return obj.string_().decode(errors="replace")
    addr = obj.value_()
    if not addr:
        return ""
    prog = obj.prog_
    return read_cstring(lambda a, n: prog.read(a, n, False), addr, limit)
