"""Find or start the GDB stub of a QEMU and open guest memory through it.

QEMU started with ``-gdb``/``-s`` already listens: its address is read from the process's command
line (same host). A stub started at run time is the chardev labelled ``gdb`` in ``query-chardev``.
Otherwise a stub is started with HMP ``gdbserver`` on a free loopback port. A stub QEMU already runs
is never replaced: ``gdbserver`` would close it under its client (and QEMU refuses a second one).
"""

from __future__ import annotations

import contextlib
import os
import socket

from aradia.errors import NotAttached
from aradia.machine.qemu import Qemu
from aradia.proto.gdbrsp import GdbClient
from aradia.sources.base import Segment
from aradia.sources.gdbstub import GdbMemory


def _chardev_address(dev: str) -> str | None:
    """The address a ``tcp:HOST:PORT,…`` or ``unix:PATH,…`` character device listens on."""
    if dev.startswith("tcp:"):
        host, _, port = dev[4:].partition(",")[0].rpartition(":")
        return f"{host or '127.0.0.1'}:{port}"
    if dev.startswith("unix:"):
        return "unix:" + dev[5:].partition(",")[0]
    return None


def gdb_address_from_cmdline(args: list[str]) -> str | None:
    """The ``host:port`` a QEMU command line makes its GDB stub listen on, if any."""
    for i, a in enumerate(args):
        if a == "-s":
            return "127.0.0.1:1234"
        if a in ("-gdb", "--gdb") and i + 1 < len(args):
            addr = _chardev_address(args[i + 1])
            if addr:
                return addr
    return None


def _qemu_cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def gdb_address_from_chardevs(chardevs: list[dict[str, object]]) -> str | None:
    """The address of a stub started at run time, from QMP ``query-chardev`` (label ``gdb``)."""
    for dev in chardevs:
        if dev.get("label") == "gdb":
            return _chardev_address(str(dev.get("filename", "")).removeprefix("disconnected:"))
    return None


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gdb_address(qemu: Qemu, start: bool = True) -> str:
    """The GDB stub address of ``qemu``: from its command line, a stub started earlier, or a new one."""
    if qemu.pid and os.path.exists(f"/proc/{qemu.pid}"):
        addr = gdb_address_from_cmdline(_qemu_cmdline(qemu.pid))
        if addr:
            return addr
    addr = gdb_address_from_chardevs(qemu.qmp.execute("query-chardev"))
    if addr:
        return addr
    if not start:
        raise NotAttached("QEMU has no GDB stub")
    port = _free_port()
    out = qemu.qmp.hmp(f"gdbserver tcp:127.0.0.1:{port}")
    if "error" in out.lower() or "could not" in out.lower():
        raise NotAttached(f"QEMU could not start a GDB stub: {out.strip()}")
    return f"127.0.0.1:{port}"


def open_gdb_memory(qemu: Qemu, segments: list[Segment], address: str | None = None) -> GdbMemory:
    """Guest-physical memory through ``qemu``'s GDB stub (found, or started at run time)."""
    # QEMU >= 8.1 sends no stop reply on connect, so the client cannot tell by itself whether the
    # VM ran; QMP can.
    client = GdbClient(address or gdb_address(qemu), was_running=qemu.status() == "running")
    try:
        return GdbMemory(client, segments, own_client=True)
    except BaseException:
        client.close()
        raise
