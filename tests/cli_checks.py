"""The ``aradia`` views' text output checked against what the guest's own /proc says.

Each ``check_*`` takes the command's stdout and compares every row with ground truth read inside the
guest (over its console), so a missing, extra or wrong row fails. Used by the README tests and by the
``--pause`` tests.
"""

from __future__ import annotations

import ipaddress
import re
from typing import TYPE_CHECKING

from cli_runner import table
from guest_truth import Samples, proc_fds_pos, proc_maps, proc_modules, proc_mounts, socket_fds, worker_id

if TYPE_CHECKING:
    from aradia.lab.launcher import Guest


# --- ps ------------------------------------------------------------------------------------------------
def check_ps(out: str, truth: Samples, details: dict[int, tuple[int, list[str]]], *,
             volatile: frozenset[int] = frozenset()) -> dict[int, dict[str, str]]:
    """``aradia ps`` rows against /proc sampled around it (:func:`guest_truth.sample_stat`): every
    process /proc showed throughout is there with its ppid, uid, start time, name (as /proc/PID/stat
    shows it) and cmdline; no process /proc never showed, but for the sampler's own short-lived
    children. ``volatile`` pids change name and cmdline all the time (only their presence counts)."""
    rows = {int(r["PID"]): r for r in table(out)}
    assert len(rows) == len(table(out)), "a pid twice"
    missing = truth.stable - rows.keys()
    assert not missing, f"processes /proc showed throughout are missing: {missing}"
    for pid, r in rows.items():
        if pid not in truth.seen:  # the sampler's children (`sleep`, `cat`) live between two samples
            assert int(r["PPID"]) == truth.sampler, r
            continue
        st = truth.last(pid)
        assert int(r["PPID"]) == st.ppid, (r, st)
        assert abs(round(float(r["START"]) * 100) - st.start_ticks) <= 1, (r, st)
        if pid in volatile:
            continue
        names = truth.names(pid)
        if worker_id(r["COMM"]):  # its work changes all the time (tests/test_kthread_names.py checks it)
            assert {worker_id(r["COMM"])} == {worker_id(n) for n in names}, (r, names)
        else:
            assert {r["COMM"]} == names, (r, names)
        if pid in details and pid in truth.stable:
            uid, argv = details[pid]
            assert int(r["UID"]) == uid, (r, uid)
            assert r["CMDLINE"] == (" ".join(argv) if argv else f"[{r['COMM']}]"), (r, argv)
    return rows


# --- lsmod, maps, files, mounts ----------------------------------------------------------------------
def check_lsmod(out: str, guest: Guest) -> None:
    truth = [(name, str(size), base) for name, size, base in proc_modules(guest)]
    got = [(r["MODULE"], r["SIZE"], int(r["BASE"], 16)) for r in table(out)]
    assert truth and got == truth


def check_maps(out: str, guest: Guest, pid: int) -> None:
    got = []
    for line in out.splitlines():
        f = line.split(None, 4)
        lo, hi = (int(x, 16) for x in f[0].split("-"))
        got.append((lo, hi, f[1], int(f[2], 16), int(f[3]), f[4].strip() if len(f) > 4 else ""))
    truth = proc_maps(guest, pid)
    assert any(m[5] == "[heap]" for m in truth) and any(m[5] == "[vdso]" for m in truth)
    assert got == truth


def check_files(out: str, guest: Guest, pid: int) -> dict[int, tuple[str, int, int]]:
    truth = proc_fds_pos(guest, pid)
    got = {int(r["FD"]): (r["PATH"], int(r["FLAGS"], 8), int(r["POS"])) for r in table(out)}
    assert got == truth
    return got


def check_mounts(out: str, guest: Guest) -> None:
    truth = proc_mounts(guest)
    got = [(r["SOURCE"], r["TARGET"], r["TYPE"], r["MODE"]) for r in table(out)]
    assert got == truth


# --- net ---------------------------------------------------------------------------------------------
def fmt_addr(address: str, port: int) -> str:
    """An address as the ``net`` table prints it (``[::1]:22``, ``127.0.0.1:7``)."""
    a = str(ipaddress.ip_address(address))
    return f"[{a}]:{port}" if ":" in a else f"{a}:{port}"


def check_net(out: str, guest: Guest, listener: tuple[int, list[str]]) -> None:
    """Every socket a process holds (pid and fd from the guest's /proc/PID/fd) is a row, and no other;
    the listener program's sockets (IPv6 on ::1 and ::, IPv4, UDP on ::1) with their addresses."""
    rows = table(out)
    got = {(int(r["PID"]), int(r["FD"])) for r in rows}
    assert len(got) == len(rows), "a (pid, fd) twice"
    assert got == socket_fds(guest)
    pid, socks = listener
    for line in socks:  # "sock FD FAMILY PROTO ADDRESS PORT", as the guest program saw it
        _, fd, family, proto, address, port = line.split()
        want = {"FAMILY": family, "PROTO": proto, "LOCAL": fmt_addr(address, int(port)),
                "REMOTE": fmt_addr("::" if family == "inet6" else "0.0.0.0", 0),
                "STATE": "LISTEN" if proto == "tcp" else "UNCONNECTED", "PID": str(pid), "FD": fd}
        assert want in rows, (want, [r for r in rows if r["PID"] == str(pid)])


# --- dmesg -------------------------------------------------------------------------------------------
def check_dmesg(out: str, guest: Guest) -> None:
    """Line for line what the guest's ``dmesg`` prints (timestamps included); the log only grows, so
    the shorter of the two is a prefix of the other."""
    got, truth = out.splitlines(), guest.run("dmesg", timeout=60).splitlines()
    n = min(len(got), len(truth))
    assert n > 100 and got[:n] == truth[:n]
    assert re.match(r"^\[    0\.000000\] Linux version ", got[0]), got[0]
