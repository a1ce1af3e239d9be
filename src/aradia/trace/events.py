"""Typed trace events: what happened, where (vCPU), and in which task."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Event:
    """One probe hit, enriched with the task that was running on the vCPU."""

    time: float  # host CLOCK_MONOTONIC seconds when aradia saw the hit
    vcpu: int
    kind: str  # "kprobe", "kretprobe", "syscall"
    name: str  # symbol or syscall name
    pid: int = 0
    tgid: int = 0
    comm: str = ""
    uid: int = -1
    args: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        """One human-readable line."""
        args = ", ".join(f"{k}={v!r}" for k, v in self.args.items())
        who = f"{self.comm}[{self.tgid}/{self.pid}] uid={self.uid}"
        return f"{self.time:.6f} cpu{self.vcpu} {who} {self.kind} {self.name}({args})"
