"""Live migration: plain QEMU against aradia-driven with probes armed (total time, downtime, events).

Boots one guest (6.1, 1 vCPU, TCG, 256 MiB in a shared file, GDB stub) and migrates it back and
forth over unix sockets, each time into a fresh destination QEMU started alike with ``-incoming
unix:PATH -S``. Rounds alternate (each starts with the other kind than the last):

* **plain**: QMP only, as an operator would: ``migrate-set-parameters max-bandwidth`` (the same
  pre-copy bandwidth aradia uses, :data:`aradia.trace.migration.PRECOPY_BANDWIDTH`; QEMU's default
  ``downtime-limit`` of 300 ms), ``migrate``, poll ``query-migrate`` until ``completed``, ``cont`` on the
  destination (it was started with ``-S``, as aradia's are). Nothing traced.
* **aradia**: a :class:`~aradia.trace.tracer.Tracer` with an ``execve`` probe, its events drained by
  a consumer thread, and :func:`aradia.trace.migration.migrate`; the trace goes on on the destination.

Both run under the same guest workload: a command loop (``/bin/true mark-R-N`` every 20 ms, ``--commands``
of them per round) that straddles the migration. Per migration: **total** (``migrate`` to the
destination running), **downtime** (QEMU's ``query-migrate`` figure; for aradia also the host-measured
*paused* time from its stop of the source to the destination's resume, which includes arming the
probes there), and for aradia **lost** and **duplicated** events: the loop's numbers in the trace
against the numbers the guest wrote itself (both must be 0). Medians over rounds, best in brackets;
ratios (aradia / plain) last. Exit status 1 if an event was lost or duplicated.

    python bench/migration.py [--rounds 3] [--commands 60]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from aradia.lab import GuestError
from aradia.lab.images import build_guest
from aradia.lab.launcher import Guest, launch
from aradia.proto.qmp import QMPClient
from aradia.trace.events import Event
from aradia.trace.migration import PRECOPY_BANDWIDTH, migrate
from aradia.trace.tracer import Tracer
from aradia.vm import attach

MARK = "mark-"


@dataclass
class Runs:
    """The measurements of one kind of migration."""

    total: list[float] = field(default_factory=list)
    downtime_ms: list[float] = field(default_factory=list)
    paused_ms: list[float] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)
    duplicated: list[int] = field(default_factory=list)


def _med(xs: list[float]) -> str:
    return f"{statistics.median(xs):8.1f} [{min(xs):.1f}]" if xs else "       -"


def argv1(ev: Event) -> str:
    """argv[1] of an exec event, or ''."""
    argv = ev.args.get("argv") or []
    return str(argv[1]) if ev.kind == "syscall" and len(argv) > 1 else ""


def start_loop(guest: Guest, tag: str, count: int) -> str:
    """The guest's command loop; the file it writes each number it ran to, ``done`` at its end."""
    out = f"/tmp/marks-{tag}"
    guest.run(f"rm -f {out}; (for i in $(seq 0 {count - 1}); do /bin/true {MARK}{tag}-$i; echo $i >> {out};"
              f" sleep 0.02; done; echo done >> {out}) > /dev/null 2>&1 &")
    return out


def wait_loop(guest: Guest, out: str, timeout: float = 240) -> list[int]:
    """The numbers the loop ran (once it wrote ``done``)."""
    text = guest.run(f"for i in $(seq {int(timeout * 10)}); do grep -q '^done' {out} && break; sleep 0.1;"
                     f" done; cat {out}", timeout=timeout + 30)
    words = text.split()
    if not words or words[-1] != "done":
        raise SystemExit(f"the guest's loop did not finish: {text[-300:]}")
    return [int(w) for w in words[:-1]]


def wait_marks(guest: Guest, out: str, n: int, timeout: float = 300) -> None:
    """Wait until the loop ran ``n`` commands (asked in the guest, before the migration)."""
    guest.run(f"for i in $(seq {int(timeout * 10)}); do [ $(cat {out} 2>/dev/null | wc -l) -ge {n} ] "
              "&& break; sleep 0.1; done", timeout=timeout + 30)


def destination(image: object, workdir: str) -> tuple[Guest, str]:
    """A fresh destination QEMU waiting on a new unix socket; (guest, uri)."""
    sock = os.path.join(workdir, f"mig-{secrets.token_hex(4)}.sock")
    guest = launch(image, smp=1, gdb=True, shared_memory=True,  # type: ignore[arg-type]
                   incoming=f"unix:{sock}", start_paused=True)
    return guest, f"unix:{sock}"


def plain(src: Guest, dst: Guest, uri: str, runs: Runs, tag: str, commands: int) -> None:
    """QMP-only migration under the command loop."""
    out = start_loop(src, tag, commands)
    wait_marks(src, out, commands // 4)
    with QMPClient(str(src.qmp_path)) as qmp:
        qmp.execute("migrate-set-parameters", {"max-bandwidth": PRECOPY_BANDWIDTH, "downtime-limit": 300})
        t0 = time.monotonic()
        qmp.execute("migrate", {"uri": uri})
        while (info := qmp.execute("query-migrate"))["status"] not in ("completed", "failed", "cancelled"):
            time.sleep(0.001)
    if info["status"] != "completed":
        raise SystemExit(f"plain migration {info['status']}: {info}")
    with QMPClient(str(dst.qmp_path)) as qmp:
        while qmp.execute("query-status")["status"] == "inmigrate":
            time.sleep(0.0005)
        qmp.execute("cont")
    runs.total.append(time.monotonic() - t0)
    runs.downtime_ms.append(float(info.get("downtime", 0)))
    print(f"plain   migration {tag}: total {runs.total[-1]:.2f} s, downtime {runs.downtime_ms[-1]:.0f} ms",
          flush=True)
    wait_loop(dst, out)


def traced(src: Guest, dst: Guest, uri: str, runs: Runs, tag: str, commands: int) -> None:
    """aradia-driven migration with an execve probe armed; lost and duplicated loop events counted."""
    events: list[Event] = []
    stop = threading.Event()
    with attach(f"qmp:{src.qmp_path}") as vm, Tracer.open(vm) as tracer:
        tracer.add_syscall("execve")

        def consume() -> None:
            for ev in tracer.events(until=stop.is_set):
                events.append(ev)

        consumer = threading.Thread(target=consume, daemon=True)
        consumer.start()
        out = start_loop(src, tag, commands)  # once the probe is armed: every command is traced
        prefix = f"{MARK}{tag}-"
        deadline = time.monotonic() + 300
        while sum(argv1(e).startswith(prefix) for e in list(events)) < commands // 4 \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        result = migrate(tracer, f"qmp:{dst.qmp_path}", uri)
        print(f"aradia  migration {tag}: total {result.total:.2f} s, downtime {result.qemu_downtime_ms} ms, "
              f"paused {result.paused * 1000:.0f} ms", flush=True)
        try:
            truth = wait_loop(dst, out)
        except GuestError as e:  # (a destination guest that crashed: it must not)
            raise SystemExit(f"the destination guest did not finish its command loop after the migration "
                             f"(crashed?): {str(e)[:200]}") from None
        last = f"{prefix}{commands - 1}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(argv1(e) == last for e in list(events)):
            time.sleep(0.05)
        stop.set()
        consumer.join(timeout=30)
    seen = [int(argv1(e)[len(prefix):]) for e in events if argv1(e).startswith(prefix)]
    runs.total.append(result.total)
    runs.downtime_ms.append(float(result.qemu_downtime_ms or 0))
    runs.paused_ms.append(result.paused * 1000)
    runs.lost.append(len(set(truth) - set(seen)))
    runs.duplicated.append(len(seen) - len(set(seen)))


def main() -> int:
    """Run the benchmark; print one line per measurement, ratios last."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", default="6.1")
    ap.add_argument("--rounds", type=int, default=3, help="migrations of each kind")
    ap.add_argument("--commands", type=int, default=60, help="numbered commands per migration's loop")
    args = ap.parse_args()
    started = time.monotonic()
    image = build_guest(args.kernel)
    kinds = {"plain": Runs(), "aradia": Runs()}
    order = [k for r in range(args.rounds)
             for k in (("plain", "aradia") if r % 2 == 0 else ("aradia", "plain"))]
    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="aradia-bench-mig-"))
        src = launch(image, smp=1, gdb=True, shared_memory=True)
        for i, kind in enumerate(order):
            dst, uri = destination(image, workdir)
            try:
                (plain if kind == "plain" else traced)(src, dst, uri, kinds[kind], f"{i}", args.commands)
            except BaseException:
                dst.stop()
                src.stop()
                raise
            src.stop()  # the migrated-away source (postmigrate)
            src = dst
        src.stop()
    p, a = kinds["plain"], kinds["aradia"]
    took = time.monotonic() - started
    print(f"guest: Linux {args.kernel}, 1 vCPU, 256M, TCG, unix-socket migration; {args.rounds} of each "
          f"kind, {args.commands} commands (one every 20 ms) straddling each; {took:.0f} s")
    print(f"plain   total s      {_med(p.total)}")
    print(f"plain   downtime ms  {_med(p.downtime_ms)}   (QEMU's figure)")
    print(f"aradia  total s      {_med(a.total)}")
    print(f"aradia  downtime ms  {_med(a.downtime_ms)}   (QEMU's figure)")
    print(f"aradia  paused ms    {_med(a.paused_ms)}   (its stop of the source to the destination's resume)")
    print(f"aradia  events lost {sum(a.lost)}, duplicated {sum(a.duplicated)} "
          f"(of {args.rounds * args.commands})")
    plain_down = max(statistics.median(p.downtime_ms), 1e-9)
    total_ratio = statistics.median(a.total) / statistics.median(p.total)
    print(f"ratio aradia/plain total            {total_ratio:.2f}")
    print(f"ratio aradia/plain downtime (QEMU)  {statistics.median(a.downtime_ms) / plain_down:.2f}")
    print(f"ratio aradia paused/plain downtime  {statistics.median(a.paused_ms) / plain_down:.2f}")
    return 1 if sum(a.lost) or sum(a.duplicated) else 0


if __name__ == "__main__":
    sys.exit(main())
