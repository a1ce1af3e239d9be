"""Processes and threads of the guest (what ``ps`` and ``/proc/<pid>/status`` show)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import drgn
from drgn.helpers.linux.kthread import to_kthread
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
    kernel_thread: bool = False  # PF_KTHREAD (an exiting process has no mm either)
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
        kernel_thread=attempt(lambda: bool(int(task.flags) & PF_KTHREAD), not mm, f"{what}: flags", warnings),
        address=task.value_(),
    )
    proc.name = attempt(lambda: _kthread_name(task) or proc.comm, proc.comm, f"{what}: name", warnings)
    if mm:
        proc.cmdline = attempt(lambda: _cmdline(task), [], f"{what}: cmdline", warnings)
        proc.exe = attempt(lambda: _path(mm.exe_file.f_path) if mm.exe_file else None, None,
                           f"{what}: exe", warnings)
    return proc


PF_WQ_WORKER = 0x00000020
PF_KTHREAD = 0x00200000
TCOMM_LEN = 64  # proc_task_name()'s buffer: /proc shows at most 63 characters of a name


def _kthread_name(task: drgn.Object) -> str | None:
    """A kernel thread's name as ``/proc/PID/stat`` and ``comm`` show it (``proc_task_name``), where
    it differs from the 15-character ``task->comm``; None where it does not.

    A workqueue worker (``wq_worker_comm``): its id, then ``+`` and the workqueue of the work it is
    running, or ``-`` and the last one it ran (``kworker/0:1-events``); since 6.10 the id is
    formatted anew from the worker (a rescuer's ``kworker/R-`` carries its workqueue's full name),
    before it is the comm. Any other kernel thread (``get_kthread_comm``, where ``struct kthread`` has
    ``full_name``): the full name it was created with (``rcu_tasks_kthread``).
    """
    flags = int(task.flags)
    if not flags & PF_KTHREAD:
        return None
    kthread = to_kthread(task)
    if not kthread:
        return None
    comm = task.comm.string_().decode(errors="replace")
    if flags & PF_WQ_WORKER:
        worker = drgn.cast("struct worker *", kthread.data)
        if not worker:
            return comm
        pool = worker.pool
        name = _worker_id(worker, pool) if _formats_worker_ids(task.prog_) else comm
        if pool and worker.desc[0]:
            name += ("+" if worker.current_work else "-") + worker.desc.string_().decode(errors="replace")
        return name[:TCOMM_LEN - 1]
    try:
        full = kthread.full_name
    except AttributeError:
        return None  # no full name kept: /proc shows the comm
    return cstring(full, TCOMM_LEN - 1) if full else None


def _worker_id(worker: drgn.Object, pool: drgn.Object) -> str:
    """The kernel's ``format_worker_id()`` (6.10+)."""
    if worker.rescue_wq:
        return "kworker/R-" + worker.rescue_wq.name.string_().decode(errors="replace")
    if not pool:
        return "kworker/dying"
    if int(pool.cpu) >= 0:
        return f"kworker/{int(pool.cpu)}:{int(worker.id)}{'H' if int(pool.attrs.nice) < 0 else ''}"
    return f"kworker/u{int(pool.id)}:{int(worker.id)}"


def _formats_worker_ids(prog: drgn.Program) -> bool:
    """Whether ``wq_worker_comm()`` formats the worker's id (Linux 6.10, and 6.9.11 stable: commit
    2a1b02bcba78 "workqueue: Refactor worker ID formatting and make wq_worker_comm() use full ID
    string") rather than copying the comm. Read once per program from the kernel's release."""
    key = "aradia.formats_worker_ids"
    if key not in prog.cache:
        release = prog["init_uts_ns"].name.release.string_().decode(errors="replace")
        m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", release)
        version = tuple(int(x or 0) for x in m.groups()) if m else (0, 0, 0)
        prog.cache[key] = version >= (6, 10, 0) or (6, 9, 11) <= version < (6, 10, 0)
    return bool(prog.cache[key])


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
