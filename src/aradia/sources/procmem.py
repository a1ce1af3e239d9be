"""Guest RAM read straight out of the QEMU process through ``/proc/<pid>/mem``.

Needs ptrace rights over QEMU (same user with ptrace_scope 0/1 as a parent, or root/CAP_SYS_PTRACE).
Each segment's ``backing`` is the host virtual address of its first byte (from HMP ``gpa2hva``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from aradia.errors import AradiaError, NotAttached
from aradia.sources.base import PhysicalMemory, Segment


class ProcMemory(PhysicalMemory):
    """Reads and writes guest RAM with ``pread``/``pwrite`` on ``/proc/<pid>/mem``."""

    kind = "proc-mem"
    writable = True

    def __init__(self, pid: int, segments: Iterable[Segment]) -> None:
        super().__init__(segments)
        self.pid = pid
        try:
            self._fd = os.open(f"/proc/{pid}/mem", os.O_RDWR)
        except PermissionError as e:
            raise NotAttached(f"no ptrace rights over QEMU pid {pid} to read /proc/{pid}/mem ({e})") from e
        except FileNotFoundError as e:
            raise NotAttached(f"QEMU pid {pid} is gone") from e

    def _read_backing(self, seg: Segment, offset: int, size: int) -> bytes:
        try:
            data = os.pread(self._fd, size, seg.backing + offset)
        except OSError as e:
            raise self._gone(e) from e
        if len(data) != size:
            raise self._gone(OSError(f"short read ({len(data)} of {size} bytes)"))
        return data

    def _write_backing(self, seg: Segment, offset: int, data: bytes) -> None:
        try:
            n = os.pwrite(self._fd, data, seg.backing + offset)
        except OSError as e:
            raise self._gone(e) from e
        if n != len(data):
            raise self._gone(OSError(f"short write ({n} of {len(data)} bytes)"))

    def _gone(self, e: OSError) -> AradiaError:
        if not os.path.exists(f"/proc/{self.pid}"):
            return NotAttached(f"QEMU pid {self.pid} exited")
        return NotAttached(f"reading QEMU pid {self.pid} memory failed: {e}")

    def close(self) -> None:
        """Close the ``/proc/<pid>/mem`` descriptor."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
