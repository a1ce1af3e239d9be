"""Per-second event counts (the dashboard's charts): exact counts per kind, a sliding window."""

from __future__ import annotations

import pytest

from aradia.service.rates import Rates


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.timeout(10)
def test_counts_per_second_and_kind_in_the_window() -> None:
    clock = Clock(1000.5)
    r = Rates(window=60, clock=clock)
    for t, kind in [(990.1, "syscall"), (990.9, "syscall"), (995.0, "exec"), (1000.2, "syscall"), (900.0, "syscall")]:
        r.add("web1", kind, t)
    r.add("web2", "exit", 1000.0)
    s = r.series("web1", 11)
    assert (s["start"], s["seconds"]) == (990, 11)
    assert s["kinds"] == {"syscall": [2] + [0] * 9 + [1], "exec": [0] * 5 + [1] + [0] * 5}
    assert s["total"] == 4  # 900.0 is outside the 11 s asked for
    assert r.series("web2", 5) == {"start": 996, "seconds": 5, "kinds": {"exit": [0, 0, 0, 0, 1]}, "total": 1}
    assert r.series("nosuch", 5)["kinds"] == {}
    assert r.series("web1", 10_000)["seconds"] == 60  # never more than the window


@pytest.mark.timeout(10)
def test_old_seconds_are_forgotten() -> None:
    clock = Clock(0.0)
    r = Rates(window=10, clock=clock)
    for t in range(200):
        clock.now = float(t)
        r.add("vm", "syscall", float(t))
    s = r.series("vm", 10)
    assert s["kinds"]["syscall"] == [1] * 10 and s["total"] == 10
    assert len(r._counts["vm"]["syscall"]) <= 10 + 60 + 1
