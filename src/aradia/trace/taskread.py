"""The task fields every stop-path event carries (pid, tgid, comm, uid), read in two guest reads.

Reading them through drgn objects costs one guest read per field (``task.pid``, ``task.tgid``,
``task.comm``, ``task.real_cred``, ``cred->uid``), each a page-table walk in Python: most of a
breakpoint hit's handling in the tracer. :class:`TaskIdentity` takes the field offsets from the
kernel's BTF once and reads the span of ``struct task_struct`` that holds pid, tgid, comm and the
``real_cred`` pointer in one read, then the uid behind that pointer in a second.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import drgn

#: A reader of guest-virtual memory in the kernel's address space: (address, size) -> bytes.
Read = Callable[[int, int], bytes]

#: Largest span of ``struct task_struct`` read at once (pid to comm is ~0x1c0 bytes on 6.1).
MAX_SPAN = 4096


@dataclass(frozen=True)
class TaskIdentity:
    """Offsets in ``struct task_struct`` (and ``struct cred``) of an event's task fields."""

    start: int  # first byte of the span read from the task
    size: int  # bytes of the span
    pid: int  # offsets from ``start``
    tgid: int
    comm: int
    comm_size: int
    real_cred: int
    uid: int  # offset of ``uid.val`` in ``struct cred``

    @classmethod
    def of(cls, prog: drgn.Program) -> TaskIdentity | None:
        """The layout of the running kernel (types from BTF); None if a field is missing or the span
        is unusually wide (the caller then reads field by field)."""
        try:
            task, cred = prog.type("struct task_struct"), prog.type("struct cred")
            offs = {name: drgn.offsetof(task, name) for name in ("pid", "tgid", "comm", "real_cred")}
            comm_size = drgn.sizeof(task.member("comm").type)
            uid = drgn.offsetof(cred, "uid")
        except (LookupError, ValueError, TypeError):
            return None
        start = min(offs.values())
        end = max(offs["pid"] + 4, offs["tgid"] + 4, offs["comm"] + comm_size, offs["real_cred"] + 8)
        if end - start > MAX_SPAN:
            return None
        return cls(start, end - start, offs["pid"] - start, offs["tgid"] - start, offs["comm"] - start,
                   comm_size, offs["real_cred"] - start, uid)

    def read(self, read: Read, task: int) -> tuple[int, int, str, int]:
        """(pid, tgid, comm, uid) of the task at ``task``; the reader's errors propagate."""
        raw = read(task + self.start, self.size)
        pid = int.from_bytes(raw[self.pid:self.pid + 4], "little", signed=True)
        tgid = int.from_bytes(raw[self.tgid:self.tgid + 4], "little", signed=True)
        comm = raw[self.comm:self.comm + self.comm_size].split(b"\0", 1)[0].decode(errors="replace")
        cred = int.from_bytes(raw[self.real_cred:self.real_cred + 8], "little")
        uid = int.from_bytes(read(cred + self.uid, 4), "little")
        return pid, tgid, comm, uid
