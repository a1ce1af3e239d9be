"""QEMU's run state as its HMP ``info status`` says it, and the states a guarded stub must not resume.

Shared by the guardian (:mod:`aradia.trace.guardian`) and its watchdog (:mod:`aradia.trace.watchdog`).
"""

from __future__ import annotations

from aradia.errors import ProtocolError

#: Run states of a migration source whose guest already lives (or is about to live) on the destination.
MIGRATED_STATES = frozenset({"finish-migrate", "postmigrate"})
#: Run state of a migration destination that has not received its guest yet.
INCOMING_STATES = frozenset({"inmigrate"})


def parse_info_status(text: str) -> str:
    """QEMU's run state from HMP ``info status`` (``VM status: paused (postmigrate)`` -> ``postmigrate``).

    ``running`` and plain ``paused`` come back as such; ``(single step mode)`` is not a run state.
    """
    line = text.partition("VM status:")[2].strip().splitlines()
    words = line[0] if line else text.strip()
    state = "running" if words.startswith("running") else "paused" if words.startswith("paused") else ""
    for part in words.split("(")[1:]:
        inner = part.partition(")")[0].strip()
        if inner and inner != "single step mode":
            state = inner
    if not state:
        raise ProtocolError(f"cannot parse QEMU's 'info status' output {text.strip()[:80]!r}")
    return state
