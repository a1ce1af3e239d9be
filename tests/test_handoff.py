"""The tracer's hand-off lock: a thread adding or removing probes gets the next turn of the event loop."""

from __future__ import annotations

import threading
import time

import pytest

from aradia.trace.tracer import HandOffLock

pytestmark = pytest.mark.timeout(60)


def _loop(lock: HandOffLock, slices: list[int], stop: threading.Event, hand_off: bool) -> None:
    """The event loop's shape: hold the lock for a wait slice, release, take it again at once."""
    while not stop.is_set():
        with lock:
            time.sleep(0.05)  # a wait slice (the tracer's are 0.25 s)
            slices[0] += 1
        if hand_off:
            lock.yield_to_waiters()


def _turns(hand_off: bool, rounds: int = 20) -> list[int]:
    """For each request of another thread: how many slices the loop completed before it got the lock."""
    lock, slices, stop = HandOffLock(), [0], threading.Event()
    loop = threading.Thread(target=_loop, args=(lock, slices, stop, hand_off), daemon=True)
    loop.start()
    waited = []
    try:
        for _ in range(rounds):
            time.sleep(0.02)
            asked = slices[0]
            with lock:
                waited.append(slices[0] - asked)
    finally:
        stop.set()
        loop.join(5)
    return waited


def test_a_waiting_thread_gets_the_lock_after_the_current_slice() -> None:
    # at most the slice in progress when it asked completes first
    assert max(_turns(hand_off=True)) <= 1


def test_without_the_hand_off_a_waiting_thread_misses_slices() -> None:
    """The reason for the lock: the loop re-takes a plain release before a waiter wakes."""
    assert max(_turns(hand_off=False)) >= 2


def test_reentrant_for_the_owner_and_exclusive_for_others() -> None:
    lock = HandOffLock()
    got = threading.Event()
    with lock, lock:  # the event loop arms hooks while it holds the lock
        t = threading.Thread(target=lambda: (lock.__enter__(), got.set(), lock.__exit__()))
        t.start()
        assert not got.wait(0.2)
    assert got.wait(5)
    t.join(5)
