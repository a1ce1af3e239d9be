"""What a tracer arms and filters: probes, watchpoints, event filters, and returns it waits for."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aradia.trace.events import Event
from aradia.trace.hooks import Decide
from aradia.trace.uprobes import UserTarget


@dataclass
class Probe:
    """One armed probe."""

    kind: str  # "kprobe", "count", "syscall", "uprobe", "lifecycle", "hook", or aradia's own "mmap"/"sysexit"
    name: str
    address: int
    ret: bool = False
    #: Bytes to skip instead of single-stepping (the 5-byte ftrace NOP at function entry).
    skip: int = 0
    target: UserTarget | None = None
    #: a decision hook's ``decide(ctx)`` (kind "hook"): None lets the function run, an errno fails it
    decide: Decide | None = None


@dataclass
class Watch:
    """One watchpoint: ``length`` bytes at guest-virtual ``address``; ``access`` is w, r or rw."""

    address: int
    length: int
    access: str
    pid: int | None = None  # report only accesses by this process (tgid)

    @property
    def gdb_kind(self) -> int:
        """The GDB ``Z`` type: 2 write, 3 read, 4 access."""
        return {"w": 2, "r": 3, "rw": 4}[self.access]


@dataclass
class Filter:
    """Which events to keep (None: any)."""

    pids: set[int] | None = None
    comms: set[str] | None = None
    uids: set[int] | None = None

    def keep(self, ev: Event) -> bool:
        """Whether ``ev`` passes (a ``migrated`` marker always does: it concerns the whole VM)."""
        return ev.kind == "migrated" or (
            (self.pids is None or ev.tgid in self.pids or ev.pid in self.pids)
            and (self.comms is None or ev.comm in self.comms)
            and (self.uids is None or ev.uid in self.uids))


@dataclass
class Pending:
    """A return we wait for: the probe, the task and the stack pointer the return will leave.

    Keyed by task, not vCPU: a task may sleep in the function and return on another vCPU.
    """

    probe: Probe
    task: int
    rsp_after: int
    entry_time: float
    #: a syscall whose results are read at this return: its name and raw arguments
    syscall: tuple[str, list[int]] | None = None
    #: a user-space probe's arguments decoded at entry, reported with its return
    entry: dict[str, Any] | None = None
