"""The SQL side of the event store: its tables, records to rows and back, query filters and cursors.

:mod:`aradia.service.store` holds the :class:`~aradia.service.store.EventStore` (the writer thread,
the readers); this module holds what it says to SQLite, so both stay small. Everything a client
gives (filters, cursors, limits) is checked here and bound as a parameter: nothing from outside is
ever formatted into SQL text.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import re
import sqlite3
from collections.abc import Collection
from typing import Any

from aradia.errors import AradiaError
from aradia.service.schema import NAME_RE, check_record

#: ``PRAGMA user_version`` of a database this module made; another number is refused
DB_VERSION = 1
MAX_LIMIT = 10_000
#: up to this many values a filter is ``col IN (?, ...)`` (the planner sees each value); beyond, one
#: JSON parameter read with ``json_each`` (SQLite allows at most 32,766 parameters)
MAX_INLINE_VALUES = 64
INT64 = (-(1 << 63), 1 << 63)

EVENT_COLUMNS = ("id", "time", "host", "vm", "vcpu", "kind", "name", "pid", "tgid", "comm", "uid",
                 "args", "schema")
_TEXT_FIELDS = ("id", "host", "vm", "kind", "name", "comm")
_INT_FIELDS = ("vcpu", "pid", "tgid", "uid")

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    time REAL NOT NULL,
    host TEXT NOT NULL,
    vm TEXT NOT NULL,
    vcpu INTEGER NOT NULL,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    pid INTEGER NOT NULL,
    tgid INTEGER NOT NULL,
    comm TEXT NOT NULL,
    uid INTEGER NOT NULL,
    args TEXT NOT NULL,
    schema INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS events_vm_time ON events (vm, time);
CREATE INDEX IF NOT EXISTS events_kind_time ON events (kind, time);
CREATE INDEX IF NOT EXISTS events_pid_time ON events (pid, time);
CREATE INDEX IF NOT EXISTS events_time ON events (time);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    tenant TEXT NOT NULL,
    vm TEXT,
    operation TEXT NOT NULL,
    allowed INTEGER NOT NULL,
    status INTEGER NOT NULL,
    client TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_tenant ON audit (tenant, seq);
CREATE INDEX IF NOT EXISTS audit_time ON audit (time);
CREATE TABLE IF NOT EXISTS traces (
    id TEXT PRIMARY KEY,
    vm TEXT NOT NULL,
    tenant TEXT NOT NULL,
    spec TEXT NOT NULL,
    created REAL NOT NULL
);
"""

INSERT_EVENT = (f"INSERT OR IGNORE INTO events ({', '.join(EVENT_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(EVENT_COLUMNS))})")
#: rows per multi-row INSERT: the writer releases the GIL once per statement (``sqlite3_step``), so
#: it contends for it once per this many rows instead of once per row (and SQLite is faster too)
ROWS_PER_INSERT = 500


def insert_events_sql(rows: int) -> str:
    """``INSERT OR IGNORE`` of ``rows`` events in one statement (``rows`` x 13 parameters)."""
    one = f"({', '.join('?' * len(EVENT_COLUMNS))})"
    return f"INSERT OR IGNORE INTO events ({', '.join(EVENT_COLUMNS)}) VALUES {', '.join([one] * rows)}"


INSERT_AUDIT = ("INSERT INTO audit (time, tenant, vm, operation, allowed, status, client, detail) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
SELECT_EVENT = f"SELECT seq, {', '.join(EVENT_COLUMNS)} FROM events"
SELECT_AUDIT = "SELECT seq, time, tenant, vm, operation, allowed, status, client, detail FROM audit"
#: the oldest events first, a chunk at a time (retention)
DELETE_OLDER = ("DELETE FROM events WHERE seq IN "
                "(SELECT seq FROM events WHERE time < ? ORDER BY time LIMIT ?)")
DELETE_AUDIT_OLDER = ("DELETE FROM audit WHERE seq IN "
                      "(SELECT seq FROM audit WHERE time < ? ORDER BY time LIMIT ?)")
DELETE_OLDEST = "DELETE FROM events WHERE seq IN (SELECT seq FROM events ORDER BY time LIMIT ?)"

#: the args column: compact JSON, non-ASCII text kept as is (so LIKE finds it)
ARGS_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_CURSOR_RE = re.compile(r"^(e|a)(a|d):([0-9eE.+-]{1,32}:)?([0-9]{1,19})$")


class StoreError(AradiaError):
    """The event store cannot do what was asked: bad filter, cursor or limit, closed, disk trouble."""


def connect(path: str, *, busy_timeout: float, synchronous: str = "NORMAL",
            query_only: bool = False) -> sqlite3.Connection:
    """A connection to the store's database in WAL mode (``isolation_level=None``: we say BEGIN/COMMIT).

    ``synchronous=NORMAL`` with WAL: a commit writes its WAL frames to the OS before it returns but
    does not fsync them, so everything committed survives a ``kill -9`` of the process (the kernel
    holds the pages); only a power cut or kernel crash can take the last commits, never the
    database's integrity. ``FULL`` (used for stored traces) also fsyncs each commit.
    """
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_timeout)
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            conn.close()
            raise StoreError(f"{path}: SQLite refused WAL mode (journal_mode={mode}); the store needs it")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        if query_only:
            conn.execute("PRAGMA query_only = 1")
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open the event store {path}: {exc}") from exc
    return conn


def create_tables(conn: sqlite3.Connection, path: str) -> None:
    """Create the tables and indexes if missing; refuse a database of another make or version."""
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, DB_VERSION):
            raise StoreError(f"{path}: event store version {version} (this aradia reads {DB_VERSION})")
        if version == 0:
            known = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if known:
                raise StoreError(f"{path} is an SQLite database but not an aradia event store "
                                 f"(tables {', '.join(sorted(known))})")
        conn.execute("PRAGMA journal_size_limit = 67108864")  # truncate the WAL to 64 MiB after checkpoints
        conn.executescript(f"BEGIN IMMEDIATE; {SCHEMA_SQL} PRAGMA user_version = {DB_VERSION}; COMMIT;")
    except sqlite3.Error as exc:
        raise StoreError(f"cannot set up the event store {path}: {exc}") from exc


def _text_ok(value: str) -> bool:
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def event_row(record: Any) -> tuple[Any, ...]:
    """The row of one event record (columns :data:`EVENT_COLUMNS`), or :class:`ValueError`.

    Beyond :func:`~aradia.service.schema.check_record`: integers must fit SQLite's 64 bits, the time
    must be finite, text must be encodable (no lone surrogates) and ``args`` JSON-serialisable, so
    that a row accepted here can never fail in the writer's batch.
    """
    check_record(record)
    for f in _INT_FIELDS:
        if not INT64[0] <= record[f] < INT64[1]:
            raise ValueError(f"event field {f}={record[f]} does not fit in 64 bits")
    for f in _TEXT_FIELDS:
        if not _text_ok(record[f]):
            raise ValueError(f"event field {f} is not valid Unicode text (lone surrogate)")
    try:
        t = float(record["time"])
    except OverflowError:
        raise ValueError("event field time is out of range") from None
    if not math.isfinite(t):
        raise ValueError("event field time must be finite")
    try:
        args = ARGS_JSON.encode(record["args"])
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"event field args is not JSON: {exc}") from None
    if not _text_ok(args):
        args = json.dumps(record["args"], separators=(",", ":"))  # \u-escaped: every string survives
    return (record["id"], t, record["host"], record["vm"], record["vcpu"], record["kind"], record["name"],
            record["pid"], record["tgid"], record["comm"], record["uid"], args, record["schema"])


def event_record(row: tuple[Any, ...]) -> dict[str, Any]:
    """The record of a row selected by :data:`SELECT_EVENT` (its first column, ``seq``, left out)."""
    (_, eid, t, host, vm, vcpu, kind, name, pid, tgid, comm, uid, args, schema) = row
    return {"schema": schema, "id": eid, "time": t, "host": host, "vm": vm, "vcpu": vcpu, "kind": kind,
            "name": name, "pid": pid, "tgid": tgid, "comm": comm, "uid": uid, "args": json.loads(args)}


def audit_row(*, tenant: Any, vm: Any, operation: Any, allowed: Any, status: Any, client: Any,
              detail: Any, time: Any) -> tuple[Any, ...]:
    """The row of one audit entry, or :class:`StoreError` naming the field of the wrong type."""
    for name, value in (("tenant", tenant), ("operation", operation), ("client", client), ("detail", detail)):
        if not isinstance(value, str) or not _text_ok(value):
            raise StoreError(f"audit {name} must be text, not {type(value).__name__}")
    if vm is not None and (not isinstance(vm, str) or not _text_ok(vm)):
        raise StoreError(f"audit vm must be text or None, not {type(vm).__name__}")
    if not isinstance(allowed, bool):
        raise StoreError("audit allowed must be True or False")
    if not isinstance(status, int) or isinstance(status, bool) or not 0 <= status < 1000:
        raise StoreError(f"audit status must be an integer 0..999, not {status!r}")
    if not isinstance(time, int | float) or isinstance(time, bool) or not math.isfinite(time):
        raise StoreError(f"audit time must be a finite number, not {time!r}")
    return (float(time), tenant, vm, operation, int(allowed), status, client, detail)


def audit_record(row: tuple[Any, ...]) -> dict[str, Any]:
    """The dict of a row selected by :data:`SELECT_AUDIT`."""
    _, t, tenant, vm, operation, allowed, status, client, detail = row
    return {"time": t, "tenant": tenant, "vm": vm, "operation": operation, "allowed": bool(allowed),
            "status": status, "client": client, "detail": detail}


def trace_row(trace: Any) -> tuple[Any, ...]:
    """The row of a stored trace (keys id, vm, tenant, spec, created), or :class:`StoreError`."""
    if not isinstance(trace, dict):
        raise StoreError("a stored trace is a dict")
    missing = [k for k in ("id", "vm", "tenant", "spec", "created") if k not in trace]
    if missing:
        raise StoreError(f"stored trace lacks {', '.join(missing)}")
    tid, vm, tenant, spec, created = (trace[k] for k in ("id", "vm", "tenant", "spec", "created"))
    if not isinstance(tid, str) or not 1 <= len(tid) <= 256 or not _text_ok(tid):
        raise StoreError("stored trace id must be text of 1..256 characters")
    if not isinstance(vm, str) or not NAME_RE.match(vm):
        raise StoreError(f"stored trace vm {vm!r} is not a name ([A-Za-z0-9_-]{{1,64}})")
    if not isinstance(tenant, str) or not _text_ok(tenant):
        raise StoreError("stored trace tenant must be text")
    if not isinstance(spec, dict):
        raise StoreError("stored trace spec must be a dict")
    if not isinstance(created, int | float) or isinstance(created, bool) or not math.isfinite(created):
        raise StoreError("stored trace created must be a finite number")
    try:
        spec_json = json.dumps(spec, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"stored trace spec is not JSON: {exc}") from None
    return (tid, vm, tenant, spec_json, float(created))


def trace_record(row: tuple[Any, ...]) -> dict[str, Any]:
    """The dict of a ``traces`` row (id, vm, tenant, spec, created)."""
    tid, vm, tenant, spec, created = row
    return {"id": tid, "vm": vm, "tenant": tenant, "spec": json.loads(spec), "created": created}


def check_limit(limit: Any) -> int:
    """``limit`` if it is an integer 1..:data:`MAX_LIMIT`, else :class:`StoreError`."""
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_LIMIT:
        raise StoreError(f"limit must be an integer 1..{MAX_LIMIT}, not {limit!r}")
    return limit


def check_order(order: Any) -> str:
    """``order`` if it is "asc" or "desc", else :class:`StoreError`."""
    if order not in ("asc", "desc"):
        raise StoreError(f"order must be 'asc' or 'desc', not {order!r}")
    return str(order)


def _values(name: str, values: Collection[Any], kind: type) -> list[Any]:
    if isinstance(values, str | bytes) or not isinstance(values, Collection):
        raise StoreError(f"{name} must be a collection of {kind.__name__} (a list or set), "
                         f"not {type(values).__name__}")
    out = list(values)
    for v in out:
        if not isinstance(v, kind) or isinstance(v, bool):
            raise StoreError(f"{name} holds {v!r}, not {kind.__name__}")
        if isinstance(v, int) and not INT64[0] <= v < INT64[1]:
            raise StoreError(f"{name} holds {v}, which does not fit in 64 bits")
        if isinstance(v, str) and not _text_ok(v):
            raise StoreError(f"{name} holds text that is not valid Unicode")
    return out


def _in(column: str, values: list[Any], where: list[str], params: list[Any]) -> None:
    if len(values) <= MAX_INLINE_VALUES:
        where.append(f"{column} IN ({', '.join('?' * len(values))})")
        params.extend(values)
    else:
        where.append(f"{column} IN (SELECT value FROM json_each(?))")
        params.append(json.dumps(values))


def _time(name: str, value: Any) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise StoreError(f"{name} must be a finite number (Unix seconds), not {value!r}")
    return float(value)


def like_pattern(text: str) -> str:
    """A LIKE pattern (``ESCAPE '\\'``) matching ``text`` anywhere, its ``%``, ``_`` and ``\\`` literal."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def event_filters(*, vms: Collection[str] | None, kinds: Collection[str] | None,
                  pids: Collection[int] | None, since: float | None, until: float | None,
                  text: str | None) -> tuple[list[str], list[Any]] | None:
    """The WHERE terms and parameters of an event query, or None when it can match nothing.

    ``since`` is inclusive, ``until`` exclusive (adjacent windows do not overlap); an empty
    collection matches nothing. Bad filters are a :class:`StoreError`.
    """
    where: list[str] = []
    params: list[Any] = []
    empty = False
    for name, column, values, kind in (("vms", "vm", vms, str), ("kinds", "kind", kinds, str),
                                       ("pids", "pid", pids, int)):
        if values is None:
            continue
        checked = _values(name, values, kind)
        if not checked:
            empty = True
        else:
            _in(column, checked, where, params)
    if since is not None:
        where.append("time >= ?")
        params.append(_time("since", since))
    if until is not None:
        where.append("time < ?")
        params.append(_time("until", until))
    if text is not None:
        if not isinstance(text, str) or len(text) > 256 or not _text_ok(text):
            raise StoreError("text must be a string of at most 256 characters")
        where.append("(comm LIKE ? ESCAPE '\\' OR name LIKE ? ESCAPE '\\' OR args LIKE ? ESCAPE '\\')")
        params.extend([like_pattern(text)] * 3)
    return None if empty else (where, params)


def encode_cursor(table: str, order: str, seq: int, time: float | None = None) -> str:
    """An opaque cursor: where the next page of ``table`` ("e" events, "a" audit) starts."""
    key = f"{table}{order[0]}:{'' if time is None else repr(float(time)) + ':'}{seq}"
    return base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def decode_cursor(cursor: Any, table: str, order: str) -> tuple[float | None, int]:
    """The (time, seq) of a cursor from :func:`encode_cursor` for this table and order, else StoreError."""
    bad = StoreError("malformed cursor (pass back the next cursor of the previous page, unchanged)")
    if not isinstance(cursor, str) or not 1 <= len(cursor) <= 128 or not cursor.isascii():
        raise bad
    try:
        key = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True).decode()
    except (binascii.Error, ValueError):
        raise bad from None
    m = _CURSOR_RE.match(key)
    if not m:
        raise bad
    if m.group(1) != table:
        raise StoreError("this cursor belongs to another listing")
    if m.group(2) != order[0]:
        raise StoreError(f"this cursor was made for order={'asc' if m.group(2) == 'a' else 'desc'}")
    seq = int(m.group(4))
    if seq >= INT64[1]:
        raise bad
    if table == "a":
        if m.group(3):
            raise bad
        return None, seq
    if not m.group(3):
        raise bad
    try:
        t = float(m.group(3)[:-1])
    except ValueError:
        raise bad from None
    if not math.isfinite(t):
        raise bad
    return t, seq


def used_bytes(conn: sqlite3.Connection) -> int:
    """Bytes of the main database file that hold data (its pages minus the free list)."""
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    return int((pages - free) * page_size)


def file_size(path: str) -> int:
    """Size of ``path`` in bytes, 0 if it does not exist."""
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0
