"""What the SSH honeypot monitor costs an attacker's session: login-to-prompt time and a 50-command
script's run time, monitor off against monitor on (every probe the monitor arms).

Boots one guest (6.1, TCG, GDB stub, shared RAM file; dropbear on 1 vCPU unless ``--variant openssh``
or ``--smp``). The attacker is paramiko from the host through the forwarded port, timed by the host's
clock (the guest's clock partly stops while the stub holds the VM):

* **login-to-prompt**: TCP connect, key exchange, password authentication, a pty and a shell, until
  the shell's prompt arrives;
* **50 commands**: 50 lines typed into that shell at once (``echo``, ``ls``, ``uname``, ``cat``,
  ``id``: builtins and programs), until the output of the last one arrives.

Rounds alternate off and on (each round starts with the other one); each phase keeps its best run
(the host is shared: other work only slows a run down). With the monitor on, the run also checks that
the monitor recorded the session and all 50 typed lines. Usage:

    python bench/honeypot.py [--rounds 3] [--variant dropbear|openssh] [--smp 1]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paramiko

from aradia.apps.honeypot.monitor import Honeypot
from aradia.lab.images import build_guest
from aradia.lab.launcher import Guest, launch
from aradia.service.schema import local_records as records
from aradia.trace.tracer import Tracer
from aradia.vm import attach

COMMANDS = [["echo cmd-{i}", "ls / > /dev/null", "uname -r", "cat /etc/hostname", "id -u"][i % 5].format(i=i)
            for i in range(50)]
DONE = "bench-done-$((40+2))"


def _recv_until(ch: paramiko.Channel, marker: bytes, timeout: float = 600) -> bytes:
    got = b""
    end = time.monotonic() + timeout
    while marker not in got:
        if time.monotonic() > end:
            raise TimeoutError(f"no {marker!r} after {timeout} s; got {got[-300:]!r}")
        chunk = ch.recv(65536)
        if not chunk:
            raise EOFError(f"the shell ended before {marker!r}; got {got[-300:]!r}")
        got += chunk
    return got


def session(guest: Guest) -> tuple[float, float]:
    """One attacker session: (login-to-prompt seconds, 50-command seconds)."""
    t0 = time.monotonic()
    sock = socket.create_connection(("127.0.0.1", guest.ssh_port), timeout=600)
    t = paramiko.Transport(sock)
    t.banner_timeout = t.auth_timeout = 600
    try:
        t.start_client(timeout=600)
        t.auth_password("root", guest.image.root_password)
        ch = t.open_session()
        ch.get_pty(term="vt100", width=80, height=24)
        ch.invoke_shell()
        ch.settimeout(600)
        _recv_until(ch, b"# ")
        login = time.monotonic() - t0
        t1 = time.monotonic()
        ch.sendall(("\n".join([*COMMANDS, f"echo {DONE}"]) + "\n").encode())
        _recv_until(ch, b"bench-done-42")
        script = time.monotonic() - t1
        ch.sendall(b"exit\n")
        while ch.recv(65536):
            pass
        return login, script
    finally:
        t.close()


def monitored(guest: Guest, work: Callable[[], tuple[float, float]], out: Path) -> tuple[float, float]:
    """``work()`` with the honeypot monitor on; checks it recorded the session and its 50 lines."""
    done = threading.Event()
    result: dict[str, tuple[float, float]] = {}
    with attach(f"qmp:{guest.qmp_path}") as vm, Tracer.open(vm) as tracer:
        hp = Honeypot(tracer, out, records("bench"))
        hp.start()

        def run() -> None:
            try:
                result["t"] = work()
            finally:
                done.set()

        worker = threading.Thread(target=run)
        worker.start()
        for ev in tracer.events(until=lambda: done.is_set() and not hp.table.open_sessions()):
            hp.handle(ev)
        worker.join()
        sessions = hp.close()
    lines = [x["line"] for s in sessions for x in s.lines]
    assert len(sessions) == 1 and lines[:50] == COMMANDS, (len(sessions), lines[:5], len(lines))
    return result["t"]


def main() -> int:
    """Boot, run the rounds, print each measurement and the ratios last."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variant", choices=["dropbear", "openssh"], default="dropbear")
    ap.add_argument("--smp", type=int, default=1, help="vCPUs of the guest (default 1)")
    args = ap.parse_args()
    image = build_guest("6.1", variant=args.variant)
    with tempfile.TemporaryDirectory() as tmp, launch(image, gdb=True, shared_memory=True, smp=args.smp,
                                                      workdir=Path(tmp)) as guest:
        print(f"guest: Linux {image.release}, {args.variant}, {args.smp} vCPU(s), TCG; host "
              f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}", flush=True)
        session(guest)  # warm: the daemon and the shell's files in the page cache
        best: dict[str, float] = {}
        for rnd in range(args.rounds):
            for on in ([False, True] if rnd % 2 == 0 else [True, False]):
                state = "on" if on else "off"
                out = Path(tmp) / f"out-{rnd}"
                login, script = monitored(guest, lambda: session(guest), out) if on else session(guest)
                print(f"round {rnd + 1}: monitor {state}: login-to-prompt {login:.2f} s, 50 commands "
                      f"{script:.2f} s", flush=True)
                best[f"login {state}"] = min(best.get(f"login {state}", login), login)
                best[f"script {state}"] = min(best.get(f"script {state}", script), script)
        print(f"login-to-prompt: off {best['login off']:.2f} s, on {best['login on']:.2f} s "
              f"(best of {args.rounds})")
        print(f"50 commands: off {best['script off']:.2f} s, on {best['script on']:.2f} s "
              f"(best of {args.rounds})")
        print(f"ratio login-to-prompt on/off: {best['login on'] / best['login off']:.1f}x")
        print(f"ratio 50 commands on/off: {best['script on'] / best['script off']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
