"""Hostile guests: corrupted copies of a real 6.1 dump must give partial results and warnings, fast.

A 6.1 guest runs three named processes that each hold ``/etc/passwd`` open; aradia writes an ELF dump
of it. Copies of that dump are then corrupted at places found with aradia's own profile and drgn
(virtual address -> physical through the kernel's page tables -> file offset through the ELF
segments):

* **cycles**: a task's ``tasks.next`` points back at an earlier task, the pid IDR (the XArray
  drgn's ``for_each_task`` and ``find_task`` really walk) gets a leaf slot pointing at the root and
  a root slot pointing at itself -- drgn's ``find_task`` spins in C on that copy --, and a VMA maple
  tree node becomes its own child; on 6.12, a mount's ``rb_left`` points at the mount tree's root
  (drgn's recursive walk ends in RecursionError);
* **wild mm**: one task's ``mm`` points outside RAM, another's into kernel text;
* **absurd lengths**: ``arg_end - arg_start`` of 2^31, a dentry name length of 2^31, and the printk
  ring's head id 2^31 past its tail;
* **random**: seeded random words and byte runs written over tasks, mms, maple and XArray nodes,
  file tables, dentries, mounts, modules and the printk ring (``ARADIA_HOSTILE_TRIALS`` trials,
  default 60, from seed ``ARADIA_HOSTILE_SEED``, default 0).

The CLI (as a subprocess) and the library views must finish in bounded time, keep the healthy
processes, name what they skipped in a warning, and never raise anything but an AradiaError.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import drgn
import pytest
from drgn.helpers.linux.list import list_for_each_entry
from drgn.helpers.linux.pid import find_task, for_each_task
from drgn.helpers.linux.rbtree import rbtree_inorder_for_each_entry

from aradia.errors import AradiaError
from aradia.lab.launcher import Guest
from aradia.linux.bounds import Warnings, bounded
from aradia.linux.walks import open_files, xa_entries
from aradia.sources.dumpwrite import write_elf
from aradia.vm import VM, attach, open_dump
from cli_runner import run_cli

NAMES = ("hostile-a", "hostile-b", "hostile-c")
BOUND = 30.0  # seconds any one command or view may take on a corrupt dump
TWO31 = 1 << 31


@dataclass
class BaseDump:
    """The healthy dump and the pids of the named processes in it."""

    path: Path
    pids: dict[str, int]


@pytest.fixture(scope="module")
def base(launch_guest: Callable[..., Guest], tmp_path_factory: pytest.TempPathFactory) -> BaseDump:
    return _base_dump(launch_guest("6.1", shared_memory=True), tmp_path_factory)


def _base_dump(guest: Guest, tmp_path_factory: pytest.TempPathFactory) -> BaseDump:
    """Start the named processes in ``guest`` and dump it with aradia's ELF writer."""
    pids = {}
    for name in NAMES:
        out = guest.run(
            f"bash -c 'echo -n {name} > /proc/$$/comm; exec 3</etc/passwd; while :; do sleep 1000; done' "
            f"{name}-arg >/dev/null 2>&1 & p=$!; for i in $(seq 200); do "
            f"[ \"$(cat /proc/$p/comm)\" = {name} ] && break; sleep 0.05; done; echo $p")
        pids[name] = int(out.split()[-1])
    path = tmp_path_factory.mktemp("hostile") / f"base-{guest.image.series}.elf"
    vm = attach(f"qmp:{guest.qmp_path}")
    try:
        with vm.paused():
            write_elf(vm.memory, path, cpu_states=[c.regs for c in vm.cpus()])
    finally:
        vm.close()
    return BaseDump(path, pids)


class Corruptor:
    """Edits to a copy of the base dump, at objects found through the healthy dump with drgn."""

    def __init__(self, base: BaseDump) -> None:
        self.base = base
        self.vm = open_dump(str(base.path))
        self.kernel = self.vm.load_kernel()
        self.prog: drgn.Program = self.kernel.prog
        self.edits: dict[int, bytes] = {}

    def task(self, name: str) -> drgn.Object:
        return find_task(self.prog, self.base.pids[name])

    def file_offset(self, vaddr: int, size: int) -> int:
        """Where ``size`` bytes at kernel virtual ``vaddr`` are in the dump file (one page at most)."""
        assert (vaddr & 0xFFF) + size <= 0x1000, "an edit must not cross a page"
        p = self.kernel.profile
        pa = self.vm.translate(vaddr, cr3=p.kernel_root, la57=p.la57).paddr
        for seg in self.vm.memory.segments():
            if seg.gpa <= pa and pa + size <= seg.end and seg.backing >= 0:
                return seg.backing + pa - seg.gpa
        raise AssertionError(f"{vaddr:#x} is not in the dump file")

    def put(self, vaddr: int, data: bytes) -> None:
        self.edits[self.file_offset(vaddr, len(data))] = data

    def u64(self, vaddr: int, value: int) -> None:
        self.put(vaddr, struct.pack("<Q", value & (1 << 64) - 1))

    def u32(self, vaddr: int, value: int) -> None:
        self.put(vaddr, struct.pack("<I", value & (1 << 32) - 1))

    def write(self, out: Path) -> Path:
        """A copy of the base dump with the edits so far; the edits are then forgotten."""
        shutil.copyfile(self.base.path, out)
        with open(out, "r+b") as f:
            for off, data in self.edits.items():
                f.seek(off)
                f.write(data)
        self.edits = {}
        return out

    def pid_root(self) -> drgn.Object:
        """The root ``struct xa_node *`` of the pid IDR (asserted to be an interior node)."""
        head = self.prog["init_pid_ns"].idr.idr_rt.xa_head.value_()
        assert head & 3 == 2 and head > 4096, "the pid IDR has a single entry: no tree to corrupt"
        root = drgn.Object(self.prog, "struct xa_node *", head - 2)
        assert root.shift.value_() == 6, "the guest needs more than 64 pids for a two-level pid IDR"
        return root


@pytest.fixture(scope="module")
def corruptor(base: BaseDump) -> Iterator[Corruptor]:
    c = Corruptor(base)
    try:
        yield c
    finally:
        c.vm.close()


@pytest.fixture(scope="module")
def base612(launch_guest: Callable[..., Guest], tmp_path_factory: pytest.TempPathFactory) -> BaseDump:
    return _base_dump(launch_guest("6.12", shared_memory=True), tmp_path_factory)


@pytest.fixture(scope="module")
def corruptor612(base612: BaseDump) -> Iterator[Corruptor]:
    c = Corruptor(base612)
    try:
        yield c
    finally:
        c.vm.close()


def aradia(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run the CLI as a user would; it must end within :data:`BOUND` seconds and never trace back."""
    started = time.monotonic()
    r = run_cli(*args, timeout=BOUND + 30)
    elapsed = time.monotonic() - started
    assert elapsed < BOUND, f"aradia {' '.join(args)} took {elapsed:.1f} s"
    assert "Traceback" not in r.stderr, r.stderr
    return r, elapsed


def view(*args: str) -> dict[str, Any]:
    """``aradia VIEW ... --json``: exit status 0 and the JSON document."""
    r, _ = aradia(*args, "--json")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    doc = json.loads(r.stdout)
    assert set(doc) == {"items", "warnings"}
    return doc


def warned(doc: dict[str, Any] | list[str], *needles: str) -> bool:
    """Whether one warning contains every needle."""
    warnings = doc["warnings"] if isinstance(doc, dict) else doc
    return any(all(n in w for n in needles) for w in warnings)


def by_pid(items: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {p["pid"]: p for p in items}


# --- the three corrupted copies ----------------------------------------------------------------------


@dataclass
class Copy:
    """A corrupted dump and what was done to it."""

    path: Path
    pids: dict[str, int]
    facts: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="module")
def cycles(corruptor: Corruptor, tmp_path_factory: pytest.TempPathFactory) -> Copy:
    c = corruptor
    a, b = c.task("hostile-a"), c.task("hostile-b")
    # The task list: b -> a -> ... -> b, never back to init_task.
    c.u64(b.tasks.next.address_, a.tasks.address_)
    # The pid IDR: the leaf holding hostile-a gets an empty slot before it pointing at the root, and
    # the root's first empty slot points at the root itself.
    root = c.pid_root()
    head = root.value_() + 2
    pid_a = c.base.pids["hostile-a"]
    leaf = drgn.Object(c.prog, "struct xa_node *", root.slots[pid_a >> 6].value_() - 2)
    empty = [i for i in range(64) if not leaf.slots[i].value_()]
    before = [i for i in empty if i < pid_a & 63]
    c.u64(leaf.slots[(before or empty)[0]].address_, head)
    loop_slot = next(i for i in range(64) if not root.slots[i].value_())
    c.u64(root.slots[loop_slot].address_, head)
    # hostile-c's VMA maple tree: the root's second child is the root again.
    mt_root = c.task("hostile-c").mm.mm_mt.ma_root.value_()
    kind = (mt_root >> 3) & 0xF
    assert kind in (2, 3), "hostile-c's maple tree is a single leaf"
    node = drgn.Object(c.prog, "struct maple_node", address=mt_root & ~0xFF)
    slots = node.ma64.slot if kind == 3 else node.mr64.slot
    c.u64(slots[1].address_, mt_root)
    return Copy(c.write(tmp_path_factory.mktemp("hostile") / "cycles.elf"), c.base.pids,
                {"looping_pid": loop_slot * 64 + 5})


@pytest.fixture(scope="module")
def wild_mm(corruptor: Corruptor, tmp_path_factory: pytest.TempPathFactory) -> Copy:
    c = corruptor
    outside = c.kernel.profile.page_offset_base + (64 << 30)  # direct map, far above the 256 MiB of RAM
    c.u64(c.task("hostile-b").mm.address_, outside)
    text = c.kernel.profile.symbol("_text")
    # the kernel's text starts 2 MiB-aligned (CONFIG_PHYSICAL_ALIGN) in the top 2 GiB of the address space
    assert text is not None and text % (2 << 20) == 0 and text >> 31 == (1 << 33) - 1, text
    c.u64(c.task("hostile-c").mm.address_, text + 0x1000)  # readable, but not an mm_struct
    return Copy(c.write(tmp_path_factory.mktemp("hostile") / "wild-mm.elf"), c.base.pids)


@pytest.fixture(scope="module")
def lengths(corruptor: Corruptor, tmp_path_factory: pytest.TempPathFactory) -> Copy:
    c = corruptor
    mm = c.task("hostile-a").mm
    c.u64(mm.arg_end.address_, mm.arg_start.value_() + TWO31)
    passwd = dict(open_files(c.task("hostile-a")))[3]
    c.u32(passwd.f_path.dentry.d_name.len.address_, TWO31)
    ring = c.prog["prb"].desc_ring
    c.u64(ring.head_id.counter.address_, ring.tail_id.counter.value_() + TWO31)
    return Copy(c.write(tmp_path_factory.mktemp("hostile") / "lengths.elf"), c.base.pids)


# --- tests ----------------------------------------------------------------------------------------------


@pytest.mark.guest
@pytest.mark.timeout(300)
def test_base_dump_is_healthy(base: BaseDump) -> None:
    """The uncorrupted dump has the three processes and no warnings (the baseline of the others)."""
    ps = view("ps", "--vm", str(base.path))
    assert ps["warnings"] == []
    procs = by_pid(ps["items"])
    for name, pid in base.pids.items():
        assert procs[pid]["comm"] == name and procs[pid]["cmdline"][-1] == f"{name}-arg"
    files = view("files", str(base.pids["hostile-a"]), "--vm", str(base.path))
    assert any(f["fd"] == 3 and f["path"] == "/etc/passwd" for f in files["items"])
    assert files["warnings"] == []


@pytest.mark.guest
@pytest.mark.timeout(300)
def test_cycle_in_task_list_and_pid_table(base: BaseDump, cycles: Copy) -> None:
    with open_dump(str(base.path)) as healthy:
        healthy_sockets, healthy_mounts = healthy.linux.sockets(), healthy.linux.mounts()
    # The copy really has both cycles.
    with open_dump(str(cycles.path)) as vm:
        prog = vm.linux.prog
        w = Warnings()
        list(bounded(list_for_each_entry("struct task_struct", prog["init_task"].tasks.address_of_(), "tasks"),
                     "tasks", w, key=lambda t: t.value_()))
        assert warned(w, "cycle detected"), w
        w = Warnings()
        list(xa_entries(prog["init_pid_ns"].idr.idr_rt.address_of_(), "pid table", w))
        assert warned(w, "reached twice (a cycle)") and warned(w, "leaf node points to another node"), w

        # Library: every healthy process is still there.
        procs = {p.pid: p for p in vm.linux.processes()}
        assert warned(vm.linux.warnings, "pid table")
        threads = vm.linux.processes(threads=True)
        assert len(threads) >= len(procs)
        assert 1 in procs and all(procs[pid].comm == name for name, pid in cycles.pids.items())
        # sockets and mounts are reached through the tasks' files and the mount namespace: the same
        # as in the healthy dump
        assert vm.linux.sockets() == healthy_sockets and healthy_sockets
        assert vm.linux.mounts() == healthy_mounts and healthy_mounts

    ps = view("ps", "--vm", str(cycles.path))
    procs = by_pid(ps["items"])
    assert 1 in procs and len(procs) > 20
    for name, pid in cycles.pids.items():
        assert procs[pid]["comm"] == name and procs[pid]["cmdline"][-1] == f"{name}-arg"
    assert warned(ps, "pid table", "cycle") and warned(ps, "pid table", "leaf node points to another node")
    pid_a = str(cycles.pids["hostile-a"])
    maps = view("maps", pid_a, "--vm", str(cycles.path))
    assert any(m["path"] == "/bin/bash" for m in maps["items"])
    files = view("files", pid_a, "--vm", str(cycles.path))
    assert any(f["fd"] == 3 and f["path"] == "/etc/passwd" for f in files["items"])
    assert view("dmesg", "--vm", str(cycles.path))["items"]
    pid_c = str(cycles.pids["hostile-c"])
    maps_c = view("maps", pid_c, "--vm", str(cycles.path))
    assert maps_c["items"] and warned(maps_c, f"maps of {pid_c}", "reached twice (a cycle)")
    starts = [m["start"] for m in maps_c["items"]]
    assert starts == sorted(set(starts))
    # A pid whose lookup runs into the self-pointing root node: drgn's find_task spins in C there.
    r, _ = aradia("maps", str(cycles.facts["looping_pid"]), "--vm", str(cycles.path), "--json")
    assert r.returncode == 2 and r.stderr.startswith("aradia: error: ") and "pid table" in r.stderr, r.stderr


@pytest.mark.guest
@pytest.mark.timeout(300)
def test_wild_mm_pointer(wild_mm: Copy) -> None:
    pid_a, pid_b, pid_c = (wild_mm.pids[n] for n in NAMES)
    ps = view("ps", "--vm", str(wild_mm.path))
    procs = by_pid(ps["items"])
    assert procs[pid_a]["cmdline"][-1] == "hostile-a-arg" and procs[pid_a]["exe"] == "/bin/bash"
    assert procs[pid_b]["comm"] == "hostile-b" and procs[pid_b]["cmdline"] == [] and procs[pid_b]["exe"] is None
    assert procs[pid_c]["comm"] == "hostile-c"
    assert warned(ps, f"task {pid_b} ", "cmdline") and warned(ps, f"task {pid_b} ", "exe")
    assert warned(ps, f"task {pid_c} ")

    maps = view("maps", str(pid_b), "--vm", str(wild_mm.path))
    assert maps["items"] == [] and warned(maps, f"maps of {pid_b}")
    # an mm that is kernel text: its VMA tree leads nowhere readable, so no maps and a warning (as
    # for the mm outside RAM), exit status 0
    maps_c = view("maps", str(pid_c), "--vm", str(wild_mm.path))
    assert maps_c["items"] == [] and warned(maps_c, f"maps of {pid_c}"), maps_c
    files = view("files", str(pid_b), "--vm", str(wild_mm.path))
    assert any(f["fd"] == 3 and f["path"] == "/etc/passwd" for f in files["items"])
    assert any(m["path"] == "/bin/bash" for m in view("maps", str(pid_a), "--vm", str(wild_mm.path))["items"])
    assert view("dmesg", "--vm", str(wild_mm.path))["items"]

    with open_dump(str(wild_mm.path)) as vm:
        procs_lib = {p.pid: p for p in vm.linux.processes()}
        assert procs_lib[pid_b].cmdline == [] and warned(vm.linux.warnings, f"task {pid_b} ")
        assert vm.linux.maps(pid_b) == [] and warned(vm.linux.warnings, f"maps of {pid_b}")
        with pytest.raises(AradiaError):
            vm.linux.read_user(pid_b, 0x400000, 16)


@pytest.mark.guest
@pytest.mark.timeout(300)
def test_absurd_lengths(lengths: Copy) -> None:
    pid_a = lengths.pids["hostile-a"]
    ps = view("ps", "--vm", str(lengths.path))
    procs = by_pid(ps["items"])
    assert procs[pid_a]["comm"] == "hostile-a" and procs[pid_a]["cmdline"] == []
    assert procs[lengths.pids["hostile-b"]]["cmdline"][-1] == "hostile-b-arg"
    assert warned(ps, f"task {pid_a} ", f"{TWO31} bytes")

    files = view("files", str(pid_a), "--vm", str(lengths.path))
    fds = {f["fd"]: f["path"] for f in files["items"]}
    assert fds[3] == "?" and fds[0] == "/dev/null"
    assert warned(files, f"fd 3 of {pid_a}", f"name length {TWO31}")
    assert any(m["path"] == "/bin/bash" for m in view("maps", str(pid_a), "--vm", str(lengths.path))["items"])

    dmesg = view("dmesg", "--vm", str(lengths.path))
    assert warned(dmesg, "span more than the ring")
    texts = [r["text"] for r in dmesg["items"]]
    assert any(t.startswith("Linux version ") for t in texts) and len(texts) > 100
    with open_dump(str(lengths.path)) as vm:
        assert [r.text for r in vm.linux.dmesg()] == texts


@pytest.mark.guest
@pytest.mark.timeout(300)
def test_cycle_in_mount_tree_612(base612: BaseDump, corruptor612: Corruptor,
                                 tmp_path_factory: pytest.TempPathFactory) -> None:
    """6.8+ keeps a namespace's mounts in a red-black tree, which drgn walks recursively: a node whose
    ``rb_left`` points back at the root must cost a warning, not a RecursionError."""
    c = corruptor612
    ns = c.prog["init_task"].nsproxy.mnt_ns
    tree = ns.mounts.rb_node
    healthy = view("mounts", "--vm", str(base612.path))
    assert healthy["warnings"] == [] and len(healthy["items"]) > 3
    leaf = next(m for m in rbtree_inorder_for_each_entry("struct mount", ns.mounts.address_of_(), "mnt_node")
                if not m.mnt_node.rb_left and m.mnt_node.address_ != tree.value_())
    c.u64(leaf.mnt_node.rb_left.address_, tree.value_())
    copy = c.write(tmp_path_factory.mktemp("hostile") / "mount-cycle-6.12.elf")
    mounts = view("mounts", "--vm", str(copy))
    assert mounts["items"] == healthy["items"]
    assert warned(mounts, "mount tree", "seen twice")
    ps = view("ps", "--vm", str(copy))
    assert all(p in by_pid(ps["items"]) for p in base612.pids.values())


# --- random corruption -----------------------------------------------------------------------------------


# The fields the views read, per object: where corruption matters.
FIELDS = {
    "task": ("tasks", "pid", "tgid", "real_parent", "real_cred", "mm", "files", "comm", "flags", "__state",
             "start_boottime", "thread_pid", "pid_links", "worker_private"),
    "mm": ("mm_mt", "arg_start", "arg_end", "exe_file", "brk", "start_brk", "start_stack", "pgd"),
    "files": ("fdt",),
    "fdtable": ("max_fds", "fd", "open_fds", "close_on_exec"),
    "file": ("f_path", "f_inode", "f_flags", "f_mode", "f_pos", "f_op", "private_data"),
    "dentry": ("d_parent", "d_name", "d_op", "d_inode", "d_hash", "d_sb"),
    "mount": ("mnt_parent", "mnt_mountpoint", "mnt", "mnt_devname", "mnt_list", "mnt_node"),
    "module": ("list", "name", "core_layout", "mem"),
    "printk ring": ("desc_ring", "text_data_ring"),
}


def _regions(c: Corruptor) -> list[tuple[str, int, int]]:
    """(what, kernel address, size) of the kernel data the views read: the fields of :data:`FIELDS`
    and whole XArray nodes, maple nodes and printk descriptors."""
    prog = c.prog
    out: list[tuple[str, int, int]] = []

    def fields(kind: str, obj: drgn.Object) -> None:
        for name in FIELDS[kind]:
            try:
                m = obj.member_(name)
            except LookupError:
                continue
            out.append((f"{kind}.{name}", m.address_, drgn.sizeof(m)))

    root = c.pid_root()
    out.append(("pid IDR root", root.value_(), drgn.sizeof(root.type_.type)))
    for i in range(64):
        v = root.slots[i].value_()
        if v & 3 == 2 and v > 4096:
            out.append(("pid IDR leaf", v - 2, drgn.sizeof(root.type_.type)))
    for t in for_each_task(prog):
        fields("task", t)
        if t.comm.string_().decode() not in NAMES:
            continue
        fields("mm", t.mm)
        fields("files", t.files)
        fields("fdtable", t.files.fdt)
        for _fd, f in open_files(t):
            fields("file", f)
            fields("dentry", f.f_path.dentry)
        fields("dentry", t.mm.exe_file.f_path.dentry)
        out += [("maple node", node, 256) for node in _maple_nodes(t.mm)]
    prb = prog["prb"]
    fields("printk ring", prb)
    ring = prb.desc_ring
    for i in range(0, 1 << int(ring.count_bits), 61):
        out.append(("printk descriptor", ring.descs[i].address_, drgn.sizeof(ring.descs[i])))
        out.append(("printk info", ring.infos[i].address_, drgn.sizeof(ring.infos[i])))
    ns = prog["init_task"].nsproxy.mnt_ns
    for mnt in (list_for_each_entry("struct mount", ns.list.address_of_(), "mnt_list")
                if ns.type_.type.has_member("list") else
                rbtree_inorder_for_each_entry("struct mount", ns.mounts.address_of_(), "mnt_node")):
        fields("mount", mnt)
        fields("dentry", mnt.mnt.mnt_root)
    for mod in list_for_each_entry("struct module", prog["modules"].address_of_(), "list"):
        fields("module", mod)
    return out


def _maple_nodes(mm: drgn.Object) -> Iterator[int]:
    """Addresses of the maple nodes of ``mm`` (interior and leaf)."""
    root = mm.mm_mt.ma_root.value_()
    seen = set()
    stack = [root]
    while stack:
        enode = stack.pop()
        addr = enode & ~0xFF
        if addr in seen or not (enode & 3 == 2 and enode > 4096):
            continue
        seen.add(addr)
        yield addr
        if (enode >> 3) & 0xF != 1:  # not a leaf: follow the children
            node = drgn.Object(mm.prog_, "struct maple_node", address=addr)
            slots = node.ma64.slot if (enode >> 3) & 0xF == 3 else node.mr64.slot
            stack.extend(v for v in slots.value_() if v)


def _nasty(rng: random.Random, regions: list[tuple[str, int, int]], here: int) -> bytes:
    """A value a corrupt kernel might hold: a pointer elsewhere, to itself, huge, zero, noise."""
    kind = rng.randrange(7)
    if kind == 0:
        return bytes(8)
    if kind == 1:
        return b"\xff" * 8
    if kind == 2:
        _what, addr, size = rng.choice(regions)
        return struct.pack("<Q", addr + rng.randrange(0, size, 8))
    if kind == 3:
        return struct.pack("<Q", here & ~7)
    if kind == 4:
        return struct.pack("<Q", 1 << rng.randrange(64))
    if kind == 5:
        return struct.pack("<Q", rng.getrandbits(64))
    return bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 33)))


def _run_views(vm: VM, pids: list[int]) -> list[str]:
    """Every view over ``vm``; returns the warnings; only AradiaError may escape a view."""
    k = vm.linux
    warnings: list[str] = []
    calls: list[Callable[[], object]] = [k.processes, lambda: k.processes(threads=True), k.sockets, k.mounts,
                                         k.dmesg, k.modules]
    for pid in pids:
        calls += [lambda pid=pid: k.maps(pid), lambda pid=pid: k.files(pid)]
    for call in calls:
        started = time.monotonic()
        try:
            rows = call()
            assert isinstance(rows, list)
        except AradiaError as e:
            warnings.append(f"error: {e}")
        elapsed = time.monotonic() - started
        assert elapsed < BOUND, f"a view took {elapsed:.1f} s"
        warnings += list(k.warnings)
    return warnings


@pytest.mark.guest
@pytest.mark.timeout(600)
@pytest.mark.parametrize("series", ["6.1", "6.12"])
def test_random_corruption_never_crashes(series: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    c: Corruptor = request.getfixturevalue("corruptor" if series == "6.1" else "corruptor612")
    regions = _regions(c)
    assert len(regions) > 100
    work = c.write(tmp_path / "random.elf")
    pids = [1, *c.base.pids.values()]
    first = int(os.environ.get("ARADIA_HOSTILE_SEED", "0"))
    trials, noticed, slowest = int(os.environ.get("ARADIA_HOSTILE_TRIALS", "60")), 0, 0.0
    for seed in range(first, first + trials):
        rng = random.Random(seed)
        patches: dict[int, bytes] = {}
        done = []
        for _ in range(rng.randrange(1, 5)):
            what, addr, size = rng.choice(regions)
            at = addr + rng.randrange(0, max(8, size - 7), 8) if size >= 8 else addr
            data = _nasty(rng, regions, at)
            data = data[:0x1000 - (at & 0xFFF)]
            patches[c.file_offset(at, len(data))] = data
            done.append(f"{what}+{at - addr:#x}={data.hex()}")
        original = {}
        with open(work, "r+b") as f:
            for off, data in patches.items():
                f.seek(off)
                original[off] = f.read(len(data))
                f.seek(off)
                f.write(data)
        try:
            started = time.monotonic()
            with open_dump(str(work)) as vm:
                try:
                    warnings = _run_views(vm, pids)
                except Exception as e:
                    raise AssertionError(f"seed {seed} ({', '.join(done)}): {type(e).__name__}: {e}") from e
            slowest = max(slowest, time.monotonic() - started)
            noticed += bool(warnings)
        finally:
            with open(work, "r+b") as f:
                for off, data in original.items():
                    f.seek(off)
                    f.write(data)
    print(f"\n{trials} random corruptions: {noticed} noticed (warnings or errors), slowest {slowest:.2f} s")
    # The corruption must matter often enough for this test to mean something.
    assert noticed >= trials // 4
