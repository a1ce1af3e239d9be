"""Tracing a guest while it does something: the harness the tracing tests share."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from aradia.lab.launcher import Guest
from aradia.trace.events import Event
from aradia.trace.tracer import Tracer
from aradia.vm import attach


def trace_while(guest: Guest, arm: Callable[[Tracer], object], action: Callable[[], Any],
                limit: float = 120) -> tuple[list[Event], Any]:
    """Attach, ``arm(tracer)``, run ``action()`` in a thread while collecting events (through the
    callback API) until it returns; the events and what ``action`` returned. Its exception is
    re-raised here; an action that outlasts ``limit`` seconds fails the test."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = action()
        except Exception as e:  # re-raised in the test's thread
            result["error"] = e
        finally:
            result["done"] = True

    events: list[Event] = []
    with attach(f"qmp:{guest.qmp_path}") as vm, Tracer.open(vm) as tracer:
        arm(tracer)
        worker = threading.Thread(target=run)
        worker.start()
        tracer.run(events.append, duration=limit, until=lambda: bool(result.get("done")))
    worker.join(30)
    if "error" in result:
        raise result["error"]
    assert result.get("done"), "the guest action did not finish while traced"
    return events, result.get("value")
