"""Ground truth: what the guest's own /proc says, read inside the guest (never through aradia).

Each reader runs a shell command in the guest (over its console; :func:`sample_stat` over ssh) and
parses what it printed: ``/proc/PID/maps``, ``/proc/PID/fd`` with ``fdinfo``, ``/proc/net/tcp``,
``/proc/mounts``, ``/proc/modules``, ``/proc/kallsyms``, ``/proc/kcore``, each process's ``stat``,
``status``, ``cmdline`` and ``exe``.

Some of what ``/proc`` shows changes all the time (a workqueue worker's name carries the work it ran
last, processes come and go). :func:`sample_stat` has the guest read every ``/proc/PID/stat`` again
and again, over ssh, while the host acts (e.g. takes aradia's view with the guest paused): what aradia
saw must be something ``/proc`` showed in the same stretch, and what ``/proc`` showed throughout must be
in aradia's view.
"""

from __future__ import annotations

import base64
import gzip
import ipaddress
import re
import secrets
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from aradia.lab.launcher import Guest

T = TypeVar("T")


# --- kallsyms -----------------------------------------------------------------------------------------
def guest_kallsyms(guest: Guest) -> list[str]:
    """The guest's /proc/kallsyms without module symbols (gzip + base64 over the serial line)."""
    out = guest.run("grep -v '\\[' /proc/kallsyms | gzip -1 | base64", timeout=240)
    return gzip.decompress(base64.b64decode("".join(out.split()))).decode().splitlines()


# --- kernel memory as the guest kernel reads it ------------------------------------------------------
def kcore_read(guest: Guest, vaddr: int, size: int) -> bytes:
    """``size`` bytes at kernel virtual ``vaddr`` as the guest kernel itself reads them, through its
    ``/proc/kcore`` (the ELF program headers say where in the file ``vaddr`` is)."""
    head = base64.b64decode("".join(guest.run("head -c 65536 /proc/kcore | base64").split()))
    phoff, = struct.unpack_from("<Q", head, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
    for i in range(phnum):
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz, _memsz, _align = struct.unpack_from(
            "<IIQQQQQQ", head, phoff + i * phentsize)
        if p_type == 1 and p_vaddr <= vaddr and vaddr + size <= p_vaddr + p_filesz:
            off = p_offset + vaddr - p_vaddr
            out = guest.run(f"dd if=/proc/kcore bs=1 skip={off} count={size} 2>/dev/null | base64")
            return base64.b64decode("".join(out.split()))
    raise AssertionError(f"/proc/kcore maps no {size} bytes at {vaddr:#x}")


# --- maps --------------------------------------------------------------------------------------------
Map = tuple[int, int, str, int, int, str]  # start, end, perms, offset, inode, path


def proc_maps(guest: Guest, pid: int) -> list[Map]:
    """``/proc/PID/maps`` of the guest process: (start, end, perms, offset, inode, path) per line."""
    out = []
    for line in guest.run(f"cat /proc/{pid}/maps").splitlines():
        f = line.split(None, 5)
        lo, hi = (int(x, 16) for x in f[0].split("-"))
        out.append((lo, hi, f[1], int(f[2], 16), int(f[4]), f[5].strip() if len(f) > 5 else ""))
    return out


# --- open files -----------------------------------------------------------------------------------------
def _fd_fields(guest: Guest, pid: int, *, pos: bool) -> dict[int, list[str]]:
    """fd -> [readlink path, fdinfo flags (octal), and with ``pos`` the fdinfo pos] of the guest process."""
    more = "|$(grep pos ../fdinfo/$f | cut -f2)" if pos else ""
    text = guest.run(f"cd /proc/{pid}/fd && for f in *; do echo \"$f|$(readlink $f)|"
                     f"$(grep flags ../fdinfo/$f | cut -f2){more}\"; done")
    return {int(fd): rest for fd, *rest in (line.split("|") for line in text.splitlines())}


def proc_fds(guest: Guest, pid: int) -> dict[int, tuple[str, int]]:
    """``/proc/PID/fd`` of the guest process: {fd: (readlink path, flags from fdinfo)}."""
    return {fd: (path, int(flags, 8)) for fd, (path, flags) in _fd_fields(guest, pid, pos=False).items()}


def proc_fds_pos(guest: Guest, pid: int) -> dict[int, tuple[str, int, int]]:
    """``/proc/PID/fd`` of the guest process: {fd: (readlink path, flags and pos from fdinfo)}."""
    return {fd: (path, int(flags, 8), int(pos))
            for fd, (path, flags, pos) in _fd_fields(guest, pid, pos=True).items()}


# --- sockets -----------------------------------------------------------------------------------------
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


SOCKET_FDS = ("for p in /proc/[0-9]*; do for f in $p/fd/*; do l=$(readlink $f 2>/dev/null); case $l in"
              " socket:*) echo \"${p#/proc/} ${f##*/} $l\";; esac; done; done")


def socket_fds(guest: Guest) -> set[tuple[int, int]]:
    """(pid, fd) of every socket a process holds, from the guest's /proc/PID/fd."""
    return {(int(p), int(fd)) for p, fd, _ in (line.split() for line in guest.run(SOCKET_FDS, timeout=60).splitlines())}


# --- mounts, modules -----------------------------------------------------------------------------------
def proc_mounts(guest: Guest) -> list[tuple[str, str, str, str]]:
    """``/proc/mounts``: (source, target, type, "ro" or "rw") per line, in order."""
    out = []
    for line in guest.run("cat /proc/mounts").splitlines():
        f = line.split()
        out.append((f[0], f[1], f[2], f[3].split(",")[0]))
    return out


def proc_modules(guest: Guest) -> list[tuple[str, int, int]]:
    """``/proc/modules``: (name, size, base address) per line, in order."""
    return [(f[0], int(f[1]), int(f[5], 16)) for f in (line.split() for line in guest.run("cat /proc/modules").splitlines())]


# --- processes ---------------------------------------------------------------------------------------
PF_KTHREAD = 0x00200000
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


def proc_details(guest: Guest, pids: Iterable[int]) -> dict[int, tuple[int, list[str]]]:
    """pid -> (real uid, argv) from the guest's /proc/PID/status and cmdline (processes that are gone
    are left out)."""
    script = "for p in " + " ".join(str(p) for p in pids) + "; do u=$(grep '^Uid:' /proc/$p/status 2>/dev/null" \
             " | cut -f2) || continue; echo \"P|$p|$u|$(tr '\\0' '\\1' < /proc/$p/cmdline 2>/dev/null)\"; done"
    out = {}
    for line in guest.run(script, timeout=60).splitlines():
        if line.startswith("P|"):
            _, pid, uid, cmd = line.split("|", 3)
            if uid:
                args = cmd.split("\x01")
                out[int(pid)] = (int(uid), args[:-1] if args and args[-1] == "" else args)
    return out


PROCESSES = r"""
for d in /proc/[0-9]*; do
  p=${d#/proc/}
  s=$(cat $d/stat 2>/dev/null) || continue
  u=$(grep -E '^(Uid|Gid):' $d/status 2>/dev/null | tr '\t\n' '  ')
  c=$(tr '\0' '\n' < $d/cmdline 2>/dev/null | base64 | tr -d '\n')
  e=$(readlink $d/exe 2>/dev/null)
  echo "P|$s|$u|$c|$e"
done
"""


@dataclass
class ProcessTruth:
    """What the guest's /proc says about one process."""

    pid: int
    comm: str
    state: str
    ppid: int
    start_ticks: int
    uid: int
    euid: int
    gid: int
    cmdline: list[str]
    exe: str


def proc_processes(guest: Guest, timeout: float = 90) -> dict[int, ProcessTruth]:
    """Every process of the guest at one pass over ``/proc``: its ``stat``, uids and gid from
    ``status``, ``cmdline`` and ``exe`` link."""
    out = {}
    for line in guest.run(PROCESSES, timeout=timeout).splitlines():
        if not line.startswith("P|"):
            continue
        _, stat, ids, cmd, exe = line.split("|", 4)
        (st,) = parse_stat(stat).values()
        nums = ids.split()
        uid, euid = int(nums[1]), int(nums[2])
        gid = int(nums[nums.index("Gid:") + 1])
        args = base64.b64decode(cmd).decode(errors="replace").split("\n")
        if args and args[-1] == "":
            args.pop()
        out[st.pid] = ProcessTruth(st.pid, st.name, st.state, st.ppid, st.start_ticks, uid, euid, gid, args, exe)
    return out


# --- /proc sampled while the host acts ----------------------------------------------------------------
MARK = "@@sample"


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
