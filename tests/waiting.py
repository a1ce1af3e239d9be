"""Polling until something holds, for tests: one helper, a clear failure naming what never came."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(cond: Callable[[], bool], timeout: float, what: str, step: float = 0.05) -> float:
    """Poll ``cond`` every ``step`` s until true; the seconds it took (AssertionError naming ``what``
    after ``timeout`` s)."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)
    return time.monotonic() - t0
