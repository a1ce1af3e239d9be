"""What the traced-migration tests share: a source and a destination QEMU, and a guest command loop.

The destination is started alike (same image, vCPUs, memory, its own shared RAM file and GDB stub)
with ``-incoming unix:PATH`` and ``-S``. Ground truth comes from the guest: the command loop writes
each number it ran to a file, read with :meth:`Guest.run` on whichever QEMU runs the guest.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from aradia.lab.launcher import Guest
from aradia.proto.qmp import QMPClient

BootGuest = Callable[..., contextlib.AbstractContextManager[Guest]]
#: How many numbered commands the guest runs, and the pause between two (seconds).
COMMANDS = 200
INTERVAL = 0.02
MARK = "mark-"


@dataclass
class Pair:
    """A booted source and a destination waiting for it over ``uri``."""

    source: Guest
    destination: Guest
    uri: str


@contextlib.contextmanager
def guest_pair(boot_guest: BootGuest, smp: int) -> Iterator[Pair]:
    """Boot a source (``smp`` vCPUs, GDB stub, shared RAM) and start its destination (``-incoming``, ``-S``)."""
    sock = f"/tmp/aradia-mig-{os.getpid()}-{secrets.token_hex(4)}.sock"
    opts = {"smp": smp, "gdb": True, "shared_memory": True}
    try:
        with boot_guest("6.1", **opts) as source, \
                boot_guest("6.1", **opts, incoming=f"unix:{sock}", start_paused=True) as destination:
            yield Pair(source, destination, f"unix:{sock}")
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)


def start_command_loop(guest: Guest, tag: str, count: int = COMMANDS, interval: float = INTERVAL) -> str:
    """Start the loop in the guest: ``/bin/true mark-TAG-N`` for N = 0..count-1, one every ``interval``
    seconds; each N is appended to ``/tmp/marks-TAG`` once run, ``done`` at the end. Returns that file."""
    out = f"/tmp/marks-{tag}"
    guest.run(f"rm -f {out}; (for i in $(seq 0 {count - 1}); do /bin/true {MARK}{tag}-$i; echo $i >> {out};"
              f" sleep {interval}; done; echo done >> {out}) > /dev/null 2>&1 &")
    return out


def marks_in_guest(guest: Guest, out: str, timeout: float = 300) -> list[int]:
    """Wait until the loop wrote ``done``; the numbers it ran, in order (the guest's own record)."""
    text = guest.run(f"for i in $(seq {int(timeout * 10)}); do grep -q '^done' {out} && break; sleep 0.1; done;"
                     f" cat {out}", timeout=timeout + 30)
    lines = text.split()
    assert lines and lines[-1] == "done", text[-500:]
    return [int(x) for x in lines[:-1]]


def marks_count(guest: Guest, out: str) -> int:
    """How many commands the loop ran so far."""
    return int(guest.run(f"cat {out} 2>/dev/null | wc -l").strip() or 0)


def qmp_status(path: object) -> str:
    """QEMU's run state, asked over its QMP socket (only when no one else holds it)."""
    with QMPClient(str(path)) as qmp:
        return str(qmp.execute("query-status")["status"])
