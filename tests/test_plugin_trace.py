"""``aradia trace syscalls`` served inside QEMU by the plugin, against the stop path and the guest's truth.

Which path a QEMU can serve is taken from the QEMU this run boots (``$ARADIA_QEMU`` or the installed
one) and the header its plugin was built against: on QEMU >= 9.2 (register and memory reads) the
trace must take the plugin path by itself and report what the stop path reports for the same script;
on QEMU 7.2 it must fall back to the stop path and say why. The script is test_trace's: 50 known
commands with known argv, files opened by known programs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from aradia.errors import AradiaError, GuestDataCorrupt
from aradia.lab.images import GuestImage
from aradia.lab.launcher import Guest, launch
from aradia.lab.plugin_build import build_plugin, installed_qemu
from aradia.trace.pluginload import PluginError, plugin_capabilities
from aradia.trace.pluginshm import EVENT_SIZE, PluginShm
from aradia.trace.plugintrace import PluginSyscallTrace, parse_record
from aradia.trace.syscalls import decode
from aradia.vm import attach
from cli_runner import assert_one_line_error, cli_argv, run_cli
from guest_programs import EDGE_PATH, build_sysargs, install_program
from test_trace import N_EXEC, WORK

EVENT_ENTRIES = 512  # per vCPU; the burst below is larger than both rings together
BURST = 3000


@pytest.fixture(scope="module")
def plugin_guest(guest_image: Callable[[str], GuestImage], tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[Guest]:
    so = build_plugin()
    with PluginShm(max_vcpus=4, event_entries=EVENT_ENTRIES) as shm:
        guest = launch(guest_image("6.1"), smp=2, plugins=[shm.plugin_arg(so)], gdb=True, shared_memory=True)
        try:
            install_program(guest, "sysargs", build_sysargs(tmp_path_factory.mktemp("sysargs")))
            guest.run(f"cat > /tmp/work.sh <<'EOF'\n{WORK}\nEOF")
            yield guest
        finally:
            guest.stop()


def _plugin_serves() -> tuple[bool, str]:
    """Whether the QEMU under test can serve syscall events in the plugin, and its version."""
    return plugin_capabilities(build_plugin()).syscall_args, installed_qemu().version


def _start(guest: Guest, *args: str) -> tuple[subprocess.Popen[str], str]:
    """Start ``aradia trace syscalls`` on the guest; returns it and its stderr up to the "tracing" line."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cli_argv("trace", "--vm", f"qmp:{guest.qmp_path}", "--json", "--duration", "400",
                                     "syscalls", *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stderr is not None
    said = ""
    while not said.splitlines()[-1:] or not said.splitlines()[-1].startswith("tracing"):
        line = proc.stderr.readline()
        if not line:
            proc.kill()
            pytest.fail(f"the trace ended before it began: {said}", pytrace=False)
        said += line
    return proc, said


def _finish(proc: subprocess.Popen[str], said: str) -> tuple[list[dict[str, Any]], str]:
    """Ctrl-C the trace; its events and all it said on stderr."""
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, said + err
    return [json.loads(line) for line in out.splitlines() if line.strip()], said + err


def _traced_work(guest: Guest, path: str) -> tuple[list[dict[str, Any]], str]:
    proc, said = _start(guest, "-e", "execve,openat", "--path", path)
    marker = len(guest.console_text())
    guest.send_console(b"bash /tmp/work.sh\n")
    end = time.monotonic() + 300
    while "WORK-DONE" not in guest.console_text()[marker:] and time.monotonic() < end:
        time.sleep(0.2)
    assert "WORK-DONE" in guest.console_text()[marker:], "the script did not finish while traced"
    return _finish(proc, said)


def _known(events: list[dict[str, Any]]) -> tuple[list[Any], list[Any], int]:
    """The script's 50 commands (path, argv), its opens of /tmp/aradia-f* (comm, path, dfd, flags), and
    how many distinct pids ran the commands."""
    execs = [e for e in events if e["name"] == "execve" and any("aradia-t" in a for a in e["args"]["argv"] or [])]
    opens = [(e["comm"], e["args"]["path"], e["args"]["dfd"], e["args"]["flags"]) for e in events
             if e["name"] == "openat" and (e["args"]["path"] or "").startswith("/tmp/aradia-f")]
    return [(e["args"]["path"], e["args"]["argv"]) for e in execs], opens, len({e["pid"] for e in execs})


@pytest.mark.guest
@pytest.mark.timeout(900)
def test_same_events_as_the_stop_path(plugin_guest: Guest) -> None:
    """The 50 known commands with argv, and the known opens, on both paths; the path named on stderr."""
    serves, version = _plugin_serves()
    expected = [("/bin/true", ["/bin/true", f"aradia-t{i}", f"arg-{i * 7}"]) for i in range(N_EXEC)]
    stop_events, stop_said = _traced_work(plugin_guest, "gdb")
    assert "via gdb (every event stops the VM)" in stop_said, stop_said
    stop_execs, stop_opens, stop_pids = _known(stop_events)
    assert stop_execs == expected and stop_pids == N_EXEC
    assert [(c, p) for c, p, _d, _f in stop_opens if c == "cat"] == [("cat", f"/tmp/aradia-f{i}") for i in range(1, 6)]
    auto_events, auto_said = _traced_work(plugin_guest, "auto")
    if not serves:
        assert "via gdb" in auto_said and "cannot read registers and guest memory" in auto_said, auto_said
        assert _known(auto_events) == (stop_execs, stop_opens, stop_pids)
        r = run_cli("trace", "--vm", f"qmp:{plugin_guest.qmp_path}", "--duration", "1", "syscalls",
                    "-e", "openat", "--path", "plugin")
        assert_one_line_error(r, "--path plugin", f"(version {plugin_capabilities(build_plugin()).api_version})")
        return
    assert "via plugin (inside QEMU, the VM does not stop)" in auto_said, (version, auto_said)
    assert re.search(r"plugin path: \d+ events reported, 0 lost to ring overflow", auto_said), auto_said
    assert _known(auto_events) == (stop_execs, stop_opens, stop_pids)
    # the same records, field by field, for every event of the script's commands (times and pids differ)
    def shape(evs: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return [(e["kind"], e["name"], e["comm"], e["uid"], json.dumps(e["args"], sort_keys=True)) for e in evs
                if e["name"] == "execve" and "aradia-t" in json.dumps(e["args"])]
    assert shape(auto_events) == shape(stop_events) and len(shape(auto_events)) == N_EXEC


@pytest.mark.guest
@pytest.mark.timeout(600)
def test_burst_larger_than_the_ring_loss_is_exact_and_shown(plugin_guest: Guest) -> None:
    """A burst of 3001 openat calls while the reader is stopped: reported + lost = 3001 exactly, and
    stderr says how many were lost."""
    serves, version = _plugin_serves()
    if not serves:
        pytest.skip(f"QEMU {version}: no plugin path (its plugin API reads no registers or memory)")
    proc, said = _start(plugin_guest, "-e", "openat", "--comm", "sysargs", "--path", "plugin")
    assert "via plugin" in said, said
    os.kill(proc.pid, signal.SIGSTOP)  # the reader sleeps: the rings must overflow
    try:
        out = plugin_guest.run(f"/tmp/sysargs open {BURST}", timeout=120)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    m = re.search(r"calls (\d+) ok (\d+)", out)
    assert m is not None and (int(m.group(1)), int(m.group(2))) == (BURST, BURST + 1), out
    time.sleep(1.0)
    events, said = _finish(proc, said)
    final = re.search(r"plugin path: (\d+) events reported, (\d+) lost to ring overflow", said)
    assert final is not None, said
    reported, lost = int(final.group(1)), int(final.group(2))
    warned = sum(int(n) for n in re.findall(r"warning: (\d+) events lost", said))
    assert reported == len(events) and reported + lost == BURST + 1, (reported, lost, said)
    assert warned == lost and lost >= BURST + 1 - 2 * (EVENT_ENTRIES - 1), (warned, lost)
    paths = [f"/nonexistent/aradia-{i:06d}" for i in range(BURST)] + [EDGE_PATH.rstrip(b"\0").decode()]
    got = [e["args"]["path"] for e in events]
    assert all(e["comm"] == "sysargs" and e["name"] == "openat" for e in events)
    assert len(set(got)) == len(got) and set(got) <= set(paths) and paths[-1] in got


# --- records and the filter, without a guest ----------------------------------------------------------------
def _record(args: tuple[int, ...], regions: list[tuple[int, bytes]], status: int = 3, comm: bytes = b"sh") -> bytes:
    data = b"".join(struct.pack("<QH", a, len(b)) + b for a, b in regions)
    head = struct.pack("<QQIIiiII16s6Q", 5_000_000_000, 7, 2, status, 41, 40, 1000, len(data), comm, *args)
    return (head + data).ljust(EVENT_SIZE, b"\0")


@pytest.mark.timeout(30)
def test_record_decodes_like_guest_memory() -> None:
    """A record's regions serve the stop path's decoder: execve's path and argv come out whole, a read
    outside the regions is unreadable (as an unmapped page), a region running past the data is corrupt."""
    argv = struct.pack("<3Q", 0x7000, 0x7010, 0)
    rec = _record((0x6000, 0x5000, 0, 0, 0, 0),
                  [(0x6000, b"/bin/ls\0"), (0x5000, argv), (0x7000, b"ls\0"), (0x7010, b"-l\0")])
    fields, memory = parse_record(rec)
    assert (fields["pid"], fields["tgid"], fields["uid"], fields["comm"], fields["target"]) == (41, 40, 1000, "sh", 2)
    assert decode("execve", list(fields["args"]), memory.read) == {"path": "/bin/ls", "argv": ["ls", "-l"]}
    assert memory.read(0x6005, 100) == b"ls\0"  # what the region holds from there, not 100 bytes
    with pytest.raises(GuestDataCorrupt, match="0x6008 was not captured"):
        memory.read(0x6008, 1)
    bad = bytearray(_record((0,) * 6, [(0x6000, b"abc\0")]))
    struct.pack_into("<H", bad, 104 + 8, 900)  # the region claims more bytes than the record's data
    with pytest.raises(GuestDataCorrupt, match="runs past"):
        parse_record(bytes(bad))


@pytest.mark.timeout(30)
def test_filter_bounds() -> None:
    """The plugin's filter holds 8 of each and comms of at most 15 bytes; more is a clear error."""
    with PluginShm(max_vcpus=1, event_entries=4) as shm:
        shm.set_event_filter(list(range(8)), [0], ["a" * 15])  # at the bounds: accepted
        with pytest.raises(PluginError, match="9 pids in the plugin's event filter: at most 8"):
            shm.set_event_filter(list(range(9)))
        with pytest.raises(PluginError, match="a comm is at most 15 bytes"):
            shm.set_event_filter(comms=["a" * 16])
        with pytest.raises(PluginError, match="a syscall event needs its argument capture"):
            shm.set_target(0, 0x1000, event=True)
    r = run_cli("trace", "--vm", "qmp:/nonexistent/qmp.sock", "--path", "plugin", "procs")
    assert_one_line_error(r, "--path applies to trace count and trace syscalls only")


@pytest.mark.guest
@pytest.mark.timeout(300)
def test_reboot_ends_a_plugin_trace(guest_image: Callable[[str], GuestImage]) -> None:
    """A reset under a plugin trace (the plugin's targets now stale: KASLR) ends it with the stop
    path's clear error; before it, the trace reports the guest's opens."""
    serves, version = _plugin_serves()
    if not serves:
        pytest.skip(f"QEMU {version}: no plugin path (its plugin API reads no registers or memory)")
    with PluginShm(max_vcpus=2) as shm:
        guest = launch(guest_image("6.1"), smp=1, plugins=[shm.plugin_arg(build_plugin())],
                       extra_args=["-action", "reboot=reset"])
        try:
            with attach(f"qmp:{guest.qmp_path}") as vm, PluginSyscallTrace.open(vm, ["openat"]) as trace:
                guest.run("cat /etc/hostname")
                seen: list[Any] = []
                for ev in trace.events(duration=2):
                    seen.append((ev.comm, ev.args["path"]))
                assert ("cat", "/etc/hostname") in seen, seen
                guest.send_console(b"echo b > /proc/sysrq-trigger\n")
                started = time.monotonic()
                with pytest.raises(AradiaError, match=r"reset \(rebooted\) while tracing"):
                    for _ in trace.events(duration=60):
                        pass
                assert time.monotonic() - started < 15
        finally:
            guest.stop()
