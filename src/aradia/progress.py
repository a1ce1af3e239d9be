"""The one shape of a progress report: a callback given one short line before each slow step.

Finding a kernel profile, building its drgn program, building a test-guest image and building the
TCG plugin all take a ``progress: Progress | None`` and call it with lines such as ``"indexing BTF"``;
the CLI prints them on stderr, tests and the lab print or ignore them. A byte count while writing a
dump is another thing, :data:`aradia.sources.dumpwrite.ByteProgress`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

Progress = Callable[[str], None]
"""Called with one short human-readable line (no newline) before a slow step."""


class StepTimer:
    """Progress lines for a run of named steps, and the seconds each step took (a kernel profile's
    ``timings``)."""

    def __init__(self, progress: Progress | None) -> None:
        self.t = time.perf_counter()
        self.start = self.t
        self.out: dict[str, float] = {}
        self.progress = progress

    def say(self, msg: str) -> None:
        """Report ``msg`` before a slow step (when there is a progress callback)."""
        if self.progress:
            self.progress(msg)

    def lap(self, name: str) -> None:
        """End step ``name``: its time is what passed since the previous lap."""
        now = time.perf_counter()
        self.out[name] = round(now - self.t, 4)
        self.t = now

    def total(self) -> dict[str, float]:
        """Every step's time and the ``total``."""
        self.out["total"] = round(time.perf_counter() - self.start, 4)
        return self.out


__all__ = ["Progress", "StepTimer"]
