"""A guest that reboots under a running trace: the tracer stops with a clear error, nothing stays armed.

After a reboot the kernel sits at new addresses (KASLR), so every armed probe is stale: aradia must
not go on reporting (or stopping the guest at) old addresses. The guest is started with
``-action reboot=reset`` so a reboot is a reset, as on a real host, rather than the test default of
QEMU exiting.
"""

from __future__ import annotations

import secrets
import threading
import time

import pytest

from aradia.errors import AradiaError
from aradia.lab.launcher import Guest
from aradia.trace.tracer import Tracer
from aradia.vm import attach
from tracing import trace_while

GUEST_SERIES = "6.1"
GUEST_OPTIONS = {"smp": 2, "extra_args": ["-action", "reboot=reset"]}


@pytest.mark.timeout(180)
def test_reboot_mid_trace_is_a_clear_error(guest: Guest) -> None:
    with attach(f"qmp:{guest.qmp_path}") as vm, Tracer.open(vm) as tracer:
        tracer.add_syscall("openat")
        threading.Timer(1.0, lambda: guest.send_console(b"echo b > /proc/sysrq-trigger\n")).start()
        started = time.monotonic()
        with pytest.raises(AradiaError, match=r"reset \(rebooted\) while tracing"):
            for _ in tracer.events(duration=60):
                pass
        assert time.monotonic() - started < 15
    # the guest boots again with nothing armed, and a new kernel profile
    deadline = time.monotonic() + 60
    while guest.console_text().count(guest.image.ready_marker) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert guest.console_text().count(guest.image.ready_marker) >= 2, guest.console_text()[-2000:]
    with attach(f"qmp:{guest.qmp_path}") as vm:
        assert vm.status() == "running"
    # The stub is free again and the new kernel's address arms: a file the guest opens after the
    # reboot is seen, once, with its path.
    probe = f"/tmp/aradia-after-reboot-{secrets.token_hex(4)}"
    events, _ = trace_while(guest, lambda tracer: tracer.add_syscall("openat"),
                            lambda: guest.run(f"echo x > {probe}; cat {probe}"), limit=60)
    assert events and all(e.name == "openat" for e in events), [e.line() for e in events[:5]]
    mine = [(e.comm, e.args["path"]) for e in events if e.args["path"] == probe]
    assert mine == [("bash", probe), ("cat", probe)], mine  # the shell's redirection, then cat
