"""``aradia serve`` benchmarks from one run: store, bus (a real nats-server) and guest (a real guest).

* **store**: events/s ingested into SQLite through :class:`aradia.service.store.EventStore`
  (``append`` of every record, then ``flush``: from the first append to the last commit), against a
  baseline measured in the same run: a bare ``executemany`` of the same records into an identical
  table (same schema and indexes, same WAL/``synchronous`` settings, one transaction; the time
  includes building the row tuples and the args JSON, nothing else). Fresh database files each
  round; rounds alternate baseline and store; each keeps its best round (other work on the shared
  host only ever slows a round down), the median follows in brackets. "lost" is the records
  appended minus the rows found by ``count(*)`` after the flush; it must be 0. Then **store
  sustained**: ``--rate`` events/s offered for ``--seconds``, a slice every 2 ms with a sleep between
  (a producer that waits for I/O, as the service's event loop does): the rate committed meanwhile and
  the worst lag (events queued, not yet committed).

* **bus** (``service_bus.py``): events/s into JetStream through ``EventBus.publish`` + ``flush``
  against raw ``js.publish`` awaited one by one, same records, same server.
* **guest** (``service_guest.py``): ``processes`` through the API against the direct library call on
  one idle guest, and the latency from a traced guest exec to a WebSocket subscriber (p50/p99).
* **browser** (``service_browser.py``): guest exec -> row visible in the dashboard's live table
  (timed by the page itself), p50/p99, against the same events' arrival in a Python WebSocket client.

Ratios are printed last. Usage:

    python bench/service.py [--only store|bus|guest|browser] [--events 200000] [--rounds 3] [--rate 50000]
                            [--seconds 4] [--bus-events 50000] [--api-calls 50] [--execs 200]

Exit status 1 if a check fails (an event lost or missing). To add a section: one
``bench_<name>(args) -> Results`` function, an entry in ``SECTIONS``.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aradia.service import store_sql
from aradia.service.store import EventStore
from service_records import synthetic_records


@dataclass
class Results:
    """What a section measured: ratio lines (printed last) and whether its checks passed."""

    ratios: list[str] = field(default_factory=list)
    ok: bool = True


def bare_executemany(path: str, records: list[dict[str, Any]]) -> float:
    """Seconds to build rows (args as JSON) and ``executemany`` them in one transaction into an
    identical table: the floor of any SQLite ingest path."""
    conn = store_sql.connect(path, busy_timeout=5.0)
    store_sql.create_tables(conn, path)
    encode = store_sql.ARGS_JSON.encode
    start = time.perf_counter()
    rows = [(r["id"], r["time"], r["host"], r["vm"], r["vcpu"], r["kind"], r["name"], r["pid"], r["tgid"],
             r["comm"], r["uid"], encode(r["args"]), r["schema"]) for r in records]
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(store_sql.INSERT_EVENT, rows)
    conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    stored = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    conn.close()
    if stored != len(records):
        raise RuntimeError(f"bare executemany stored {stored} of {len(records)} rows")
    return elapsed


def store_ingest(path: str, records: list[dict[str, Any]]) -> tuple[float, float, int, dict[str, Any]]:
    """(seconds to append + flush, seconds of the appends alone, events lost, the store's stats)."""
    with EventStore(path) as store:
        start = time.perf_counter()
        for r in records:
            store.append(r)
        appended = time.perf_counter() - start
        store.flush(timeout=600)
        elapsed = time.perf_counter() - start
        stats = store.stats()
        lost = len(records) - store.count_events()
    return elapsed, appended, lost, stats


def store_sustained(path: str, records: list[dict[str, Any]], rate: float) -> dict[str, float]:
    """Offer ``records`` at ``rate``/s, in slices every 2 ms with a sleep between (as an event loop
    that waits for I/O would): committed rate while offering, worst lag, dropped and lost."""
    worst_lag = 0
    with EventStore(path) as store:
        start = time.monotonic()
        i = 0
        while i < len(records):
            due = min(len(records), int((time.monotonic() - start) * rate) + 1)
            while i < due:
                store.append(records[i])
                i += 1
            worst_lag = max(worst_lag, int(store.stats()["lag"]))
            time.sleep(0.002)
        offered = time.monotonic() - start
        stats = store.stats()
        store.flush(timeout=600)
        lost = len(records) - store.count_events()
    return {"offered_s": offered, "offered_rate": len(records) / offered,
            "committed_rate": stats["committed"] / offered, "worst_lag": worst_lag,
            "dropped": stats["dropped"], "lost": lost}


def bench_store(args: argparse.Namespace) -> Results:
    """The store section: EventStore.append + flush against a bare executemany, best of the rounds."""
    n = args.events
    rates: dict[str, list[float]] = {"bare executemany": [], "store ingest": []}
    append_rates: list[float] = []
    results = Results()
    lost_total = 0
    with tempfile.TemporaryDirectory(prefix="aradia-bench-store-") as tmp:
        for rnd in range(1, args.rounds + 1):
            records = synthetic_records(n, f"r{rnd}")
            bare = bare_executemany(os.path.join(tmp, f"bare{rnd}.db"), records)
            rates["bare executemany"].append(n / bare)
            elapsed, appended, lost, stats = store_ingest(os.path.join(tmp, f"store{rnd}.db"), records)
            rates["store ingest"].append(n / elapsed)
            append_rates.append(n / appended)
            lost_total += lost
            print(f"round {rnd}: bare executemany: {n:,} events in {bare:.2f} s = {n / bare:,.0f} events/s; "
                  f"store ingest: {n:,} events in {elapsed:.2f} s = {n / elapsed:,.0f} events/s, lost {lost} "
                  f"(appends alone {n / appended:,.0f}/s, {stats['commits']} commits, "
                  f"db {stats['bytes'] / 1e6:.1f} MB)", flush=True)
        records = synthetic_records(int(args.rate * args.seconds), "sustained")
        sus = store_sustained(os.path.join(tmp, "sustained.db"), records, args.rate)
        lost_total += sus["lost"]
    best = {k: max(v) for k, v in rates.items()}
    for name in ("bare executemany", "store ingest"):
        v = rates[name]
        seconds = n / best[name]
        extra = f", lost {lost_total} over {len(v)} rounds" if name == "store ingest" else ""
        print(f"{name}: {n:,} events in {seconds:.2f} s = {best[name]:,.0f} events/s "
              f"(median {statistics.median(v):,.0f}; {len(v)} rounds){extra}")
    print(f"store appends alone (caller's side): {max(append_rates):,.0f} events/s "
          f"(median {statistics.median(append_rates):,.0f})")
    print(f"store sustained: offered {sus['offered_rate']:,.0f} events/s for {sus['offered_s']:.1f} s "
          f"(slices every 2 ms), committed meanwhile {sus['committed_rate']:,.0f}/s, worst lag "
          f"{sus['worst_lag']:,} events = {sus['worst_lag'] / args.rate:.2f} s, dropped {sus['dropped']}, "
          f"lost {sus['lost']}")
    target = 50_000
    print(f"check store ingest >= {target:,} events/s with 0 lost: {best['store ingest']:,.0f}/s, "
          f"lost {lost_total} {'OK' if lost_total == 0 and best['store ingest'] >= target else 'FAILED'}")
    results.ok = lost_total == 0 and best["store ingest"] >= target
    ratio = best["store ingest"] / best["bare executemany"]
    results.ratios.append(f"ratio store/bare-executemany: {ratio:.2f}x")
    return results


def bench_bus_section(args: argparse.Namespace) -> Results:
    """The bus section (``service_bus.py``): EventBus into a real nats-server against raw publishes."""
    from service_bus import bench_bus

    lines = bench_bus(args)
    for line in lines[:-1]:
        print(line)
    ok = any(line.startswith("check") and line.endswith("OK") for line in lines)
    return Results(ratios=[lines[-1]], ok=ok)


def bench_guest_section(args: argparse.Namespace) -> Results:
    """The guest sections (``service_guest.py``): API latency and exec -> WebSocket latency."""
    from service_guest import bench_guest

    ratios, ok = bench_guest(args)
    return Results(ratios=ratios, ok=ok)


def bench_browser_section(args: argparse.Namespace) -> Results:
    """The browser section (``service_browser.py``): exec -> dashboard row against exec -> WebSocket."""
    from service_browser import bench_browser

    ratios, ok = bench_browser(args)
    return Results(ratios=ratios, ok=ok)


SECTIONS: dict[str, Callable[[argparse.Namespace], Results]] = {
    "store": bench_store, "bus": bench_bus_section, "guest": bench_guest_section,
    "browser": bench_browser_section}


def main() -> int:
    """Run the chosen sections (all by default); print each section's lines, the ratios last."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=sorted(SECTIONS), action="append",
                    help="run only this section (repeatable); default: all")
    ap.add_argument("--events", type=int, default=200_000, help="store: records per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rate", type=float, default=50_000, help="store sustained: events/s offered")
    ap.add_argument("--seconds", type=float, default=4.0, help="store sustained: for how long")
    ap.add_argument("--bus-events", type=int, default=50_000, help="bus: records per round and side")
    ap.add_argument("--api-calls", type=int, default=50, help="guest: processes calls per side")
    ap.add_argument("--execs", type=int, default=200, help="guest, browser: execs traced")
    args = ap.parse_args()
    if args.events < 1 or args.rounds < 1:
        ap.error("--events and --rounds must be positive")
    print(f"host: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start; "
          f"SQLite {sqlite3.sqlite_version}, Python {sys.version.split()[0]}", flush=True)
    started = time.monotonic()
    ratios: list[str] = []
    ok = True
    for name in args.only or list(SECTIONS):
        print(f"== {name}", flush=True)
        res = SECTIONS[name](args)
        ratios.extend(res.ratios)
        ok = ok and res.ok
    print(f"total run time {time.monotonic() - started:.0f} s; "
          f"load average {os.getloadavg()[0]:.2f} at the end")
    for line in ratios:
        print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
