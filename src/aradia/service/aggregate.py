"""The fleet view: every host's event records, consumed from the stream into one event store.

``aradia serve --aggregate`` runs an :class:`Aggregator` and serves the usual API, read-only, over the
store it fills. No-loss rule: a message is acked on the bus only once its record is committed in the
store (``store.flush()`` returned); a crash in between means a redelivery, and the store ignores a
second copy of an id.

Hostile input: a message that is not JSON, not a well-formed record (:func:`check_record`), or whose
host/vm/kind disagree with its subject is counted ``invalid``, logged, acked and dropped. With NATS
permissions letting each host publish only to ``aradia.events.<its name>.>``, the subject check means
no host can write records in another host's name.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from aradia.service.jetstream import (
    EVENTS_PREFIX,
    STREAM,
    BusError,
    close_quietly,
    connect_forever,
    ensure_stream,
    kind_token,
)
from aradia.service.schema import check_record

if TYPE_CHECKING:
    from aradia.service.store import EventStore

#: how long the broker waits for an ack before it redelivers (a store flush takes far less)
ACK_WAIT = 60.0


class Aggregator:
    """Consumes every host's events from the stream into an EventStore (fleet view).

    A durable pull consumer ``durable`` on ``stream``: restarted, the aggregator continues where it
    acked last. Messages come in batches of ``batch``; the store is called from one thread of its own.
    """

    def __init__(self, url: str, store: EventStore, *, stream: str = STREAM,
                 durable: str = "aradia-aggregate", log: logging.Logger | None = None,
                 batch: int = 500, reconnect_wait: float = 0.5, start_wait: float = 2.0,
                 on_stored: Callable[[dict[str, Any]], None] | None = None) -> None:
        if not isinstance(batch, int) or batch < 1:
            raise BusError(f"batch must be a positive integer, not {batch!r}")
        self.url, self.store, self.stream, self.durable = url, store, stream, durable
        self.log = log or logging.getLogger("aradia.service.aggregate")
        self._batch, self._reconnect_wait, self._start_wait = batch, reconnect_wait, start_wait
        #: called with each record once it is committed (the aggregate's live subscribers, its rates)
        self.on_stored = on_stored
        self._store_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="aradia-aggregate")
        self._nc: Client | None = None
        self._ready: asyncio.Event | None = None
        self._runner: asyncio.Task[None] | None = None
        self._consumed = self._acked = self._invalid = self._stored = self._refused = 0
        self._lag: int | None = None
        self._last_error: str | None = None

    async def start(self) -> None:
        """Connect and bind the durable consumer; returns after ``start_wait`` s if the broker is away
        (a task keeps trying)."""
        if self._runner is not None:
            raise BusError("Aggregator.start() was already called")
        self._ready = asyncio.Event()
        self._runner = asyncio.create_task(self._run(), name="aradia-aggregate")
        try:
            await asyncio.wait_for(asyncio.shield(self._ready.wait()), self._start_wait)
        except TimeoutError:
            if self._runner.done():
                self._runner.result()
            self.log.warning("aggregate: NATS broker %s not reachable yet", self.url)

    async def _run(self) -> None:
        assert self._ready is not None

        async def nothing() -> None:
            return None

        self._nc = await connect_forever(self.url, name="aradia-aggregate", log=self.log,
                                         reconnect_wait=self._reconnect_wait,
                                         connect_timeout=max(1.0, min(self._start_wait, 5.0)),
                                         on_disconnect=nothing, on_reconnect=nothing)
        js = self._nc.jetstream()
        while True:
            try:
                sub = await self._subscribe(js)
            except (nats.errors.Error, TimeoutError, OSError) as e:
                self._note_error(f"binding consumer {self.durable}: {type(e).__name__}: {e}")
                await asyncio.sleep(self._reconnect_wait)
                continue
            self._ready.set()
            try:
                await self._consume(sub)
            except (nats.errors.Error, TimeoutError, OSError) as e:
                self._note_error(f"fetching: {type(e).__name__}: {e}")
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
                await asyncio.sleep(self._reconnect_wait)

    async def _subscribe(self, js: JetStreamContext) -> JetStreamContext.PullSubscription:
        await ensure_stream(js, self.stream)
        config = ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
                                ack_wait=ACK_WAIT, max_ack_pending=max(10_000, 4 * self._batch),
                                description="aradia serve --aggregate")
        return await js.pull_subscribe(f"{EVENTS_PREFIX}.>", durable=self.durable, stream=self.stream,
                                       config=config)

    async def _consume(self, sub: JetStreamContext.PullSubscription) -> None:
        loop = asyncio.get_running_loop()
        misses = 0
        while True:
            try:
                msgs = await sub.fetch(self._batch, timeout=1.0)
            except (nats.errors.TimeoutError, TimeoutError):     # nats-py raises either
                self._lag = 0          # nothing waiting
                misses += 1
                if misses >= 30 and self._nc is not None and self._nc.is_connected:
                    return          # rebind now and then: the consumer may be gone (a fresh broker store)
                continue
            misses = 0
            records = [self._record(m) for m in msgs]
            try:
                taken, stored, invalid = await loop.run_in_executor(self._store_thread, self._commit, records)
            except Exception as e:      # the store failed: no ack, the broker redelivers
                self._note_error(f"store: {type(e).__name__}: {e}")
                taken, stored, invalid = [False] * len(msgs), 0, 0
            self._stored += stored
            self._invalid += invalid
            for m, ok in zip(msgs, taken, strict=True):
                if ok:
                    await m.ack()
                else:               # not in the store (its queue full, or it failed): again later
                    with contextlib.suppress(Exception):
                        await m.nak(delay=self._reconnect_wait)
            acked = sum(taken)
            self._acked += acked
            self._refused += len(msgs) - acked
            if acked < len(msgs):
                await asyncio.sleep(self._reconnect_wait)
            with contextlib.suppress(Exception):
                self._lag = msgs[-1].metadata.num_pending

    def _record(self, msg: Msg) -> dict[str, Any] | None:
        """The record ``msg`` carries, or None (counted ``invalid``, logged) if it is not a valid one."""
        self._consumed += 1
        try:
            record = check_record(json.loads(msg.data))
            parts = msg.subject.split(".")
            if (len(parts) != 5 or parts[2] != record["host"] or parts[3] != record["vm"]
                    or parts[4] != kind_token(record["kind"])):
                raise ValueError(f"record of {record['host']}/{record['vm']}/{record['kind']} "
                                 f"on subject {msg.subject}")
        except (ValueError, UnicodeDecodeError) as e:
            self._invalid += 1
            if self._invalid <= 10 or self._invalid % 1000 == 0:
                self.log.warning("aggregate: invalid record #%d on %s dropped: %s", self._invalid,
                                 msg.subject, e)
            return None
        return record

    def _commit(self, records: list[dict[str, Any] | None]) -> tuple[list[bool], int, int]:
        """Append ``records`` (None: an invalid one, acked without storing) and commit them; runs on
        the store's thread. Per record, whether it may be acked: False where the store refused it
        (``append`` False: its queue is full), so that message comes again; then how many records
        were stored and how many the store found invalid."""
        taken: list[bool] = []
        stored = invalid = 0
        for r in records:
            if r is None:
                taken.append(True)
                continue
            try:
                ok = self.store.append(r)
            except ValueError as e:     # the store is stricter than check_record (64-bit ints, ...)
                invalid += 1
                self.log.warning("aggregate: record %s refused by the store: %s", r.get("id"), e)
                ok = True
            else:
                stored += ok
            taken.append(ok)
        self.store.flush()
        if self.on_stored is not None:
            for r, ok in zip(records, taken, strict=True):
                if r is not None and ok:
                    try:
                        self.on_stored(r)
                    except Exception:  # a subscriber's trouble never holds the stream
                        self.log.exception("aggregate: on_stored failed")
        return taken, stored, invalid

    def _note_error(self, text: str) -> None:
        if text != self._last_error:
            self.log.warning("aggregate: %s", text)
        self._last_error = text

    def stats(self) -> dict[str, Any]:
        """Counters: connected, consumed (messages, redeliveries included), acked, invalid (records
        refused: not JSON, malformed, subject mismatch), stored (committed in the store; a copy of an id
        it has counts too, the store ignores it), refused (the store did not take it: redelivered),
        lag (messages left for this consumer after the last batch; None before the first), last_error."""
        return {"connected": self._nc is not None and self._nc.is_connected, "consumed": self._consumed,
                "acked": self._acked, "invalid": self._invalid, "stored": self._stored,
                "refused": self._refused, "lag": self._lag, "last_error": self._last_error}

    async def close(self) -> None:
        """Stop consuming and close the connection. A batch not acked yet comes again to the next
        aggregator on this durable (the store ignores the copies)."""
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        await close_quietly(self._nc, drain=False)      # the acks sent, then closed
        self._store_thread.shutdown(wait=True)
