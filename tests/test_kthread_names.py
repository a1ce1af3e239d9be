"""Kernel-thread names as the guest's /proc shows them, on every kernel of the lab.

``task->comm`` holds 15 characters; ``/proc/PID/stat`` shows more for kernel threads: the full name a
thread was created with (``rcu_tasks_kthread``, 5.18+), and for a workqueue worker its id followed by
``+`` and the workqueue it is running work for, or ``-`` and the last one (``kworker/0:1-events``; since
6.10 the id is formatted anew, so a rescuer shows ``kworker/R-`` and its workqueue's full name).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from aradia.lab.launcher import Guest
from aradia.vm import attach
from guest_truth import sample_stat, worker_id


@pytest.fixture(scope="module", params=["5.10", "6.1", "6.12"])
def guest(request: pytest.FixtureRequest, launch_guest: Callable[..., Guest]) -> Guest:
    return launch_guest(request.param, smp=2, shared_memory=True)


ROUNDS = 3


@pytest.mark.timeout(300)
def test_every_kernel_thread_is_named_as_proc_shows_it(guest: Guest) -> None:
    with attach(f"qmp:{guest.qmp_path}") as vm:
        vm.load_kernel()

        def view() -> dict[int, tuple[str, str, bool]]:
            with vm.paused():
                procs = vm.linux.processes()
            assert not vm.linux.warnings
            return {p.pid: (p.name, p.comm, p.kernel_thread) for p in procs if p.pid}

        # A pool worker's "+work"/"-work" changes as it runs: the name aradia read (the guest paused)
        # must be one /proc showed in the same stretch, and a worker may run a work between two of
        # /proc's samples: a round with such a miss is taken again, up to ROUNDS times (a name that
        # is wrong stays wrong). Every other name must be what /proc showed throughout.
        for _ in range(ROUNDS):
            truth, mine = sample_stat(guest, view)
            kthreads = {pid for pid in truth.seen if truth.last(pid).kernel_thread}
            stable = {pid for pid in truth.stable if pid in kthreads}
            ours = {pid for pid, (_, _, kt) in mine.items() if kt}
            # every kernel thread /proc showed throughout is in the view, and the view has no other
            assert stable <= ours <= kthreads, (stable - ours, ours - kthreads)
            wrong = {pid: (mine[pid][0], truth.names(pid)) for pid in ours
                     if (mine[pid][0] not in truth.names(pid) if worker_id(mine[pid][0])
                         else truth.names(pid) != {mine[pid][0]})}
            if not wrong:
                break
    assert wrong == {}
    assert len(stable) > 30
    assert all(len(mine[pid][1]) <= 15 for pid in ours)  # comm stays the kernel's 15 characters
    long_names = [mine[pid][0] for pid in ours if len(mine[pid][0]) > 15]
    assert long_names, "no kernel thread name longer than task->comm: the test would prove nothing"
