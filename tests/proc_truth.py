"""Ground truth from the guest's own /proc, sampled while the host does something.

Some of what ``/proc`` shows changes all the time (a workqueue worker's name carries the work it ran
last, processes come and go). :func:`sample_stat` has the guest read every ``/proc/PID/stat`` again
and again, over ssh, while the host acts (e.g. takes aradia's view with the guest paused): what aradia
saw must be something ``/proc`` showed in the same stretch, and what ``/proc`` showed throughout must be
in aradia's view.
"""

from __future__ import annotations

import re
import secrets
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from aradia.lab.launcher import Guest

T = TypeVar("T")
PF_KTHREAD = 0x00200000
MARK = "@@sample"
#: A pool worker's name: its id, then "+" and the workqueue of the work it runs, or "-" and the last
#: one; the part after the id changes from one instant to the next.
WORKER = re.compile(r"^(kworker/(?:\d+:\d+H?|u\d+:\d+))(?:[+-].+)?$")


def worker_id(name: str) -> str | None:
    """The id of a pool worker's name (``kworker/0:1-events`` -> ``kworker/0:1``), None for others."""
    m = WORKER.match(name)
    return m[1] if m else None


@dataclass(frozen=True)
class Stat:
    """The fields of ``/proc/PID/stat`` the tests compare."""

    pid: int
    name: str
    state: str
    ppid: int
    flags: int
    start_ticks: int

    @property
    def kernel_thread(self) -> bool:
        return bool(self.flags & PF_KTHREAD)


def parse_stat(text: str) -> dict[int, Stat]:
    """``cat /proc/[0-9]*/stat`` output -> pid -> :class:`Stat`."""
    out = {}
    for line in text.splitlines():
        head, _, rest = line.rpartition(")")
        pid, sep, name = head.partition(" (")
        f = rest.split()
        if not sep or len(f) < 20 or not pid.isdigit():
            continue
        out[int(pid)] = Stat(int(pid), name, f[0], int(f[1]), int(f[6]), int(f[19]))
    return out


@dataclass
class Samples:
    """Consecutive snapshots of the guest's ``/proc/*/stat``."""

    snaps: list[dict[int, Stat]]
    sampler: int = 0  # the guest shell that took them (its children come and go between samples)

    @property
    def stable(self) -> set[int]:
        """Pids present in every snapshot."""
        return set.intersection(*(set(s) for s in self.snaps))

    @property
    def seen(self) -> set[int]:
        """Pids present in any snapshot."""
        return set.union(*(set(s) for s in self.snaps))

    def names(self, pid: int) -> set[str]:
        """Every name ``/proc`` showed for ``pid``."""
        return {s[pid].name for s in self.snaps if pid in s}

    def last(self, pid: int) -> Stat:
        return next(s[pid] for s in reversed(self.snaps) if pid in s)


def sample_stat(guest: Guest, during: Callable[[], T], *, before: int = 3, after: int = 3,
                threads: bool = False, timeout: float = 120) -> tuple[Samples, T]:
    """Read ``/proc/*/stat`` (every thread's ``/proc/*/task/*/stat`` with ``threads``) in the guest over
    and over (an ssh session) while ``during()`` runs on the host, with at least ``before`` snapshots
    before it starts and ``after`` once it returned."""
    files = "/proc/[0-9]*/task/[0-9]*/stat" if threads else "/proc/[0-9]*/stat"
    stop = f"/tmp/.aradia-stop-{secrets.token_hex(4)}"
    loop = (f"echo sampler $$; while [ ! -e {stop} ]; do cat {files} 2>/dev/null; echo {MARK}; sleep 0.05; done;"
            f" rm -f {stop}")
    proc = subprocess.Popen([*guest.ssh_argv(), loop], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, text=True)
    chunks: list[str] = []
    count = [0]

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            chunks.append(line)
            if line.strip() == MARK:
                count[0] += 1

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        _wait(lambda: count[0] >= before, timeout, "the guest's /proc sampler did not start")
        start = count[0]
        value = during()
        done = count[0]
        _wait(lambda: count[0] >= done + after, timeout, "the guest's /proc sampler stopped")
        guest.run(f"touch {stop}")
        proc.wait(timeout=30)
        thread.join(10)
    finally:
        proc.kill()
    snaps, current = [], []
    sampler = int(chunks[0].split()[1])
    for line in chunks[1:]:
        if line.strip() == MARK:
            snaps.append(parse_stat("".join(current)))
            current = []
        else:
            current.append(line)
    assert len(snaps) >= start + after, (len(snaps), start)
    return Samples(snaps, sampler), value


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(what)
        time.sleep(0.05)
