"""Live event subscribers (WebSocket and SSE clients): filters, bounded queues, routing from tracers.

Tracers run in their own threads; :meth:`LiveHub.route` is called there and hands each record to the
subscribers' asyncio loop. A subscriber that does not keep up loses events (counted and told), never
the guest: the tracer is never blocked by a slow client.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
from dataclasses import dataclass, field
from typing import Any

from aradia.service.policy import TooManyRequests

QUEUE_LIMIT = 10_000


@dataclass
class LiveFilter:
    """Which live events a subscriber wants (None: any)."""

    kinds: set[str] | None = None
    names: set[str] | None = None
    pids: set[int] | None = None
    comms: set[str] | None = None
    uids: set[int] | None = None
    traces: set[str] | None = None
    text: str | None = None

    def keep(self, record: dict[str, Any], trace_ids: list[str]) -> bool:
        """Whether ``record`` (belonging to ``trace_ids``) passes; a ``migrated`` marker passes every
        filter but the traces one (a subscriber learns that its VM moved, whatever it asked for)."""
        if record["kind"] == "migrated":
            return self.traces is None or bool(self.traces.intersection(trace_ids))
        if self.kinds is not None and record["kind"] not in self.kinds:
            return False
        if self.names is not None and record["name"] not in self.names:
            return False
        if self.pids is not None and record["pid"] not in self.pids and record["tgid"] not in self.pids:
            return False
        if self.comms is not None and record["comm"] not in self.comms:
            return False
        if self.uids is not None and record["uid"] not in self.uids:
            return False
        if self.traces is not None and not self.traces.intersection(trace_ids):
            return False
        if self.text:
            needle = self.text.lower()
            hay = f"{record['comm']}\n{record['name']}\n{json.dumps(record['args'])}".lower()
            if needle not in hay:
                return False
        return True


@dataclass(eq=False)
class Subscriber:
    """One live client on one VM."""

    id: int
    principal: str
    vm: str
    filter: LiveFilter
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=lambda: asyncio.Queue(QUEUE_LIMIT))
    dropped: int = 0
    delivered: int = 0

    def take_dropped(self) -> int:
        """Events lost since the last call (the client is told how many)."""
        n, self.dropped = self.dropped, 0
        return n


class LiveHub:
    """Every live subscriber of the service."""

    def __init__(self, *, max_per_principal: int = 64) -> None:
        self.max_per_principal = max_per_principal
        self._subs: dict[int, Subscriber] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.routed = 0
        self.dropped = 0

    def subscribe(self, principal: str, vm: str, flt: LiveFilter) -> Subscriber:
        """A new subscriber on the running loop (:class:`TooManyRequests` past the per-principal limit)."""
        with self._lock:
            mine = sum(1 for s in self._subs.values() if s.principal == principal)
            if mine >= self.max_per_principal:
                raise TooManyRequests(f"{principal} has {mine} live subscribers, the limit is "
                                      f"{self.max_per_principal}")
            sub = Subscriber(next(self._ids), principal, vm, flt, asyncio.get_running_loop())
            self._subs[sub.id] = sub
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        """Forget a subscriber."""
        with self._lock:
            self._subs.pop(sub.id, None)

    def route(self, record: dict[str, Any], trace_ids: list[str]) -> None:
        """Hand ``record`` to every subscriber of its VM whose filter it passes (any thread)."""
        with self._lock:
            targets = [s for s in self._subs.values()
                       if s.vm == record["vm"] and s.filter.keep(record, trace_ids)]
        self.routed += 1
        for sub in targets:
            with contextlib.suppress(RuntimeError):  # the loop closed: the subscriber is going away
                sub.loop.call_soon_threadsafe(self._put, sub, record)

    def _put(self, sub: Subscriber, record: dict[str, Any]) -> None:
        try:
            sub.queue.put_nowait(record)
            sub.delivered += 1
        except asyncio.QueueFull:
            sub.dropped += 1
            self.dropped += 1

    def stats(self) -> dict[str, int]:
        """Subscribers, events routed, events a slow subscriber lost."""
        with self._lock:
            n = len(self._subs)
        return {"subscribers": n, "routed": self.routed, "dropped": self.dropped}
