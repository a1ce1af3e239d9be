"""A bounded, thread-safe FIFO whose items leave only when their delivery is confirmed.

Producers (any thread) :meth:`Spool.put`; one consumer takes a batch off the head with
:meth:`Spool.peek`, delivers it, then :meth:`Spool.settle` removes the delivered items and keeps the
failed ones at the head, in their order, for the next attempt. Items in flight still count against
the limit, so the spool bounds memory however long the broker is away.

When the spool is full a new item is refused (``put`` returns False, ``dropped`` counts it): the
items already spooled keep their order and none that may be in flight is thrown away. The bus is a
copy of what the service's own store holds, so a refused event is missing from the bus, not lost.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from aradia.errors import AradiaError

T = TypeVar("T")


class Spool(Generic[T]):
    """Bounded FIFO of at most ``limit`` items; ``on_put`` runs (outside the lock) after a put that
    found the spool empty, so a sleeping consumer can be woken once, not once per item."""

    def __init__(self, limit: int, on_put: Callable[[], None] | None = None) -> None:
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise AradiaError(f"spool limit must be a positive integer, not {limit!r}")
        self.limit = limit
        self._items: deque[T] = deque()
        self._lock = threading.Lock()
        self._on_put = on_put
        self._waiting = True
        self.dropped = 0
        self.high_water = 0

    def put(self, item: T) -> bool:
        """Append ``item``; False (and ``dropped`` + 1) if the spool is full. Never blocks for long."""
        with self._lock:
            if len(self._items) >= self.limit:
                self.dropped += 1
                return False
            self._items.append(item)
            n = len(self._items)
            if n > self.high_water:
                self.high_water = n
            wake, self._waiting = self._waiting, False
        if wake and self._on_put is not None:
            self._on_put()
        return True

    def peek(self, n: int) -> list[T]:
        """Up to ``n`` items from the head, left in the spool; with none, the next put wakes ``on_put``."""
        with self._lock:
            if not self._items:
                self._waiting = True
                return []
            return list(itertools.islice(self._items, n))

    def settle(self, taken: int, failed: list[T]) -> None:
        """Remove the ``taken`` head items of the last :meth:`peek`; put ``failed`` (a subsequence of
        them, in order) back at the head."""
        with self._lock:
            for _ in range(taken):
                self._items.popleft()
            self._items.extendleft(reversed(failed))

    def __len__(self) -> int:
        """Items spooled now, in flight included."""
        return len(self._items)
