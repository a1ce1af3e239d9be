"""Helpers for the bus tests: synthetic event records and a reader of everything a stream holds."""

from __future__ import annotations

import json
import time
from typing import Any

import nats
import nats.errors

from aradia.service.bus import STREAM


def make_record(i: int, *, host: str = "hv1", vm: str = "vm1", kind: str = "syscall") -> dict[str, Any]:
    """Record number ``i`` of ``host``'s VM ``vm``: valid for ``check_record``, id unique per host and i."""
    return {"schema": 1, "id": f"{host}-{vm}-test-{i:012d}", "time": time.time(), "host": host, "vm": vm,
            "vcpu": i % 2, "kind": kind, "name": "execve", "pid": 100 + i, "tgid": 100 + i, "comm": "sh",
            "uid": 0, "args": {"filename": "/bin/true", "i": i}}


async def read_stream(url: str, *, stream: str = STREAM, subject: str = "aradia.events.>",
                      idle: float = 1.0) -> list[tuple[str, str | None, dict[str, Any]]]:
    """Every message of ``stream`` on ``subject`` as (subject, Nats-Msg-Id, record), in stream order.

    Reads with an ephemeral pull consumer until a fetch of ``idle`` seconds finds nothing more.
    """
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe(subject, stream=stream)
        out: list[tuple[str, str | None, dict[str, Any]]] = []
        while True:
            try:
                msgs = await sub.fetch(1000, timeout=idle)
            except (nats.errors.TimeoutError, TimeoutError):     # nats-py raises either
                return out
            for m in msgs:
                out.append((m.subject, (m.headers or {}).get("Nats-Msg-Id"), json.loads(m.data)))
                await m.ack()
    finally:
        await nc.close()


async def stream_messages(url: str, stream: str = STREAM) -> int:
    """How many messages ``stream`` stores."""
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info(stream)
        return int(info.state.messages)
    finally:
        await nc.close()
