"""What the honeypot reads at each hit, with the vCPUs stopped: the decisions of its kernel hooks.

Every decision returns None (the kernel function runs as it would) and emits one ``honeypot`` event
with what only the stopped guest can show: a new process and the connection it holds, a program's argv
and working directory, the bytes a pseudo-terminal passes on, a file's contents in the page cache at its
last close, a name unlinked or renamed. Which session an event belongs to is decided later, in event
order, by :class:`~aradia.apps.honeypot.sessions.SessionTable`; hits by processes of no session
(except the daemons' forks and terminal traffic) emit nothing, so they cost only the stop.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from typing import Any

import drgn

from aradia.linux.bounds import GUEST_ERRORS, Warnings
from aradia.linux.net import socket_info
from aradia.linux.pagecache import read_cached
from aradia.linux.processes import task_info
from aradia.linux.walks import d_path, open_files
from aradia.trace.hooks import HookContext

SSH_DAEMONS = ("dropbear", "sshd")
FMODE_WRITE = 0x2
S_IFMT, S_IFREG = 0o170000, 0o100000
PTY_TYPE_MASTER = 1
MAX_FILE = 16 << 20  # bytes of a written file kept (larger ones: size and path only)
MAX_TTY = 1 << 16  # bytes of one terminal write (the kernel passes at most a few KiB at a time)

#: kernel function -> what its hit means
KERNEL_HOOKS = {
    "proc_fork_connector": "fork",
    "proc_exec_connector": "exec",
    "proc_exit_connector": "exit",
    "pty_write": "tty",
    "filp_close": "close",
    "security_path_unlink": "unlink",
    "security_path_rename": "rename",
}

Member = Callable[[int], bool]


def _comm(task: drgn.Object) -> str:
    return task.comm.string_().decode(errors="replace")


def connection(task: drgn.Object) -> dict[str, Any] | None:
    """The first established TCP connection ``task`` holds: its local and remote address and port."""
    for fd, file in open_files(task):
        with contextlib.suppress(*GUEST_ERRORS):
            s = socket_info(file, int(task.pid), int(fd))
            if s is not None and s.proto == "tcp" and s.state == "ESTABLISHED":
                return {"client": s.remote_address, "client_port": s.remote_port,
                        "server": s.local_address, "server_port": s.local_port}
    return None


def _path_of(path: drgn.Object, dentry: drgn.Object | None = None) -> str:
    """A ``struct path *`` (plus a name in it) as the guest names it."""
    base = d_path(path).decode(errors="replace")
    if dentry is None:
        return base
    raw = dentry.prog_.read(dentry.d_name.name.value_(), min(int(dentry.d_name.len), 255))
    return base.rstrip("/") + "/" + raw.decode(errors="replace")


Arm = Callable[[str, drgn.Object], None]


class Hits:
    """The decisions; ``member(tgid)`` says whether a process belongs to a session now; ``arm(what,
    task)`` arms the user-space probes of ``what`` ("daemon": the password check, "shell": typed
    lines) in ``task``'s address space, while the guest is stopped at the hit."""

    def __init__(self, member: Member, arm: Arm | None = None) -> None:
        self.member = member
        self.arm = arm

    def decision(self, what: str) -> Callable[[HookContext], int | None]:
        """The decision for hook kind ``what`` (a value of :data:`KERNEL_HOOKS`): never blocks."""
        body = getattr(self, f"_{what}")

        def decide(ctx: HookContext) -> int | None:
            with contextlib.suppress(*GUEST_ERRORS):
                body(ctx)
            return None  # guest data that makes no sense: nothing recorded, the guest runs on
        return decide

    def _mine(self, ctx: HookContext) -> bool:
        return ctx.task is not None and self.member(int(ctx.task.tgid))

    # --- processes -----------------------------------------------------------------------------------
    def _fork(self, ctx: HookContext) -> None:
        child = ctx.obj(0, "struct task_struct *")
        if int(child.pid) != int(child.tgid):
            return  # a thread: its process is what counts
        parent = child.real_parent.read_()
        ptgid = int(parent.tgid)
        args: dict[str, Any] = {"child": int(child.pid), "parent": ptgid, "parent_comm": _comm(parent)}
        daemon = args["parent_comm"] in SSH_DAEMONS
        if self.member(ptgid):
            ctx.emit("honeypot", "fork", args)
        elif daemon:  # the listening daemon: a new connection's process
            args["connection"] = connection(child)
            ctx.emit("honeypot", "fork", args)
        if daemon and self.arm is not None:
            # a session's daemon (dropbear's per-connection process, a copy of the listener; OpenSSH's
            # monitor, re-executed, whose libraries are loaded by its first fork): its password check
            self.arm("daemon", parent)
            self.arm("daemon", child)

    def _exec(self, ctx: HookContext) -> None:
        task = ctx.obj(0, "struct task_struct *")
        if not self.member(int(task.tgid)):
            return
        info = task_info(task, Warnings())
        cwd = None
        with contextlib.suppress(*GUEST_ERRORS):
            cwd = d_path(task.fs.pwd).decode(errors="replace")
        ctx.emit("honeypot", "exec", {"pid": info.tgid, "exe": info.exe, "argv": info.cmdline, "cwd": cwd,
                                       "comm": info.comm})
        if self.arm is not None and (info.exe or "").rsplit("/", 1)[-1] == "bash":
            self.arm("shell", task)  # readline is in bash itself: mapped by the exec

    def _exit(self, ctx: HookContext) -> None:
        task = ctx.obj(0, "struct task_struct *")
        if int(task.pid) == int(task.tgid) and self.member(int(task.tgid)):
            code = int(task.exit_code)
            ctx.emit("honeypot", "exit", {"pid": int(task.tgid), "status": (code >> 8) & 0xFF,
                                          "signal": code & 0x7F})

    # --- the terminal --------------------------------------------------------------------------------
    def _tty(self, ctx: HookContext) -> None:
        tty = ctx.obj(0, "struct tty_struct *")
        count = ctx.arg(2) & 0xFFFFFFFF
        if not 0 < count <= MAX_TTY:
            return
        master = int(tty.driver.subtype) == PTY_TYPE_MASTER
        slave = tty.link.read_() if master else tty
        data = ctx.prog.read(ctx.arg(1), count, False)
        writer = int(ctx.task.tgid) if ctx.task is not None else 0
        ctx.emit("honeypot", "tty", {"dir": "i" if master else "o", "data": data, "pts": int(tty.index),
                                     "writer": writer, "cols": int(slave.winsize.ws_col),
                                     "rows": int(slave.winsize.ws_row)})

    # --- files ---------------------------------------------------------------------------------------
    def _close(self, ctx: HookContext) -> None:
        if not self._mine(ctx):
            return
        f = ctx.obj(0, "struct file *")
        if not int(f.f_mode) & FMODE_WRITE or int(f.f_count.counter) != 1:
            return  # read-only, or not the last reference (a dup'ed descriptor: reported at the last)
        inode = f.f_inode
        if int(inode.i_mode) & S_IFMT != S_IFREG:
            return
        ctx.emit("honeypot", "file", {"op": "write", "path": _path_of(f.f_path.address_of_()),
                                      **_contents(inode)})

    def _unlink(self, ctx: HookContext) -> None:
        if not self._mine(ctx):
            return
        dentry = ctx.obj(1, "struct dentry *")
        args: dict[str, Any] = {"op": "delete", "path": _path_of(ctx.obj(0, "struct path *"), dentry)}
        inode = dentry.d_inode
        if inode and int(inode.i_mode) & S_IFMT == S_IFREG:
            args.update(_contents(inode))
        ctx.emit("honeypot", "file", args)

    def _rename(self, ctx: HookContext) -> None:
        if not self._mine(ctx):
            return
        old = _path_of(ctx.obj(0, "struct path *"), ctx.obj(1, "struct dentry *"))
        new = _path_of(ctx.obj(2, "struct path *"), ctx.obj(3, "struct dentry *"))
        ctx.emit("honeypot", "file", {"op": "rename", "path": new, "from": old})


def _contents(inode: drgn.Object) -> dict[str, Any]:
    """Size, sha256 and the bytes of a regular file from the page cache (None where not cached)."""
    size = int(inode.i_size)
    out: dict[str, Any] = {"size": size, "sha256": None, "content": None}
    if 0 <= size <= MAX_FILE:
        with contextlib.suppress(*GUEST_ERRORS):
            data = read_cached(inode, 0, size)
            out["sha256"], out["content"] = hashlib.sha256(data).hexdigest(), data
    return out
