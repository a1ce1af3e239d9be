"""Guest RAM held in bytearrays: a writable :class:`PhysicalMemory` for tests that need no QEMU."""

from __future__ import annotations

from aradia.sources.base import PhysicalMemory, Segment


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
