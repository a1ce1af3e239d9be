"""Parse QEMU's HMP ``info mtree -f`` into the guest-physical RAM map.

The flattened view of the address space named ``memory`` lists every guest-physical range with the
memory region that backs it and the offset into that region::

    0000000000100000-00000000bfffffff (prio 0, ram): pc.ram @0000000000100000

RAM is what the machine's memory backends (``query-memdev`` ids such as ``pc.ram`` or ``m0``)
back; shadowed BIOS areas show as ``rom`` of the same region and are RAM too. Device RAM (VGA) is
not guest RAM. The format is the same in QEMU 7.2 and 10.x; unknown decorations after the name
(``KVM``, ``[disabled]``) are tolerated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from aradia.errors import ProtocolError

_ENTRY = re.compile(
    r"^\s*(?P<start>[0-9a-fA-F]+)-(?P<end>[0-9a-fA-F]+)\s+\(prio\s+-?\d+,\s*(?P<type>[^)]+)\):\s+"
    r"(?P<name>.+?)(?:\s+@(?P<off>[0-9a-fA-F]+))?(?:\s+KVM)?(?:\s+\[[^\]]*\])*\s*$"
)
_AS = re.compile(r'^\s*AS\s+"(?P<name>[^"]+)"')


@dataclass(frozen=True)
class FlatRange:
    """One line of a flat view: ``[start, end]`` inclusive, backed by ``region`` at ``offset``."""

    start: int
    end: int
    kind: str
    region: str
    offset: int

    @property
    def size(self) -> int:
        """Length in bytes."""
        return self.end - self.start + 1


def parse_flatview(text: str, address_space: str = "memory") -> list[FlatRange]:
    """Return the ranges of the flat view that serves ``address_space``."""
    views: list[tuple[set[str], list[FlatRange]]] = []
    names: set[str] = set()
    ranges: list[FlatRange] = []
    for line in text.splitlines():
        if line.startswith("FlatView"):
            names, ranges = set(), []
            views.append((names, ranges))
            continue
        if m := _AS.match(line):
            names.add(m["name"])
            continue
        if m := _ENTRY.match(line):
            ranges.append(
                FlatRange(int(m["start"], 16), int(m["end"], 16), m["type"].split()[0], m["name"].strip(),
                          int(m["off"], 16) if m["off"] else 0)
            )
    for view_names, view_ranges in views:
        if address_space in view_names:
            return view_ranges
    raise ProtocolError(f'no flat view for address space "{address_space}" in QEMU\'s "info mtree -f" output')


def ram_ranges(text: str, ram_regions: set[str] | None = None) -> list[FlatRange]:
    """The ranges of the ``memory`` address space backed by one of ``ram_regions``, adjacent ones merged.

    With no region names (the memory backends are unknown) the region backing most ``ram`` is taken.
    """
    view = parse_flatview(text)
    if not ram_regions:
        totals: dict[str, int] = {}
        for r in view:
            if r.kind == "ram":
                totals[r.region] = totals.get(r.region, 0) + r.size
        ram_regions = {max(totals, key=lambda n: totals[n])} if totals else set()
    out: list[FlatRange] = []
    for r in view:
        if r.region not in ram_regions or r.kind not in ("ram", "rom", "ramd", "romd"):
            continue
        prev = out[-1] if out else None
        if (prev and prev.region == r.region and prev.end + 1 == r.start
                and prev.offset + prev.size == r.offset):
            out[-1] = FlatRange(prev.start, r.end, "ram", r.region, prev.offset)
        else:
            out.append(FlatRange(r.start, r.end, "ram", r.region, r.offset))
    if not out:
        raise ProtocolError(f"QEMU's memory map shows no RAM backed by {sorted(ram_regions)}")
    return out
