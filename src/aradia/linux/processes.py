"""Processes and threads of the guest (what ``ps`` and ``/proc/<pid>/status`` show)."""

from __future__ import annotations

from dataclasses import dataclass, field

import drgn
from drgn.helpers.linux.mm import cmdline as task_cmdline
from drgn.helpers.linux.sched import task_state_to_char

from aradia.errors import AradiaError
from aradia.linux.bounds import GUEST_ERRORS, Warnings, attempt, bounded, cstring
from aradia.linux.walks import d_path, each_task, task_by_pid

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
    name: str = ""  # as /proc/<pid>/stat shows it: a kernel thread's full name (6.x) beyond 15 chars
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
    proc.name = proc.comm
    if not mm:
        proc.name = attempt(lambda: _kthread_name(task) or proc.comm, proc.comm, f"{what}: name", warnings)
    if mm:
        proc.cmdline = attempt(lambda: _cmdline(task), [], f"{what}: cmdline", warnings)
        proc.exe = attempt(lambda: _path(mm.exe_file.f_path) if mm.exe_file else None, None,
                           f"{what}: exe", warnings)
    return proc


PF_WQ_WORKER = 0x00000020
PF_KTHREAD = 0x00200000


def _kthread_name(task: drgn.Object) -> str | None:
    """A kernel thread's name as /proc shows it: a workqueue worker's comm with its current work
    (``kworker/0:1-events``), or the full name of other kernel threads (6.0+) beyond 15 chars."""
    flags = int(task.flags)
    if not flags & PF_KTHREAD:
        return None
    try:
        kthread = drgn.cast("struct kthread *", task.worker_private)
    except (AttributeError, LookupError):
        return None  # before 5.17 the pointer lives elsewhere and there is no full name
    if not kthread:
        return None
    comm = task.comm.string_().decode(errors="replace")
    if flags & PF_WQ_WORKER:
        worker = drgn.cast("struct worker *", kthread.data)
        if worker and worker.pool and worker.desc[0]:
            busy = "+" if worker.current_work else "-"
            return comm + busy + worker.desc.string_().decode(errors="replace")
        return comm
    try:
        full = kthread.full_name
    except AttributeError:
        return None
    return cstring(full, 256) if full else None


def _cmdline(task: drgn.Object) -> list[str]:
    mm = task.mm
    size = int(mm.arg_end) - int(mm.arg_start)
    if size <= 0:
        # As /proc/<pid>/cmdline: an mm still being set up by exec (arg_end not yet set) is empty.
        return []
    if size > MAX_ARGV_BYTES:
        raise ValueError(f"absurd argument area of {size} bytes")
    args = task_cmdline(task) or []
    return [a.decode(errors="replace") for a in args]


def processes(prog: drgn.Program, *, threads: bool = False,
              warnings: Warnings | None = None) -> list[Process]:
    """Every process (thread-group leader) of the guest, or every thread with ``threads=True``."""
    warnings = Warnings() if warnings is None else warnings
    out = []
    for task in bounded(each_task(prog, warnings), "task list", warnings, limit=1 << 22,
                        key=lambda t: t.value_()):
        try:
            if not threads and int(task.pid) != int(task.tgid):
                continue
            out.append(task_info(task, warnings))
        except GUEST_ERRORS as e:
            warnings.add(f"task at {task.value_():#x}: unreadable ({e})")
    return out


def find_task(prog: drgn.Program, pid: int) -> drgn.Object:
    """The ``struct task_struct *`` of ``pid``; :class:`AradiaError` if there is none (see
    :func:`aradia.linux.walks.task_by_pid` for the lookup that returns None)."""
    task = task_by_pid(prog, pid)
    if task is None:
        raise AradiaError(f"no process {pid} in the guest")
    return task
