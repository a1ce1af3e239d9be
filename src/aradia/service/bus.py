"""The service's NATS JetStream bus: every event record out to the stream, commands in, the fleet view.

* :class:`EventBus` publishes each record to ``aradia.events.<host>.<vm>.<kind>`` on the stream
  :data:`STREAM` (which it creates), header ``Nats-Msg-Id`` = the record's id. :meth:`EventBus.publish`
  only spools (thread-safe, never blocks, never raises for broker trouble); a task on the loop drains
  the spool in order, a batch of publishes in flight at once (nats-py's ``publish_async``), and a
  record leaves the spool only once JetStream acked it.
  A broker outage (down at start, killed, restarting) fills the bounded spool, which drains
  once the broker is back; the duplicate window stores a record that was sent twice (ack lost in the
  outage, then retried) once. A full spool refuses the newest record and counts it ``dropped``.
* :meth:`EventBus.serve_commands` answers ``aradia.cmd.<host>.<vm>`` requests (JSON objects, the token
  inside) with the handler's reply: the same operations and policy as the HTTP API. :func:`request` is
  the client side.
* :class:`~aradia.service.aggregate.Aggregator` (re-exported here) consumes every host's records into
  an event store: ``aradia serve --aggregate``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, NamedTuple

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from aradia.service.aggregate import Aggregator
from aradia.service.jetstream import (
    COMMANDS_PREFIX,
    STREAM,
    BusError,
    close_quietly,
    command_subject,
    connect_forever,
    ensure_stream,
    event_subject,
)
from aradia.service.schema import NAME_RE
from aradia.service.spool import Spool

__all__ = ["STREAM", "Aggregator", "BusError", "CommandHandler", "EventBus", "command_subject",
           "event_subject", "request"]

#: the largest command request accepted, and the largest record published (the broker's default
#: max_payload is 1 MiB; a record is refused before it could block the spool)
MAX_COMMAND_BYTES = 64 * 1024
MAX_RECORD_BYTES = 1024 * 1024 - 4096
#: command requests answered at once (each waits on the handler)
COMMAND_CONCURRENCY = 32

CommandHandler = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


class _Pending(NamedTuple):
    id: str
    subject: str
    data: bytes


def _error_reply(status: int, error: str) -> dict[str, Any]:
    return {"ok": False, "status": status, "error": error}


class EventBus:
    """Publishes event records to JetStream; serves commands. Runs on an asyncio loop.

    ``batch`` publishes are in flight at once, each awaiting its PubAck for at most ``ack_timeout``
    seconds; a failed one is retried (``retries`` counts retries) until acked. ``start_wait`` bounds
    how long :meth:`start` waits for a broker that is away.
    """

    def __init__(self, url: str, host: str, *, stream: str = STREAM, spool_limit: int = 100_000,
                 log: logging.Logger | None = None, batch: int = 1024, ack_timeout: float = 5.0,
                 reconnect_wait: float = 0.5, start_wait: float = 2.0, max_age: float | None = None,
                 max_bytes: int | None = None) -> None:
        if not isinstance(host, str) or not NAME_RE.match(host):
            raise BusError(f"host {host!r} is not a name ([A-Za-z0-9_-]{{1,64}})")
        if not isinstance(batch, int) or batch < 1:
            raise BusError(f"batch must be a positive integer, not {batch!r}")
        self.url, self.host, self.stream = url, host, stream
        self._max_age, self._max_bytes = max_age, max_bytes  # the stream's retention, when configured
        self.log = log or logging.getLogger("aradia.service.bus")
        self._batch, self._ack_timeout = batch, ack_timeout
        self._reconnect_wait, self._start_wait = reconnect_wait, start_wait
        self._spool: Spool[_Pending] = Spool(spool_limit, self._wake_threadsafe)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._connected: asyncio.Event | None = None
        self._ready: asyncio.Event | None = None
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._runner: asyncio.Task[None] | None = None
        self._commands: tuple[frozenset[str], CommandHandler] | None = None
        self._command_sub: Subscription | None = None
        self._command_slots = asyncio.Semaphore(COMMAND_CONCURRENCY)
        self._command_tasks: set[asyncio.Task[None]] = set()
        self._count_lock = threading.Lock()
        self._published = self._retries = self._duplicates = self._rejected = self._commands_answered = 0
        self._last_error: str | None = None
        self._closing = False

    # -- publishing ------------------------------------------------------------------------------

    def publish(self, record: dict[str, Any]) -> None:
        """Spool ``record`` for the stream. Thread-safe, never blocks, never raises for broker trouble.

        A full spool refuses the record (``dropped``); a record larger than the broker takes is refused
        and logged (``rejected``). A record that is not an event record (no string ``id``, a host or
        vm that is not a name, not JSON-serialisable) raises :class:`BusError`: that is a bug upstream.
        """
        subject = event_subject(record)
        rid = record.get("id")
        if not isinstance(rid, str) or not rid:
            raise BusError("an event record needs a non-empty string id (the bus's Nats-Msg-Id)")
        try:
            data = json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode()
        except (TypeError, ValueError) as e:
            raise BusError(f"event record {rid} is not JSON: {e}") from e
        if len(data) > MAX_RECORD_BYTES:
            with self._count_lock:
                self._rejected += 1
            self.log.warning("event %s is %d bytes, more than the bus takes (%d): not published",
                             rid, len(data), MAX_RECORD_BYTES)
            return
        self._spool.put(_Pending(rid, subject, data))

    def _wake_threadsafe(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is None or wake is None or loop.is_closed():
            return          # not started (or gone): start() drains what is spooled
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            wake.set()
        else:
            with contextlib.suppress(RuntimeError):     # the loop closed in between
                loop.call_soon_threadsafe(wake.set)

    async def start(self) -> None:
        """Connect and make sure the stream exists; returns after ``start_wait`` s if the broker is away
        (records spool, a task keeps connecting; ``stats()["connected"]`` tells)."""
        if self._runner is not None:
            raise BusError("EventBus.start() was already called")
        self._loop = asyncio.get_running_loop()
        self._wake, self._connected, self._ready = asyncio.Event(), asyncio.Event(), asyncio.Event()
        self._wake.set()                    # records spooled before start
        self._runner = asyncio.create_task(self._run(), name=f"aradia-bus-{self.host}")
        try:
            await asyncio.wait_for(asyncio.shield(self._ready.wait()), self._start_wait)
        except TimeoutError:
            if self._runner.done():
                self._runner.result()       # a bug in _run: let it show
            self.log.warning("NATS broker %s not reachable yet: events spool until it is", self.url)

    async def _run(self) -> None:
        assert self._connected is not None and self._ready is not None
        self._nc = await connect_forever(self.url, name=f"aradia-{self.host}", log=self.log,
                                         reconnect_wait=self._reconnect_wait,
                                         connect_timeout=max(1.0, min(self._start_wait, 5.0)),
                                         on_disconnect=self._on_disconnect, on_reconnect=self._on_reconnect)
        self._js = self._nc.jetstream(timeout=self._ack_timeout)
        await self._ensure_stream()
        self._connected.set()
        if self._commands is not None:
            await self._subscribe_commands()
        self._ready.set()
        self.log.info("bus: connected to %s, stream %s", self.url, self.stream)
        await self._drain_forever()

    async def _ensure_stream(self) -> None:
        assert self._js is not None
        while True:
            try:
                await ensure_stream(self._js, self.stream, max_age=self._max_age, max_bytes=self._max_bytes)
                return
            except (nats.errors.Error, TimeoutError, OSError) as e:
                self._note_error(f"creating stream {self.stream}: {type(e).__name__}: {e}")
                await asyncio.sleep(self._reconnect_wait)

    async def _on_disconnect(self) -> None:
        if self._connected is not None:
            self._connected.clear()
        if not self._closing:
            self.log.warning("bus: lost the NATS broker %s; events spool", self.url)

    async def _on_reconnect(self) -> None:
        if self._connected is not None:
            self._connected.set()
        if self._wake is not None:
            self._wake.set()
        self.log.info("bus: reconnected to %s", self.url)

    def _note_error(self, text: str) -> None:
        if text != self._last_error:
            self.log.warning("bus: %s", text)
        self._last_error = text

    async def _drain_forever(self) -> None:
        assert self._wake is not None and self._connected is not None
        while True:
            self._wake.clear()
            items = self._spool.peek(self._batch)
            if not items:
                await self._wake.wait()
                continue
            await self._connected.wait()
            await self._send(items)

    async def _send(self, items: list[_Pending]) -> None:
        """Publish ``items`` all at once, then await their acks (at most ``ack_timeout`` s); acked ones
        leave the spool, the others stay at its head, in order, for the next attempt."""
        js = self._js
        assert js is not None
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Any]] = []
        for p in items:
            try:
                futures.append(await js.publish_async(p.subject, p.data, headers={"Nats-Msg-Id": p.id}))
            except Exception as e:      # the connection went away under us: this one failed
                failed_now: asyncio.Future[Any] = loop.create_future()
                failed_now.set_exception(e)
                futures.append(failed_now)
        _done, late = await asyncio.wait(futures, timeout=self._ack_timeout)
        for f in late:
            f.cancel()          # also frees its slot in nats-py's pending-acks semaphore
        results = [TimeoutError(f"no PubAck within {self._ack_timeout} s") if f.cancelled() else
                   (f.exception() or f.result()) for f in futures]
        failed: list[_Pending] = []
        acked = duplicates = 0
        missing_stream = False
        for p, r in zip(items, results, strict=True):
            if not isinstance(r, BaseException):
                acked += 1
                duplicates += bool(r.duplicate)
            elif isinstance(r, asyncio.CancelledError):
                failed.append(p)
            elif isinstance(r, nats.errors.MaxPayloadError) or (
                    isinstance(r, nats.js.errors.APIError) and r.code is not None and 400 <= r.code < 500):
                with self._count_lock:
                    self._rejected += 1     # the broker will never take it: do not block the spool
                self.log.warning("bus: event %s refused by the broker: %s", p.id, r)
            else:
                failed.append(p)
                missing_stream |= isinstance(r, nats.js.errors.NoStreamResponseError)
                self._note_error(f"{type(r).__name__}: {r}")
        self._spool.settle(len(items), failed)
        self._published += acked
        self._duplicates += duplicates
        if failed:
            self._retries += len(failed)
            if missing_stream and self._nc is not None and self._nc.is_connected:
                await self._ensure_stream()     # a broker with a fresh store
            await asyncio.sleep(min(self._reconnect_wait, 0.2))

    async def flush(self, timeout: float = 10.0) -> None:
        """Wait until every spooled record is acked; :class:`BusError` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while len(self._spool):
            if time.monotonic() > deadline:
                raise BusError(f"bus flush: {len(self._spool)} records still unacked after {timeout} s "
                               f"(broker {self.url} {'up' if self.connected else 'away'})")
            if self._runner is not None and self._runner.done():
                self._runner.result()
                raise BusError("the bus is closed")
            await asyncio.sleep(0.005)

    @property
    def connected(self) -> bool:
        """Whether the broker is reachable now (and the stream was set up)."""
        ready = self._ready is not None and self._ready.is_set()
        return ready and self._nc is not None and self._nc.is_connected

    def stats(self) -> dict[str, Any]:
        """Counters: connected, published (acked), spooled (now), spool_high (most at once), dropped
        (spool full), rejected (too large / refused), retries, duplicates (the broker had the id already),
        commands (answered), last_error."""
        return {"connected": self.connected, "published": self._published, "spooled": len(self._spool),
                "spool_high": self._spool.high_water, "spool_limit": self._spool.limit,
                "dropped": self._spool.dropped, "rejected": self._rejected, "retries": self._retries,
                "duplicates": self._duplicates, "commands": self._commands_answered,
                "last_error": self._last_error}

    async def close(self, timeout: float = 5.0) -> None:
        """Flush for at most ``timeout`` s (records still spooled are logged as lost), then drain, close."""
        if self._runner is None:
            return
        if self.connected:
            try:
                await self.flush(timeout)
            except BusError as e:
                self.log.warning("bus: closing with %d records unpublished: %s", len(self._spool), e)
        elif len(self._spool):
            self.log.warning("bus: closing with %d records unpublished (broker away)", len(self._spool))
        self._closing = True
        self._runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._runner
        for task in list(self._command_tasks):
            task.cancel()
        await close_quietly(self._nc, timeout)

    # -- commands --------------------------------------------------------------------------------

    async def serve_commands(self, vms: Iterable[str], handler: CommandHandler) -> None:
        """Answer requests on ``aradia.cmd.<host>.<vm>`` for each of ``vms`` with ``handler(vm, request)``.

        The request is a JSON object of at most :data:`MAX_COMMAND_BYTES` (else 413); not JSON or not
        an object: 400; a VM not in ``vms``: 404; the handler raising: 500 (logged, the subscription
        lives on). Replies are JSON objects; errors are ``{"ok": false, "status": N, "error": "..."}``.
        Called again, it replaces the VMs and the handler. Before the broker was reached, it subscribes
        once it is.
        """
        names = frozenset(vms)
        bad = sorted(v for v in names if not isinstance(v, str) or not NAME_RE.match(v))
        if bad:
            raise BusError(f"VM names {bad!r} are not names ([A-Za-z0-9_-]{{1,64}})")
        self._commands = (names, handler)
        if self._nc is not None and self._ready is not None and self._ready.is_set():
            await self._subscribe_commands()

    async def _subscribe_commands(self) -> None:
        assert self._nc is not None
        if self._command_sub is None:
            self._command_sub = await self._nc.subscribe(f"{COMMANDS_PREFIX}.{self.host}.*",
                                                         cb=self._on_command)
            await self._nc.flush()

    async def _on_command(self, msg: Msg) -> None:
        if not msg.reply:
            return          # a publish, not a request: nobody to answer
        task = asyncio.create_task(self._answer(msg))
        self._command_tasks.add(task)
        task.add_done_callback(self._command_tasks.discard)

    async def _answer(self, msg: Msg) -> None:
        async with self._command_slots:
            vm = msg.subject.rsplit(".", 1)[-1]
            reply = await self._command_reply(vm, msg.data)
            try:
                data = json.dumps(reply, separators=(",", ":")).encode()
            except (TypeError, ValueError) as e:
                self.log.error("bus: reply to a command on %s is not JSON: %s", msg.subject, e)
                data = json.dumps(_error_reply(500, "internal error: reply is not JSON")).encode()
            try:
                await msg.respond(data)
                self._commands_answered += 1
            except Exception as e:      # a reply too large, the broker gone: the requester times out
                self.log.warning("bus: cannot answer command on %s: %s: %s", msg.subject, type(e).__name__, e)
                with contextlib.suppress(Exception):
                    await msg.respond(json.dumps(_error_reply(500, f"cannot send reply: {e}")).encode())

    async def _command_reply(self, vm: str, data: bytes) -> dict[str, Any]:
        if self._commands is None:
            return _error_reply(503, "commands are not served")
        vms, handler = self._commands
        if vm not in vms:
            return _error_reply(404, f"no VM {vm!r} on host {self.host!r}")
        if len(data) > MAX_COMMAND_BYTES:
            return _error_reply(413, f"command is {len(data)} bytes, at most {MAX_COMMAND_BYTES} allowed")
        try:
            message = json.loads(data)
        except (UnicodeDecodeError, ValueError) as e:
            return _error_reply(400, f"command is not JSON: {e}")
        if not isinstance(message, dict):
            return _error_reply(400, "a command is a JSON object")
        try:
            reply = await handler(vm, message)
        except Exception as e:
            self.log.exception("bus: command handler failed on %s/%s", self.host, vm)
            return _error_reply(500, f"internal error: {type(e).__name__}")
        if not isinstance(reply, dict):
            self.log.error("bus: command handler returned %s, not a dict", type(reply).__name__)
            return _error_reply(500, "internal error: handler reply is not an object")
        return reply


async def request(url: str, host: str, vm: str, message: dict[str, Any], *,
                  timeout: float = 10.0) -> dict[str, Any]:
    """Send ``message`` (the token inside) to the service of ``host`` for VM ``vm``; its JSON reply.

    :class:`BusError` if the broker cannot be reached, no service answers that subject, the answer
    takes longer than ``timeout`` seconds, the message is too large or the reply is not a JSON object.
    """
    subject = command_subject(host, vm)
    if not isinstance(message, dict):
        raise BusError("a command is a dict (a JSON object)")
    try:
        data = json.dumps(message, separators=(",", ":")).encode()
    except (TypeError, ValueError) as e:
        raise BusError(f"command is not JSON-serialisable: {e}") from e
    if len(data) > MAX_COMMAND_BYTES:
        raise BusError(f"command is {len(data)} bytes, at most {MAX_COMMAND_BYTES} allowed")

    async def quiet(_exc: Exception) -> None:
        return None

    # nats-py retries a refused first connection in a loop whatever allow_reconnect says: bound it
    nc = Client()
    connect_timeout = max(1.0, min(timeout, 5.0))
    try:
        await asyncio.wait_for(nc.connect(url, allow_reconnect=False, max_reconnect_attempts=1,
                                          reconnect_time_wait=0.2, connect_timeout=connect_timeout,
                                          error_cb=quiet), connect_timeout)
    except Exception as e:
        await close_quietly(nc, 1.0)
        raise BusError(f"cannot reach the NATS broker {url}: {str(e) or type(e).__name__}") from e
    try:
        answer = await nc.request(subject, data, timeout=timeout)
    except nats.errors.NoRespondersError:
        raise BusError(f"no aradia service answers on {subject}") from None
    except (nats.errors.TimeoutError, TimeoutError):
        raise BusError(f"no answer on {subject} within {timeout} s") from None
    finally:
        await close_quietly(nc)
    try:
        reply = json.loads(answer.data)
    except ValueError as e:
        raise BusError(f"the answer on {subject} is not JSON: {e}") from e
    if not isinstance(reply, dict):
        raise BusError(f"the answer on {subject} is not a JSON object")
    return reply
