"""The service's embedded event store: SQLite (stdlib ``sqlite3``) in WAL mode, one writer thread.

Events and audit rows are queued in memory by :meth:`EventStore.append` / :meth:`EventStore.audit`
(never blocking on disk) and committed by the writer in batches: one transaction per batch, at most
``commit_interval`` after the first of them was queued (sooner when :meth:`EventStore.flush` asks, or
when a batch is full). An event is *acknowledged* once its batch committed: from then on it survives a
``kill -9`` of the process (see :func:`aradia.service.store_sql.connect` for why ``synchronous=NORMAL``
is enough for that). Reads run on their own connections, which WAL lets run beside the writer.

Retention runs in the writer every ``retention_interval`` seconds: events older than ``max_age`` go,
then, while the data in the database file is bigger than ``max_bytes``, the oldest events go in
chunks. "Size" is the bytes of the main database file's pages in use (pages minus the free list,
audit rows and traces included): SQLite keeps the freed pages in the file and reuses them for new
rows, so the file stops growing at about ``max_bytes`` (plus the WAL, at most 64 MiB after a
checkpoint, and what arrives between two retention runs) instead of shrinking and growing again.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from types import TracebackType
from typing import Any

from aradia.service import store_sql as sql
from aradia.service.store_sql import StoreError

__all__ = ["EventStore", "StoreError"]

log = logging.getLogger(__name__)

#: the most events one transaction takes; a bigger backlog is committed in several, back to back
BATCH_MAX = 50_000
#: events deleted per retention statement (each its own transaction, so ingest is not held up long)
RETENTION_CHUNK = 10_000
#: one retention run stops after this long and resumes at the next turn of the writer
RETENTION_BUDGET = 0.25
#: When the queue is half full, every this many appends the caller gives up the GIL for a moment.
#: The writer releases the GIL inside every ``sqlite3_step`` (one per row) and must win it back each
#: time; against a producer thread that never waits (pure Python, CPU-bound) it wins it only at the
#: interpreter's switch interval (5 ms), so it falls behind and the queue fills. A producer that
#: waits for I/O (the service's event loop) does not need this; a CPU-bound one is slowed down by it
#: instead of having its events dropped.
YIELD_EVERY = 64


class EventStore:
    """Events, audit rows and stored traces in one SQLite file; thread-safe; see the module docstring.

    ``max_age`` (seconds) and ``max_bytes`` bound what is kept (None: keep everything);
    ``queue_limit`` bounds the events appended but not yet committed (beyond it :meth:`append`
    refuses and counts a drop); ``on_commit(n)`` is called from the writer after each batch with the
    number of events it committed. ``busy_timeout`` is how long a statement waits for another
    connection's write lock before the batch counts as failed (and is retried);
    ``retention_interval`` how often retention runs.
    """

    def __init__(self, path: str | os.PathLike[str], *, max_age: float | None = None,
                 max_bytes: int | None = None, commit_interval: float = 0.1,
                 queue_limit: int = 1_000_000, on_commit: Callable[[int], None] | None = None,
                 busy_timeout: float = 5.0, retention_interval: float = 2.0) -> None:
        self.path = os.fspath(path)
        for name, value in (("max_age", max_age), ("max_bytes", max_bytes)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                      or not value > 0):
                raise StoreError(f"{name} must be a positive number or None, not {value!r}")
        for name, value in (("commit_interval", commit_interval), ("busy_timeout", busy_timeout),
                            ("retention_interval", retention_interval)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 3600:
                raise StoreError(f"{name} must be a number of seconds in (0, 3600), not {value!r}")
        if isinstance(queue_limit, bool) or not isinstance(queue_limit, int) or queue_limit < 1:
            raise StoreError(f"queue_limit must be a positive integer, not {queue_limit!r}")
        self.max_age = max_age
        self.max_bytes = max_bytes
        self.commit_interval = float(commit_interval)
        self.queue_limit = queue_limit
        self.retention_interval = float(retention_interval)
        self._on_commit = on_commit
        self._busy_timeout = float(busy_timeout)

        self._conn = sql.connect(self.path, busy_timeout=self._busy_timeout)
        try:
            sql.create_tables(self._conn, self.path)
            rows = self._conn.execute("SELECT count(*) FROM events").fetchone()[0]
            used = sql.used_bytes(self._conn)
        except sqlite3.Error as exc:
            self._conn.close()
            raise StoreError(f"cannot read the event store {self.path}: {exc}") from exc
        except StoreError:
            self._conn.close()
            raise

        limit = self._conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        self._rows_per_insert = max(1, min(sql.ROWS_PER_INSERT, limit // len(sql.EVENT_COLUMNS)))
        self._insert_sql = sql.insert_events_sql(self._rows_per_insert)

        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)   # the writer waits here
        self._done = threading.Condition(self._lock)   # flush() waits here
        self._pending: list[tuple[Any, ...]] = []
        self._pending_audit: list[tuple[Any, ...]] = []
        self._first_at: float | None = None           # monotonic time the oldest pending item came
        self._items_queued = 0                         # events + audit rows, for flush()
        self._items_committed = 0
        self._flushers = 0
        self._closing = False
        self._close_deadline = 0.0
        self._closed = False
        self._writer_error: BaseException | None = None
        self._appended = 0
        self._committed = 0
        self._dropped = 0
        self._duplicates = 0
        self._expired = 0
        self._commits = 0
        self._failures = 0
        self._rows = int(rows)
        self._used_bytes = used
        self._last_commit = 0.0
        self._next_retention = time.monotonic()

        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._direct: sqlite3.Connection | None = None  # stored traces: synchronous commits
        self._direct_lock = threading.Lock()

        self._writer = threading.Thread(target=self._run, name=f"aradia-store-writer {self.path}",
                                        daemon=True)
        self._writer.start()

    # -- writing ---------------------------------------------------------------------------------

    def append(self, record: dict[str, Any]) -> bool:
        """Queue one event record for the writer; False (and a drop counted) if the queue is full.

        Never waits for the disk. A record that is not well formed (see
        :func:`~aradia.service.store_sql.event_row`) is refused at once with :class:`ValueError`.
        """
        row = sql.event_row(record)
        with self._lock:
            self._check_open()
            if self._appended - self._committed >= self.queue_limit:
                self._dropped += 1
                return False
            wake = self._first_at is None
            if wake:
                self._first_at = time.monotonic()
            self._pending.append(row)
            self._appended += 1
            self._items_queued += 1
            if wake or len(self._pending) == BATCH_MAX:
                self._work.notify()
            # Half full: let the writer have the GIL now and then (see YIELD_EVERY).
            crowded = (self._appended % YIELD_EVERY == 0
                       and self._appended - self._committed >= self.queue_limit // 2)
        if crowded:
            time.sleep(0)
        return True

    def append_many(self, records: Iterable[dict[str, Any]]) -> int:
        """Queue records in order; return how many were queued (the rest are counted as drops).

        Every record is checked first: if one is malformed, :class:`ValueError` and none is queued.
        """
        rows = [sql.event_row(r) for r in records]
        with self._lock:
            self._check_open()
            room = max(0, self.queue_limit - (self._appended - self._committed))
            taken = rows[:room]
            self._dropped += len(rows) - len(taken)
            if taken:
                if self._first_at is None:
                    self._first_at = time.monotonic()
                self._pending.extend(taken)
                self._appended += len(taken)
                self._items_queued += len(taken)
                self._work.notify()
        return len(taken)

    def audit(self, *, tenant: str, vm: str | None, operation: str, allowed: bool, status: int,
              client: str, detail: str = "", time: float | None = None) -> None:
        """Queue one audit row (committed with the events' batches; never dropped).

        ``time`` defaults to now; a field of the wrong type is a :class:`StoreError`.
        """
        row = sql.audit_row(tenant=tenant, vm=vm, operation=operation, allowed=allowed, status=status,
                            client=client, detail=detail, time=_now() if time is None else time)
        with self._lock:
            self._check_open()
            wake = self._first_at is None
            if wake:
                self._first_at = _monotonic()
            self._pending_audit.append(row)
            self._items_queued += 1
            if wake:
                self._work.notify()

    def flush(self, timeout: float = 10.0) -> None:
        """Block until every event and audit row queued before this call is committed.

        :class:`StoreError` if that takes longer than ``timeout`` seconds or the writer stopped.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            target = self._items_queued
            if self._items_committed >= target:
                return
            self._flushers += 1
            self._work.notify()
            try:
                while self._items_committed < target:
                    if self._writer_error is not None or not self._writer.is_alive():
                        raise StoreError(f"the store's writer stopped ({self._writer_error or 'closed'}); "
                                         f"{target - self._items_committed} items not committed")
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise StoreError(f"flush timed out after {timeout:g} s: "
                                         f"{target - self._items_committed} items not committed yet "
                                         f"({self._failures} failed batches so far)")
                    self._done.wait(remaining)
            finally:
                self._flushers -= 1

    def stats(self) -> dict[str, int | float]:
        """Counters: appended, committed, dropped, duplicates, lag, rows, expired, commits, failures,
        bytes (main database file), wal_bytes, used_bytes (see the module docstring), last_commit
        (wall time of the last commit, 0 if none yet)."""
        with self._lock:
            out: dict[str, int | float] = {
                "appended": self._appended, "committed": self._committed, "dropped": self._dropped,
                "duplicates": self._duplicates, "lag": self._appended - self._committed,
                "rows": self._rows, "expired": self._expired, "commits": self._commits,
                "failures": self._failures, "used_bytes": self._used_bytes,
                "last_commit": self._last_commit}
        out["bytes"] = sql.file_size(self.path)
        out["wal_bytes"] = sql.file_size(self.path + "-wal")
        return out

    # -- reading ---------------------------------------------------------------------------------

    def events(self, *, vms: Collection[str] | None = None, kinds: Collection[str] | None = None,
               pids: Collection[int] | None = None, since: float | None = None,
               until: float | None = None, text: str | None = None, limit: int = 100,
               cursor: str | None = None, order: str = "asc") -> tuple[list[dict[str, Any]], str | None]:
        """One page of stored events, oldest first (``order="desc"``: newest first), and the cursor of
        the next page (None when this is the last).

        Filters combine with AND; ``vms=None`` means every VM, an empty collection none. ``since`` is
        inclusive, ``until`` exclusive. ``text`` is a substring of comm, name or the JSON of args
        (``%`` and ``_`` literal; case-insensitive for ASCII letters, as SQLite's LIKE). Records come
        back as appended (``args`` through JSON, ``time`` as a float). Bad filters, a ``limit``
        outside 1..10000 or a cursor not from this listing are a :class:`StoreError`.
        """
        limit = sql.check_limit(limit)
        order = sql.check_order(order)
        filters = sql.event_filters(vms=vms, kinds=kinds, pids=pids, since=since, until=until, text=text)
        after = sql.decode_cursor(cursor, "e", order) if cursor is not None else None
        if filters is None:
            return [], None
        where, params = filters
        if after is not None:
            t, seq = after
            if order == "asc":
                where.append("time >= ? AND (time > ? OR seq > ?)")
            else:
                where.append("time <= ? AND (time < ? OR seq < ?)")
            params.extend([t, t, seq])
        direction = "ASC" if order == "asc" else "DESC"
        query = (f"{sql.SELECT_EVENT}{_where(where)} ORDER BY time {direction}, seq {direction} LIMIT ?")
        rows = self._read(query, [*params, limit + 1])
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = sql.encode_cursor("e", order, rows[-1][0], rows[-1][2]) if more else None
        return [sql.event_record(r) for r in rows], next_cursor

    def count_events(self, *, vms: Collection[str] | None = None, kinds: Collection[str] | None = None,
                     pids: Collection[int] | None = None, since: float | None = None,
                     until: float | None = None, text: str | None = None) -> int:
        """How many stored events match the filters of :meth:`events`."""
        filters = sql.event_filters(vms=vms, kinds=kinds, pids=pids, since=since, until=until, text=text)
        if filters is None:
            return 0
        where, params = filters
        return int(self._read(f"SELECT count(*) FROM events{_where(where)}", params)[0][0])

    def sources(self) -> list[dict[str, Any]]:
        """Every (host, vm) with stored events: how many and the newest one's time (an aggregate's VMs)."""
        rows = self._read("SELECT host, vm, count(*), max(time) FROM events GROUP BY host, vm "
                          "ORDER BY host, vm", [])
        return [{"host": h, "name": v, "events": int(n), "last_event": t} for h, v, n, t in rows]

    def audit_rows(self, *, limit: int = 100, cursor: str | None = None, tenant: str | None = None,
                   allowed: bool | None = None,
                   order: str = "asc") -> tuple[list[dict[str, Any]], str | None]:
        """One page of audit rows in the order they were recorded (``order="desc"``: newest first) and
        the next page's cursor; keys time, tenant, vm, operation, allowed, status, client, detail."""
        limit = sql.check_limit(limit)
        order = sql.check_order(order)
        where: list[str] = []
        params: list[Any] = []
        if tenant is not None:
            if not isinstance(tenant, str):
                raise StoreError(f"tenant must be text, not {type(tenant).__name__}")
            where.append("tenant = ?")
            params.append(tenant)
        if allowed is not None:
            if not isinstance(allowed, bool):
                raise StoreError("allowed must be True, False or None")
            where.append("allowed = ?")
            params.append(int(allowed))
        if cursor is not None:
            _, seq = sql.decode_cursor(cursor, "a", order)
            where.append("seq > ?" if order == "asc" else "seq < ?")
            params.append(seq)
        direction = "ASC" if order == "asc" else "DESC"
        rows = self._read(f"{sql.SELECT_AUDIT}{_where(where)} ORDER BY seq {direction} LIMIT ?",
                          [*params, limit + 1])
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = sql.encode_cursor("a", order, rows[-1][0]) if more else None
        return [sql.audit_record(r) for r in rows], next_cursor

    # -- stored traces (synchronous) ---------------------------------------------------------------

    def save_trace(self, trace: dict[str, Any]) -> None:
        """Store (or replace) a trace: keys id, vm, tenant, spec (dict), created. Committed, with an
        fsync, before this returns: the client is told it exists."""
        row = sql.trace_row(trace)
        self._write_direct("INSERT OR REPLACE INTO traces (id, vm, tenant, spec, created) "
                           "VALUES (?, ?, ?, ?, ?)", row)

    def delete_trace(self, trace_id: str) -> bool:
        """Delete a stored trace; False if there was none by that id."""
        if not isinstance(trace_id, str):
            raise StoreError(f"a trace id is text, not {type(trace_id).__name__}")
        return self._write_direct("DELETE FROM traces WHERE id = ?", (trace_id,)) > 0

    def traces(self) -> list[dict[str, Any]]:
        """Every stored trace, oldest first: dicts with id, vm, tenant, spec, created."""
        rows = self._read("SELECT id, vm, tenant, spec, created FROM traces ORDER BY created, id", [])
        return [sql.trace_record(r) for r in rows]

    # -- life cycle ------------------------------------------------------------------------------

    def close(self, timeout: float = 10.0) -> None:
        """Commit what is queued, stop the writer, close every connection.

        :class:`StoreError` (after closing) if queued items could not be committed within ``timeout``
        seconds; those were never acknowledged. Closing twice is harmless.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._closing = True
            self._close_deadline = time.monotonic() + timeout
            self._work.notify_all()
        self._writer.join(timeout + self._busy_timeout + 1.0)
        with self._readers_lock:
            readers, self._readers = self._readers, []
        for conn in readers:
            conn.close()
        with self._direct_lock:
            if self._direct is not None:
                self._direct.close()
                self._direct = None
        if not self._writer.is_alive():
            self._conn.close()
        with self._lock:
            lost = self._items_queued - self._items_committed
        if lost or self._writer.is_alive():
            raise StoreError(f"closed {self.path} with {lost} queued items not committed")

    def __enter__(self) -> EventStore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------------

    def _check_open(self) -> None:
        """(under the lock) StoreError if the store is closed or its writer died."""
        if self._closed:
            raise StoreError(f"the event store {self.path} is closed")
        if self._writer_error is not None:
            raise StoreError(f"the event store's writer stopped: {self._writer_error}")

    @contextlib.contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        """A read-only connection from the pool (one per concurrent reader), returned after use."""
        with self._readers_lock:
            if self._closed:
                raise StoreError(f"the event store {self.path} is closed")
            conn = self._readers.pop() if self._readers else None
        if conn is None:
            conn = sql.connect(self.path, busy_timeout=self._busy_timeout, query_only=True)
        try:
            yield conn
        finally:
            with self._readers_lock:
                if self._closed:
                    conn.close()
                else:
                    self._readers.append(conn)

    def _read(self, query: str, params: list[Any]) -> list[tuple[Any, ...]]:
        with self._reader() as conn:
            try:
                return conn.execute(query, params).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"reading the event store failed: {exc}") from exc

    def _write_direct(self, statement: str, params: tuple[Any, ...]) -> int:
        """Run one statement in its own fsynced transaction on the direct connection; rows changed."""
        with self._direct_lock:
            if self._closed:
                raise StoreError(f"the event store {self.path} is closed")
            if self._direct is None:
                self._direct = sql.connect(self.path, busy_timeout=self._busy_timeout, synchronous="FULL")
            try:
                return self._direct.execute(statement, params).rowcount
            except sqlite3.Error as exc:
                raise StoreError(f"writing to the event store failed: {exc}") from exc

    def _run(self) -> None:
        """The writer thread: take batches, commit them (retrying failures), run retention."""
        events: list[tuple[Any, ...]] = []
        audits: list[tuple[Any, ...]] = []
        backoff = 0.0
        try:
            while True:
                if not events and not audits:
                    taken = self._take()
                    if taken is None:
                        break
                    events, audits = taken
                if events or audits:
                    if self._commit(events, audits):
                        events, audits = [], []
                        backoff = 0.0
                    else:
                        backoff = min(max(backoff * 2, 0.05), 1.0)
                        with self._lock:
                            if self._closing and time.monotonic() > self._close_deadline:
                                log.error("event store %s: giving up on %d events and %d audit rows at close",
                                          self.path, len(events), len(audits))
                                break
                            self._work.wait(backoff)
                if (self.max_age or self.max_bytes) and time.monotonic() >= self._next_retention:
                    self._retain()
        except BaseException as exc:
            log.exception("event store %s: the writer stopped", self.path)
            with self._lock:
                self._writer_error = exc
        finally:
            with self._lock:
                self._done.notify_all()

    def _take(self) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]] | None:
        """Wait for work; the next batch (possibly empty when only retention is due), None to stop."""
        with self._lock:
            while True:
                if self._pending or self._pending_audit:
                    while not (self._closing or self._flushers or len(self._pending) >= BATCH_MAX):
                        if self._first_at is None:  # not expected: every queueing sets it
                            self._first_at = time.monotonic()
                        remaining = self._first_at + self.commit_interval - time.monotonic()
                        if remaining <= 0:
                            break
                        self._work.wait(remaining)
                    if len(self._pending) <= BATCH_MAX:
                        events, self._pending = self._pending, []
                    else:
                        events = self._pending[:BATCH_MAX]
                        del self._pending[:BATCH_MAX]
                    audits, self._pending_audit = self._pending_audit, []
                    if not self._pending:
                        self._first_at = None
                    return events, audits
                if self._closing:
                    return None
                timeout = None
                if self.max_age or self.max_bytes:
                    timeout = self._next_retention - time.monotonic()
                    if timeout <= 0:
                        return [], []
                self._work.wait(timeout)

    def _commit(self, events: list[tuple[Any, ...]], audits: list[tuple[Any, ...]]) -> bool:
        """One transaction for a batch; False (logged, rolled back) if it failed."""
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            before = conn.total_changes
            if events:
                self._insert_events(events)
            inserted = conn.total_changes - before
            if audits:
                conn.executemany(sql.INSERT_AUDIT, audits)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            with self._lock:
                self._failures += 1
                failures = self._failures
            log.warning("event store %s: committing %d events and %d audit rows failed (%s); "
                        "kept for a retry (failure %d)", self.path, len(events), len(audits), exc, failures)
            return False
        used = self._safe_used_bytes()
        with self._lock:
            self._committed += len(events)
            self._duplicates += len(events) - inserted
            self._rows += inserted
            self._items_committed += len(events) + len(audits)
            self._commits += 1
            self._last_commit = time.time()
            if used is not None:
                self._used_bytes = used
            self._done.notify_all()
        if self._on_commit is not None and events:
            try:
                self._on_commit(len(events))
            except Exception:
                log.exception("event store %s: on_commit raised", self.path)
        return True

    def _insert_events(self, events: list[tuple[Any, ...]]) -> None:
        """INSERT OR IGNORE the rows, :data:`~aradia.service.store_sql.ROWS_PER_INSERT` a statement."""
        n = self._rows_per_insert
        full = len(events) - len(events) % n
        for k in range(0, full, n):
            self._conn.execute(self._insert_sql, list(itertools.chain.from_iterable(events[k:k + n])))
        if full < len(events):
            self._conn.executemany(sql.INSERT_EVENT, events[full:])

    def _safe_used_bytes(self) -> int | None:
        try:
            return sql.used_bytes(self._conn)
        except sqlite3.Error:
            return None

    def _retain(self) -> None:
        """Delete events past ``max_age``, then the oldest while over ``max_bytes``, within a budget."""
        start = time.monotonic()
        self._next_retention = start + self.retention_interval
        conn = self._conn
        try:
            if self.max_age:
                cutoff = time.time() - self.max_age
                while True:
                    n = conn.execute(sql.DELETE_OLDER, (cutoff, RETENTION_CHUNK)).rowcount
                    self._expire(n)
                    if n < RETENTION_CHUNK:
                        break
                    if time.monotonic() - start > RETENTION_BUDGET:
                        self._next_retention = time.monotonic()  # more to do: at the next turn
                        return
                # audit rows age out by the same rule (a flood of refused requests cannot fill the disk
                # for longer than max_age); size retention counts only events
                chunk = (cutoff, RETENTION_CHUNK)
                while conn.execute(sql.DELETE_AUDIT_OLDER, chunk).rowcount == RETENTION_CHUNK:
                    if time.monotonic() - start > RETENTION_BUDGET:
                        self._next_retention = time.monotonic()
                        return
            if self.max_bytes:
                while True:
                    used = sql.used_bytes(conn)
                    with self._lock:
                        self._used_bytes = used
                        rows = self._rows
                    if used <= self.max_bytes or rows <= 0:
                        break
                    # about the share of the rows that is over, at least 100, at most one chunk
                    want = min(RETENTION_CHUNK, max(100, int(rows * (used - self.max_bytes) / used) + 1))
                    n = conn.execute(sql.DELETE_OLDEST, (want,)).rowcount
                    self._expire(n)
                    if n == 0:
                        break
                    if time.monotonic() - start > RETENTION_BUDGET:
                        self._next_retention = time.monotonic()
                        return
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            log.warning("event store %s: retention failed (%s); retrying in %g s",
                        self.path, exc, self.retention_interval)

    def _expire(self, n: int) -> None:
        with self._lock:
            self._expired += n
            self._rows -= n


def _where(terms: list[str]) -> str:
    return f" WHERE {' AND '.join(terms)}" if terms else ""


def _now() -> float:
    return time.time()


def _monotonic() -> float:
    return time.monotonic()
