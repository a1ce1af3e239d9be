"""Probes removed and added from another thread while events are iterated, on a busy 2-vCPU guest.

Two guest loops exec and open files without pause on both vCPUs, so hits (often on both vCPUs at
once: all-stop parks one on the breakpoint the other hit) keep arriving while the main thread swaps
the armed syscall probe twenty times. After every change the guest must not be stalled (a guest
command completes, QMP sees the VM running between hits), the probe still armed must keep reporting
(the load loops' calls and the command's own marked call), and the removed one must report nothing
once its removal returned.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from aradia.lab.launcher import Guest
from aradia.trace.events import Event
from aradia.trace.tracer import Tracer
from aradia.vm import attach

GUEST_SERIES = "6.1"
GUEST_OPTIONS = {"smp": 2}
ROUNDS = 20
STOP_FILE = "/tmp/aradia-load-stop"
LOAD = f"while [ ! -e {STOP_FILE} ]; do /bin/true aradia-load; /bin/cat /proc/version > /dev/null; done"


def from_load(ev: Event, name: str) -> bool:
    """Whether ``ev`` is a ``name`` syscall of the load loops."""
    if ev.name != name:
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


def wait_for(pred: Any, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return bool(pred())


@pytest.mark.guest
@pytest.mark.timeout(900)
def test_probes_swapped_while_events_iterate_under_load(guest: Guest) -> None:
    guest.run(f"rm -f {STOP_FILE}; for i in 1 2; do ({LOAD}) > /dev/null 2>&1 & done")
    events: list[Event] = []
    errors: list[BaseException] = []
    stop = threading.Event()
    try:
        with attach(f"qmp:{guest.qmp_path}") as vm, Tracer.open(vm) as tracer:
            probes = {"execve": tracer.add_syscall("execve")}

            def iterate() -> None:
                try:
                    for ev in tracer.events(until=stop.is_set):
                        events.append(ev)
                except BaseException as e:  # re-raised in the test's thread
                    errors.append(e)

            worker = threading.Thread(target=iterate, name="events")
            worker.start()
            try:
                for k in range(ROUNDS):
                    old = next(iter(probes))
                    new = "openat" if old == "execve" else "execve"
                    if k % 2:  # both orders: remove then add, add then remove
                        tracer.remove(probes.pop(old))
                        removed = time.monotonic()
                        probes[new] = tracer.add_syscall(new)
                    else:
                        probes[new] = tracer.add_syscall(new)
                        tracer.remove(probes.pop(old))
                        removed = time.monotonic()
                    changed = time.monotonic()
                    where = f"round {k}: {old} removed, {new} armed"

                    # not stalled: QMP sees the VM run between hits, and a guest command completes
                    assert wait_for(lambda: vm.machine.status() == "running", 20), \
                        f"{where}: the VM stays in run state {vm.machine.status()!r}"
                    mark = f"/aradia-mark-{k}"
                    guest.run(f"/bin/cat /etc/hostname {mark} > /dev/null 2>&1; true", timeout=60)
                    assert not errors, f"{where}: the event loop failed: {errors[0]!r}"

                    # the armed probe reports: the command's marked call and the load loops' calls
                    assert wait_for(lambda new=new, mark=mark: any(marked(e, new, mark) for e in list(events)), 20), \
                        f"{where}: no {new} event for {mark}"
                    assert wait_for(lambda new=new, changed=changed: any(from_load(e, new) and e.time > changed
                                                                for e in list(events)), 20), \
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
            assert vm.machine.status() == "running"
    finally:
        guest.run(f"touch {STOP_FILE}", timeout=60)
    assert guest.run("echo alive").strip() == "alive"
