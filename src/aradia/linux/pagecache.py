"""A file's contents as the guest's page cache holds them (guest RAM, no disk access).

A file a process maps or has read lives, page by page, in its inode's ``i_mapping`` XArray. Reading
it there works whether or not a given process has faulted the page in, which is what reading a
library's symbol tables "as mapped" needs: ``ld.so`` maps the whole file but touches few pages.
A page the page cache does not hold (never read, or evicted) is a :class:`NotCached`.
:func:`cached_pages` lists every page a file has in the cache at once (with its dirty bit), which is
what extracting whole files (``aradia.apps.extract``) needs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import drgn
from drgn.helpers.linux.mm import page_to_phys

from aradia.errors import AradiaError
from aradia.linux.bounds import GUEST_ERRORS, Warnings
from aradia.linux.walks import xa_entries, xa_load

PAGE_SIZE = 4096
MAX_FILE_READ = 64 << 20


class NotCached(AradiaError):
    """A page of the file is not in the guest's page cache."""


def _page_phys(mapping: drgn.Object, index: int) -> int:
    entry = xa_load(mapping.i_pages.address_of_(), index)
    if not entry or entry & 3:
        raise NotCached(f"page {index} of the file is not in the page cache")
    page = drgn.Object(mapping.prog_, "struct page *", value=entry)
    # a large folio: the XArray gives the head page; the wanted page follows it
    delta = index - int(page.index)
    if delta < 0 or delta >= 1 << 9:
        delta = 0
    return page_phys(page) + delta * PAGE_SIZE


def page_phys(page: drgn.Object) -> int:
    """The physical address of the memory a ``struct page *`` describes.

    drgn finds the page array (``vmemmap``) from what the kernel tells it; with some kernels' RAM
    alone (5.10) it cannot, and then it is the kernel's own ``vmemmap_base`` (x86-64, vmemmap model).
    """
    prog = page.prog_
    try:
        return int(page_to_phys(page))
    except (LookupError, drgn.FaultError):  # drgn's ObjectNotFoundError is a KeyError
        # drgn derives vmemmap from mem_section, which it cannot find or read here: then it is the
        # kernel's own vmemmap_base (x86-64) or what its VMCOREINFO says (arm64: VMEMMAP_START less
        # PHYS_OFFSET's pages)
        try:
            base = int(prog["vmemmap_base"])
        except LookupError:
            found = _vmcoreinfo_vmemmap(prog)
            if found is None:
                raise
            base = found
    pfn = (page.value_() - base) // drgn.sizeof(prog.type("struct page"))
    return pfn * PAGE_SIZE


def _vmcoreinfo_vmemmap(prog: drgn.Program) -> int | None:
    """``vmemmap`` (the address of page frame 0's ``struct page``) from VMCOREINFO's
    ``NUMBER(VMEMMAP_START)`` and ``NUMBER(PHYS_OFFSET)`` (arm64 exports both); None without them."""
    if "aradia_vmemmap" not in prog.cache:
        numbers: dict[str, int] = {}
        try:
            text = prog["VMCOREINFO"].string_().decode(errors="replace")
        except (LookupError, *GUEST_ERRORS):
            text = ""
        for line in text.splitlines():
            key, _, value = line.partition("=")
            if key in ("NUMBER(VMEMMAP_START)", "NUMBER(PHYS_OFFSET)"):
                with contextlib.suppress(ValueError):
                    numbers[key] = int(value, 16)
        start, phys = numbers.get("NUMBER(VMEMMAP_START)"), numbers.get("NUMBER(PHYS_OFFSET)")
        prog.cache["aradia_vmemmap"] = (None if start is None or phys is None else
                                        start - (phys // PAGE_SIZE) * drgn.sizeof(prog.type("struct page")))
    value = prog.cache["aradia_vmemmap"]
    return None if value is None else int(value)


def read_cached(inode: drgn.Object, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset`` of the file of ``inode`` (a ``struct inode *``), from the page cache.

    Reads stop at the file's size (``i_size``); a page not in the page cache raises
    :class:`NotCached`.
    """
    if not 0 <= size <= MAX_FILE_READ or offset < 0:
        raise AradiaError(f"file read of {size} bytes at {offset} is out of range")
    end = min(offset + size, int(inode.i_size))
    mapping = inode.i_mapping
    prog = inode.prog_
    out = bytearray()
    pos = offset
    while pos < end:
        n = min(end - pos, PAGE_SIZE - pos % PAGE_SIZE)
        out += prog.read(_page_phys(mapping, pos // PAGE_SIZE) + pos % PAGE_SIZE, n, True)
        pos += n
    return bytes(out)


@dataclass(frozen=True)
class CachedPage:
    """One page of a file in the page cache: its guest-physical address and whether it is dirty
    (written by the guest, not yet written back to the file's storage)."""

    phys: int
    dirty: bool


MAX_FOLIO_PAGES = 1 << 9  # a PMD-sized folio; larger orders are guest data corruption


def _pg_bits(prog: drgn.Program) -> tuple[int, int]:
    """The bit numbers of PG_dirty and PG_head in ``page->flags`` (an enum in the kernel's BTF)."""
    return int(prog["PG_dirty"].value_()), int(prog["PG_head"].value_())


def _folio_pages(page: drgn.Object, head_bit: int) -> int:
    """Pages in the folio whose head is ``page`` (1 for an order-0 page)."""
    if not int(page.flags) >> head_bit & 1:
        return 1
    tail = drgn.Object(page.prog_, "struct page *", value=page.value_() + page.type_.type.size)
    for name in ("compound_order", "_folio_order"):  # 6.1; 6.2-6.5
        if tail.type_.type.has_member(name):
            return min(1 << int(getattr(tail, name)), MAX_FOLIO_PAGES)
    return min(1 << (int(tail.flags) & 0xFF), MAX_FOLIO_PAGES)  # 6.6+: the order in folio->_flags_1


def cached_pages(inode: drgn.Object, warnings: Warnings, *, max_pages: int = 1 << 22,
                 values: set[int] | None = None) -> dict[int, CachedPage]:
    """Page index -> :class:`CachedPage` for every page of ``inode``'s file in the page cache.

    One walk of the mapping's XArray (bounded, with a warning for what it skipped); shadow entries
    (value entries: pages evicted, or swapped-out shmem) are not pages. Large folios count once
    per page they hold. ``values``, if given, receives the indices of value entries (for shmem:
    pages swapped out, whose contents are not in RAM).
    """
    prog = inode.prog_
    dirty_bit, head_bit = _pg_bits(prog)
    flags_at = drgn.offsetof(prog.type("struct page"), "flags")
    npages = -(-int(inode.i_size) // PAGE_SIZE)
    out: dict[int, CachedPage] = {}
    what = f"page cache of inode {int(inode.i_ino)}"
    for index, entry in xa_entries(inode.i_mapping.i_pages.address_of_(), what, warnings):
        if entry & 1:  # a value entry: a shadow of an evicted page, or a swap entry
            if values is not None:
                values.add(index)
            continue
        if index >= npages or len(out) >= max_pages:
            if index < npages:
                warnings.add(f"{what}: more than {max_pages} pages; the rest were skipped")
            break
        try:
            phys = page_phys(drgn.Object(prog, "struct page *", value=entry))
            flags = prog.read_u64(entry + flags_at)  # one read
            dirty = bool(flags >> dirty_bit & 1)
            count = 1
            if flags >> head_bit & 1:
                count = _folio_pages(drgn.Object(prog, "struct page *", value=entry), head_bit)
        except GUEST_ERRORS as e:
            warnings.add(f"{what}: page {index} unreadable ({e}): skipped")
            continue
        for k in range(count):
            if index + k < npages:
                out[index + k] = CachedPage(phys + k * PAGE_SIZE, dirty)
    return out
