"""README claims beyond its command lines, each against what the guest itself did or shows.

``--pause`` takes a consistent snapshot (the guest's clock stands still while the view is read, and
the view equals /proc around it); the trace filters ``--pid``/``--uid``/``--comm`` keep exactly the
events of the processes they name; ``--in-pid`` and ``--args`` of user-space probes; ``--in-pid`` of
a watchpoint with another process writing the same address; a guest that shuts down ends a trace with
a one-line error and exit status 2; ``vm.write`` writes what the guest then reads.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from aradia.lab.launcher import Guest
from aradia.vm import attach
from cli_checks import (
    check_dmesg,
    check_files,
    check_lsmod,
    check_maps,
    check_mounts,
    check_net,
    check_ps,
)
from cli_runner import Cli
from guest_programs import TWIN_VA
from guest_truth import proc_details, sample_stat
from guest_workload import (
    ACTORS,
    Ticker,
    Workload,
    actor_events,
    program_lines,
    release_actors,
    release_opener,
    start_actors,
    start_opener,
)

GUEST_SERIES = "6.1"
GUEST_OPTIONS = {"smp": 2, "gdb": True, "shared_memory": True}


class Env:
    def __init__(self, guest: Guest, tmp: Path) -> None:
        self.guest = guest
        self.tmp = tmp
        self.cli = Cli(tmp)
        self.work = Workload.start(guest, tmp)
        self.vm = f"qmp:{guest.qmp_path}"


@pytest.fixture(scope="module")
def env(guest: Guest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(guest, tmp_path_factory.mktemp("claims"))
    yield e
    e.work.stop()


@pytest.fixture
def ticker(env: Env) -> Iterator[Ticker]:
    t = Ticker(env.guest, seconds=300)
    yield t
    t.close()


# --- --pause -------------------------------------------------------------------------------------------
PAUSED = 0.01  # seconds: a view with --pause stops the guest longer than this (measured: 26-170 ms)


def _assert_running_again(env: Env, ticker: Ticker) -> None:
    _, n0, _ = ticker.read()
    time.sleep(0.3)
    assert ticker.read()[1] > n0, "the guest does not run after the view"
    with attach(env.vm) as vm:
        assert vm.status() == "running"


@pytest.mark.timeout(300)
def test_ps_pause_is_the_guest_at_one_instant(env: Env, ticker: Ticker) -> None:
    """``ps --pause``: the guest's clock stood still while aradia read (and only then), the ticker's
    round in the table is one the guest sat on while the host watched, and the rest equals /proc."""
    cmd = f"aradia ps --vm {env.vm} --pause"
    truth, (out, held, growth) = sample_stat(env.guest, lambda: ticker.watch(lambda: env.cli.ok(cmd)))
    assert growth >= PAUSED, f"the guest's clock did not stop (lag grew {growth:.4f}s)"
    row = check_ps(out, truth, proc_details(env.guest, truth.stable), volatile=frozenset({ticker.pid}))[ticker.pid]
    # the ticker writes a round into its cmdline, then its comm, then its page: paused anywhere in
    # round n+1, the page says n and comm and cmdline n or n+1 (cmdline never behind comm)
    comm, argv = int(row["COMM"].removeprefix("tk")), int(row["CMDLINE"].split()[-1])
    assert comm <= argv <= comm + 1, row
    frozen = max(held.get(comm, 0.0), held.get(comm - 1, 0.0))
    assert frozen >= PAUSED / 2, (comm, sorted(held.items(), key=lambda kv: -kv[1])[:3])
    _assert_running_again(env, ticker)
    # without --pause the clock does not stop: the measure tells the two apart
    _, _, growth = ticker.watch(lambda: env.cli.ok(f"aradia ps --vm {env.vm}"))
    assert growth < PAUSED, growth


VIEWS: dict[str, Callable[[Env, str], None]] = {
    "lsmod": lambda env, out: check_lsmod(out, env.guest),
    "maps {worker}": lambda env, out: check_maps(out, env.guest, env.work.worker),
    "files {worker}": lambda env, out: check_files(out, env.guest, env.work.worker) and None,
    "net": lambda env, out: check_net(out, env.guest, env.work.listener),
    "mounts": lambda env, out: check_mounts(out, env.guest),
    "dmesg": lambda env, out: check_dmesg(out, env.guest),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("view", VIEWS)
def test_view_pause(env: Env, ticker: Ticker, view: str) -> None:
    cmd = f"aradia {view.format(worker=env.work.worker)} --vm {env.vm} --pause"
    out, _, growth = ticker.watch(lambda: env.cli.ok(cmd))
    assert growth >= PAUSED, f"the guest's clock did not stop (lag grew {growth:.4f}s)"
    VIEWS[view](env, out)
    _assert_running_again(env, ticker)


# --- trace filters ---------------------------------------------------------------------------------
FILTERS = {  # option -> the actors (of ACTORS: name -> uid) whose events it keeps
    "--pid {a}": {"a"},
    "--comm aradia-act": {"a", "b", "d"},
    "--uid 4321": {"a", "decoy", "d"},
    "--comm aradia-decoy --comm aradia-act --uid 0": {"b"},
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("option", FILTERS)
def test_trace_filter_keeps_exactly_the_named_processes(env: Env, option: str) -> None:
    pids = start_actors(env.guest, ACTORS)
    ports = {name: 7100 + i for i, name in enumerate(ACTORS)}
    cmd = f"aradia trace --vm {env.vm} syscalls -e execve,openat,connect {option.format(**pids)} --json"
    result, _ = env.cli.live(cmd, lambda: release_actors(env.guest, pids))
    assert result.returncode == 0, result.stderr
    events = [json.loads(x) for x in result.stdout.splitlines()]
    by_actor = {name: [(e["name"], {k: e["args"][k] for k in want}) for e in events if e["tgid"] == pid
                       for want in [dict(actor_events(name, ports[name]))[e["name"]]]]
                for name, pid in pids.items()}
    for name in ACTORS:  # positive: all three calls of each kept actor; negative: none of the others
        assert by_actor[name] == (actor_events(name, ports[name]) if name in FILTERS[option] else []), name
    assert len(events) == 3 * len(FILTERS[option]), [(e["comm"], e["tgid"], e["name"]) for e in events]


# --- user-space probes: --in-pid, --args --------------------------------------------------------------
PATHS = ["/etc/hostname", "/nonexistent-aradia", "/etc/shells"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("ret", [False, True], ids=["entry", "ret"])
def test_uprobe_in_pid_with_declared_args(env: Env, ret: bool) -> None:
    """Two processes of one program call libc's openat(); ``--in-pid`` reports the calls of one, with
    the arguments ``--args`` declares (openat has no built-in signature) or its return value."""
    tag = "r" if ret else "e"
    (a, out_a), (b, out_b) = start_opener(env.guest, f"ua-{tag}", PATHS), start_opener(env.guest, f"ub-{tag}", PATHS)
    cmd = (f"aradia trace --vm {env.vm} uprobe --in-pid {a} libc.so.6:openat --args 'dfd:int,path:str,flags:hex->int'"
           f"{' --ret' if ret else ''} --json")

    def act() -> tuple[list[list[str]], list[list[str]]]:
        return release_opener(env.guest, b, out_b), release_opener(env.guest, a, out_a)

    result, (calls_b, calls_a) = env.cli.live(cmd, act)
    assert result.returncode == 0, result.stderr
    assert [c[0] for c in calls_a] == [c[0] for c in calls_b] == PATHS  # both called it, b first
    events = [json.loads(x) for x in result.stdout.splitlines()]
    assert {(e["tgid"], e["comm"], e["name"]) for e in events} == {(a, "opener", "libc.so.6:openat")}, events
    if ret:  # openat() returns the fd, or -1 (the opener printed -errno)
        assert [(e["kind"], e["args"]["ret"]) for e in events] == [("uretprobe", max(-1, int(c[3])))
                                                                    for c in calls_a]
        assert int(calls_a[1][3]) == -2
    else:
        assert [(e["kind"], e["args"]) for e in events] == [
            ("uprobe", {"dfd": -100, "path": c[0], "flags": int(c[1], 16)}) for c in calls_a]
        assert int(calls_a[1][1], 16) != int(calls_a[0][1], 16)  # the flags differ: hex is decoded


# --- watch --in-pid: another process writes the same address -----------------------------------------
@pytest.mark.timeout(300)
def test_watch_in_pid_ignores_another_process_at_the_same_address(env: Env) -> None:
    env.guest.run("/tmp/multi twins > /tmp/out-twins 2>&1 &")
    lines = program_lines(env.guest, "/tmp/out-twins", "twin")
    for _ in range(100):
        twins = [int(x.split()[1]) for x in env.guest.run("cat /tmp/out-twins").splitlines() if x.startswith("twin")]
        if len(twins) == 2:
            break
        time.sleep(0.1)
    assert len(twins) == 2, lines
    parent, child = sorted(twins)
    cmd = f"aradia trace --vm {env.vm} watch {TWIN_VA:#x} 8 --in-pid {child} --json"

    def act() -> None:  # both store 8 bytes at the same virtual address, the parent first
        env.guest.run(f"kill -USR1 {parent}; sleep 0.5; kill -USR1 {child}; sleep 0.5")

    try:
        result, _ = env.cli.live(cmd, act)
    finally:
        env.guest.run(f"kill {parent} {child}", check=False)
    assert result.returncode == 0, result.stderr
    events = [json.loads(x) for x in result.stdout.splitlines()]
    assert [(e["kind"], e["tgid"], e["args"]["address"], e["args"]["value"]) for e in events] == [
        ("watch", child, TWIN_VA, (bytes([child & 0xFF]) * 8).decode("latin-1"))], events


# --- vm.write ------------------------------------------------------------------------------------------
@pytest.mark.timeout(300)
@pytest.mark.parametrize("path", ["shared-file", "proc-mem", "gdb"])
def test_vm_write_is_what_the_guest_reads(env: Env, path: str) -> None:
    hold = env.work.hold
    i = len(hold.pages) // 3
    offset = i * 4096 + 0x123
    data = f"written by aradia via {path}".encode()
    assert hold.check() == (0, -1)
    try:
        with attach(env.vm, memory=path) as vm:
            assert vm.info()["memory_path"] == path
            vm.write(hold.pages[i] + 0x123, data)
            assert vm.read(hold.pages[i] + 0x123, len(data)) == data
        assert hold.dump(offset, len(data)) == data  # the guest process reads what was written
        words = {w for w in range(offset // 8, (offset + len(data) + 7) // 8)}
        count, first = hold.check()
        assert (count, first) == (len(words), min(words) * 8)  # and nothing else changed
    finally:
        hold.poke(offset, hold.expected(offset, len(data)))
    assert hold.check() == (0, -1)


# --- shutdown ------------------------------------------------------------------------------------------
@pytest.mark.timeout(300)
@pytest.mark.parametrize("action", ["exit", "pause"])
def test_guest_shutdown_ends_a_trace(launch_guest: Callable[..., Guest], tmp_path: Path, action: str) -> None:
    """``poweroff -f`` in the guest: QEMU exits (its default), or stays with the guest shut down
    (``-action shutdown=pause``); either way the trace ends with one line on stderr and status 2."""
    extra = ["-action", "shutdown=pause"] if action == "pause" else []
    g = launch_guest("6.1", gdb=True, extra_args=extra)
    cli = Cli(tmp_path)
    started = time.monotonic()
    result, _ = cli.live(f"aradia trace --vm qmp:{g.qmp_path} syscalls -e openat",
                         lambda: g.send_console(b"poweroff -f\n"), interrupt=False, timeout=60)
    assert time.monotonic() - started < 60
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("tracing syscalls") and len(lines) == 2 and "Traceback" not in result.stderr
    if action == "pause":
        assert lines[1] == "aradia: error: the guest shut down while tracing (guest-shutdown)", lines
        with attach(f"qmp:{g.qmp_path}") as vm:
            assert vm.status() == "shutdown"
    else:
        # the SHUTDOWN event, or QEMU's exit (through QMP or the GDB stub), whichever aradia sees first
        assert lines[1].startswith("aradia: error: ") and ("shut down" in lines[1] or "QEMU exited" in lines[1])
        deadline = time.monotonic() + 30
        while g.alive and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not g.alive



@pytest.mark.timeout(30)
def test_int_is_a_c_int() -> None:
    """``--args`` ``int`` is the low 32 bits of the register, signed; ``hex`` the whole register."""
    from aradia.trace.uprobes import decode_value, parse_signature

    def nothing(addr: int, size: int) -> bytes:
        raise AssertionError("no memory read for numbers")

    assert decode_value("int", 0x00000000FFFFFF9C, nothing) == -100  # what a caller leaves for dfd -100
    assert decode_value("int", 0xFFFFFFFFFFFFFFFF, nothing) == -1
    assert decode_value("int", 0xDEAD00000000002A, nothing) == 42  # the upper half is not part of an int
    assert decode_value("hex", 0xFFFFFFFFFFFFFF9C, nothing) == 0xFFFFFFFFFFFFFF9C
    sig = parse_signature("path:str,flags:hex->int")
    assert sig.args == (("path", "str"), ("flags", "hex")) and sig.ret == "int"
