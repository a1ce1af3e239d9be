"""What the insider guard costs the guest: a file-heavy workload and an ssh command loop, guard off
against guard on (every hook armed, the policy of ``tests/guard_setup.py``), and the cost per hook hit.

Boots one guest (6.1, 2 vCPUs unless ``--smp``, TCG, GDB stub, shared RAM file). Workloads, timed by
the host's clock (the guest's clock partly stops while the stub holds the VM):

* **files**: 2,000 small files written one by one outside the protected tree (``/tmp``), then read
  back by one ``cat``: each write is a create and an open for writing, each read an open (~6,000 hook
  hits, all decided "not protected");
* **ssh**: ``--ssh`` logins running ``true`` (dropbear, bash: a few dozen opens and execs each).

Rounds alternate off and on (each round starts with the other one). Each phase keeps its best
run (the host is shared: other work only slows a run down). Cost per hook hit = (on - off) / hits;
the share of it the guard's own decision takes (Python, drgn reads) is printed beside it. Usage:

    python bench/guard.py [--rounds 2] [--files 2000] [--ssh 10] [--smp 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from aradia.apps.guard.guard import Guard
from aradia.apps.guard.policy import parse_policy
from aradia.lab.images import build_guest
from aradia.lab.launcher import Guest, launch
from aradia.trace.tracer import Tracer
from aradia.vm import attach

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from guard_setup import POLICY, SCENE  # the tests' scene: one definition


def files_workload(guest: Guest, n: int) -> float:
    """Seconds (host clock) to write ``n`` small files in /tmp and read them back."""
    guest.run("rm -rf /tmp/gb; mkdir /tmp/gb", timeout=600)
    script = f"cd /tmp/gb; i=0; while [ $i -lt {n} ]; do echo $i > f$i; i=$((i+1)); done; cat f* > /dev/null"
    t = time.monotonic()
    guest.run(script, timeout=1200)
    return time.monotonic() - t


def ssh_workload(guest: Guest, n: int) -> float:
    """Seconds (host clock) for ``n`` ssh logins that run ``true``."""
    t = time.monotonic()
    for _ in range(n):
        guest.ssh("true", timeout=300)
    return time.monotonic() - t


def guarded(guest: Guest, work: Callable[[], float]) -> tuple[float, int, float]:
    """Run ``work()`` with the guard on: (seconds, hook hits, seconds spent in the guard's decisions)."""
    policy = parse_policy(POLICY.format(action="block"))
    done = threading.Event()
    out: dict[str, float] = {}
    with attach(f"qmp:{guest.qmp_path}") as vm, Tracer.open(vm) as tracer:
        guard = Guard(tracer, policy)
        guard.start()

        def run() -> None:
            try:
                out["t"] = work()
            finally:
                done.set()

        worker = threading.Thread(target=run)
        hits0, dec0 = guard.hits, guard.decide_seconds
        worker.start()
        alerts = list(tracer.events(until=done.is_set))
        worker.join()
        assert not alerts, [a.line() for a in alerts]  # nothing in the workloads touches the tree
        return out["t"], guard.hits - hits0, guard.decide_seconds - dec0


def main() -> int:
    """Boot, run the rounds, print each measurement and the ratios last."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--ssh", type=int, default=10)
    ap.add_argument("--smp", type=int, default=2, help="vCPUs of the guest (default 2)")
    args = ap.parse_args()
    image = build_guest("6.1")
    with tempfile.TemporaryDirectory() as tmp, launch(image, gdb=True, shared_memory=True, smp=args.smp,
                                                      workdir=Path(tmp)) as guest:
        print(f"guest: Linux {image.release}, {args.smp} vCPUs, TCG; host {os.cpu_count()} CPUs, load "
              f"{os.getloadavg()[0]:.2f}", flush=True)
        guest.run(SCENE)
        guest.ssh("true", timeout=60)  # sshd up
        best: dict[str, float] = {}
        hits: dict[str, int] = {}
        decide: dict[str, float] = {}
        workloads: dict[str, Callable[[], float]] = {"files": lambda: files_workload(guest, args.files),
                                                     "ssh": lambda: ssh_workload(guest, args.ssh)}
        for rnd in range(args.rounds):
            for on in ([False, True] if rnd % 2 == 0 else [True, False]):
                for name, work in workloads.items():
                    key = f"{name} {'on' if on else 'off'}"
                    if on:
                        t, h, d = guarded(guest, work)
                        hits[name], decide[name] = h, d
                        print(f"round {rnd + 1}: {key}: {t:.2f} s, {h:,} hook hits, decisions {d:.2f} s",
                              flush=True)
                    else:
                        t = work()
                        print(f"round {rnd + 1}: {key}: {t:.2f} s", flush=True)
                    best[key] = min(best.get(key, t), t)
        for name in workloads:
            off, on = best[f"{name} off"], best[f"{name} on"]
            per_hit = (on - off) / hits[name] * 1000 if hits[name] else float("nan")
            own = decide[name] / hits[name] * 1000 if hits[name] else float("nan")
            unit = f"{args.files} files" if name == "files" else f"{args.ssh} logins"
            print(f"{name} ({unit}): off {off:.2f} s, on {on:.2f} s (best of {args.rounds}); {hits[name]:,} "
                  f"hook hits; {per_hit:.2f} ms per hook hit, of which the decision {own:.3f} ms")
        for name in workloads:
            print(f"ratio {name} guard on / off: {best[f'{name} on'] / best[f'{name} off']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
