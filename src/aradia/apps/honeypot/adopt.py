"""Sessions already open when the monitor starts (a restarted monitor): found in the guest's process
tree, stopped, so that their later events are recorded as for a session seen from its start.

A session's root is a per-connection daemon process: an ssh daemon whose parent is the listening
daemon (an ssh daemon whose own parent is not one). Its processes are its descendants.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import drgn

from aradia.apps.honeypot.hits import SSH_DAEMONS, connection
from aradia.linux.bounds import GUEST_ERRORS, Warnings
from aradia.linux.walks import each_task

MAX_TASKS = 1 << 16


@dataclass
class Found:
    """One open session: its root daemon process, its connection, every process of it (tgid -> task)."""

    root: drgn.Object
    daemon: str
    conn: dict[str, Any] | None
    members: dict[int, drgn.Object] = field(default_factory=dict)


def open_sessions(prog: drgn.Program) -> list[Found]:
    """The ssh sessions open in the guest now (read with the guest stopped)."""
    procs: dict[int, tuple[drgn.Object, int, str]] = {}  # tgid -> (task, parent tgid, comm)
    for i, task in enumerate(each_task(prog, Warnings())):
        if i >= MAX_TASKS:
            break
        with contextlib.suppress(*GUEST_ERRORS):
            if int(task.pid) == int(task.tgid):
                comm = task.comm.string_().decode(errors="replace")
                procs[int(task.tgid)] = (task, int(task.real_parent.tgid), comm)
    roots = [t for t, (task, ppid, comm) in procs.items()
             if comm in SSH_DAEMONS and ppid in procs and procs[ppid][2] in SSH_DAEMONS
             and procs[ppid][1] in procs and procs[procs[ppid][1]][2] not in SSH_DAEMONS]
    children: dict[int, list[int]] = {}
    for t, (_task, ppid, _comm) in procs.items():
        children.setdefault(ppid, []).append(t)
    out = []
    for r in sorted(roots):
        conn = None
        with contextlib.suppress(*GUEST_ERRORS):
            conn = connection(procs[r][0])
        found = Found(procs[r][0], procs[r][2], conn)
        todo = [r]
        while todo and len(found.members) < MAX_TASKS:
            t = todo.pop()
            if t not in found.members:
                found.members[t] = procs[t][0]
                todo.extend(children.get(t, []))
        out.append(found)
    return out
