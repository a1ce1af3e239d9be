"""A guest's syscall loop while ``aradia trace syscalls`` runs on the plugin path and on the stop path.

Boots one guest (6.1, 1 vCPU, TCG, aradia's plugin loaded) on the QEMU under test (``$ARADIA_QEMU``;
the plugin path needs QEMU >= 9.2, e.g. the other Debian release's QEMU 10 from
``python -m aradia.lab.otherqemu``) and copies in ``loop N 124``: exactly N ``getsid`` syscalls (a
syscall nothing else in the guest makes), timed by the guest's own clock. In interleaved rounds the
loop runs:

* **untraced**: nothing armed (the plugin loaded, no target);
* **plugin, pid filter**: :class:`~aradia.trace.plugintrace.PluginSyscallTrace` on ``getsid`` with
  ``--pid 1`` (the filter applied inside QEMU): every call of the loop runs the plugin's callback,
  which reads the current task from guest memory and drops the call; a host thread drains the rings;
* **plugin, every call an event**: the same with ``--comm loop``: every call becomes an event record
  (arguments, task) that the host thread drains and decodes into an ``Event``; events read plus those
  the ring lost (reported) must number the loop's calls exactly;
* **stop path, pid filter**: :class:`~aradia.trace.tracer.Tracer` with ``add_syscall("getsid")`` and
  the same pid filter: every call stops the VM, the tracer reads registers and the task and drops the
  event. The guest's clock partly stops while the stub holds the VM, so here the rate is by the host's
  clock over the whole guest command (a shell start included: it understates this path's rate a
  little, never the ratio's order).

Each phase keeps its best run (the host is shared: other work only slows a run down); the median
follows in brackets. Ratios to **untraced**, measured in the same run, are printed last. Usage:

    ARADIA_QEMU=$(python -m aradia.lab.otherqemu) python bench/syscall_paths.py [--rounds 3] [--reps 3]
    ... python bench/syscall_paths.py --quick       # 2 rounds, 2 reps, fewer calls
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aradia.errors import AradiaError
from aradia.lab.images import build_guest
from aradia.lab.launcher import Guest, launch
from aradia.lab.plugin_build import build_plugin, installed_qemu
from aradia.trace.pluginshm import PluginShm
from aradia.trace.plugintrace import PluginSyscallTrace, plugin_path_problem
from aradia.trace.probes import Filter
from aradia.trace.tracer import Tracer
from aradia.vm import VM, attach
from guest_loop import BenchError, guest_programs

REPO = Path(__file__).resolve().parent.parent
SYSCALL, NR = "getsid", 124
EVENT_ENTRIES = 1 << 14  # per vCPU (16 MiB): room for what the loop writes between two drains




@dataclass
class Phase:
    """All runs of one phase: loop calls per second, one per run."""

    name: str
    rates: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def loop_rates(guest: Guest, calls: int, reps: int) -> list[float]:
    """Run ``/tmp/loop calls 124`` ``reps`` times in one guest command; each run's rate (guest clock)."""
    out = guest.run(f"for i in $(seq {reps}); do /tmp/loop {calls} {NR}; done", timeout=900)
    ns = [int(m.group(1)) for m in re.finditer(rf"calls {calls} ns (\d+)", out)]
    if len(ns) != reps:
        raise BenchError(f"{reps} x loop {calls} printed {len(ns)} results: {out[-500:]!r}")
    return [calls / (n / 1e9) for n in ns]


def plugin_phase(vm: VM, guest: Guest, flt: Filter, calls: int, reps: int, ph: Phase, want: int) -> None:
    """The loop while a plugin trace with ``flt`` runs and a thread drains it; the loop's events read
    plus those lost to ring overflow must be ``want``."""
    seen: list[int] = [0]
    stop = threading.Event()
    with PluginSyscallTrace.open(vm, [SYSCALL], flt) as trace:
        def drain() -> None:
            for ev in trace.events(until=stop.is_set):
                seen[0] += ev.comm == "loop"
        t = threading.Thread(target=drain, daemon=True)
        t.start()
        try:
            ph.rates += loop_rates(guest, calls, reps)
        finally:
            stop.set()
            t.join(60)
        lost = trace.lost
    if seen[0] + lost != want:
        raise BenchError(f"{ph.name}: {seen[0]} loop events read + {lost} lost, {want} expected")
    ph.notes.append(f"{seen[0]:,} loop events read, {lost:,} lost to ring overflow")


def stop_phase(vm: VM, guest: Guest, calls: int, ph: Phase) -> None:
    """The loop while the stop path traces its syscall with a pid filter (host clock)."""
    with Tracer.open(vm) as tracer:
        tracer.filter = Filter(pids={1})
        tracer.add_syscall(SYSCALL)
        stop = threading.Event()
        kept: list[int] = [0]

        def run() -> None:
            for _ev in tracer.events(until=stop.is_set):
                kept[0] += 1

        t = threading.Thread(target=run, daemon=True)
        t.start()
        try:
            started = time.monotonic()
            out = guest.run(f"/tmp/loop {calls} {NR}", timeout=900)
            wall = time.monotonic() - started
        finally:
            stop.set()
            t.join(60)
    if f"calls {calls} " not in out:
        raise BenchError(f"the loop under the stop path printed {out[-300:]!r}")
    if kept[0]:
        raise BenchError(f"the pid filter kept {kept[0]} events of the loop")
    ph.rates.append(calls / wall)
    ph.notes.append(f"{calls} calls in {wall:.2f} s wall")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 on success, 2 when a step fails or the QEMU has no plugin path."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--calls", type=int, default=200_000, help="loop calls untraced and on the plugin path")
    ap.add_argument("--stop-calls", type=int, default=200, help="loop calls on the stop path")
    ap.add_argument("--quick", action="store_true", help="2 rounds, 2 reps, 100,000 / 100 calls")
    a = ap.parse_args(argv)
    if a.quick:
        a.rounds, a.reps, a.calls, a.stop_calls = 2, 2, 100_000, 100
    try:
        return _run(a)
    except (AradiaError, BenchError) as exc:
        print(f"bench/syscall_paths.py: {exc}", file=sys.stderr)
        return 2


def _run(a: argparse.Namespace) -> int:
    qemu = installed_qemu()
    so = build_plugin()
    phases = {n: Phase(n) for n in ("untraced", "plugin, pid filter", "plugin, every call an event",
                                    "stop path, pid filter")}
    with tempfile.TemporaryDirectory() as tmp, PluginShm(max_vcpus=1, event_entries=EVENT_ENTRIES) as shm:
        guest = launch(build_guest("6.1"), smp=1, plugins=[shm.plugin_arg(so)], gdb=True, shared_memory=True)
        try:
            gp = guest_programs()
            gp.install_program(guest, "loop", gp.build_loop(Path(tmp)))
            with attach(f"qmp:{guest.qmp_path}") as vm:
                problem = plugin_path_problem(vm, [SYSCALL])
                if problem is not None:
                    raise BenchError(f"QEMU {qemu.version}: {problem}")
                filtered, every = phases["plugin, pid filter"], phases["plugin, every call an event"]
                steps: list[Callable[[], None]] = [
                    lambda: phases["untraced"].rates.extend(loop_rates(guest, a.calls, a.reps)),
                    lambda: plugin_phase(vm, guest, Filter(pids={1}), a.calls, a.reps, filtered, 0),
                    lambda: plugin_phase(vm, guest, Filter(comms={"loop"}), a.calls, a.reps, every,
                                         a.calls * a.reps),
                    lambda: stop_phase(vm, guest, a.stop_calls, phases["stop path, pid filter"]),
                ]
                for r in range(a.rounds):
                    for k in range(len(steps)):
                        steps[(r + k) % len(steps)]()
                    print(f"round {r + 1}/{a.rounds} done", file=sys.stderr, flush=True)
        finally:
            guest.stop()
    _report(qemu.version, phases, a)
    return 0


def _report(version: str, phases: dict[str, Phase], a: argparse.Namespace) -> None:
    print(f"QEMU {version}, guest 6.1, 1 vCPU, TCG; loop of getsid: {a.calls:,} calls x {a.reps} per round "
          f"(stop path: {a.stop_calls}), {a.rounds} rounds; best run [median]")
    for ph in phases.values():
        print(f"  {ph.name:<30} {max(ph.rates):>14,.0f} calls/s  [{statistics.median(ph.rates):,.0f}]"
              f"  {'; '.join(dict.fromkeys(ph.notes))}")
    base = max(phases["untraced"].rates)
    print("ratios to untraced (same run, best rates):")
    for name, need in (("plugin, pid filter", ">= 0.80"), ("plugin, every call an event", ""),
                       ("stop path, pid filter", "< 0.001")):
        ratio = max(phases[name].rates) / base
        print(f"  {name:<30} {ratio:.5f}" + (f"   (issue 16 asks {need})" if need else ""))


if __name__ == "__main__":
    raise SystemExit(main())
