"""aradia.service.store: the SQLite event store, on real SQLite files in a temp dir (no guest)."""

from __future__ import annotations

import base64
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from aradia.errors import AradiaError
from aradia.service.schema import check_record
from aradia.service.store import EventStore, StoreError
from waiting import wait_until

SRC = Path(__file__).resolve().parent.parent / "src"
T0 = 1_733_369_640.0


def rec(i: int, **fields: Any) -> dict[str, Any]:
    """Event record number ``i``: id ``h-i``, time T0 + i/10, three VMs, 50 pids; ``fields`` override."""
    r = {"schema": 1, "id": f"h-{i}", "time": T0 + i / 10, "host": "hv1", "vm": f"vm{i % 3}", "vcpu": i % 2,
         "kind": "syscall", "name": "execve", "pid": 100 + i % 50, "tgid": 100 + i % 50, "comm": "sh",
         "uid": 0, "args": {"filename": "/bin/true", "i": i}}
    r.update(fields)
    return check_record(r)


def all_events(store: EventStore, **filters: Any) -> list[dict[str, Any]]:
    """Every event matching ``filters``, through the cursor (pages of 1,000)."""
    out: list[dict[str, Any]] = []
    cursor = None
    while True:
        page, cursor = store.events(limit=1000, cursor=cursor, **filters)
        out.extend(page)
        if cursor is None:
            return out


def ids(records: list[dict[str, Any]]) -> list[str]:
    """The ids of ``records``, in order."""
    return [r["id"] for r in records]


@pytest.fixture
def db(tmp_path: Path) -> str:
    """Path of a fresh store database."""
    return str(tmp_path / "events.db")


@pytest.mark.timeout(30)
def test_records_round_trip_exactly_and_survive_reopen(db: str) -> None:
    latin1 = bytes(range(256)).decode("latin-1")
    records = [
        rec(0, comm="Grüße", args={"data": latin1, "argv": ["/bin/sh", "-c", "echo ü"],
                                    "env": {"A": 1, "B": [1.5, None, True, {"deep": [2**62, -(2**63)]}]}}),
        rec(1, time=int(T0), args={}),  # an integer time comes back as the same number (a float)
        rec(2, name="open\u2603", args={"path": "/tmp/\U0001f600", "flags": 0o101}),
        *[rec(i) for i in range(3, 100)],
    ]
    with EventStore(db) as store:
        assert all(store.append(r) for r in records)
        store.flush()
        got = all_events(store)
        assert got == records
        assert isinstance(got[1]["time"], float) and got[1]["time"] == int(T0)
        assert got[0]["args"]["env"]["B"][3]["deep"][0] == 2**62
        assert isinstance(got[0]["args"]["env"]["B"][3]["deep"][0], int)
        st = store.stats()
        assert (st["appended"], st["committed"], st["rows"], st["dropped"], st["duplicates"], st["lag"]) == \
            (100, 100, 100, 0, 0, 0)
        assert st["bytes"] > 0 and st["last_commit"] > 0
    with EventStore(db) as store:
        assert all_events(store) == records
        assert store.stats()["rows"] == 100
        assert store.count_events() == 100


@pytest.mark.timeout(30)
def test_malformed_records_are_refused_at_once_and_none_of_a_bad_batch_is_queued(db: str) -> None:
    bad = [
        {"schema": 1},                                        # fields missing
        {**rec(1), "extra": 1},                               # unknown field
        rec(2, comm="\udcff"),                                # lone surrogate: not encodable
        rec(3, pid=2**64),                                    # does not fit SQLite's 64 bits
        rec(4, time=float("nan")),
        rec(5, time=10**400),
        rec(6, args={"x": object()}),                         # not JSON
        {**rec(7), "vm": "web 1"},                            # not a name
    ]
    with EventStore(db) as store:
        for r in bad:
            with pytest.raises(ValueError):
                store.append(r)
        with pytest.raises(ValueError):
            store.append_many([rec(10), rec(11), bad[2]])
        assert store.append(rec(12)) is True                  # a good one still goes in
        assert store.append_many([rec(13), rec(14)]) == 2
        store.flush()
        assert ids(all_events(store)) == ["h-12", "h-13", "h-14"]
        assert store.stats()["appended"] == 3


@pytest.mark.timeout(30)
def test_each_filter_selects_exactly_its_events(db: str) -> None:
    records = [rec(i) for i in range(300)]
    records += [rec(300, comm="50%_off", name="read", args={}), rec(301, comm="50Xyoff", name="read", args={}),
                rec(302, kind="kprobe", name="do_sys_open", args={"note": "a_b"}),
                rec(303, kind="kprobe", name="do_sys_open", args={"note": "aXb"})]
    with EventStore(db) as store:
        store.append_many(records)
        store.flush()

        def check(expected: list[dict[str, Any]], **filters: Any) -> None:
            assert ids(all_events(store, **filters)) == ids(expected), filters
            assert store.count_events(**filters) == len(expected), filters

        check([r for r in records if r["vm"] == "vm1"], vms=["vm1"])
        check([r for r in records if r["vm"] in ("vm0", "vm2")], vms={"vm0", "vm2"})
        check([], vms=["vm9"])
        check([], vms=[])                                     # a tenant with no VMs sees nothing
        check(records, vms=None)
        many = [f"x{i}" for i in range(200)] + ["vm2"]        # beyond the inline IN list
        check([r for r in records if r["vm"] == "vm2"], vms=many)
        check(records[302:], kinds=["kprobe"])
        check([], kinds=["uprobe"])
        check([r for r in records if r["pid"] in (107, 149)], pids=[107, 149])
        check([], pids=[99])
        check(records[10:20], since=T0 + 1.0, until=T0 + 2.0)   # since inclusive, until exclusive
        check([], since=T0 + 1000)
        check(records[:5], until=T0 + 0.5)
        check([records[300]], text="50%_")                    # % and _ literal
        check([records[302]], text="a_b")
        check([], text="%%")
        check(records[:300], text="BIN/TRUE")                 # case-insensitive, in the args JSON
        check(records[300:302], text="READ")                  # in name
        check([records[300]], text="50%_", vms=["vm0"], kinds=["syscall"], pids=[100])
        check([], text="50%_", vms=["vm1"])


@pytest.mark.timeout(60)
def test_cursor_paging_returns_every_event_once_in_order(db: str) -> None:
    # times out of append order, some equal: the order is (time, then storage order)
    records = [rec(i, time=T0 + (i * 7919) % 1000) for i in range(2345)]
    with EventStore(db) as store:
        store.append_many(records)
        store.flush()
        expected = ids(sorted(records, key=lambda r: (r["time"], int(r["id"][2:]))))
        for order, want in (("asc", expected), ("desc", expected[::-1])):
            got: list[str] = []
            pages = 0
            cursor = None
            while True:
                page, cursor = store.events(limit=100, cursor=cursor, order=order)
                pages += 1
                got.extend(ids(page))
                if cursor is None:
                    break
                assert len(page) == 100
            assert pages == 24
            assert got == want
        # an exact multiple: the last full page says there is no more
        page, cursor = store.events(limit=2345)
        assert len(page) == 2345 and cursor is None
        page, cursor = store.events(limit=2344)
        assert len(page) == 2344 and cursor is not None
        assert ids(store.events(cursor=cursor)[0]) == [expected[-1]]


@pytest.mark.timeout(30)
def test_bad_limits_and_cursors_are_store_errors(db: str) -> None:
    with EventStore(db) as store:
        store.append_many(rec(i) for i in range(5))
        store.audit(tenant="t", vm=None, operation="list", allowed=True, status=200, client="::1")
        store.audit(tenant="t", vm=None, operation="list", allowed=True, status=200, client="::1")
        store.flush()
        for limit in (0, 10_001, -1, True, "5", 2.0):
            with pytest.raises(StoreError, match="limit"):
                store.events(limit=limit)
            with pytest.raises(StoreError, match="limit"):
                store.audit_rows(limit=limit)
        assert len(store.events(limit=1)[0]) == 1
        assert len(store.events(limit=10_000)[0]) == 5
        good = store.events(limit=2)[1]
        audit_cursor = store.audit_rows(limit=1)[1]
        assert good is not None and audit_cursor is not None

        def b64(text: str) -> str:
            return base64.urlsafe_b64encode(text.encode()).decode()

        bad = ["", "!!!", "zzzz", good + "!", "1; DROP TABLE events", "' OR 1=1 --", "é",
               b64("ea:abc:1"), b64("ea:1.0:-1"), b64("ea:inf:1"), b64("ea:nan:1"), b64("ea:1.0:99999999999999999999"),
               b64("ea:1.0:1) OR (1=1"), b64("ea:1"), "A" * 500, 17]
        for cursor in bad:
            with pytest.raises(StoreError, match="cursor"):
                store.events(cursor=cursor)
        with pytest.raises(StoreError, match="another listing"):
            store.events(cursor=audit_cursor)
        with pytest.raises(StoreError, match="another listing"):
            store.audit_rows(cursor=good)
        with pytest.raises(StoreError, match="order=asc"):
            store.events(cursor=good, order="desc")
        with pytest.raises(StoreError, match="order"):
            store.events(order="up")
        for filters in ({"vms": "vm1"}, {"pids": ["1"]}, {"pids": [True]}, {"kinds": [1]}, {"since": "x"},
                        {"until": float("inf")}, {"text": 5}, {"text": "x" * 257}, {"pids": [2**70]}):
            with pytest.raises(StoreError):
                store.events(**filters)
        assert isinstance(StoreError("x"), AradiaError)
        assert store.count_events() == 5                     # nothing dropped by any of that
        assert ids(store.events(cursor=good)[0]) == ["h-2", "h-3", "h-4"]


@pytest.mark.timeout(30)
def test_a_duplicate_id_is_stored_once_and_counted(db: str) -> None:
    with EventStore(db) as store:
        assert store.append(rec(1, comm="first"))
        store.flush()
        assert store.append(rec(1, comm="second"))           # in a later batch
        assert store.append_many([rec(2), rec(2, comm="third"), rec(3)]) == 3   # within one batch
        store.flush()
        st = store.stats()
        assert (st["appended"], st["committed"], st["duplicates"], st["rows"]) == (5, 5, 2, 3)
        got = all_events(store)
        assert ids(got) == ["h-1", "h-2", "h-3"]
        assert [r["comm"] for r in got] == ["first", "sh", "sh"]
        # a batch bigger than one multi-row INSERT (500 rows), each id twice
        twice = [rec(1000 + i // 2, comm=f"c{i}") for i in range(1200)]
        assert store.append_many(twice) == 1200
        store.flush()
        st = store.stats()
        assert (st["appended"], st["committed"], st["duplicates"], st["rows"]) == (1205, 1205, 602, 603)
        got = all_events(store, since=T0 + 100)
        assert ids(got) == [f"h-{1000 + i}" for i in range(600)]
        assert [r["comm"] for r in got] == [f"c{2 * i}" for i in range(600)]   # the first copy kept


@pytest.mark.timeout(30)
def test_commits_are_batched_at_most_commit_interval_apart(db: str) -> None:
    calls: list[tuple[float, int]] = []
    interval = 0.1
    with EventStore(db, commit_interval=interval,
                    on_commit=lambda n: calls.append((time.monotonic(), n))) as store:
        start = time.monotonic()
        for step in range(100):                               # 3,000 events over about 1 s
            store.append_many(rec(step * 30 + k) for k in range(30))
            time.sleep(0.01)
        last = time.monotonic()
        wait_until(lambda: store.stats()["committed"] == 3000, 5, "the writer to commit without a flush")
        latency = time.monotonic() - last
        elapsed = time.monotonic() - start
        st = store.stats()
    assert sum(n for _, n in calls) == 3000
    assert st["commits"] == len(calls)
    # A commit per append would be ~100 transactions; a commit only at the end 1.
    assert 3 <= len(calls) <= elapsed / interval + 2, (len(calls), elapsed)
    # the last events waited for the interval, not for a flush (1 s slack: a loaded, shared host)
    assert latency <= interval + 1.0


CHILD = textwrap.dedent("""
    import sys
    from aradia.service.store import EventStore
    path, n = sys.argv[1], int(sys.argv[2])

    def rec(i):
        return {"schema": 1, "id": f"h-{i}", "time": 1.0 + i, "host": "hv1", "vm": "vm1", "vcpu": 0,
                "kind": "syscall", "name": "execve", "pid": i, "tgid": i, "comm": "sh", "uid": 0,
                "args": {"pad": "x" * 100, "i": i}}

    store = EventStore(path, commit_interval=0.01)
    for i in range(n):
        store.append(rec(i))
    store.flush(30)
    print("flushed", flush=True)
    i = n
    told = False
    while True:
        if store.append(rec(i)):
            i += 1
        if not told and i % 1000 == 0:
            committed = store.stats()["committed"]
            if committed >= n + 1000:  # acknowledged beyond the flush, and still appending
                print(f"committed {committed}", flush=True)
                told = True
""")


@pytest.mark.timeout(60)
def test_flushed_events_survive_kill_9_and_the_database_is_intact(db: str) -> None:
    n = 20_000
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, db, str(n)], stdout=subprocess.PIPE, text=True,
                             env=env)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "flushed"
        word, count = child.stdout.readline().split()
        assert word == "committed"
        acknowledged = int(count)
        child.send_signal(signal.SIGKILL)                     # while it appends and commits more
        assert child.wait(10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    flushed = conn.execute("SELECT count(*) FROM events WHERE pid < ?", (n,)).fetchone()[0]
    total, top = conn.execute("SELECT count(*), max(pid) FROM events").fetchone()
    conn.close()
    assert flushed == n
    assert total >= acknowledged > n                          # every one the store had committed
    assert top == total - 1                                   # committed in order: no gaps
    with EventStore(db) as store:                             # and the store opens it again
        assert store.stats()["rows"] == total
        assert store.append(rec(total))
        store.flush()
        assert store.count_events() == total + 1


@pytest.mark.timeout(30)
def test_retention_by_age_deletes_exactly_the_old_events(db: str) -> None:
    now = time.time()
    old = [rec(i, time=now - 1000 + i) for i in range(300)]
    new = [rec(1000 + i, time=now + i / 100) for i in range(200)]
    with EventStore(db, max_age=100, retention_interval=0.05) as store:
        for i in range(30):                                   # audit rows age out by the same rule
            store.audit(tenant="t", vm=None, operation="vms", allowed=True, status=200, client="c",
                        detail=str(i), time=now - 1000 + i if i < 20 else now)
        store.append_many(old + new)
        store.flush()
        wait_until(lambda: store.stats()["expired"] == 300, 10, "300 events to expire")
        time.sleep(0.3)                                       # more retention runs: the new ones stay
        st = store.stats()
        assert (st["expired"], st["rows"]) == (300, 200)
        assert ids(all_events(store)) == ids(new)
        assert [r["detail"] for r in store.audit_rows(limit=100)[0]] == [str(i) for i in range(20, 30)]
    with EventStore(db) as store:                             # no max_age: nothing more goes
        time.sleep(0.1)
        assert store.stats()["expired"] == 0 and store.count_events() == 200


@pytest.mark.timeout(60)
def test_retention_by_size_keeps_the_newest_events_under_max_bytes(db: str) -> None:
    n = 20_000
    limit = 1 << 20
    records = [rec(i, args={"pad": "p" * 200, "i": i}) for i in range(n)]
    with EventStore(db, max_bytes=limit, retention_interval=0.05) as store:
        store.append_many(records)
        store.flush()
        wait_until(lambda: store.stats()["used_bytes"] <= limit and store.stats()["expired"] > 0, 20,
                   "retention to bring the data under max_bytes")
        st = store.stats()
        rows = int(st["rows"])
        assert 0 < rows < n
        assert rows + st["expired"] == n
        assert ids(all_events(store)) == ids(records[n - rows:])   # the oldest went
        assert store.count_events() == rows
    with EventStore(db) as unbounded:                         # the same data without max_bytes stays
        unbounded.append_many(records)
        unbounded.flush()
        assert unbounded.stats()["used_bytes"] > limit
        assert unbounded.count_events() == n


@pytest.mark.timeout(30)
def test_audit_rows_round_trip_filter_and_page(db: str) -> None:
    entries = [
        {"tenant": "alice", "vm": "web1", "operation": "trace.create", "allowed": True, "status": 201,
         "client": "10.0.0.5:5123", "detail": "syscall execve", "time": T0},
        {"tenant": "bob", "vm": "web1", "operation": "trace.create", "allowed": False, "status": 403,
         "client": "10.0.0.6:4000", "detail": "vm not in tenant", "time": T0 + 1},
        {"tenant": "alice", "vm": None, "operation": "events.list", "allowed": True, "status": 200,
         "client": "[::1]:80", "detail": "", "time": T0 + 2},
        {"tenant": "bob", "vm": "db1", "operation": "ps", "allowed": True, "status": 200,
         "client": "10.0.0.6:4001", "detail": "ünïcode", "time": T0 + 3},
        {"tenant": "carol", "vm": "db1", "operation": "ps", "allowed": False, "status": 429,
         "client": "10.0.0.7:1", "detail": "rate", "time": T0 + 4},
    ]
    with EventStore(db) as store:
        for e in entries:
            store.audit(**e)
        before = time.time()
        store.audit(tenant="dave", vm=None, operation="health", allowed=True, status=200, client="c")
        store.flush()
        rows, cursor = store.audit_rows()
        assert cursor is None
        assert rows[:5] == entries
        assert before <= rows[5]["time"] <= time.time()
        assert store.audit_rows(tenant="alice")[0] == [entries[0], entries[2]]
        assert store.audit_rows(tenant="nobody")[0] == []
        assert store.audit_rows(allowed=False)[0] == [entries[1], entries[4]]
        assert store.audit_rows(tenant="bob", allowed=True)[0] == [entries[3]]
        assert store.audit_rows(order="desc", limit=2)[0] == [rows[5], entries[4]]
        got: list[dict[str, Any]] = []
        cursor = None
        pages = 0
        while True:
            page, cursor = store.audit_rows(limit=2, cursor=cursor)
            got.extend(page)
            pages += 1
            if cursor is None:
                break
        assert got == rows and pages == 3
        for bad in ({"allowed": "yes"}, {"status": "200"}, {"tenant": None}, {"vm": 5}, {"time": float("nan")}):
            with pytest.raises(StoreError):
                store.audit(**{**entries[0], **bad})
        with pytest.raises(StoreError):
            store.audit_rows(allowed=1)
    with EventStore(db) as store:
        assert store.audit_rows()[0] == rows
        assert store.stats()["rows"] == 0                     # audit rows are not events


@pytest.mark.timeout(30)
def test_traces_are_saved_replaced_deleted_and_survive_reopen(db: str) -> None:
    t1 = {"id": "tr-1", "vm": "web1", "tenant": "alice", "spec": {"syscalls": ["execve"], "pid": None},
          "created": T0}
    t2 = {"id": "tr-2", "vm": "db1", "tenant": "bob", "spec": {"kprobes": ["do_sys_open"]}, "created": T0 + 1}
    with EventStore(db) as store:
        store.save_trace(t1)
        store.save_trace(t2)
        assert store.traces() == [t1, t2]
        t1b = {**t1, "spec": {"syscalls": ["execve", "openat"]}}
        store.save_trace(t1b)
        assert store.traces() == [t1b, t2]
        for bad in ({**t1, "vm": "web 1"}, {**t1, "spec": "x"}, {"id": "x"}, {**t1, "id": ""},
                    {**t1, "created": "now"}, {**t1, "spec": {"x": float("nan")}}):
            with pytest.raises(StoreError):
                store.save_trace(bad)
        with pytest.raises(StoreError):
            store.delete_trace(5)  # type: ignore[arg-type]
    # committed synchronously: seen by another connection before any close
    with EventStore(db) as store:
        assert store.traces() == [t1b, t2]
        assert store.delete_trace("tr-1") is True
        assert store.delete_trace("tr-1") is False
        assert store.delete_trace("tr-9") is False
    with EventStore(db) as store:
        assert store.traces() == [t2]


@pytest.mark.timeout(60)
def test_full_queue_drops_and_counts_and_a_failed_batch_is_retried(db: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="aradia.service.store")
    store = EventStore(db, queue_limit=10, busy_timeout=0.05, commit_interval=0.01)
    blocker = sqlite3.connect(db, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")                    # holds the write lock: the writer cannot commit
        results = [store.append(rec(i)) for i in range(15)]
        assert results == [True] * 10 + [False] * 5
        assert store.append_many([rec(20), rec(21), rec(22)]) == 0
        wait_until(lambda: store.stats()["failures"] >= 2, 10, "the writer to fail and retry")
        st = store.stats()
        assert (st["appended"], st["committed"], st["dropped"], st["lag"]) == (10, 0, 8, 10)
        with pytest.raises(StoreError, match="timed out"):
            store.flush(timeout=0.2)
        assert "kept for a retry" in caplog.text
        blocker.execute("COMMIT")                             # the disk is back
        store.flush(10)
        st = store.stats()
        assert (st["appended"], st["committed"], st["dropped"], st["lag"], st["rows"]) == (10, 10, 8, 0, 10)
        assert ids(all_events(store)) == [f"h-{i}" for i in range(10)]
        assert store.append(rec(30)) is True                  # room again
        store.flush()
        assert store.count_events() == 11
    finally:
        blocker.close()
        store.close()


@pytest.mark.timeout(60)
def test_many_threads_append_and_read_at_once(db: str) -> None:
    errors: list[BaseException] = []
    done = threading.Event()
    with EventStore(db) as store:

        def writer(k: int) -> None:
            try:
                for i in range(2500):
                    assert store.append(rec(k * 10_000 + i, vm=f"vm{k}"))
            except BaseException as exc:
                errors.append(exc)

        def reader() -> None:
            try:
                while not done.is_set():
                    page, _ = store.events(vms=["vm1"], limit=50)
                    assert all(r["vm"] == "vm1" for r in page)
                    store.count_events(kinds=["syscall"])
            except BaseException as exc:
                errors.append(exc)

        readers = [threading.Thread(target=reader) for _ in range(2)]
        writers = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
        for t in readers + writers:
            t.start()
        for t in writers:
            t.join()
        store.flush()
        done.set()
        for t in readers:
            t.join()
        assert errors == []
        assert store.count_events() == 10_000
        for k in range(4):
            assert ids(all_events(store, vms=[f"vm{k}"])) == [f"h-{k * 10_000 + i}" for i in range(2500)]


@pytest.mark.timeout(30)
def test_bad_settings_foreign_files_and_a_closed_store_are_store_errors(tmp_path: Path) -> None:
    for kwargs in ({"queue_limit": 0}, {"commit_interval": 0}, {"max_age": -1}, {"max_bytes": 0},
                   {"busy_timeout": True}):
        with pytest.raises(StoreError):
            EventStore(tmp_path / "a.db", **kwargs)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreError, match=r"junk\.db"):
        EventStore(junk)
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE people (name TEXT)").connection.commit()
    with pytest.raises(StoreError, match="not an aradia event store"):
        EventStore(other)
    with pytest.raises(StoreError):
        EventStore(tmp_path)                                  # a directory
    store = EventStore(tmp_path / "ok.db")
    assert store.append(rec(1))
    store.close()
    store.close()                                             # twice is harmless
    for call in (lambda: store.append(rec(2)), lambda: store.events(), lambda: store.traces(),
                 lambda: store.audit(tenant="t", vm=None, operation="o", allowed=True, status=200, client="c")):
        with pytest.raises(StoreError, match="closed"):
            call()
    with EventStore(tmp_path / "ok.db") as again:
        assert ids(again.events()[0]) == ["h-1"]              # close() committed what was queued


@pytest.mark.timeout(30)
def test_sources_lists_each_host_and_vm_with_its_count(db: str) -> None:
    with EventStore(db) as store:
        assert store.sources() == []
        store.append_many([rec(i) for i in range(10)] + [rec(100 + i, host="hv2", vm="web") for i in range(4)])
        store.flush()
        assert store.sources() == [
            {"host": "hv1", "name": "vm0", "events": 4, "last_event": T0 + 0.9},
            {"host": "hv1", "name": "vm1", "events": 3, "last_event": T0 + 0.7},
            {"host": "hv1", "name": "vm2", "events": 3, "last_event": T0 + 0.8},
            {"host": "hv2", "name": "web", "events": 4, "last_event": T0 + 10.3}]
