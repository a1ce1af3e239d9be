"""Processes and threads of the guest (what ``ps`` and ``/proc/<pid>/status`` show)."""

from __future__ import annotations

from dataclasses import dataclass, field

import drgn
from drgn.helpers.linux.fs import d_path
from drgn.helpers.linux.mm import cmdline as task_cmdline
from drgn.helpers.linux.pid import find_task as drgn_find_task
from drgn.helpers.linux.pid import for_each_task
from drgn.helpers.linux.sched import task_state_to_char

from aradia.errors import AradiaError
from aradia.linux.guard import Warnings, attempt, bounded

MAX_ARGV_BYTES = 1 << 20


@dataclass
class Process:
    """One task (a process, or a thread when ``pid != tgid``)."""

    pid: int
    tgid: int
    ppid: int
    uid: int
    gid: int
    euid: int
    comm: str
    cmdline: list[str] = field(default_factory=list)
    state: str = "?"
    start_time: float = 0.0  # seconds since boot (CLOCK_BOOTTIME), as /proc/<pid>/stat field 22
    exe: str | None = None
    kernel_thread: bool = False
    address: int = 0  # the task_struct in guest memory


def _path(p: drgn.Object) -> str:
    return d_path(p).decode(errors="replace")


def task_info(task: drgn.Object, warnings: Warnings) -> Process:
    """A :class:`Process` for one ``struct task_struct *``; unreadable fields keep defaults with a warning."""
    pid = int(task.pid)
    what = f"task {pid} at {task.value_():#x}"
    cred = task.real_cred
    mm = task.mm
    proc = Process(
        pid=pid,
        tgid=int(task.tgid),
        ppid=attempt(lambda: int(task.real_parent.tgid) if pid > 1 else 0, 0, f"{what}: parent", warnings),
        uid=attempt(lambda: int(cred.uid.val), -1, f"{what}: cred", warnings),
        gid=attempt(lambda: int(cred.gid.val), -1, f"{what}: cred", warnings),
        euid=attempt(lambda: int(cred.euid.val), -1, f"{what}: cred", warnings),
        comm=attempt(lambda: task.comm.string_().decode(errors="replace"), "?", f"{what}: comm", warnings),
        state=attempt(lambda: task_state_to_char(task), "?", f"{what}: state", warnings),
        start_time=attempt(lambda: int(task.start_boottime) / 1e9, 0.0, f"{what}: start time", warnings),
        kernel_thread=not mm,
        address=task.value_(),
    )
    if mm:
        proc.cmdline = attempt(lambda: _cmdline(task), [], f"{what}: cmdline", warnings)
        proc.exe = attempt(lambda: _path(mm.exe_file.f_path) if mm.exe_file else None, None,
                           f"{what}: exe", warnings)
    return proc


def _cmdline(task: drgn.Object) -> list[str]:
    mm = task.mm
    size = int(mm.arg_end) - int(mm.arg_start)
    if not 0 <= size <= MAX_ARGV_BYTES:
        raise ValueError(f"absurd argument area of {size} bytes")
    args = task_cmdline(task) or []
    return [a.decode(errors="replace") for a in args]


def processes(prog: drgn.Program, *, threads: bool = False,
              warnings: Warnings | None = None) -> list[Process]:
    """Every process (thread-group leader) of the guest, or every thread with ``threads=True``."""
    warnings = Warnings() if warnings is None else warnings
    out = []
    for task in bounded(for_each_task(prog), "task list", warnings, limit=1 << 22, key=lambda t: t.value_()):
        try:
            if not threads and int(task.pid) != int(task.tgid):
                continue
            out.append(task_info(task, warnings))
        except (drgn.FaultError, ValueError) as e:
            warnings.add(f"task at {task.value_():#x}: unreadable ({e})")
    return out


def find_task(prog: drgn.Program, pid: int) -> drgn.Object:
    """The ``struct task_struct *`` of ``pid``; :class:`AradiaError` if there is none."""
    task = drgn_find_task(prog, pid)
    if not task:
        raise AradiaError(f"no process {pid} in the guest")
    return task
