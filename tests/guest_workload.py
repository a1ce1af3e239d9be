"""Guest programs at work: started in the guest, waited for, driven and heard from.

The programs of ``tests/guest_programs.py`` print ``ready PID`` once set up and then what they did as
the guest saw it; :func:`start_program` starts one in the background and waits for that line.
:class:`Ticker` reads the ``multi ticker`` program's clock from outside to tell whether (and how long)
the guest was paused; :class:`Workload` is what the command-line tests look at; actors and openers
act on SIGUSR1; :func:`ssh_typed` types command lines into an interactive login shell.
"""

from __future__ import annotations

import itertools
import os
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aradia.lab.launcher import Guest
from guest_programs import build_loop, install_cli_programs, install_program


def program_lines(guest: Guest, out: str, what: str, timeout: float = 30) -> list[str]:
    """Wait until the guest file ``out`` holds a line starting with ``what``; its lines."""
    text = guest.run(f"for i in $(seq {int(timeout * 20)}); do grep -q '^{what}' {out} && break; sleep 0.05; done;"
                     f" cat {out}", timeout=timeout + 10)
    lines = text.splitlines()
    assert any(x.startswith(what) for x in lines), text
    return lines


def start_program(guest: Guest, command: str, tag: str) -> tuple[int, str]:
    """Start ``command`` in the guest in the background, its output in ``/tmp/out-TAG``; once it
    printed ``ready PID``: (PID, the output file)."""
    out = f"/tmp/out-{tag}"
    guest.run(f"{command} > {out} 2>&1 &")
    lines = program_lines(guest, out, "ready")
    return int(next(x for x in lines if x.startswith("ready")).split()[1]), out


class Ticker:
    """The ``multi ticker`` guest program: its guest-physical page, read straight from the guest's
    shared RAM file (no QMP: the command under test holds QEMU's one QMP connection meanwhile)."""

    MAGIC = 0x72656B6369746172

    def __init__(self, guest: Guest, seconds: int = 120) -> None:
        assert guest.shm_path is not None, "the ticker needs the guest's RAM in a shared file"
        self.guest = guest
        self.pid, out = start_program(guest, f"/tmp/multi ticker {seconds} 000000000000", "ticker")
        self.phys = int(next(x for x in program_lines(guest, out, "ready") if x.startswith("phys")).split()[1], 16)
        self.fd = os.open(guest.shm_path, os.O_RDONLY)  # pc machine below 3 GiB: file offset = address
        magic, _, _ = self.read()
        assert magic == self.MAGIC

    def read(self) -> tuple[int, int, int]:
        """(magic, round, guest CLOCK_MONOTONIC ns) as the guest last wrote them."""
        return struct.unpack("<QQQ", os.pread(self.fd, 24, self.phys))

    def lag(self, seconds: float = 0.5) -> float:
        """Host minus guest monotonic time, in seconds (the least over ``seconds`` of readings: a
        reading can only be late). It grows by exactly the time the guest spent paused (QEMU stops
        the guest's clocks with it); host load does not move it."""
        best = float("inf")
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            _, _, ns = self.read()
            best = min(best, time.monotonic_ns() - ns)
            time.sleep(0.002)
        return best / 1e9

    def watch(self, run: Callable[[], Any]) -> tuple[Any, dict[int, float], float]:
        """``run()`` while reading the guest's round number every ~0.5 ms: (what it returned, round ->
        how long the host saw it unchanged, in seconds, the lag growth over ``run``)."""
        before = self.lag()
        seen: list[tuple[float, int]] = []
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set():
                seen.append((time.monotonic(), self.read()[1]))
                time.sleep(0.0005)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            value = run()
        finally:
            stop.set()
            poller.join(5)
        growth = self.lag() - before
        held: dict[int, float] = {}
        for (t0, n0), (t1, _) in itertools.pairwise(seen):
            held[n0] = held.get(n0, 0.0) + (t1 - t0)
        return value, held, growth

    def close(self) -> None:
        os.close(self.fd)
        self.guest.run(f"kill {self.pid} 2>/dev/null; true")


W1 = ("bash -c 'exec 5</etc/passwd 6>>/tmp/aradia-out.txt; dd bs=7 count=1 <&5 >/dev/null 2>&1;"
      " echo -n aradia-w1 > /proc/$$/comm; echo ready $$; while :; do sleep 1000; done' w1 alpha")


@dataclass
class Workload:
    """What the command-line tests look at in a guest: a bash worker with open files (fd 5 read to
    offset 7, fd 6 appending), the listener and threads programs, and a memhold region."""

    guest: Guest
    worker: int
    listener: tuple[int, list[str]]  # pid, its "sock ..." lines
    threads: int
    hold: Any  # aradia.lab.launcher.MemHold

    @classmethod
    def start(cls, guest: Guest, tmp: Path) -> Workload:
        install_cli_programs(guest, tmp)
        install_program(guest, "loop", build_loop(tmp))
        worker, _ = start_program(guest, W1, "w1")
        lpid, lout = start_program(guest, "/tmp/multi listen", "listen")
        socks = [x for x in program_lines(guest, lout, "ready") if x.startswith("sock ")]
        threads, _ = start_program(guest, "/tmp/multi threads 3", "threads")
        hold = guest.start_memhold(seed=0xC0FFEE, size=1 << 16)
        return cls(guest, worker, (lpid, socks), threads, hold)

    def stop(self) -> None:
        self.hold.stop()
        self.guest.run(f"kill {self.worker} {self.listener[0]} {self.threads}", check=False)


# --- actors and openers (multi actor, opener) -----------------------------------------------------
def start_actors(guest: Guest, specs: dict[str, int]) -> dict[str, int]:
    """Start ``name -> uid`` actors (comm ``aradia-act``, or ``aradia-decoy`` for names starting with
    "decoy"), each waiting for SIGUSR1; name -> pid."""
    pids = {}
    for i, (name, uid) in enumerate(specs.items()):
        prog = "/tmp/aradia-decoy" if name.startswith("decoy") else "/tmp/aradia-act"
        pids[name], _ = start_program(guest, f"{prog} actor {name} {uid} {7100 + i}", f"actor-{name}")
    return pids


def release_actors(guest: Guest, pids: dict[str, int]) -> None:
    """Let the actors act, and wait until each has exec'd /bin/true and is gone."""
    ids = " ".join(str(p) for p in pids.values())
    guest.run(f"kill -USR1 {ids}; for i in $(seq 200); do kill -0 {ids} 2>/dev/null || break; sleep 0.05;"
              f" done; for p in {ids}; do while kill -0 $p 2>/dev/null; do sleep 0.05; done; done", timeout=60)


def actor_events(name: str, port: int) -> list[tuple[str, dict[str, Any]]]:
    """What actor ``name`` does, as syscall events with decoded arguments."""
    return [("openat", {"dfd": -100, "path": f"/tmp/aradia-open-{name}", "flags": 0}),
            ("connect", {"addr": {"family": "inet", "address": "127.0.0.1", "port": port}}),
            ("execve", {"path": "/bin/true", "argv": ["/bin/true", name]})]


ACTORS = {"a": 4321, "b": 0, "decoy": 4321, "d": 4321}


def start_opener(guest: Guest, tag: str, paths: list[str]) -> tuple[int, str]:
    """Start ``/tmp/opener PATHS...``, waiting for SIGUSR1; (pid, its output file)."""
    return start_program(guest, f"/tmp/opener {' '.join(paths)}", tag)


def release_opener(guest: Guest, pid: int, out: str) -> list[list[str]]:
    """SIGUSR1 the opener and wait for its report of this round: [path, flags-hex, address, result]
    per call."""
    before = int(guest.run(f"grep -c '^done' {out}; true").split()[0])
    guest.run(f"kill -USR1 {pid}; for i in $(seq 400); do [ $(grep -c '^done' {out}) -gt {before} ] && break;"
              " sleep 0.05; done")
    rounds = "\n".join(program_lines(guest, out, "done")).split("done")
    assert len(rounds) == before + 2, rounds
    return [x.split()[1:] for x in rounds[before].splitlines() if x.startswith("open ")]


# --- an interactive login -------------------------------------------------------------------------------
def ssh_typed(guest: Guest, lines: list[str]) -> str:
    """Log in over ssh with a terminal (``-tt``), type each of ``lines`` and then ``exit``, 1.5 s
    apart; everything the session printed."""
    proc = subprocess.Popen([*guest.ssh_argv(), "-tt"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    assert proc.stdin is not None
    time.sleep(3)  # login and the first prompt
    for typed in [*lines, "exit"]:
        proc.stdin.write(typed.encode() + b"\n")
        proc.stdin.flush()
        time.sleep(1.5)
    try:
        return proc.communicate(timeout=60)[0].decode(errors="replace")
    finally:
        proc.kill()
