"""Helpers several test modules share: in-memory RAM, running the CLI, and the guest's own /proc.

(Tracing while a guest acts is in ``tracing.py``; guest programs built on the host in
``guest_programs.py``; bare QEMUs without a kernel in ``bare_qemu.py``.)
"""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from typing import TYPE_CHECKING, Any

from aradia.sources.base import PhysicalMemory, Segment

if TYPE_CHECKING:
    from aradia.lab.launcher import Guest


# --- RAM in bytearrays ----------------------------------------------------------------------------------
class BytesMemory(PhysicalMemory):
    """RAM held in bytearrays, ``{gpa: bytearray}`` (or one bytearray at guest-physical 0); writable.

    ``reads`` counts the reads that reached the bytes (cache tests use it).
    """

    kind = "bytes"
    writable = True

    def __init__(self, chunks: dict[int, bytearray] | bytearray) -> None:
        self.bufs = {0: chunks} if isinstance(chunks, bytearray) else chunks
        self.reads = 0
        super().__init__(Segment(gpa, len(b), gpa) for gpa, b in self.bufs.items())

    @property
    def buf(self) -> bytearray:
        """The bytes at guest-physical 0 (the one buffer of a single-range memory)."""
        return self.bufs[0]

    def _read_backing(self, seg: Segment, offset: int, size: int) -> bytes:
        self.reads += 1
        return bytes(self.bufs[seg.backing][offset : offset + size])

    def _write_backing(self, seg: Segment, offset: int, data: bytes) -> None:
        self.bufs[seg.backing][offset : offset + len(data)] = data


# --- the command line, as a user runs it ------------------------------------------------------------------
def cli_argv(*args: str) -> list[str]:
    """The argv that runs ``aradia ARGS`` with this interpreter."""
    return [sys.executable, "-m", "aradia.cli", *args]


def run_cli(*args: str, timeout: float = 120, text: bool = True, input: str | None = None,
            ) -> subprocess.CompletedProcess[Any]:
    """Run ``aradia ARGS`` as a separate process (stdin /dev/null unless ``input``); its result."""
    return subprocess.run(cli_argv(*args), capture_output=True, text=text, timeout=timeout, input=input,
                          stdin=subprocess.DEVNULL if input is None else None)


def assert_one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit status 2, nothing on stdout, and one ``aradia: error: ...`` line holding every needle."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aradia: error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert r.stdout == "", r.stdout
    return lines[0]


# --- ground truth: what the guest's own /proc says ----------------------------------------------------
Map = tuple[int, int, str, int, int, str]  # start, end, perms, offset, inode, path


def proc_maps(guest: Guest, pid: int) -> list[Map]:
    """``/proc/PID/maps`` of the guest process: (start, end, perms, offset, inode, path) per line."""
    out = []
    for line in guest.run(f"cat /proc/{pid}/maps").splitlines():
        f = line.split(None, 5)
        lo, hi = (int(x, 16) for x in f[0].split("-"))
        out.append((lo, hi, f[1], int(f[2], 16), int(f[4]), f[5].strip() if len(f) > 5 else ""))
    return out


def proc_fds(guest: Guest, pid: int) -> dict[int, tuple[str, int]]:
    """``/proc/PID/fd`` of the guest process: {fd: (readlink path, flags from fdinfo)}."""
    text = guest.run(f"cd /proc/{pid}/fd && for f in *; do echo \"$f|$(readlink $f)|"
                     f"$(grep flags ../fdinfo/$f | cut -f2)\"; done")
    return {int(a): (b, int(c, 8)) for a, b, c in (line.split("|") for line in text.splitlines())}


Tcp = tuple[str, int, str, int, str, int]  # local address, port, remote address, port, state, inode
TCP_STATES = {"01": "ESTABLISHED", "0A": "LISTEN"}


def proc_tcp(guest: Guest) -> set[Tcp]:
    """The ESTABLISHED and LISTEN sockets of ``/proc/net/tcp`` and ``tcp6``."""
    out = set()
    for fam, fname in (("inet", "tcp"), ("inet6", "tcp6")):
        for line in guest.run(f"cat /proc/net/{fname}").splitlines()[1:]:
            f = line.split()
            if f[3] not in TCP_STATES:
                continue

            def addr(x: str, fam: str = fam) -> tuple[str, int]:
                a, p = x.split(":")
                raw = bytes.fromhex(a)
                if fam == "inet":
                    return str(ipaddress.ip_address(raw[::-1])), int(p, 16)
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                return str(ipaddress.ip_address(words)), int(p, 16)

            la, lp = addr(f[1])
            ra, rp = addr(f[2])
            out.add((la, lp, ra, rp, TCP_STATES[f[3]], int(f[9])))
    return out


def proc_mounts(guest: Guest) -> list[tuple[str, str, str, str]]:
    """``/proc/mounts``: (source, target, type, "ro" or "rw") per line, in order."""
    out = []
    for line in guest.run("cat /proc/mounts").splitlines():
        f = line.split()
        out.append((f[0], f[1], f[2], f[3].split(",")[0]))
    return out
