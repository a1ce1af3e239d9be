"""Network captures taken by QEMU itself: a ``filter-dump`` object on one of the VM's netdevs writes
every frame the guest sends or receives to a pcap file (QMP ``object-add``; ``object-del`` ends it).

Nothing runs in the guest and the guest cannot see it. The file is written by the QEMU process, so its
directory must be writable by QEMU's user. Capture objects aradia starts are named ``aradia-cap-*``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from aradia.errors import AradiaError
from aradia.machine.qemu import Qemu
from aradia.proto.qmp import QMPCommandError

PREFIX = "aradia-cap-"
MAX_FRAME = 65535  # bytes kept of each frame (filter-dump's maxlen; an Ethernet frame fits whole)
# ``info network`` lists a NIC's backend as a line " \ NAME: index=N,type=user,..."
_NETDEV = re.compile(r"^\s*\\\s+([^:\s]+):\s+index=\d+,type=(\w+)", re.M)


@dataclass(frozen=True)
class Capture:
    """A running capture: the QEMU object's id, the netdev it watches and the pcap file."""

    id: str
    netdev: str
    file: str


def netdevs(qemu: Qemu) -> list[tuple[str, str]]:
    """(id, type) of each netdev the VM's NICs use (QEMU's ``info network``)."""
    return _NETDEV.findall(qemu.qmp.hmp("info network"))


def _choose_netdev(qemu: Qemu, netdev: str | None) -> str:
    known = netdevs(qemu)
    names = [n for n, _ in known]
    if netdev is not None:
        if netdev not in names:
            raise AradiaError(f"the VM has no netdev {netdev!r} (it has: {', '.join(names) or 'none'})")
        return netdev
    if len(names) != 1:
        listed = ", ".join(names)
        raise AradiaError(f"the VM has {len(names)} netdevs; name one with --netdev ({listed})" if names
                          else "the VM has no network device")
    return names[0]


def captures(qemu: Qemu) -> list[str]:
    """Ids of the capture objects aradia started in this QEMU (still running)."""
    return sorted(o["name"] for o in qemu.qmp.execute("qom-list", {"path": "/objects"}) or []
                  if str(o.get("name", "")).startswith(PREFIX))


def start_capture(qemu: Qemu, file: str | Path, *, netdev: str | None = None) -> Capture:
    """Start capturing ``netdev`` (default: the VM's only one) into the pcap ``file`` (created or
    truncated by QEMU); returns the capture, to be ended with :func:`stop_capture`."""
    path = Path(file).absolute()
    if not path.parent.is_dir():
        raise AradiaError(f"{path.parent} is not a directory")
    name = _choose_netdev(qemu, netdev)
    taken = set(captures(qemu))
    ident = next(f"{PREFIX}{i}" for i in range(len(taken) + 1) if f"{PREFIX}{i}" not in taken)
    try:
        qemu.qmp.execute("object-add", {"qom-type": "filter-dump", "id": ident, "netdev": name,
                                        "file": str(path), "maxlen": MAX_FRAME})
    except QMPCommandError as e:
        raise AradiaError(f"QEMU refused the capture on {name}: {e}") from e
    return Capture(ident, name, str(path))


def stop_capture(qemu: Qemu, ident: str | None = None) -> list[str]:
    """End capture ``ident`` (default: every capture aradia started in this QEMU); QEMU closes the
    file. Returns the ids ended."""
    running = captures(qemu)
    if ident is not None and ident not in running:
        raise AradiaError(f"no capture {ident!r} in this QEMU (running: {', '.join(running) or 'none'})")
    ended = [ident] if ident is not None else running
    for i in ended:
        qemu.qmp.execute("object-del", {"id": i})
    return ended


__all__ = ["Capture", "captures", "netdevs", "start_capture", "stop_capture"]
