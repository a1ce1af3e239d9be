"""Where guest bytes come from: live QEMU processes, shared RAM files, GDB stubs and dump files."""

from aradia.sources.base import PhysicalMemory, Range, Segment

__all__ = ["PhysicalMemory", "Range", "Segment"]
