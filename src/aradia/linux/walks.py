"""Bounded versions of the few drgn walks that can loop forever on corrupt guest data.

drgn's helpers trust the kernel's invariants. On a hostile or corrupt guest some of their walks
never end without yielding anything, so :func:`~aradia.linux.bounds.bounded` cannot stop them:

* ``for_each_task`` walks the pid IDR (an XArray) in Python with an unbounded stack: a node whose
  slot points back at itself or an ancestor is pushed again and again;
* ``find_task`` (``xa_load`` in drgn's C code; here :func:`task_by_pid`) follows node pointers
  until a leaf: a self-pointing interior node spins in C, where no Python-level cap can reach;
* ``for_each_vma`` (6.1+) walks the maple tree breadth-first with an unbounded queue;
* ``d_path`` follows ``d_parent`` and mount parents with no step limit, and reads each name with no
  length limit;
* ``for_each_file`` scans ``max_fds`` bits, which a corrupt table makes 2^32.

These re-implementations keep the kernel's invariants as checks instead: an XArray child's shift is
its parent's minus ``XA_CHUNK_SHIFT`` (so a cycle is impossible and the depth is at most 11), a
maple tree node is visited once and at most :data:`MAPLE_HEIGHT_MAX` deep with pivots inside its
parent's range, path components are at most ``NAME_MAX`` bytes and a path at most ``PATH_MAX``. A
violated invariant skips that part with a warning; the rest of the walk goes on. They also read a
whole node per memory read, which is faster than drgn's per-slot reads.
"""

from __future__ import annotations

from collections.abc import Iterator

import drgn
from drgn.helpers.linux.pid import pid_task

from aradia.errors import AradiaError, GuestDataCorrupt
from aradia.linux.bounds import GUEST_ERRORS, Warnings, cstring

MAX_TREE_NODES = 1 << 16  # XArray / maple tree nodes visited per walk
MAPLE_HEIGHT_MAX = 31
NAME_MAX = 255
PATH_MAX = 4096
MAX_PATH_STEPS = 4096  # dentries plus mount crossings per path
MAX_FDS = 1 << 20  # NR_OPEN: the default ceiling of fs.nr_open
_XA_ZERO_ENTRY = 0x406  # xa_mk_internal(257)
_MAPLE_NODE_MASK = 0xFF
_MAPLE_LEAF_64, _MAPLE_RANGE_64, _MAPLE_ARANGE_64 = 1, 2, 3


def _is_node(v: int) -> bool:
    """``xa_is_node()``: an internal entry above 4096 points to a node (the same test for maple trees)."""
    return (v & 3) == 2 and v > 4096


# --- XArray ------------------------------------------------------------------------------------


def _xa_node(prog: drgn.Program, addr: int) -> tuple[int, list[int]]:
    node = drgn.Object(prog, "struct xa_node", address=addr).read_()
    return int(node.shift), list(node.slots.value_())


def xa_entries(xa: drgn.Object, what: str, warnings: Warnings, *,
               max_nodes: int = MAX_TREE_NODES) -> Iterator[tuple[int, int]]:
    """``(index, entry)`` of every entry of an XArray (``struct xarray *``), in index order.

    Like drgn's ``xa_for_each`` (zero, sibling and retry entries are skipped), but a node whose
    shift is not its parent's minus the chunk shift, a node seen twice, and an unreadable node are
    skipped with a warning, and at most ``max_nodes`` nodes are read.
    """
    prog = xa.prog_
    try:
        head = xa.xa_head.value_()
    except GUEST_ERRORS as e:
        warnings.add(f"{what}: unreadable ({e})")
        return
    if not _is_node(head):
        if head and (head & 3) != 2:
            yield 0, head
        return
    seen: set[int] = set()
    # Each frame: (slots, next slot, first index, shift).
    stack: list[tuple[list[int], int, int, int]] = []

    def push(addr: int, base: int, want: int | None) -> None:
        if addr in seen:
            warnings.add(f"{what}: node {addr:#x} reached twice (a cycle): skipped")
            return
        if len(seen) >= max_nodes:
            raise GuestDataCorrupt(f"{what}: more than {max_nodes} nodes")
        seen.add(addr)
        try:
            shift, slots = _xa_node(prog, addr)
        except GUEST_ERRORS as e:
            warnings.add(f"{what}: node {addr:#x} unreadable ({e}): skipped")
            return
        chunk = len(slots).bit_length() - 1
        if (want is not None and shift != want) or shift % chunk or shift > 64 - chunk:
            warnings.add(f"{what}: node {addr:#x} has shift {shift}"
                         f"{'' if want is None else f', expected {want}'}: skipped")
            return
        stack.append((slots, 0, base, shift))

    try:
        push(head - 2, 0, None)
        while stack:
            slots, i, base, shift = stack[-1]
            if i >= len(slots):
                stack.pop()
                continue
            stack[-1] = (slots, i + 1, base, shift)
            v = slots[i]
            if not v:
                continue
            index = base + (i << shift)
            if _is_node(v):
                if shift == 0:
                    warnings.add(f"{what}: leaf node points to another node ({v:#x}): skipped")
                    continue
                push(v - 2, index, shift - (len(slots).bit_length() - 1))
            elif (v & 3) != 2:  # not an internal (sibling, retry, zero) entry
                yield index, v
    except GuestDataCorrupt as e:
        warnings.add(f"{e}; the rest were skipped")


def xa_load(xa: drgn.Object, index: int) -> int:
    """The entry at ``index`` of an XArray (0 if none), like drgn's ``xa_load`` but at most one
    read per level: a child whose shift is not its parent's minus the chunk shift is
    :class:`~aradia.errors.GuestDataCorrupt`."""
    prog = xa.prog_
    entry = xa.xa_head.value_()
    want: int | None = None
    while _is_node(entry):
        addr = entry - 2
        shift, slots = _xa_node(prog, addr)
        chunk = len(slots).bit_length() - 1
        if (want is not None and shift != want) or shift % chunk or shift > 64 - chunk:
            raise GuestDataCorrupt(f"XArray node {addr:#x} has shift {shift}")
        if want is None and index >> shift >= len(slots):
            return 0
        offset = (index >> shift) & (len(slots) - 1)
        entry = slots[offset]
        if (entry & 3) == 2 and entry < 256:  # a sibling entry: the canonical slot holds the value
            entry = slots[(entry >> 2) % len(slots)]
        if shift == 0:
            if _is_node(entry):
                raise GuestDataCorrupt(f"XArray leaf node {addr:#x} points to another node")
            break
        want = shift - chunk
    if entry == _XA_ZERO_ENTRY or ((entry & 3) == 2 and entry <= 4096):
        return 0
    return entry


# --- tasks -----------------------------------------------------------------------------------------


def _pid_ns(prog: drgn.Program) -> drgn.Object:
    return prog["init_pid_ns"].address_of_()


def each_task(prog: drgn.Program, warnings: Warnings) -> Iterator[drgn.Object]:
    """Every task (``struct task_struct *``) of the initial pid namespace, by pid.

    drgn's ``for_each_task`` walks the same pid IDR; this walk is bounded (see the module docs).
    """
    try:
        ns = _pid_ns(prog)
        base = int(ns.idr.idr_base)
        pidtype = prog["PIDTYPE_PID"]
    except (KeyError, *GUEST_ERRORS) as e:
        warnings.add(f"pid table unreadable: {e}")
        return
    pid_ptr = prog.type("struct pid *")
    for nr, entry in xa_entries(ns.idr.idr_rt.address_of_(), "pid table", warnings):
        try:
            task = pid_task(drgn.Object(prog, pid_ptr, entry), pidtype)
        except GUEST_ERRORS as e:
            warnings.add(f"pid {nr + base}: unreadable struct pid at {entry:#x} ({e})")
            continue
        if task:
            yield task


def task_by_pid(prog: drgn.Program, pid: int) -> drgn.Object | None:
    """The ``struct task_struct *`` of ``pid`` in the initial pid namespace, or None (see
    :func:`aradia.linux.processes.find_task` for the lookup that raises)."""
    ns = _pid_ns(prog)
    try:
        entry = xa_load(ns.idr.idr_rt.address_of_(), pid - int(ns.idr.idr_base)) if pid >= 0 else 0
        if not entry:
            return None
        task = pid_task(drgn.Object(prog, "struct pid *", entry), prog["PIDTYPE_PID"])
    except GUEST_ERRORS as e:
        raise GuestDataCorrupt(f"pid {pid}: the pid table is unreadable ({e})") from e
    return task if task else None


# --- maple tree -----------------------------------------------------------------------------------


def _maple_node(prog: drgn.Program, enode: int, lo: int, hi: int) -> tuple[list[int], list[int], int, bool]:
    """``(pivots, slots, end, leaf)`` of the maple node ``enode`` covering ``[lo, hi]``."""
    kind = (enode >> 3) & 0xF
    node = drgn.Object(prog, "struct maple_node", address=enode & ~_MAPLE_NODE_MASK).read_()
    if kind == _MAPLE_ARANGE_64:
        m = node.ma64
        pivots, slots = list(m.pivot.value_()), list(m.slot.value_())
        end = int(m.meta.end)
    elif kind in (_MAPLE_RANGE_64, _MAPLE_LEAF_64):
        m = node.mr64
        pivots, slots = list(m.pivot.value_()), list(m.slot.value_())
        if not pivots[-1]:
            end = int(m.meta.end)
        elif pivots[-1] == hi:
            end = len(pivots) - 1
        else:
            end = len(pivots)
    else:
        raise GuestDataCorrupt(f"maple node {enode:#x}: unknown node type {kind}")
    if end >= len(slots):
        raise GuestDataCorrupt(f"maple node {enode:#x}: {end + 1} slots used of {len(slots)}")
    return pivots, slots, end, kind == _MAPLE_LEAF_64


def mt_entries(mt: drgn.Object, what: str, warnings: Warnings, *,
               max_nodes: int = MAX_TREE_NODES) -> Iterator[tuple[int, int, int]]:
    """``(first, last, entry)`` of every entry of a maple tree (``struct maple_tree *``), in order.

    Like drgn's ``mt_for_each`` (zero entries skipped), but each node is read once, at most
    :data:`MAPLE_HEIGHT_MAX` deep and ``max_nodes`` in all, and a node whose pivots leave its range
    is skipped with a warning.
    """
    prog = mt.prog_
    try:
        root = mt.ma_root.value_()
    except GUEST_ERRORS as e:
        warnings.add(f"{what}: unreadable ({e})")
        return
    if not _is_node(root):
        if root:
            yield 0, 0, root
        return
    seen: set[int] = set()
    # Each frame: remaining (first, last, entry, depth) in reverse order.
    stack: list[tuple[int, int, int, int]] = [(0, (1 << 64) - 1, root, 1)]
    while stack:
        lo, hi, enode, depth = stack.pop()
        addr = enode & ~_MAPLE_NODE_MASK
        if addr in seen:
            warnings.add(f"{what}: node {addr:#x} reached twice (a cycle): skipped")
            continue
        if len(seen) >= max_nodes or depth > MAPLE_HEIGHT_MAX:
            warnings.add(f"{what}: more than {max_nodes} nodes or {MAPLE_HEIGHT_MAX} levels; "
                         "the rest were skipped")
            return
        seen.add(addr)
        try:
            pivots, slots, end, leaf = _maple_node(prog, enode, lo, hi)
        except (AradiaError, *GUEST_ERRORS) as e:
            warnings.add(f"{what}: node {addr:#x} skipped: {e}")
            continue
        ranges = []
        prev = lo
        for offset in range(end + 1):
            last = pivots[offset] if offset < end else hi
            if not prev <= last <= hi:
                warnings.add(f"{what}: node {addr:#x}: pivot {last:#x} outside [{prev:#x}, {hi:#x}]; "
                             "the rest of the node was skipped")
                break
            ranges.append((prev, last, slots[offset]))
            prev = last + 1
        if leaf:
            for first, last, v in ranges:
                if v and v != _XA_ZERO_ENTRY:
                    yield first, last, v
        else:
            stack.extend((first, last, v, depth + 1) for first, last, v in reversed(ranges) if v)


# --- red-black tree ----------------------------------------------------------------------------------

MAX_RB_DEPTH = 128  # a red-black tree of n nodes is at most 2*log2(n+1) deep


def rb_inorder(root: drgn.Object, what: str, warnings: Warnings, *,
               max_nodes: int = MAX_TREE_NODES) -> Iterator[drgn.Object]:
    """The nodes (``struct rb_node *``) of a red-black tree (``struct rb_root *``) in order.

    drgn's ``rbtree_inorder_for_each`` recurses once per level, so a cycle through ``rb_left``
    ends in a RecursionError; this walk is iterative, at most :data:`MAX_RB_DEPTH` deep, visits a
    node at most once and reads at most ``max_nodes`` nodes, with a warning for what it skipped.
    """
    seen: set[int] = set()
    stack: list[drgn.Object] = []
    try:
        node = root.rb_node.read_()
        while stack or node:
            while node:
                addr = node.value_()
                if addr in seen or len(stack) >= MAX_RB_DEPTH or len(seen) >= max_nodes:
                    warnings.add(f"{what}: node {addr:#x} is seen twice, too deep or too many; skipped")
                    node = None
                    break
                seen.add(addr)
                stack.append(node)
                node = node.rb_left.read_()
            if not stack:
                return
            node = stack.pop()
            yield node
            node = node.rb_right.read_()
    except GUEST_ERRORS as e:
        warnings.add(f"{what}: walk stopped: unreadable node ({e})")


# --- paths ---------------------------------------------------------------------------------------


def _name(dentry: drgn.Object) -> bytes:
    qstr = dentry.d_name
    n = int(qstr.len)
    if n > NAME_MAX:
        raise GuestDataCorrupt(f"dentry {dentry.value_():#x}: name length {n}")
    return dentry.prog_.read(qstr.name.value_(), n) if n else b""


def d_path(path_or_mnt: drgn.Object, dentry: drgn.Object | None = None) -> bytes:
    """The path of a ``struct path`` (or a ``struct vfsmount *`` and ``struct dentry *``).

    drgn's ``d_path`` for kernel objects, bounded: at most :data:`MAX_PATH_STEPS` steps up the
    tree, no (mount, dentry) pair twice, names read by their length (at most ``NAME_MAX``) and a
    result of at most ``PATH_MAX`` bytes; otherwise :class:`~aradia.errors.GuestDataCorrupt`.
    """
    if dentry is None:
        mnt = drgn.container_of(path_or_mnt.mnt, "struct mount", "mnt")
        dentry = path_or_mnt.dentry.read_()
    else:
        mnt = drgn.container_of(path_or_mnt, "struct mount", "mnt")
        dentry = dentry.read_()
    d_op = dentry.d_op.read_()
    if d_op and d_op.d_dname:
        return b"[" + cstring(dentry.d_inode.i_sb.s_type.name, NAME_MAX).encode() + b"]"
    parts: list[bytes] = []
    size = 0
    seen: set[tuple[int, int]] = set()
    for _ in range(MAX_PATH_STEPS):
        key = (mnt.value_(), dentry.value_())
        if key in seen:
            raise GuestDataCorrupt(f"path of dentry {key[1]:#x}: a cycle in the dentry or mount tree")
        seen.add(key)
        if dentry == mnt.mnt.mnt_root:
            parent = mnt.mnt_parent.read_()
            if mnt == parent:
                break
            dentry = mnt.mnt_mountpoint.read_()
            mnt = parent
            continue
        d_parent = dentry.d_parent.read_()
        if dentry == d_parent:
            break
        name = _name(dentry)
        size += len(name) + 1
        if size > PATH_MAX:
            raise GuestDataCorrupt(f"path of dentry {dentry.value_():#x} is longer than {PATH_MAX} bytes")
        parts.append(name)
        dentry = d_parent
    else:
        raise GuestDataCorrupt(f"path of dentry {dentry.value_():#x}: more than {MAX_PATH_STEPS} steps")
    return b"".join(b"/" + p for p in reversed(parts)) or b"/"


# --- open files ------------------------------------------------------------------------------------


def open_files(task: drgn.Object) -> Iterator[tuple[int, drgn.Object]]:
    """``(fd, struct file *)`` of every open descriptor of ``task``, like drgn's ``for_each_file``,
    reading the open-descriptor bitmap in one read; a table of more than :data:`MAX_FDS`
    descriptors is :class:`~aradia.errors.GuestDataCorrupt`. A descriptor whose bit is set but whose
    file is not installed yet (the kernel reserves the number first, e.g. while ``accept`` waits) is
    not open: skipped, as ``/proc/PID/fd`` skips it."""
    files = task.files.read_()
    if not files:
        return
    prog = task.prog_
    fdt = files.fdt.read_()
    max_fds = int(fdt.max_fds)
    if max_fds > MAX_FDS:
        raise GuestDataCorrupt(f"file table of {max_fds} descriptors (at most {MAX_FDS})")
    nwords = (max_fds + 63) // 64
    bitmap = prog.read(fdt.open_fds.value_(), 8 * nwords)
    fd_array = fdt.fd.value_()
    file_ptr = prog.type("struct file *")
    for w in range(nwords):
        word = int.from_bytes(bitmap[8 * w:8 * w + 8], "little")
        while word:
            low = word & -word
            fd = 64 * w + low.bit_length() - 1
            word ^= low
            if fd >= max_fds:
                return
            ptr = int.from_bytes(prog.read(fd_array + 8 * fd, 8), "little")
            if ptr:  # a descriptor reserved but not installed yet (accept() waiting): /proc skips it too
                yield fd, drgn.Object(prog, file_ptr, ptr)
