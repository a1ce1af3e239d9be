"""A file's contents as the guest's page cache holds them (guest RAM, no disk access).

A file a process maps or has read lives, page by page, in its inode's ``i_mapping`` XArray. Reading
it there works whether or not a given process has faulted the page in, which is what reading a
library's symbol tables "as mapped" needs: ``ld.so`` maps the whole file but touches few pages.
A page the page cache does not hold (never read, or evicted) is a :class:`NotCached`.
"""

from __future__ import annotations

import drgn
from drgn.helpers.linux.mm import page_to_phys

from aradia.errors import AradiaError
from aradia.linux.walks import xa_load

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
    except LookupError:  # drgn's ObjectNotFoundError is a KeyError
        base = int(prog["vmemmap_base"])
        pfn = (page.value_() - base) // drgn.sizeof(prog.type("struct page"))
        return pfn * PAGE_SIZE


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
