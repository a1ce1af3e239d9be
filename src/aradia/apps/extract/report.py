"""Text for people: an extraction's map of sources and what is not in memory, a directory listing."""

from __future__ import annotations

import stat

from aradia.apps.extract.files import Extraction
from aradia.apps.extract.ranges import MISSING, totals
from aradia.linux.dcache import DirEntry


def extraction_lines(x: Extraction) -> list[str]:
    """A header line, one line per extent, and a line naming the ranges that are in neither memory
    nor disk (or saying there are none)."""
    deleted = " deleted" if x.info.deleted else ""
    lines = [f"{x.name}: inode {x.info.ino} on {x.info.fstype} ({x.info.dev}){deleted}, {x.info.size} bytes "
             f"-> {x.output}  sha256 {x.sha256}"]
    lines += [f"  {e.start:#012x}-{e.end:#012x}  {e.size:>10}  {e.source}" for e in x.extents]
    by = totals(x.extents)
    lines.append("  " + ", ".join(f"{src} {n}" for src, n in by.items()) if by else "  empty file")
    missing = [e for e in x.extents if e.source == MISSING]
    if missing:
        lines.append(f"  NOT IN MEMORY (zeros in the output): {sum(e.size for e in missing)} bytes in "
                     f"{len(missing)} range(s): " + ", ".join(f"{e.start:#x}-{e.end:#x}" for e in missing))
    else:
        lines.append("  complete: every byte came from the guest's memory or disk")
    return lines


def listing_lines(entries: list[DirEntry]) -> list[str]:
    """``ls -li``-like lines plus the pages each file has in the page cache."""
    lines = [f"{'INODE':>10}  {'MODE':<10}  {'SIZE':>12}  {'CACHED':>12}  NAME"]
    for e in entries:
        cached = f"{e.cached_pages * 4096}" if stat.S_ISREG(e.mode) else "-"
        name = e.name + (" (mount point)" if e.mounted else "")
        lines.append(f"{e.ino:>10}  {stat.filemode(e.mode):<10}  {e.size:>12}  {cached:>12}  {name}")
    return lines


__all__ = ["extraction_lines", "listing_lines"]
