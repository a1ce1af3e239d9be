"""Probes removed and added from another thread while events are iterated, on a busy 2-vCPU guest.

Two guest loops exec and open files without pause on both vCPUs, so hits (often on both vCPUs at
once: all-stop parks one on the breakpoint the other hit) keep arriving while the probes are swapped
twenty times from a thread of their own. After every change the guest must not be stalled (a guest
command completes, QMP sees the VM running between hits), the probe still armed must keep reporting
(the load loops' calls and the command's own marked call), and the removed one must report nothing
once its removal returned.

The thread changing probes is the last to get a CPU, as on a loaded machine: it shares one core with
the thread iterating events and runs at ``SCHED_IDLE`` (QEMU is kept on the other cores). The event
loop holds the tracer's lock through each wait for a stop and asks for it again as soon as it let it
go, so a change is served only if the lock goes to whoever asked first; each change must return
within :data:`CHANGE_LIMIT` seconds.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from aradia.lab.launcher import Guest
from aradia.trace.events import Event
from aradia.trace.tracer import Tracer
from aradia.vm import attach

GUEST_SERIES = "6.1"
GUEST_OPTIONS = {"smp": 2}
ROUNDS = 20
#: Seconds a probe change may take: the event loop's current wait slice (0.25 s), a hit it is
#: handling, and the change itself, with a wide margin for a slow machine.
CHANGE_LIMIT = 10.0
STOP_FILE = "/tmp/aradia-load-stop"
LOAD = f"while [ ! -e {STOP_FILE} ]; do /bin/true aradia-load; /bin/cat /proc/version > /dev/null; done"


def from_load(ev: Event, name: str, after: float) -> bool:
    """Whether ``ev`` is a ``name`` syscall of the load loops seen after time ``after``."""
    if ev.name != name or ev.time <= after:
        return False
    if name == "execve":
        return (ev.args.get("argv") or [])[1:] == ["aradia-load"]
    return ev.args.get("path") == "/proc/version"


def marked(ev: Event, name: str, mark: str) -> bool:
    """Whether ``ev`` is the ``name`` syscall of the guest command carrying ``mark``."""
    if ev.name != name:
        return False
    if name == "execve":
        return mark in (ev.args.get("argv") or [])
    return ev.args.get("path") == mark


def wait_for(pred: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def pin_process(pid: int, cpus: set[int]) -> None:
    """Keep every thread of process ``pid`` on ``cpus``."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(tid), cpus)


@pytest.mark.guest
@pytest.mark.timeout(900)
def test_probes_swapped_while_events_iterate_under_load(guest: Guest) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    tracer_cpu = {cpus[0]}
    pin_process(guest.pid, set(cpus[1:]) or tracer_cpu)
    guest.run(f"rm -f {STOP_FILE}; for i in 1 2; do ({LOAD}) > /dev/null 2>&1 & done")
    events: list[Event] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def last_to_run() -> None:
        os.sched_setaffinity(0, tracer_cpu)  # this thread only
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))

    def iterate(tracer: Tracer) -> None:
        os.sched_setaffinity(0, tracer_cpu)
        try:
            for ev in tracer.events(until=stop.is_set):
                events.append(ev)
        except BaseException as e:  # re-raised in the test's thread
            errors.append(e)

    def seen(pred: Callable[[Event], bool], timeout: float = 20) -> bool:
        return wait_for(lambda: any(pred(e) for e in list(events)), timeout)

    changer = ThreadPoolExecutor(1, thread_name_prefix="probe-changes", initializer=last_to_run)
    try:
        with attach(f"qmp:{guest.qmp_path}") as vm, Tracer.open(vm) as tracer:
            probes = {"execve": tracer.add_syscall("execve")}
            worker = threading.Thread(target=iterate, args=(tracer,), name="events")
            worker.start()

            def change(what: str, fn: Callable[..., Any], arg: Any) -> Any:
                try:
                    result = changer.submit(fn, arg).result(timeout=CHANGE_LIMIT)
                except TimeoutError:
                    pytest.fail(f"{what} did not return within {CHANGE_LIMIT} s while events were iterated "
                                f"(the VM is {vm.status()!r}, {len(events)} events so far)")
                assert not errors, f"{what}: the event loop failed: {errors[0]!r}"
                return result

            try:
                for k in range(ROUNDS):
                    old = next(iter(probes))
                    new = "openat" if old == "execve" else "execve"
                    where = f"round {k}: {old} -> {new}"
                    if k % 2:  # both orders: remove then add, add then remove
                        change(f"{where}: remove({old})", tracer.remove, probes.pop(old))
                        removed = time.monotonic()
                        probes[new] = change(f"{where}: add_syscall({new})", tracer.add_syscall, new)
                    else:
                        probes[new] = change(f"{where}: add_syscall({new})", tracer.add_syscall, new)
                        change(f"{where}: remove({old})", tracer.remove, probes.pop(old))
                        removed = time.monotonic()
                    changed = time.monotonic()

                    # not stalled: QMP sees the VM run between hits, and a guest command completes
                    assert wait_for(lambda: vm.status() == "running", 20), \
                        f"{where}: the VM stays in run state {vm.status()!r}"
                    mark = f"/aradia-mark-{k}"
                    guest.run(f"/bin/cat /etc/hostname {mark} > /dev/null 2>&1; true", timeout=60)
                    assert not errors, f"{where}: the event loop failed: {errors[0]!r}"

                    # the armed probe reports: the command's marked call and the load loops' calls
                    assert seen(functools.partial(marked, name=new, mark=mark)), f"{where}: no {new} for {mark}"
                    assert seen(functools.partial(from_load, name=new, after=changed)), \
                        f"{where}: the load loops' {new} calls are not reported"
                    # the removed probe does not, once its removal returned
                    late = [e.line() for e in list(events) if e.name == old and e.time > removed]
                    assert not late, f"{where}: events of the removed probe: {late[:3]}"
            finally:
                stop.set()
                worker.join(30)
            assert not worker.is_alive(), "the event loop did not end"
            assert not errors, repr(errors)
        # closed: nothing armed, the guest runs
        with attach(f"qmp:{guest.qmp_path}") as vm:
            assert vm.status() == "running"
    finally:
        changer.shutdown(wait=True)
        guest.run(f"touch {STOP_FILE}", timeout=60)
    assert guest.run("echo alive").strip() == "alive"
