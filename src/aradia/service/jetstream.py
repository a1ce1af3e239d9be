"""The bus's names and its one stream: subjects, the stream's configuration, a connection that waits.

Subjects (every token is a safe NATS token: host and VM names match :data:`~aradia.service.schema.NAME_RE`,
the event kind is sanitised to ``[A-Za-z0-9_-]``)::

    aradia.events.<host>.<vm>.<kind>     every event record, JSON, header Nats-Msg-Id = record["id"]
    aradia.cmd.<host>.<vm>               commands, request/reply, JSON both ways

The stream :data:`STREAM` holds ``aradia.events.>`` on file storage with a duplicate window, so a
publish retried with the same ``Nats-Msg-Id`` (after a lost ack, a reconnect) is stored once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig

from aradia.errors import AradiaError
from aradia.service.schema import NAME_RE

STREAM = "ARADIA_EVENTS"
EVENTS_PREFIX = "aradia.events"
COMMANDS_PREFIX = "aradia.cmd"
#: a retried publish with the same Nats-Msg-Id inside this window is stored once
DUPLICATE_WINDOW = 120.0
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


class BusError(AradiaError):
    """The bus was misused or its broker did not answer (a command without responder, a flush timeout)."""


def _name(what: str, value: Any) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise BusError(f"{what} {value!r} is not a name ([A-Za-z0-9_-]{{1,64}}): not a subject token")
    return value


def kind_token(kind: Any) -> str:
    """``kind`` as a safe subject token: characters outside ``[A-Za-z0-9_-]`` become ``_``, at most 64."""
    token = _UNSAFE.sub("_", str(kind))[:64]
    return token or "_"


def event_subject(record: dict[str, Any]) -> str:
    """``aradia.events.<host>.<vm>.<kind>`` of an event record (:class:`BusError` on a bad host or vm)."""
    if not isinstance(record, dict):
        raise BusError("an event record is a dict")
    host = _name("event host", record.get("host"))
    vm = _name("event vm", record.get("vm"))
    return f"{EVENTS_PREFIX}.{host}.{vm}.{kind_token(record.get('kind'))}"


def command_subject(host: str, vm: str) -> str:
    """``aradia.cmd.<host>.<vm>``: where the service of ``host`` answers commands for its VM ``vm``."""
    return f"{COMMANDS_PREFIX}.{_name('host', host)}.{_name('vm', vm)}"


def stream_config(name: str = STREAM, *, max_age: float | None = None,
                  max_bytes: int | None = None) -> StreamConfig:
    """The configuration the service gives the events stream (limits retention, file storage; the
    oldest events go past ``max_age`` seconds or ``max_bytes``)."""
    return StreamConfig(name=name, subjects=[f"{EVENTS_PREFIX}.>"], retention=RetentionPolicy.LIMITS,
                        storage=StorageType.FILE, duplicate_window=DUPLICATE_WINDOW,
                        max_age=max_age, max_bytes=max_bytes,
                        description="aradia event records (aradia.service.bus)")


async def ensure_stream(js: JetStreamContext, name: str = STREAM, *, max_age: float | None = None,
                        max_bytes: int | None = None) -> None:
    """Create the events stream, or accept an existing one (adding our subjects or a duplicate window
    to it if it lacks them; its limits are the operator's unless ``max_age``/``max_bytes`` are given,
    which are then set)."""
    wanted = stream_config(name, max_age=max_age, max_bytes=max_bytes)
    try:
        info = await js.stream_info(name)
    except nats.js.errors.NotFoundError:
        try:
            await js.add_stream(wanted)
            return
        except nats.js.errors.BadRequestError:
            info = await js.stream_info(name)   # another service created it a moment ago
    have = info.config
    subjects = list(have.subjects or [])
    missing = [s for s in wanted.subjects or [] if s not in subjects]
    limits: dict[str, Any] = {}
    if max_age is not None and have.max_age != max_age:
        limits["max_age"] = max_age
    if max_bytes is not None and have.max_bytes != max_bytes:
        limits["max_bytes"] = max_bytes
    if missing or not have.duplicate_window or limits:
        await js.update_stream(have.evolve(subjects=subjects + missing,
                                           duplicate_window=have.duplicate_window or DUPLICATE_WINDOW,
                                           **limits))


Callback = Callable[[], Awaitable[None]]


async def connect_forever(url: str, *, name: str, log: logging.Logger, reconnect_wait: float,
                          connect_timeout: float, on_disconnect: Callback, on_reconnect: Callback) -> Client:
    """A NATS connection that reconnects forever; it returns once the broker first answered.

    Waits as long as the broker is away (the caller runs it in a task); every failure is logged once
    per kind, not once per attempt.
    """
    last: list[str] = [""]

    async def error_cb(exc: Exception) -> None:
        text = f"{type(exc).__name__}: {exc}"
        if text != last[0]:
            last[0] = text
            log.warning("nats %s: %s", url, text)

    async def closed_cb() -> None:
        log.info("nats %s: connection closed", url)

    return await nats.connect(url, name=name, allow_reconnect=True, max_reconnect_attempts=-1,
                              reconnect_time_wait=reconnect_wait, connect_timeout=connect_timeout,
                              error_cb=error_cb, disconnected_cb=on_disconnect, reconnected_cb=on_reconnect,
                              closed_cb=closed_cb)


async def close_quietly(nc: Client | None, timeout: float = 5.0, *, drain: bool = True) -> None:
    """Drain (or, ``drain=False``, flush) and close ``nc`` within ``timeout`` (a broker that is away:
    just close). A pull subscription never drains (nobody reads its queue): flush that connection."""
    if nc is None or nc.is_closed:
        return
    if nc.is_connected:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.drain() if drain else nc.flush(timeout), timeout)
    if not nc.is_closed:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), timeout)
