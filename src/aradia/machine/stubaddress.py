"""Where a QEMU's GDB stub listens: parsed from its command line or from QMP ``query-chardev``.

QEMU started with ``-gdb``/``-s`` already listens: its address is read from the process's command
line (same host). A stub started at run time is the chardev labelled ``gdb`` in ``query-chardev``.
:meth:`aradia.machine.qemu.Qemu.gdb_address` asks these in that order and otherwise starts a stub.
"""

from __future__ import annotations

import contextlib
import socket


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


def gdb_address_from_chardevs(chardevs: list[dict[str, object]]) -> str | None:
    """The address of a stub started at run time, from QMP ``query-chardev`` (label ``gdb``)."""
    for dev in chardevs:
        if dev.get("label") == "gdb":
            return _chardev_address(str(dev.get("filename", "")).removeprefix("disconnected:"))
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (another process may still take it first)."""
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
