"""The kernel profile from RAM (kallsyms, KASLR, paging, BTF) and the drgn Program built on it.

Unit tests build kallsyms tables and BTF blobs by hand in every layout the decoders accept and
corrupt them; guest tests compare against what real Debian 5.10 / 6.1 / 6.12 guests report about
themselves (``/proc/kallsyms``, ``/proc/*/comm``, ``/proc/modules``, ``/proc/PID/maps``).
"""

from __future__ import annotations

import contextlib
import random
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import drgn
import pytest

from aradia.errors import GuestDataCorrupt
from aradia.lab.launcher import Guest
from aradia.linux import kallsyms as ks
from aradia.linux.btf import (
    ARRAY,
    CONST,
    DATASEC,
    DECL_TAG,
    ENUM,
    ENUM64,
    FLOAT,
    FUNC,
    FUNC_PROTO,
    FWD,
    INT,
    PTR,
    RESTRICT,
    STRUCT,
    TYPE_TAG,
    TYPEDEF,
    UNION,
    VAR,
    VOLATILE,
    Btf,
    BtfError,
    DrgnTypes,
)
from aradia.linux.profile import KernelNotFound, ProfileCache, find_profile
from aradia.linux.program import make_program, platform_x86_64
from aradia.vm import VM, attach, open_dump
from bytes_memory import BytesMemory
from guest_truth import guest_kallsyms, proc_modules

# --- crafted memory ---------------------------------------------------------------------------------


def _align(buf: bytearray, n: int = 8) -> None:
    buf.extend(b"\0" * (-len(buf) % n))


def _tokens(lines: list[bytes]) -> list[bytes]:
    """A token table in the kernel's shape: used characters stand for themselves, the other slots
    hold frequent two-character strings (so '0'..'9' are tokens 0x30..0x39)."""
    used = {c for line in lines for c in line}
    pairs: dict[bytes, int] = {}
    for line in lines:
        for i in range(len(line) - 1):
            pairs[line[i:i + 2]] = pairs.get(line[i:i + 2], 0) + 1
    best = sorted(pairs, key=lambda p: -pairs[p])
    table = []
    for i in range(256):
        if i in used:
            table.append(bytes([i]))
        else:
            table.append(best.pop(0) if best else b"~~")
    return table


def _encode(line: bytes, table: list[bytes]) -> bytes:
    pair = {t: i for i, t in enumerate(table) if len(t) == 2}
    out = bytearray()
    i = 0
    while i < len(line):
        if line[i:i + 2] in pair:
            out.append(pair[line[i:i + 2]])
            i += 2
        else:
            out.append(line[i])
            i += 1
    return bytes(out)


KBASE = 0xFFFF_FFFF_8100_0000


def _symbols(n: int = 1500, *, percpu: int = 5, big: bool = True) -> list[ks.KSym]:
    rng = random.Random(7)
    syms = [ks.KSym(0x1000 * i, "A", f"percpu_var{i}") for i in range(percpu)]
    addr = KBASE
    for i in range(n):
        letter = rng.choice("TtDdBbRrW")
        name = f"sym_{i}_{rng.choice(['alloc', 'free', 'lock', 'init'])}_{i % 10}{(i * 7) % 10}"
        if big and i % 300 == 17:
            name += "_" + "".join(rng.choice("qxzjkv") for _ in range(200))  # > 127 bytes: 2-byte length
        syms.append(ks.KSym(addr, letter, name))
        addr += rng.choice([0, 0x10, 0x40, 0x100])
    syms.append(ks.KSym(addr + 0x10, "T", "digits_0123456789"))
    return syms


def build_kallsyms(syms: list[ks.KSym], *, order: str = "old", seqs: int = 0, absolute_percpu: bool = True,
                   base_relative: bool = True, at: int = 0x30_0000,
                   size: int = 8 << 20) -> tuple[BytesMemory, dict[str, int]]:
    """Lay the tables out the way ``scripts/kallsyms`` does; returns memory and table addresses.

    ``order`` "old" (offsets, relative_base, num_syms, names, markers, [seqs], token_table, token_index:
    5.10, 6.1) or "new" (num_syms, names, markers, token_table, token_index, offsets, relative_base,
    [seqs]: 6.12). ``seqs`` is 0 (none), 3 or 4 bytes per kallsyms_seqs_of_names entry.
    """
    lines = [s.type.encode() + s.name.encode() for s in syms]
    table = _tokens(lines)
    rel_base = min(s.address for s in syms if s.address >= KBASE)
    offsets = bytearray()
    for s in syms:
        if absolute_percpu:
            off = s.address if s.address < KBASE else rel_base - s.address - 1
            offsets += struct.pack("<i", off)
        else:
            offsets += struct.pack("<I", (s.address - rel_base) & 0xFFFFFFFF)
    names = bytearray()
    markers = bytearray()
    for i, line in enumerate(lines):
        if i % 256 == 0:
            markers += struct.pack("<I", len(names))
        code = _encode(line, table)
        n = len(code)
        names += bytes([n]) if n < 0x80 else bytes([(n & 0x7F) | 0x80, n >> 7])
        names += code
    seq_blob = b"".join(i.to_bytes(seqs, "little") for i in range(len(syms))) if seqs else b""
    tt = bytearray()
    index = []
    for tok in table:
        index.append(len(tt))
        tt += tok + b"\0"
    ti = struct.pack("<256H", *index)

    rng = random.Random(1)
    buf = bytearray(rng.randbytes(at))  # garbage before the tables
    addrs: dict[str, int] = {}

    def put(label: str, blob: bytes) -> None:
        _align(buf)
        addrs[label] = len(buf)
        buf.extend(blob)

    def put_addresses() -> None:
        if base_relative:
            put("offsets", bytes(offsets))
            put("relative_base", struct.pack("<Q", rel_base))
        else:
            put("addresses", b"".join(struct.pack("<Q", s.address) for s in syms))

    if order == "old":
        put_addresses()
    put("num_syms", struct.pack("<I", len(syms)))
    put("names", bytes(names))
    put("markers", bytes(markers))
    if seqs and order == "old":
        put("seqs_of_names", seq_blob)
    put("token_table", bytes(tt))
    put("token_index", ti)
    if order == "new":
        put_addresses()
        if seqs:
            put("seqs_of_names", seq_blob)
    _align(buf, 4096)
    buf.extend(rng.randbytes(size - len(buf)))
    return BytesMemory(buf), addrs


LAYOUTS = [
    pytest.param(dict(order="old", seqs=0), id="5.10"),
    pytest.param(dict(order="old", seqs=3), id="6.1-backport"),
    pytest.param(dict(order="old", seqs=4), id="6.2-6.11"),
    pytest.param(dict(order="new", seqs=0), id="6.12"),
    pytest.param(dict(order="new", seqs=4, absolute_percpu=False), id="no-absolute-percpu"),
    pytest.param(dict(order="old", base_relative=False), id="kallsyms_addresses"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_kallsyms_layouts_decode_exactly(layout: dict[str, Any]) -> None:
    syms = _symbols(big=layout.get("order") == "new" or layout.get("seqs", 0) > 0)
    if layout.get("absolute_percpu") is False or layout.get("base_relative") is False:
        syms = [s for s in syms if s.address >= KBASE]
    mem, where = build_kallsyms(syms, **layout)
    found = list(ks.find_token_tables(mem))
    assert found == [(where["token_table"], where["token_index"])]
    tables = ks.locate_tables(mem, *found[0])
    assert tables.names == where["names"] and tables.count == len(syms)
    assert ks.read_kallsyms(mem.read, tables) == syms
    # The same tables from their symbol addresses (what VMCOREINFO gives on 6.0+).
    named = ks.tables_from_symbols(mem.read, lambda n: where.get(n.removeprefix("kallsyms_")))
    assert ks.read_kallsyms(mem.read, named) == syms
    text = ks.format_proc_kallsyms(syms)
    assert text.splitlines()[-1] == f"{syms[-1].address:016x} T digits_0123456789"
    table = ks.SymbolTable([s.address for s in syms], "".join(s.type for s in syms), [s.name for s in syms])
    assert table.proc_kallsyms() == text
    assert table.address("digits_0123456789") == syms[-1].address
    mid = len(syms) // 2
    inside = table.containing(syms[mid].address)
    assert mid in inside and all(syms[i].address == syms[mid].address for i in inside)


@pytest.mark.timeout(60)
def test_kallsyms_corruption_is_a_clear_error() -> None:
    syms = _symbols(600, big=False)
    mem, where = build_kallsyms(syms, order="old", seqs=3)
    tt, ti = where["token_table"], where["token_index"]
    good = ks.locate_tables(mem, tt, ti)

    def corrupt(at: int, data: bytes) -> BytesMemory:
        buf = bytearray(mem.buf)
        buf[at:at + len(data)] = data
        return BytesMemory(buf)

    # a marker that disagrees with the names stream: no candidate survives
    bad = corrupt(where["markers"] + 4, b"\xff\xff\x00\x00")
    with pytest.raises(ks.KallsymsError):
        ks.locate_tables(bad, tt, ti)
    with pytest.raises(ks.KallsymsError, match="markers"):
        ks.decode_names(bad.read, good)
    # a zero-length symbol
    with pytest.raises(ks.KallsymsError):
        ks.decode_names(corrupt(where["names"], b"\0").read, good)
    # an absurd count (2^31)
    from dataclasses import replace
    with pytest.raises(ks.KallsymsError, match="implausible"):
        ks.decode_names(mem.read, replace(good, count=1 << 31))
    with pytest.raises(ks.KallsymsError, match="implausible"):
        ks.read_addresses(mem.read, replace(good, count=1 << 31))
    # unsorted addresses
    with pytest.raises(ks.KallsymsError, match="sorted"):
        ks.read_addresses(corrupt(where["offsets"] + 4 * 300, struct.pack("<i", -5)).read, good)
    # a token index that does not describe the token table
    assert list(ks.find_token_tables(corrupt(ti + 2 * 0x41, b"\x00\x00"))) == []
    # nothing at all
    assert list(ks.find_token_tables(BytesMemory(bytearray(1 << 20)))) == []


# --- crafted BTF --------------------------------------------------------------------------------------


class BtfBuilder:
    """Writes BTF blobs type by type (ids from 1)."""

    def __init__(self) -> None:
        self.types = bytearray()
        self.strings = bytearray(b"\0")
        self.count = 0

    def s(self, name: str) -> int:
        if not name:
            return 0
        off = len(self.strings)
        self.strings += name.encode() + b"\0"
        return off

    def add(self, kind: int, name: str = "", vlen: int = 0, kflag: bool = False, size_or_type: int = 0,
            extra: bytes = b"") -> int:
        info = (int(kflag) << 31) | (kind << 24) | vlen
        self.types += struct.pack("<III", self.s(name), info, size_or_type) + extra
        self.count += 1
        return self.count

    def members(self, items: list[tuple[str, int, int]]) -> bytes:
        return b"".join(struct.pack("<III", self.s(n), t, off) for n, t, off in items)

    def blob(self) -> bytes:
        n = len(self.types)
        hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, n, n, len(self.strings))
        return hdr + bytes(self.types) + bytes(self.strings)


def sample_btf() -> bytes:
    b = BtfBuilder()
    i_int = b.add(INT, "int", size_or_type=4, extra=struct.pack("<I", (1 << 24) | 32))  # 1
    i_uint = b.add(INT, "unsigned int", size_or_type=4, extra=struct.pack("<I", 32))  # 2
    i_char = b.add(INT, "char", size_or_type=1, extra=struct.pack("<I", (3 << 24) | 8))  # 3
    b.add(INT, "_Bool", size_or_type=1, extra=struct.pack("<I", (4 << 24) | 8))  # 4
    p_s = b.add(PTR, size_or_type=10)  # 5
    a_name = b.add(ARRAY, extra=struct.pack("<III", i_char, i_int, 16))  # 6
    a_flex = b.add(ARRAY, extra=struct.pack("<III", i_int, i_int, 0))  # 7
    u32 = b.add(TYPEDEF, "u32", size_or_type=i_uint)  # 8
    c_u32 = b.add(CONST, size_or_type=u32)  # 9
    s = b.add(STRUCT, "s", vlen=6, kflag=True, size_or_type=32, extra=b.members([
        ("a", i_int, 0), ("b", u32, (3 << 24) | 32), ("c", u32, (5 << 24) | 35), ("", 11, 64),
        ("name", a_name, 128), ("data", a_flex, 256)]))  # 10
    assert s == 10 and p_s == 5
    b.add(UNION, "", vlen=2, size_or_type=8, extra=b.members([("x", i_int, 0), ("y", c_u32, 0)]))  # 11
    fwd = b.add(FWD, "s")  # 12
    b.add(PTR, size_or_type=fwd)  # 13
    b.add(ENUM, "e", vlen=2, kflag=True, size_or_type=4,
          extra=struct.pack("<Ii", b.s("E_NEG"), -1) + struct.pack("<Ii", b.s("E_TWO"), 2))  # 14
    b.add(ENUM, "u", vlen=1, size_or_type=4, extra=struct.pack("<II", b.s("U_MAX"), 0x7FFFFFFF))  # 15
    b.add(ENUM64, "big", vlen=1, size_or_type=8, extra=struct.pack("<III", b.s("BIG_ONE"), 0, 1 << 8))  # 16
    proto = b.add(FUNC_PROTO, vlen=2, size_or_type=i_int,
                  extra=struct.pack("<II", b.s("a"), i_int) + struct.pack("<II", 0, 0))  # 17
    b.add(FUNC, "f", vlen=1, size_or_type=proto)  # 18
    var = b.add(VAR, "v", size_or_type=i_int, extra=struct.pack("<I", 1))  # 19
    b.add(DATASEC, ".data..percpu", vlen=1, size_or_type=4, extra=struct.pack("<III", var, 0, 4))  # 20
    b.add(FLOAT, "double", size_or_type=8)  # 21
    b.add(DECL_TAG, "tag", size_or_type=s, extra=struct.pack("<i", -1))  # 22
    tag = b.add(TYPE_TAG, "user", size_or_type=i_int)  # 23
    b.add(PTR, size_or_type=tag)  # 24
    b.add(VOLATILE, size_or_type=i_int)  # 25
    b.add(RESTRICT, size_or_type=p_s)  # 26
    b.add(FWD, "only_fwd", kflag=True)  # 27
    b.add(STRUCT, "lst", vlen=1, size_or_type=8, extra=b.members([("next", 29, 0)]))  # 28
    b.add(PTR, size_or_type=28)  # 29
    return b.blob()


def _prog_with(blob: bytes) -> tuple[drgn.Program, DrgnTypes]:
    prog = drgn.Program(platform_x86_64())
    types = DrgnTypes(prog, Btf(blob))
    prog.register_type_finder("btf", types.finder, enable_index=0)
    return prog, types


@pytest.mark.timeout(30)
def test_btf_every_kind_converts() -> None:
    blob = sample_btf()
    btf = Btf(blob)
    assert len(btf) == 29 and btf.type(10).name == "s"
    prog, types = _prog_with(blob)
    s = prog.type("struct s")
    assert s.size == 32
    m = {x.name: x for x in s.members}
    assert m["a"].bit_offset == 0 and m["a"].type.name == "int"
    assert (m["b"].bit_offset, m["b"].bit_field_size) == (32, 3)
    assert (m["c"].bit_offset, m["c"].bit_field_size) == (35, 5)
    anon = [x for x in s.members if x.name is None]
    assert len(anon) == 1 and anon[0].type.kind == drgn.TypeKind.UNION
    assert [x.name for x in anon[0].type.members] == ["x", "y"]
    assert anon[0].type.members[1].type.qualifiers == drgn.Qualifiers.CONST
    assert m["name"].type.length == 16 and m["data"].type.length is None
    assert drgn.offsetof(s, "x") == 8  # through the anonymous union
    # the FWD pointer resolves to the complete struct; an unresolvable FWD stays incomplete
    assert types.convert(13).type.size == 32
    assert not types.convert(27).is_complete() and types.convert(27).kind == drgn.TypeKind.UNION
    assert prog.type("u32").type.name == "unsigned int"
    e = prog.type("enum e")
    assert [(x.name, x.value) for x in e.enumerators] == [("E_NEG", -1), ("E_TWO", 2)]
    assert prog.type("enum big").enumerators[0].value == 1 << 40
    f = types.convert(18)
    assert f.kind == drgn.TypeKind.FUNCTION and f.is_variadic and f.parameters[0].name == "a"
    assert prog.type("double").kind == drgn.TypeKind.FLOAT
    assert prog.type("_Bool").kind == drgn.TypeKind.BOOL
    assert types.convert(24).type.name == "int"  # type tags are dropped
    assert types.convert(25).qualifiers == drgn.Qualifiers.VOLATILE
    assert types.convert(26).qualifiers == drgn.Qualifiers.RESTRICT
    lst = prog.type("struct lst")
    inner = lst.members[0].type.type  # a self-reference, through a lazy member
    assert (inner.tag, inner.size, inner.members[0].name) == ("lst", 8, "next")
    assert btf.enumerator("E_TWO") == (14, 2) and btf.enumerator("nope") is None
    assert btf.find("v", (VAR,)) == [19] and btf.type(20).members[0].type == 19
    # the index round-trips through the cache format
    again = Btf(blob, index=Btf.load_index(btf.dump_index()))
    assert again.offsets == btf.offsets and again.ids_by_name("s") == btf.ids_by_name("s")


@pytest.mark.timeout(30)
def test_btf_corruption_is_a_clear_error() -> None:
    blob = sample_btf()
    with pytest.raises(BtfError, match="magic"):
        Btf(b"\0\0" + blob[2:])
    with pytest.raises(BtfError, match="past the blob"):
        Btf(blob[:-10])
    with pytest.raises(BtfError):
        Btf(blob[:10])
    bad = bytearray(blob)
    struct.pack_into("<I", bad, 24 + 4, 25 << 24)  # type 1: kind 25 does not exist
    with pytest.raises(BtfError, match="unknown kind"):
        Btf(bytes(bad))
    b = BtfBuilder()  # typedef a -> b -> a
    b.add(TYPEDEF, "a", size_or_type=2)
    b.add(TYPEDEF, "b", size_or_type=1)
    prog, types = _prog_with(b.blob())
    with pytest.raises(BtfError, match="itself"):
        prog.type("a")
    with pytest.raises(BtfError, match="out of range"):
        types.convert(99)
    assert isinstance(BtfError("x"), GuestDataCorrupt)


@pytest.mark.timeout(60)
def test_no_kernel_in_memory() -> None:
    vm = VM(BytesMemory(bytearray(random.Random(3).randbytes(4 << 20))))
    with pytest.raises(KernelNotFound):
        find_profile(vm, cache=False)


# --- real guests --------------------------------------------------------------------------------------

BootGuest = Callable[..., contextlib.AbstractContextManager[Guest]]


def start_sleeper(guest: Guest, name: str = "sleeper-aradia") -> int:
    """A process with a chosen comm that stays (a bash loop around sleep); returns its pid."""
    out = guest.run(f"bash -c 'echo -n {name} > /proc/self/comm; while :; do sleep 100; done' "
                    f">/dev/null 2>&1 & p=$!; for i in $(seq 200); do [ \"$(cat /proc/$p/comm)\" = {name} ] "
                    "&& break; sleep 0.05; done; echo $p")
    pid = int(out.split()[-1])
    assert guest.run(f"cat /proc/{pid}/comm").strip() == name
    return pid


def guest_processes(guest: Guest) -> dict[int, str]:
    """pid -> comm of every process in the guest's /proc."""
    out = guest.run("for p in /proc/[0-9]*; do echo \"${p#/proc/} $(cat $p/comm 2>/dev/null)\"; done")
    procs = {}
    for line in out.splitlines():
        pid, _, comm = line.partition(" ")
        if pid.isdigit() and comm:
            procs[int(pid)] = comm
    return procs


@contextlib.contextmanager
def attached(guest: Guest) -> Iterator[VM]:
    vm = attach(f"qmp:{guest.qmp_path}")
    try:
        yield vm
    finally:
        vm.close()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One profile cache for the module (the cold/warm tests rely on it starting empty)."""
    return tmp_path_factory.mktemp("profiles")


@pytest.mark.guest
@pytest.mark.timeout(300)
@pytest.mark.parametrize("series", ["5.10", "6.1", "6.12"])
def test_kallsyms_equal_proc_kallsyms(series: str, boot_guest: BootGuest, tmp_path: Path) -> None:
    with boot_guest(series, shared_memory=True, smp=2) as guest:
        truth = guest_kallsyms(guest)
        with attached(guest) as vm:
            cold = find_profile(vm, cache=ProfileCache(tmp_path))
            warm = find_profile(vm, cache=ProfileCache(tmp_path))
            scanned = find_profile(vm, cache=False, use_vmcoreinfo=False)
        assert cold.release == guest.image.release
        assert cold.symbols.proc_kallsyms().splitlines() == truth
        assert warm.cached == {"layout": True, "kallsyms": True, "btf": True}
        assert warm.symbols.proc_kallsyms().splitlines() == truth
        assert scanned.source == "scan"
        assert scanned.symbols.proc_kallsyms().splitlines() == truth
        for p in (warm, scanned):
            assert (p.kaslr_offset, p.phys_base, p.kernel_root, p.la57, p.page_offset_base, p.build_id) == \
                (cold.kaslr_offset, cold.phys_base, cold.kernel_root, cold.la57, cold.page_offset_base,
                 cold.build_id)
        assert cold.btf is not None and len(cold.btf) > 50000
        print(f"\n{series}: cold {cold.timings['total']:.3f} s, warm {warm.timings['total']:.3f} s, "
              f"scan {scanned.timings['total']:.3f} s, {len(truth)} symbols")


def _check_program(guest: Guest, vm: VM, prog: drgn.Program) -> None:
    """drgn's own helpers, with no DWARF, against the guest's /proc."""
    from drgn.helpers.linux.fs import d_path
    from drgn.helpers.linux.mm import for_each_vma
    from drgn.helpers.linux.module import for_each_module
    from drgn.helpers.linux.pid import for_each_task
    from drgn.helpers.linux.printk import get_dmesg
    from drgn.helpers.linux.sched import task_state_to_char

    before = guest_processes(guest)
    modules = {name for name, _, _ in proc_modules(guest)}
    maps = guest.run("cat /proc/1/maps").splitlines()
    with vm.paused():
        tasks = {int(t.pid): t.comm.string_().decode() for t in for_each_task(prog) if t.pid == t.tgid}
        states = {t.comm.string_().decode(): task_state_to_char(t) for t in for_each_task(prog)}
        mods = {m.name.string_().decode() for m in for_each_module(prog)}
        init = next(t for t in for_each_task(prog) if t.pid == 1)
        vmas = []
        for v in for_each_vma(init.mm):
            f = v.vm_file
            vmas.append((int(v.vm_start), int(v.vm_end), d_path(f.f_path).decode() if f else ""))
        dmesg = get_dmesg(prog)
    after = guest_processes(guest)
    stable = {p: c for p, c in before.items() if after.get(p) == c}
    assert len(stable) > 20
    for pid, comm in stable.items():
        # /proc shows kthreads' full names and kworkers' workqueue: task->comm is a prefix of it.
        assert pid in tasks and comm.startswith(tasks[pid]), (pid, comm, tasks.get(pid))
    for pid, comm in tasks.items():
        # Anything else is a transient: a kworker, or a process of the command channel started after
        # the first listing (pids grow).
        assert pid in before or pid in after or pid > max(before) or comm.startswith("kworker"), (pid, comm)
    assert {"sleeper-aradia"} <= set(tasks.values())
    assert states["sleeper-aradia"] == "S" and set(states.values()) <= set("RSDTtXZPI")
    assert mods == modules
    want = []
    for line in maps:
        parts = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        path = parts[5] if len(parts) > 5 and parts[5].startswith("/") else ""
        if not (len(parts) > 5 and parts[5] == "[vsyscall]"):
            want.append((lo, hi, path))
    assert vmas == want
    assert guest.image.release.encode() in dmesg and b"Linux version" in dmesg


@pytest.mark.guest
@pytest.mark.timeout(300)
def test_drgn_helpers_live_and_dump(boot_guest: BootGuest, tmp_path: Path) -> None:
    with boot_guest("6.1", shared_memory=True, smp=2) as guest:
        sleeper = start_sleeper(guest)
        with attached(guest) as vm:
            started = time.perf_counter()
            profile = find_profile(vm, cache=ProfileCache(tmp_path))
            prog = make_program(vm, profile)
            cold = time.perf_counter() - started
            _check_program(guest, vm, prog)
            started = time.perf_counter()
            prog2 = make_program(vm, find_profile(vm, cache=ProfileCache(tmp_path)))
            warm = time.perf_counter() - started
            _check_program(guest, vm, prog2)
            # Freshness: a task started after the Program was built (and used) is seen at once.
            fresh = start_sleeper(guest, "fresh-aradia")
            from drgn.helpers.linux.pid import for_each_task
            with vm.paused():
                names = {int(t.pid): t.comm.string_().decode() for t in for_each_task(prog)}
            assert names.get(fresh) == "fresh-aradia" and names.get(sleeper) == "sleeper-aradia"
            dump = tmp_path / "guest.elf"
            vm.machine.dump_guest_memory(str(dump))  # type: ignore[union-attr]
        print(f"\ncold attach (profile + Program) {cold:.3f} s, warm {warm:.3f} s")
        d = open_dump(str(dump))
        try:
            dprof = find_profile(d, cache=ProfileCache(tmp_path))
            assert dprof.kaslr_offset == profile.kaslr_offset
            dprog = make_program(d, dprof)
            from drgn.helpers.linux.pid import for_each_task
            dump_names = {t.comm.string_().decode() for t in for_each_task(dprog)}
            assert "fresh-aradia" in dump_names and dprog.flags & drgn.ProgramFlags.IS_LINUX_KERNEL
            assert not dprog.flags & drgn.ProgramFlags.IS_LIVE
        finally:
            d.close()


@pytest.mark.guest
@pytest.mark.timeout(300)
def test_kaslr_differs_between_boots_cache_reused(boot_guest: BootGuest, tmp_path: Path) -> None:
    cache = ProfileCache(tmp_path)
    seen = []
    for attempt in range(3):
        with boot_guest("6.1", shared_memory=True) as guest, attached(guest) as vm:
            p = find_profile(vm, cache=cache)
            assert p.cached.get("kallsyms") == (attempt > 0) and p.cached.get("btf") == (attempt > 0)
            assert p.symbols.address("_text") == 0xFFFF_FFFF_8100_0000 + p.kaslr_offset
            if attempt == 0:
                truth = guest_kallsyms(guest)
                assert p.symbols.proc_kallsyms().splitlines() == truth
            seen.append((p.kaslr_offset, p.phys_base))
            prog = make_program(vm, p)
            assert prog["init_uts_ns"].name.release.string_().decode() == guest.image.release
        if len(seen) >= 2 and len({s[0] for s in seen}) > 1:
            break
    assert len({s[0] for s in seen}) > 1, f"KASLR slide equal in {len(seen)} boots: {seen}"


@pytest.mark.guest
@pytest.mark.timeout(300)
def test_five_level_paging(boot_guest: BootGuest, tmp_path: Path) -> None:
    with boot_guest("6.1", shared_memory=True, cpu="max", smp=2) as guest:
        start_sleeper(guest)
        with attached(guest) as vm:
            assert any(c.la57 for c in vm.cpus())
            p = find_profile(vm, cache=ProfileCache(tmp_path))
            assert p.la57 and p.page_offset_base >= 0xFF00_0000_0000_0000
            scanned = find_profile(vm, cache=False, use_vmcoreinfo=False)
            assert scanned.la57 and scanned.phys_base == p.phys_base
            _check_program(guest, vm, make_program(vm, p))
