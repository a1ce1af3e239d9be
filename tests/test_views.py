"""Linux views against the guest's own /proc, field by field, live and from a dump.

Each guest runs a stable workload: workers with chosen names and arguments, open files, a listening and
a connected TCP socket. Ground truth is what the guest's /proc says; aradia reads only guest memory.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from aradia.lab.launcher import Guest
from aradia.vm import VM, attach, open_dump
from cli_runner import DRGN
from guest_programs import build_unixpair, install_program
from guest_truth import proc_fds, proc_maps, proc_modules, proc_mounts, proc_processes, proc_tcp

WORKLOAD = r"""
cd /tmp
bash -c 'echo -n aradia-w1 > /proc/$$/comm; exec 5</etc/passwd 6>>/tmp/aradia-out.txt; while :; do sleep 1000; done' w1 alpha "two words" >/dev/null 2>&1 &
bash -c 'echo -n aradia-w2 > /proc/$$/comm; exec 3<>/dev/tcp/127.0.0.1/22; while :; do sleep 1000; done' w2 beta >/dev/null 2>&1 &
sleep 100000 | nc -l -p 7777 >/dev/null 2>&1 &
sleep 100000 | nc -l -p 7778 >/dev/null 2>&1 &
sleep 0.3
bash -c 'echo -n aradia-w3 > /proc/$$/comm; exec 4<>/dev/tcp/127.0.0.1/7777; while :; do sleep 1000; done' w3 >/dev/null 2>&1 &
sleep 1
"""


class Env:
    """A guest with the workload, its ground truth, a live VM handle and a dump of the same moment."""

    def __init__(self, guest: Guest, tmp: Path) -> None:
        self.guest = guest
        install_program(guest, "unixpair", build_unixpair(tmp, guest.image.guest_arch.gcc))
        guest.run("/tmp/unixpair /tmp/aradia.sock >/dev/null 2>&1 &")
        guest.run(WORKLOAD)
        self.workers = {name: int(guest.run(f"ps -o pid,comm | awk '$2==\"{name}\"{{print $1}}'").split()[0])
                        for name in ("aradia-w1", "aradia-w2", "aradia-w3")}
        self.nc = {int(p) for p in guest.run("pidof nc").split()}
        self.live = attach(f"qmp:{guest.qmp_path}")
        self.live.load_kernel()
        dump = tmp / "views.elf"
        self.live.dump(dump)  # an ELF core of the guest's architecture, the guest paused meanwhile
        self.dump_path = dump
        self._dump: VM | None = None
        self.truth = proc_processes(guest)  # the processes compared are stable

    @property
    def dump(self) -> VM:
        """The dump, opened (and its kernel found) on first use."""
        if self._dump is None:
            self._dump = open_dump(str(self.dump_path))
            self._dump.load_kernel()
        return self._dump

    def vm(self, which: str) -> VM:
        return self.live if which == "live" else self.dump

    def close(self) -> None:
        self.live.close()
        if self._dump is not None:
            self._dump.close()


@pytest.fixture(scope="module", params=[("5.10", None, "x86_64"), ("6.1", None, "x86_64"),
                                        ("6.12", None, "x86_64"), ("6.1", "max", "x86_64"),
                                        ("6.1", None, "arm64"), ("6.12", None, "arm64")],
                ids=["5.10", "6.1", "6.12", "6.1-la57", "6.1-arm64", "6.12-arm64"])
def env(request: pytest.FixtureRequest, launch_guest: Callable[..., Guest],
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    series, cpu, arch = request.param
    guest = launch_guest(series, cpu=cpu, smp=2, shared_memory=True, arch=arch, boot_timeout=180)
    e = Env(guest, tmp_path_factory.mktemp(f"views-{series}"))
    try:
        yield e
    finally:
        e.close()
        guest.stop()


WHICH = ["live", "dump"]


@pytest.mark.timeout(120)
def test_paging_mode(env: Env) -> None:
    la57 = "la57" in env.guest.run("grep -o la57 /proc/cpuinfo | head -1", check=False)
    for which in WHICH:
        assert env.vm(which).linux.profile.la57 == la57


@pytest.mark.timeout(120)
@pytest.mark.parametrize("which", WHICH)
def test_processes(env: Env, which: str) -> None:
    truth = env.truth
    procs = {p.pid: p for p in env.vm(which).linux.processes()}
    assert not env.vm(which).linux.warnings
    stable = [pid for pid, t in truth.items() if t.ppid in (0, 1, 2) or pid in env.workers.values()]
    assert len(stable) > 30
    for pid in stable:
        t, p = truth[pid], procs.get(pid)
        assert p is not None, f"pid {pid} ({t.comm}) missing"
        # A workqueue worker's /proc name carries its current work ("kworker/0:1+events"), which
        # may change between the two reads: compare the part before it when it differs.
        name, truth_name = p.name, t.comm
        if name != truth_name and name.startswith("kworker/"):
            name, truth_name = re.split("[+-]", name)[0], re.split("[+-]", truth_name)[0]
        assert (name, p.ppid, p.uid, p.euid, p.gid) == (truth_name, t.ppid, t.uid, t.euid, t.gid), pid
        assert t.comm.startswith(p.comm) and len(p.comm) <= 15
        assert abs(round(p.start_time * 100) - t.start_ticks) <= 1, (pid, p.start_time, t.start_ticks)
        assert p.cmdline == t.cmdline, pid
        assert (p.exe or "") == t.exe, pid
    for name, pid in env.workers.items():
        p = procs[pid]
        assert p.comm == name and p.state == "S" and truth[pid].state == "S"
        assert p.cmdline[:3] == ["bash", "-c", p.cmdline[2]] and p.cmdline[3] == name.replace("aradia-", "")
    assert procs[env.workers["aradia-w1"]].cmdline[-2:] == ["alpha", "two words"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("which", WHICH)
def test_modules(env: Env, which: str) -> None:
    truth = {name: (size, base) for name, size, base in proc_modules(env.guest)}
    mods = {m.name: (m.size, m.base) for m in env.vm(which).linux.modules()}
    assert truth and mods == truth


@pytest.mark.timeout(120)
@pytest.mark.parametrize("which", WHICH)
def test_maps(env: Env, which: str) -> None:
    for pid in (env.workers["aradia-w1"], 1):
        got = [(m.start, m.end, m.perms, m.offset, m.inode, m.path) for m in env.vm(which).linux.maps(pid)]
        assert got == proc_maps(env.guest, pid)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("which", WHICH)
def test_files(env: Env, which: str) -> None:
    for pid in (*env.workers.values(), *env.nc):
        got = {f.fd: (f.path, f.flags) for f in env.vm(which).linux.files(pid)}
        assert got == proc_fds(env.guest, pid), pid
        assert env.vm(which).linux.warnings == [], (pid, env.vm(which).linux.warnings)
    w1 = {f.fd: f.path for f in env.vm(which).linux.files(env.workers["aradia-w1"])}
    assert w1[5] == "/etc/passwd" and w1[6] == "/tmp/aradia-out.txt"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("which", WHICH)
def test_sockets(env: Env, which: str) -> None:
    truth = proc_tcp(env.guest)
    socks = env.vm(which).linux.sockets()
    assert env.vm(which).linux.warnings == []  # nc waiting in accept() holds a reserved, unopened fd
    got = {(s.local_address, s.local_port, s.remote_address, s.remote_port, s.state, s.inode)
           for s in socks if s.proto == "tcp" and s.state in ("ESTABLISHED", "LISTEN")}
    # /proc/net also lists sockets no process holds (e.g. the accepted side before accept); every
    # socket a process holds must be there, and the workload's ones must be found.
    assert got <= truth and got
    by_pid = {(s.pid, s.state, s.local_port, s.remote_port) for s in socks}
    assert any(p in env.nc and st == "LISTEN" and lp == 7778 for p, st, lp, _ in by_pid)
    assert any(p in env.nc and st == "ESTABLISHED" and lp == 7777 for p, st, lp, _ in by_pid)
    assert any(p == env.workers["aradia-w3"] and st == "ESTABLISHED" and rp == 7777 for p, st, _, rp in by_pid)
    assert any(p == env.workers["aradia-w2"] and st == "ESTABLISHED" and rp == 22 for p, st, _, rp in by_pid)
    holders = env.guest.run("ls -l /proc/[0-9]*/fd/ 2>/dev/null | grep -c 'socket:'", check=False)
    assert len(socks) == int(holders.strip() or 0)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("which", WHICH)
def test_unix_sockets(env: Env, which: str) -> None:
    truth = {}
    for line in env.guest.run("cat /proc/net/unix").splitlines()[1:]:
        f = line.split()
        listening = int(f[3], 16) & 0x10000 != 0  # __SO_ACCEPTCON
        truth[int(f[6])] = (f[7] if len(f) > 7 else "", listening, f[5] == "03")
    ours = [s for s in env.vm(which).linux.sockets() if s.family == "unix"]
    pair = [s for s in ours if s.inode in truth and truth[s.inode][0] == "/tmp/aradia.sock"]
    assert any(s.state == "LISTEN" for s in pair), ours
    for s in ours:
        path, listening, connected = truth[s.inode]
        assert s.local_address == path, s
        assert (s.state == "LISTEN") == listening and (s.state == "CONNECTED") == connected, s
    assert sum(1 for s in ours if s.state == "CONNECTED") >= 2  # both ends of the accepted pair


@pytest.mark.timeout(120)
@pytest.mark.parametrize("which", WHICH)
def test_mounts(env: Env, which: str) -> None:
    got = [(m.source, m.target, m.fstype, "ro" if m.readonly else "rw") for m in env.vm(which).linux.mounts()]
    assert got == proc_mounts(env.guest)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("which", WHICH)
def test_dmesg(env: Env, which: str) -> None:
    # A record of several lines prints its first line after the timestamp and the rest bare.
    truth = [line.split("] ", 1)[1] if line.startswith("[") else line
             for line in env.guest.run("dmesg").splitlines()]
    got = [line for r in env.vm(which).linux.dmesg() for line in r.text.split("\n")]
    # The log only grows: the dump and the first records agree; messages may arrive between the reads.
    n = min(len(truth), len(got))
    assert n > 100 and got[:n] == truth[:n]
    # x86 logs the banner first; arm64 logs "Booting Linux on physical CPU ..." before it
    assert got[0 if env.guest.image.guest_arch.name == "x86_64" else 1].startswith("Linux version ")


@pytest.mark.timeout(180)
def test_drgn_lists_the_dumps_tasks(env: Env) -> None:
    """``drgn -c`` on aradia's dump, with no debug info: aradia's drgn plugin gives it the dump's own
    kallsyms and BTF, and it lists every process aradia lists, with the guest's names."""
    code = ("for t in for_each_task(prog):\n"
            "    if t.pid == t.tgid: print(int(t.pid), t.comm.string_().decode())")
    r = subprocess.run([DRGN, "-q", "-c", str(env.dump_path), "--no-default-symbols", "-e", code],
                       capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, r.stderr
    listed = {int(pid): comm for pid, comm in (line.split(" ", 1) for line in r.stdout.splitlines())}
    assert listed == {p.pid: p.comm for p in env.dump.linux.processes()}
    stable = [pid for pid, t in env.truth.items() if t.ppid in (0, 1, 2) or pid in env.workers.values()]
    assert len(stable) > 30 and all(env.truth[pid].comm.startswith(listed[pid]) for pid in stable)
    off = subprocess.run([DRGN, "-q", "-c", str(env.dump_path), "--no-default-symbols", "-e", code],
                         capture_output=True, text=True, timeout=150, env={**os.environ, "ARADIA_DRGN_PLUGIN": "0"})
    assert off.returncode != 0 and not off.stdout  # drgn alone has no types for this kernel


@pytest.mark.timeout(120)
def test_read_user_memory(env: Env) -> None:
    pid = env.workers["aradia-w1"]
    for which in WHICH:
        k = env.vm(which).linux
        m = next(m for m in k.maps(pid) if m.path == "[stack]")
        env_area = k.read_user(pid, m.end - 4096, 4096)
        assert b"PATH=" in env_area or b"HOME=" in env_area or b"w1" in env_area
        exe = next(m for m in k.maps(pid) if m.offset == 0 and m.path.endswith("bash"))
        assert k.read_user(pid, exe.start, 4) == b"\x7fELF"

