"""Who acts: a task's ancestry up to init and the login session it belongs to (the ssh daemon's
per-connection process, the user, and the client's address as that process's socket peer)."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Any

import drgn

from aradia.linux.bounds import GUEST_ERRORS
from aradia.linux.net import socket_info
from aradia.linux.walks import d_path, open_files

MAX_ANCESTRY = 64
SSH_DAEMONS = ("dropbear", "sshd")


@dataclass
class Proc:
    """One process of an ancestry chain."""

    pid: int
    comm: str
    uid: int
    exe: str | None = None


@dataclass
class Session:
    """A login session: the user, the client's address and port, the per-connection daemon's pid."""

    user: str
    uid: int
    client: str | None = None
    client_port: int | None = None
    daemon_pid: int | None = None


@dataclass
class Actor:
    """The acting process with its ancestry (parent first) and its login session, if any."""

    proc: Proc
    ancestry: list[Proc] = field(default_factory=list)
    session: Session | None = None

    def as_dict(self) -> dict[str, Any]:
        """As plain values (for an alert's ``args``)."""
        return {"process": asdict(self.proc), "ancestry": [asdict(p) for p in self.ancestry],
                "session": None if self.session is None else asdict(self.session)}


def task_exe(task: drgn.Object) -> drgn.Object | None:
    """The ``struct file *`` of a task's program (``mm->exe_file``), or None (kernel thread)."""
    mm = task.mm.read_()
    if not mm:
        return None
    exe = mm.exe_file.read_()
    return exe if exe else None


def proc_of(task: drgn.Object) -> Proc:
    """One :class:`Proc` (program path through ``d_path``; None when unreadable)."""
    exe = None
    with contextlib.suppress(*GUEST_ERRORS):
        f = task_exe(task)
        if f is not None:
            exe = d_path(f.f_path).decode(errors="replace")
    comm = task.comm.string_().decode(errors="replace")
    return Proc(int(task.tgid), comm, int(task.real_cred.uid.val), exe)


def parents(task: drgn.Object) -> list[drgn.Object]:
    """The ``real_parent`` chain of ``task`` (parent first) up to pid 1, bounded."""
    out = []
    t = task.group_leader.read_()
    for _ in range(MAX_ANCESTRY):
        p = t.real_parent.read_()
        if p.value_() == t.value_() or int(t.pid) <= 1:
            break
        out.append(p)
        t = p
    return out


def _peer(task: drgn.Object) -> tuple[str, int] | None:
    """The remote address of the first connected TCP socket ``task`` holds."""
    for fd, file in open_files(task):
        with contextlib.suppress(*GUEST_ERRORS):
            s = socket_info(file, int(task.pid), int(fd))
            if s is not None and s.proto == "tcp" and s.state == "ESTABLISHED":
                return s.remote_address, s.remote_port
    return None


def actor(task: drgn.Object, users: dict[int, str]) -> Actor:
    """The acting ``task`` (``struct task_struct *``) described: itself, its ancestry, and its login
    session — the first ancestor that is an ssh daemon's per-connection process (an ssh daemon whose
    own parent is one too), the uid of the process it started, and its socket's peer."""
    chain = parents(task)
    me = proc_of(task)
    procs = [proc_of(t) for t in chain]
    session = None
    below = me
    for i, t in enumerate(chain):
        if procs[i].comm in SSH_DAEMONS and i + 1 < len(chain) and procs[i + 1].comm == procs[i].comm:
            peer = None
            with contextlib.suppress(*GUEST_ERRORS):
                peer = _peer(t)
            session = Session(users.get(below.uid, str(below.uid)), below.uid,
                              peer[0] if peer else None, peer[1] if peer else None, procs[i].pid)
            break
        below = procs[i]
    return Actor(me, procs, session)
