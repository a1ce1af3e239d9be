"""The one event record: what a probe saw, as the CLI prints it, the store keeps it, the bus carries it.

A record is a plain JSON object (see ``event.schema.json`` beside this file)::

    {"schema": 1, "id": "web1-3f2a9c1d-000000000042", "time": 1733369640.123456,
     "host": "hv1", "vm": "web1", "vcpu": 0, "kind": "syscall", "name": "execve",
     "pid": 812, "tgid": 812, "comm": "sh", "uid": 0, "args": {"filename": "/bin/true", ...}}

``time`` is wall-clock (Unix seconds); ``id`` is unique per event across hosts and service restarts
(the bus uses it to drop duplicates, the store refuses a second copy).
"""

from __future__ import annotations

import itertools
import json
import re
import socket
import time
import uuid
from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aradia.trace.events import Event

SCHEMA_VERSION = 1
#: host and VM names: they become NATS subject tokens and URL path segments
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
FIELDS = ("schema", "id", "time", "host", "vm", "vcpu", "kind", "name", "pid", "tgid", "comm", "uid", "args")


def jsonable(value: Any) -> Any:
    """Decoded arguments as JSON values: bytes become latin-1 text (every byte kept), tuples lists."""
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def wall_time(monotonic: float) -> float:
    """The wall-clock time of a ``time.monotonic()`` stamp taken in this process."""
    return time.time() - (time.monotonic() - monotonic)


def record_from_event(ev: Event, *, host: str, vm: str, event_id: str) -> dict[str, Any]:
    """The record of a tracer :class:`~aradia.trace.events.Event` seen on ``host``'s VM ``vm``."""
    return {"schema": SCHEMA_VERSION, "id": event_id, "time": wall_time(ev.time), "host": host, "vm": vm,
            "vcpu": ev.vcpu, "kind": ev.kind, "name": ev.name, "pid": ev.pid, "tgid": ev.tgid,
            "comm": ev.comm, "uid": ev.uid, "args": jsonable(ev.args)}


class Records:
    """Records of one VM's events, with ids unique across hosts and runs: ``HOST-VM-RUN-SEQ`` (RUN is
    random per :class:`Records`, SEQ counts from 1)."""

    def __init__(self, host: str, vm: str) -> None:
        for what, name in (("host", host), ("vm", vm)):
            if not NAME_RE.match(name):
                raise ValueError(f"{what} {name!r} is not a name ([A-Za-z0-9_-]{{1,64}})")
        self.host, self.vm = host, vm
        self._run = uuid.uuid4().hex[:8]
        self._seq = itertools.count(1)

    def record(self, ev: Event) -> dict[str, Any]:
        """The record of ``ev``, with the next id."""
        return record_from_event(ev, host=self.host, vm=self.vm,
                                 event_id=f"{self.host}-{self.vm}-{self._run}-{next(self._seq)}")


def local_records(vm: str, host: str | None = None) -> Records:
    """A record maker for a command run where the VM is (``aradia trace --json``, the guard's and the
    honeypot's records): VM ``vm`` (any text, e.g. its socket's name: made a schema name) on ``host``
    (default: this machine's name)."""
    return Records(_name(host or socket.gethostname()), _name(vm))


def _name(text: str) -> str:
    """A host or VM name as the schema accepts it (``[A-Za-z0-9_-]{1,64}``)."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", text)[-64:] or "vm"


def check_record(record: Any) -> dict[str, Any]:
    """``record`` if it is a well-formed event record, else :class:`ValueError` naming what is wrong.

    Used on everything that arrives from outside (the bus, an aggregator's input): an untrusted peer
    cannot put a malformed row into the store.
    """
    if not isinstance(record, dict):
        raise ValueError("an event record is a JSON object")
    missing = [f for f in FIELDS if f not in record]
    if missing:
        raise ValueError(f"event record lacks {', '.join(missing)}")
    extra = sorted(set(record) - set(FIELDS))
    if extra:
        raise ValueError(f"event record has unknown fields {', '.join(extra)}")
    if record["schema"] != SCHEMA_VERSION:
        raise ValueError(f"event schema {record['schema']!r} (this aradia reads {SCHEMA_VERSION})")
    for f in ("id", "host", "vm", "kind", "name", "comm"):
        if not isinstance(record[f], str) or len(record[f]) > 256:
            raise ValueError(f"event field {f} must be a string of at most 256 characters")
    for f in ("host", "vm"):
        if not NAME_RE.match(record[f]):
            raise ValueError(f"event field {f}={record[f]!r} is not a name ([A-Za-z0-9_-]{{1,64}})")
    for f in ("vcpu", "pid", "tgid", "uid"):
        if not isinstance(record[f], int) or isinstance(record[f], bool):
            raise ValueError(f"event field {f} must be an integer")
    if not isinstance(record["time"], int | float) or isinstance(record["time"], bool):
        raise ValueError("event field time must be a number")
    if not isinstance(record["args"], dict):
        raise ValueError("event field args must be an object")
    return record


def schema_document() -> dict[str, Any]:
    """The JSON Schema of a record (``event.schema.json``, shipped in the package)."""
    return json.loads(resources.files("aradia.service").joinpath("event.schema.json").read_text())
