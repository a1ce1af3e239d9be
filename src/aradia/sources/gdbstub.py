"""Guest-physical memory through QEMU's GDB stub (``Qqemu.PhyMemMode:1``).

The slowest source (tens of MB/s) but it needs nothing from the host besides the stub, it works on
a running VM and its writes invalidate code TCG already translated. On a running VM each call stops
the VM, reads and continues it; on a paused VM (QMP ``stop``, a breakpoint) it only reads.

The stub does not report physical addresses that are not RAM (it reads zeros), so the RAM map is
needed: the caller passes it (it knows it from QMP) or it is probed with HMP ``info memdev`` and
``info mtree -f`` run through the stub's ``qRcmd``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from aradia.proto.gdbrsp import GdbClient
from aradia.proto.gdbstub_api import GdbStub
from aradia.proto.mtree import ram_ranges
from aradia.sources.base import PhysicalMemory, Segment

_MEMDEV = re.compile(r"^\s*memory backend:\s*(\S+)", re.M)


def probe_ram_segments(client: GdbStub) -> list[Segment]:
    """Ask QEMU (HMP through the stub, held directly or by a guardian) for the guest-physical RAM map."""
    memdevs = set(_MEMDEV.findall(client.monitor("info memdev")))
    return [Segment(r.start, r.size, r.start) for r in ram_ranges(client.monitor("info mtree -f"), memdevs)]


class GdbMemory(PhysicalMemory):
    """Guest-physical memory read and written through a :class:`GdbClient`.

    Each segment's ``backing`` is its guest-physical address. If connecting the client paused a
    running VM, the VM is continued here; afterwards every call leaves the VM as it found it: a
    running VM is stopped for the call (~0.1-0.2 ms plus the read) and continued, a paused one
    (QMP ``stop``, a breakpoint) stays paused. Each such stop/continue is also a QMP STOP/RESUME
    event. The RAM map is a snapshot: a guest remapping memory later (PAM, hotplug) needs a new one.
    """

    kind = "gdb"
    writable = True

    def __init__(self, client: GdbClient, segments: Iterable[Segment] | None = None, *,
                 own_client: bool = False) -> None:
        super().__init__(probe_ram_segments(client) if segments is None else segments)
        self.client = client
        self._own = own_client
        client.restore_run_state()

    @classmethod
    def connect(cls, address: str | tuple[str, int], segments: Iterable[Segment] | None = None,
                **client_options: Any) -> GdbMemory:
        """Connect to a stub and wrap it; :meth:`close` then closes the connection too.

        On QEMU 8.1 and later pass ``was_running`` (from QMP) so that the VM the connection paused
        is continued: those versions do not say whether it ran.
        """
        client = GdbClient(address, **client_options)
        try:
            return cls(client, segments, own_client=True)
        except BaseException:
            client.close()
            raise

    def read(self, paddr: int, size: int) -> bytes:
        """Read guest-physical bytes; the VM is stopped at most once for the whole read."""
        if size <= 0 or not self.is_ram(paddr, size):
            return super().read(paddr, size)  # NotRAM (or b"") without stopping the VM
        with self.client.halted():
            return super().read(paddr, size)

    def write(self, paddr: int, data: bytes) -> None:
        """Write guest-physical bytes; the VM is stopped at most once for the whole write."""
        if not data or not self.is_ram(paddr, len(data)):
            super().write(paddr, data)
            return
        with self.client.halted():
            super().write(paddr, data)

    def _read_backing(self, seg: Segment, offset: int, size: int) -> bytes:
        return self.client.read_memory(seg.backing + offset, size, physical=True)

    def _write_backing(self, seg: Segment, offset: int, data: bytes) -> None:
        self.client.write_memory(seg.backing + offset, data, physical=True)

    def close(self) -> None:
        """Close the client if this source opened it."""
        if self._own:
            self.client.close()
