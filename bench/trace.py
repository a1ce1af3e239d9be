"""The guest's syscall-loop rate untraced, under GDB-stub probes (hot, cold) and under the TCG plugin counter.

Boots one guest (1 vCPU, TCG, GDB stub on, aradia's TCG plugin loaded) and copies in ``loop N``, a
static no-libc program (``tests/guest_programs.py``: ``loop``; ``a64loop`` on arm64) that makes exactly
N ``getppid`` syscalls and prints how long they took by the guest's own clock. Then, in interleaved
rounds, the same loop runs:

* **untraced**: nothing armed (the plugin is loaded but has no target: it only looks at code as TCG
  translates it);
* **gdb-probe hot**: :class:`aradia.trace.tracer.Tracer` with ``add_syscall("getppid")``, the tracer
  draining events (task, decoded arguments) while the loop runs; every call stops the VM;
* **gdb-probe cold**: the tracer running with a probe on a kernel function the loop never calls
  (``--cold``): the cost of an armed but idle stub probe;
* **tracer, no probe**: the tracer attached and running its event loop with nothing armed, which
  separates the cost of the tracer's processes from that of an armed breakpoint in QEMU;
* **gdb-stub raw hot**: no tracer: a bare :class:`~aradia.proto.gdbrsp.GdbClient` breakpoint on the
  hot syscall's entry that only moves the PC past the entry's NOP and continues, the floor of a
  stub probe (what the tracer adds per event is the difference to **gdb-probe hot**);
* **bare client hot**: the same per hit through ``bare_rsp.py``, a ~100-line RSP client that imports
  nothing from aradia: the stub's own limit, against which the tracer's rate is put last;
* **plugin counter**: the plugin counting executions of ``__x64_sys_getppid`` (arm64:
  ``__arm64_sys_getppid``; callback, no log); its
  count must match the loop's own count within 0.5 % (the shell's own ``getppid`` calls, measured with
  ``loop 0`` under the same target, are subtracted);
* **plugin counter+log**: the same with every hit logged to the ring, drained by a host thread.

Each round sets every phase up once and runs its loop ``--reps`` times back to back (the hot probes:
``--hot-calls`` once per set-up; the three hot phases run back to back ``--hot-reps`` times a round,
each time starting one later); rounds start at a different phase each time. Loop rates are calls per second
by the guest's clock, except under the hot GDB probes: the guest's clock partly stops while the stub
holds the VM, so there the rate is the host's, from the first to the last loop hit. Each phase keeps its best
run (the host is shared: other work only ever slows a run down); the median follows in brackets.
Cost per event is the wall time each event adds: 1/rate(phase) - 1/rate(untraced), best rates.
Ratios are printed last, "aradia tracer / bare client" (gdb-probe hot / bare client hot) the very last.

``--arch arm64`` boots the lab's arm64 guest (``qemu-system-aarch64 -M virt``, the same plugin built for
the host's QEMU). What differs comes from :mod:`aradia.trace.abi`, not from this file: the syscall's entry
symbol, where a probe on a function breaks and how many bytes of NOP it skips there (x86-64: after
``ENDBR64``, 5; arm64: after ``mov x9, x30``, 4), the PC's name; the PC's register number, size and byte
order in the stub's ``g`` layout come from the stub's own target description. Usage:

    python bench/trace.py [--kernel 6.1] [--arch x86_64|arm64] [--rounds 5] [--reps 5] [--calls 200000]
                           [--hot-calls 400] [--hot-reps 3]
    python bench/trace.py --quick     # 3 rounds, 4 reps, 100,000 / 200 calls
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from aradia.errors import AradiaError
from aradia.lab.images import build_guest
from aradia.lab.launcher import Guest, launch
from aradia.lab.plugin_build import build_plugin
from aradia.proto.gdbrsp import BP_SOFTWARE, GdbClient
from aradia.trace.abi import KernelABI, kernel_abi
from aradia.trace.events import Event
from aradia.trace.pluginload import retranslate_at
from aradia.trace.pluginshm import PluginShm
from aradia.trace.tracer import Tracer
from aradia.vm import VM, attach
from bare_rsp import BareRsp
from guest_loop import BenchError, guest_programs

REPO = Path(__file__).resolve().parent.parent
HOT_SYSCALL = "getppid"
COLD_SYSCALL = "reboot"  # the cold probe's default: this syscall's entry (the loop never calls it)
TOLERANCE = 0.005  # plugin count vs the loop's own count
PHASES = ("untraced", "gdb-probe hot", "gdb-probe cold", "tracer, no probe", "gdb-stub raw hot",
          "bare client hot", "plugin counter", "plugin counter+log")
HOT_PHASES = ("gdb-probe hot", "gdb-stub raw hot", "bare client hot")  # host clock, one loop per round
HEAD = 16  # bytes of a function's head read to find where its probe breaks (arm64: bti, mov, nop)


@dataclass
class StubPc:
    """The program counter as the GDB stub and the bare client see it."""

    name: str  # in aradia's register names (``rip``, ``pc``)
    regnum: int  # in the stub's target description (what ``p``/``P`` take)
    size: int  # bytes
    byteorder: Literal["little", "big"]


@dataclass
class Loops:
    """One guest command running ``loop calls`` ``len(guest_s)`` times: each run's seconds by the
    guest's clock."""

    calls: int
    guest_s: list[float]

    @property
    def rates(self) -> list[float]:
        """Calls per second of each run, by the guest's clock."""
        return [self.calls / s for s in self.guest_s]


@dataclass
class Phase:
    """All runs of one phase."""

    name: str
    rates: list[float] = field(default_factory=list)  # loop calls/s, one per run
    events: list[float] = field(default_factory=list)  # events counted or delivered per second, per run
    notes: list[str] = field(default_factory=list)  # one per round

    @property
    def best(self) -> float:
        """Best loop rate of all runs."""
        return max(self.rates)

    @property
    def median(self) -> float:
        """Median loop rate of all runs."""
        return statistics.median(self.rates)


def run_loops(guest: Guest, calls: int, reps: int = 1, timeout: float = 600) -> Loops:
    """Run ``/tmp/loop calls`` ``reps`` times in one guest command."""
    cmd = f"/tmp/loop {calls}" if reps == 1 else f"for i in $(seq {reps}); do /tmp/loop {calls}; done"
    out = guest.run(cmd, timeout=timeout)
    ns = [int(m.group(1)) for m in re.finditer(rf"calls {calls} ns (\d+)", out)]
    if len(ns) != reps:
        raise BenchError(f"{reps} x loop {calls} printed {len(ns)} results: {out[-500:]!r}")
    return Loops(calls, [n / 1e9 for n in ns])


def retarget(shm: PluginShm, gdb_address: str, vaddr: int | None, *, log: bool = False) -> None:
    """Point the plugin's slot 0 at ``vaddr`` (None: clear) and force re-translation of what changed
    (:func:`~aradia.trace.pluginload.retranslate_at`, which retries where an arm64 vCPU stopped at EL0
    cannot reach kernel text)."""
    missed = retranslate_at(gdb_address, shm.set_target(0, vaddr, log=log))
    if missed:
        raise BenchError(f"could not force re-translation at {', '.join(hex(a) for a in missed)}")


class BackgroundLoops:
    """:func:`run_loops` in a worker thread while the main thread serves the probe that slows it."""

    def __init__(self, guest: Guest, calls: int, reps: int = 1) -> None:
        self._result: dict[str, Loops | BaseException] = {}
        self.thread = threading.Thread(target=self._work, args=(guest, calls, reps), daemon=True)
        self.thread.start()

    def _work(self, guest: Guest, calls: int, reps: int) -> None:
        try:
            self._result["run"] = run_loops(guest, calls, reps)
        except BaseException as e:  # reported by the main thread
            self._result["error"] = e

    def running(self) -> bool:
        """Whether the loops still run."""
        return self.thread.is_alive()

    def finish(self, what: str) -> Loops | None:
        """Wait (30 s at most) for the loops; their runs (None if not done), BenchError if they failed."""
        self.thread.join(30)
        if "error" in self._result:
            raise BenchError(f"loop under {what} failed: {self._result['error']}")
        run = self._result.get("run")
        return run if isinstance(run, Loops) else None


def traced_loops(vm: VM, guest: Guest, calls: int, reps: int,
                 arm: Callable[[Tracer], object]) -> tuple[Loops, list[Event]]:
    """Run the loops while a tracer with the probes ``arm`` sets drains events; the runs and the events."""
    with Tracer.open(vm) as tracer:
        arm(tracer)
        loops = BackgroundLoops(guest, calls, reps)
        events = list(tracer.events(until=lambda: not loops.running()))
    run = loops.finish("the tracer")
    if run is None:
        raise BenchError("the traced loop did not finish")
    return run, events


def phase_untraced(guest: Guest, calls: int, reps: int, ph: Phase) -> None:
    """Nothing armed."""
    ph.rates += run_loops(guest, calls, reps).rates


def phase_gdb_hot(vm: VM, guest: Guest, calls: int, ph: Phase) -> int:
    """A syscall probe on the loop's own syscall: every call stops the VM and becomes an event.

    Returns how many of the loop's calls the tracer reported (all of them: all-stop loses no hit).
    """
    run, events = traced_loops(vm, guest, calls, 1, lambda t: t.add_syscall(HOT_SYSCALL))
    mine = [e for e in events if e.comm == "loop" and e.name == HOT_SYSCALL]
    if len(mine) < 2:
        raise BenchError(f"the hot probe saw {len(mine)} loop calls of {calls}")
    span = mine[-1].time - mine[0].time
    rate = (len(mine) - 1) / span  # host wall: the guest's clock stalls while the stub holds the VM
    ph.rates.append(rate)
    ph.events.append(rate)
    ph.notes.append(f"{len(mine)}/{calls} loop calls seen, {len(events) - len(mine)} other events, "
                    f"the guest's clock said {run.rates[0]:,.0f}/s")
    return len(mine)


def phase_gdb_raw(guest: Guest, gdb_address: str, pc: str, addr: int, skip_len: int, calls: int,
                  ph: Phase) -> None:
    """A bare stub breakpoint at ``addr`` on the hot syscall's entry: per hit, the PC (register ``pc``)
    ``skip_len`` bytes on past the entry NOP (0: one step), continue."""
    gdb = GdbClient(gdb_address, was_running=True)
    hits: list[float] = []
    try:
        gdb.restore_run_state()
        gdb.set_breakpoint(addr, BP_SOFTWARE)
        loops = BackgroundLoops(guest, calls)
        while loops.running() or gdb.running:
            ev = gdb.wait_stop(0.25)
            if ev is None:
                if not loops.running():
                    break
                continue
            hits.append(time.monotonic())
            if skip_len:
                gdb.resume({pc: addr + skip_len}, ev.thread)
            else:
                gdb.step(ev.thread, until_pc_changes=True)
                gdb.cont()
        loops.finish("the raw stub breakpoint")
    finally:
        gdb.close()
    rate = hot_rate(hits, calls)
    ph.rates.append(rate)
    ph.events.append(rate)
    ph.notes.append(f"{len(hits)} hits for the loop's {calls} calls and the shell's own; "
                    f"{f'{pc.upper()} moved past the entry NOP' if skip_len else 'single-stepped'}")


def hot_rate(hits: list[float], calls: int) -> float:
    """Hits per second of the loop's ``calls`` calls among ``hits`` (host times): the shell's own few
    ``getppid`` calls come before and after the loop's, so the loop's are the run of ``calls``
    consecutive hits with the shortest span."""
    if len(hits) < calls:
        raise BenchError(f"{len(hits)} hits for the loop's {calls} calls")
    span = min(hits[i + calls - 1] - hits[i] for i in range(len(hits) - calls + 1))
    return (calls - 1) / span


def phase_bare(guest: Guest, pc: StubPc, addr: int, skip: int, calls: int, ph: Phase) -> None:
    """The independent client (``bare_rsp.py``): per hit the stop reply, ``P`` the PC past the NOP, ``c``."""
    client = BareRsp("127.0.0.1", guest.gdb_port or 0, pc=pc.regnum, pc_size=pc.size, byteorder=pc.byteorder)
    try:
        loops = BackgroundLoops(guest, calls)
        hits = client.hits(addr, skip, lambda: not loops.running())
        loops.finish("the bare client's breakpoint")
    finally:
        client.close()
    rate = hot_rate(hits, calls)
    ph.rates.append(rate)
    ph.events.append(rate)
    ph.notes.append(f"{len(hits)} hits for the loop's {calls} calls and the shell's own; {pc.name.upper()} "
                    "moved past the entry NOP")


def entry_breakpoint(vm: VM, abi: KernelABI, entry: int) -> tuple[int, int]:
    """Where a probe on the function at ``entry`` breaks and how many bytes of NOP it skips there
    (the architecture's entry layout: :meth:`~aradia.trace.abi.KernelABI.kernel_entry`)."""
    at, skip = abi.kernel_entry(vm.read_virt(entry, HEAD))
    if not skip:
        raise BenchError(f"no entry NOP at {entry + at:#x}: the bare client cannot step, it only moves "
                         f"{abi.pc.upper()}")
    return entry + at, skip


def stub_pc(gdb_address: str, name: str) -> StubPc:
    """Register ``name`` (the PC) as the stub at ``gdb_address`` describes it."""
    gdb = GdbClient(gdb_address, was_running=True)
    try:
        gdb.restore_run_state()
        reg = next((r for r in gdb.register_map if r.name == name), None)
        order = gdb.byteorder
    finally:
        gdb.close()
    if reg is None or order not in ("little", "big"):
        raise BenchError(f"the stub's target description has no register {name!r}")
    return StubPc(name, reg.regnum, reg.size, "big" if order == "big" else "little")


def phase_gdb_idle(vm: VM, guest: Guest, calls: int, reps: int, cold: str | None, ph: Phase) -> None:
    """A probe on a kernel function the loop never calls (armed, idle); None: no probe at all."""
    def arm(tracer: Tracer) -> None:
        if cold is not None:
            tracer.add_kprobe(cold)

    run, events = traced_loops(vm, guest, calls, reps, arm)
    ph.rates += run.rates
    ph.notes.append(f"{len(events)} events")


def phase_plugin(guest: Guest, shm: PluginShm, gdb_address: str, target: int, calls: int, reps: int,
                 log: bool, ph: Phase) -> tuple[int, int]:
    """The plugin counting (with ``log``: logging) the hot syscall's entry.

    Returns (counted, called): hits during the loops less the shell's own, and the loops' calls.
    """
    retarget(shm, gdb_address, target, log=log)
    logged = 0
    lost0 = shm.lost
    stop = threading.Event()

    def drain() -> None:
        nonlocal logged
        while not stop.wait(0.005):
            logged += len(shm.drain())

    drainer = threading.Thread(target=drain, daemon=True)
    if log:
        drainer.start()
    try:
        c0 = shm.count(0)
        run_loops(guest, 0)
        background = shm.count(0) - c0  # the shell Guest.run starts calls getppid itself
        c1 = shm.count(0)
        run = run_loops(guest, calls, reps)
        counted = shm.count(0) - c1 - background
        total = shm.count(0)
    finally:
        stop.set()
        if log:
            drainer.join(10)
        logged += len(shm.drain())
        retarget(shm, gdb_address, None)
    called = calls * reps
    ph.rates += run.rates
    ph.events += [r * counted / called for r in run.rates]  # every call is one counted event
    note = (f"count {counted:,} vs the loops' {called:,} calls ({(counted - called) / called:+.3%}; "
            f"the shell's own {background}/command subtracted)")
    if log:
        note += f"; logged {logged:,} of {total:,} counted, lost {shm.lost - lost0:,}"
    ph.notes.append(note)
    return counted, called


def per_event_us(rate: float, base: float) -> float:
    """Wall time one event adds to the loop, in µs: 1/rate - 1/base."""
    return (1 / rate - 1 / base) * 1e6


def fmt_us(us: float) -> str:
    """A per-event cost for printing (a negative one is below the noise of the two rates)."""
    text = f"{us:,.0f}" if abs(us) >= 100 else f"{us:.3g}"
    return f"{text} µs/event" + (" (below noise)" if us <= 0 else "")


def fmt_ratio(x: float) -> str:
    """A ratio with two significant digits, never in exponent notation."""
    decimals = max(2, 1 - math.floor(math.log10(x))) if x > 0 else 2
    return f"{x:.{decimals}f}"


def report(ph: dict[str, Phase], args: argparse.Namespace, checks: list[tuple[int, int]], hot_seen: list[int],
           elapsed: float) -> bool:
    """Print the per-phase lines, the checks and the ratios (last); whether the checks passed."""
    base = ph["untraced"].best
    print("loop rates (calls/s): best run (median of all runs in brackets); guest clock unless noted")
    for name, p in ph.items():
        line = f"  {name:<20}{p.best:13,.0f}/s  ({p.median:,.0f}; {len(p.rates)} runs)"
        if p.events:
            line += f"  events {max(p.events):,.0f}/s  {fmt_us(per_event_us(p.best, base))}"
        if name == "gdb-probe hot":
            line += "  [host clock, first..last loop event]"
        elif name in HOT_PHASES:
            line += "  [host clock, first..last of the loop's hits]"
        print(line)
        if p.notes:
            print(f"  {'':<20}last round: {p.notes[-1]}")
    worst = max(checks, key=lambda c: abs(c[0] - c[1]) / c[1])
    ok = abs(worst[0] - worst[1]) <= TOLERANCE * worst[1]
    print(f"check plugin count vs the loops' own count (worst of {len(checks)}): {worst[0]:,} vs "
          f"{worst[1]:,} ({(worst[0] - worst[1]) / worst[1]:+.3%}; tolerance {TOLERANCE:.1%}) "
          f"{'OK' if ok else 'MISMATCH'}")
    seen = all(n == args.hot_calls for n in hot_seen)
    print(f"check gdb-probe hot reported every loop call: {sum(n == args.hot_calls for n in hot_seen)}/"
          f"{len(hot_seen)} runs {'OK' if seen else 'MISSED'}")
    print(f"total run time {elapsed:.0f} s; load average {os.getloadavg()[0]:.2f} at the end")

    for name in PHASES[1:]:
        x = ph[name].best / base
        slower = f" ({1 / x:,.0f}x slower)" if x < 0.1 else ""
        print(f"ratio {name}: {fmt_ratio(x)}x untraced{slower}")
    hot = max(ph["gdb-probe hot"].events)
    print(f"ratio plugin vs gdb-probe events/s: {max(ph['plugin counter'].events) / hot:,.0f}x")
    print(f"ratio plugin+log vs gdb-probe events/s: {max(ph['plugin counter+log'].events) / hot:,.0f}x")
    bare = ph["bare client hot"]
    rounds = ", ".join(f"{t / b:.2f}" for t, b in zip(ph["gdb-probe hot"].rates, bare.rates, strict=True))
    print(f"hot path, best of {len(bare.rates)} runs each: bare client {bare.best:,.0f} hits/s, "
          f"aradia raw client {ph['gdb-stub raw hot'].best:,.0f} hits/s, "
          f"aradia tracer (syscall probe, registers decoded) {ph['gdb-probe hot'].best:,.0f} events/s; "
          f"tracer / bare in each run (same round and turn): {rounds}")
    print(f"ratio aradia raw client / bare client: {ph['gdb-stub raw hot'].best / bare.best:.2f}x")
    print(f"ratio aradia tracer / bare client: {ph['gdb-probe hot'].best / bare.best:.2f}x")
    return ok and seen


def main() -> int:
    """Run the benchmark and print one line per phase, ratios last."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", default="6.1")
    ap.add_argument("--arch", default="x86_64", choices=("x86_64", "arm64"), help="the guest's architecture")
    ap.add_argument("--memory", default="256M")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of every phase")
    ap.add_argument("--reps", type=int, default=5, help="loop runs per phase and round (hot probes: 1)")
    ap.add_argument("--calls", type=int, default=200_000, help="getppid calls per loop run")
    ap.add_argument("--hot-reps", type=int, default=3,
                    help="runs of each hot phase (tracer, raw client, bare client) per round, back to back")
    ap.add_argument("--hot-calls", type=int, default=400,
                    help="getppid calls per loop run under the hot GDB probe")
    ap.add_argument("--cold", default=None,
                    help="kernel function for the cold probe (default: the reboot syscall's entry, "
                         "__x64_sys_reboot / __arm64_sys_reboot)")
    ap.add_argument("--quick", action="store_true",
                    help="3 rounds, 4 reps, 100,000 / 200 calls (under 1 min)")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.reps, args.calls, args.hot_calls = 3, 4, 100_000, 200
    started = time.monotonic()

    image = build_guest(args.kernel, arch=args.arch)
    so = build_plugin()
    programs = guest_programs()
    with tempfile.TemporaryDirectory(prefix="aradia-bench-") as tmp:
        if args.arch == "arm64":  # the same loop and output line, arm64's syscall numbers
            loop = programs.build_a64loop(Path(tmp), image.guest_arch.gcc)
        else:
            loop = programs.build_loop(Path(tmp))
    boot_timeout = 60 if args.arch == "x86_64" else 180  # TCG boots an arm64 kernel in ~1-2 min
    ph = {n: Phase(n) for n in PHASES}
    checks: list[tuple[int, int]] = []
    hot_seen: list[int] = []
    with PluginShm(max_vcpus=1, ring_entries=1 << 18) as shm, \
            launch(image, smp=1, memory=args.memory, gdb=True, shared_memory=True,
                   plugins=[shm.plugin_arg(so)], boot_timeout=boot_timeout) as guest, \
            attach(f"qmp:{guest.qmp_path}") as vm:
        gdb_address = f"127.0.0.1:{guest.gdb_port}"
        programs.install_program(guest, "loop", loop)  # as /tmp/loop on both: its comm is "loop"
        vm.load_kernel()
        abi = kernel_abi(vm.arch, vm.linux.profile.symbol)
        hot_symbol = abi.syscall_symbols(HOT_SYSCALL)[0]
        target = vm.linux.profile.symbol(hot_symbol)
        if target is None:
            raise BenchError(f"no {hot_symbol} in this kernel")
        bare_at, bare_skip = entry_breakpoint(vm, abi, target)
        pc = stub_pc(gdb_address, abi.pc)
        if args.cold is None:
            args.cold = abi.syscall_symbols(COLD_SYSCALL)[0]
        if vm.linux.profile.symbol(args.cold) is None:
            raise BenchError(f"no kernel symbol {args.cold!r} for the cold probe")
        print(f"guest: Linux {image.release}, 1 vCPU, {args.memory}, TCG, plugin loaded (no target unless "
              f"measured); hot: {HOT_SYSCALL} ({hot_symbol}), cold: {args.cold}; {args.rounds} rounds x "
              f"{args.reps} loops of {args.calls:,} calls (hot probes: {args.hot_reps} x 1 x "
              f"{args.hot_calls:,}); setup {time.monotonic() - started:.1f} s", flush=True)
        print(f"host: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start", flush=True)
        run_loops(guest, args.calls)  # warm-up: translate the loop's path once
        n, reps = args.calls, args.reps
        steps: list[Callable[[], object]] = [
            lambda: phase_untraced(guest, n, reps, ph["untraced"]),
            lambda: checks.append(phase_plugin(guest, shm, gdb_address, target, n, reps, False,
                                               ph["plugin counter"])),
            lambda: phase_plugin(guest, shm, gdb_address, target, n, reps, True, ph["plugin counter+log"]),
            lambda: phase_gdb_idle(vm, guest, n, reps, args.cold, ph["gdb-probe cold"]),
            lambda: phase_gdb_idle(vm, guest, n, reps, None, ph["tracer, no probe"]),
        ]
        hot: list[Callable[[], object]] = [
            lambda: hot_seen.append(phase_gdb_hot(vm, guest, args.hot_calls, ph["gdb-probe hot"])),
            lambda: phase_gdb_raw(guest, gdb_address, abi.pc, bare_at, bare_skip, args.hot_calls,
                                  ph["gdb-stub raw hot"]),
            lambda: phase_bare(guest, pc, bare_at, bare_skip, args.hot_calls, ph["bare client hot"]),
        ]
        turn = [0]

        def hot_phases() -> None:
            """The three hot phases back to back, ``--hot-reps`` times, each time starting one later."""
            for _ in range(args.hot_reps):
                for i in range(len(hot)):
                    hot[(turn[0] + i) % len(hot)]()
                turn[0] += 1

        steps.append(hot_phases)
        for rnd in range(args.rounds):
            marks = {name: len(p.rates) for name, p in ph.items()}
            for i in range(len(steps)):  # each round starts one phase later: load changes hit all alike
                steps[(rnd + i) % len(steps)]()
            print(f"round {rnd + 1}: " + "  ".join(f"{name} {max(p.rates[marks[name]:]):,.0f}/s"
                                                  for name, p in ph.items()), flush=True)
    ok = report(ph, args, checks, hot_seen, time.monotonic() - started)
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (BenchError, AradiaError) as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        sys.exit(1)
