"""``aradia serve`` benchmark, section **bus**: events/s into NATS JetStream through the real pipeline.

Starts its own ``nats-server -js`` (temp store dir, free port) and, in alternating rounds, publishes
``--bus-events`` synthetic records (syscall-like, ~330 bytes of JSON each):

* **baseline**: raw nats-py ``js.publish`` awaited one by one (each waits for its PubAck, header
  ``Nats-Msg-Id``, same subjects and JSON bytes): what a naive publisher gets;
* **EventBus**: :meth:`aradia.service.bus.EventBus.publish` of every record (the caller's side: JSON
  encoding and the spool) then :meth:`~aradia.service.bus.EventBus.flush` until every PubAck is in:
  the time from the first publish to the last ack.

After each round the stream must have grown by exactly the records published ("lost" must be 0).
Each side keeps its best round (other work on the shared host only slows a round down), the median
in brackets. ``bench_bus(args) -> list[str]`` returns the lines to print, the ratio last; it is
``bench/service.py``'s ``bus`` section:

    python bench/service.py --only bus [--bus-events 50000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from typing import Any

import nats

from aradia.service.bus import STREAM, EventBus, event_subject
from service_records import synthetic_records


def start_nats(store_dir: str) -> tuple[subprocess.Popen[bytes], str]:
    """A ``nats-server -js`` on a free port of 127.0.0.1 with its store in ``store_dir``, and its URL."""
    binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
    if not os.access(binary, os.X_OK):
        raise SystemExit("nats-server is not installed: run `bash scripts/dev.sh setup`")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "-js", "-sd", store_dir, "-p", str(port), "-a", "127.0.0.1"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and proc.poll() is None:
        with socket.socket() as s:
            try:
                s.connect(("127.0.0.1", port))
                if s.recv(5) == b"INFO ":
                    return proc, f"nats://127.0.0.1:{port}"
            except OSError:
                time.sleep(0.02)
    proc.kill()
    raise SystemExit("nats-server did not start")


async def stream_messages(url: str) -> int:
    """How many messages the events stream holds."""
    nc = await nats.connect(url)
    try:
        return int((await nc.jetstream().stream_info(STREAM)).state.messages)
    finally:
        await nc.close()


async def raw_one_by_one(url: str, records: list[dict[str, Any]]) -> float:
    """Seconds to ``js.publish`` every record, each PubAck awaited before the next (JSON included)."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    try:
        t0 = time.perf_counter()
        for r in records:
            await js.publish(event_subject(r), json.dumps(r, separators=(",", ":")).encode(),
                             headers={"Nats-Msg-Id": r["id"]})
        return time.perf_counter() - t0
    finally:
        await nc.close()


async def through_bus(url: str, records: list[dict[str, Any]]) -> tuple[float, float, dict[str, Any]]:
    """Seconds from the first ``EventBus.publish`` to the flush's end, seconds of the publish calls
    alone, and the bus's stats."""
    bus = EventBus(url, "hv1")
    await bus.start()
    try:
        t0 = time.perf_counter()
        for r in records:
            bus.publish(r)
        t1 = time.perf_counter()
        await bus.flush(300)
        return time.perf_counter() - t0, t1 - t0, bus.stats()
    finally:
        await bus.close()


def bench_bus(args: argparse.Namespace) -> list[str]:
    """The bus section: EventBus.publish + flush against raw one-by-one js.publish; the lines to print."""
    n, rounds = args.bus_events, args.rounds
    out: list[str] = []
    rates: dict[str, list[float]] = {"raw js.publish one by one": [], "EventBus publish+flush": []}
    call_rates: list[float] = []
    lost_total = 0
    with tempfile.TemporaryDirectory(prefix="aradia-bench-bus-") as tmp:
        proc, url = start_nats(os.path.join(tmp, "js"))
        try:
            asyncio.run(through_bus(url, []))       # creates the stream
            for rnd in range(1, rounds + 1):
                before = asyncio.run(stream_messages(url))
                raw = asyncio.run(raw_one_by_one(url, synthetic_records(n, f"raw{rnd}")))
                mid = asyncio.run(stream_messages(url))
                elapsed, calls, stats = asyncio.run(through_bus(url, synthetic_records(n, f"bus{rnd}")))
                after = asyncio.run(stream_messages(url))
                lost = (n - (mid - before)) + (n - (after - mid))
                lost_total += lost
                rates["raw js.publish one by one"].append(n / raw)
                rates["EventBus publish+flush"].append(n / elapsed)
                call_rates.append(n / calls)
                out.append(f"round {rnd}: raw one by one {n / raw:,.0f} events/s; "
                           f"EventBus {n / elapsed:,.0f} events/s (publish calls alone {n / calls:,.0f}/s, "
                           f"retries {stats['retries']}, "
                           f"dropped {stats['dropped']}); lost {lost}")
        finally:
            proc.kill()
            proc.wait()
    best = {k: max(v) for k, v in rates.items()}
    for name, v in rates.items():
        out.append(f"{name}: {n:,} events, best {best[name]:,.0f} events/s "
                   f"(median {statistics.median(v):,.0f}; {len(v)} rounds)")
    out.append(f"EventBus.publish alone (caller's side, never waits for the broker): {max(call_rates):,.0f} "
               f"events/s (median {statistics.median(call_rates):,.0f})")
    verdict = "OK" if lost_total == 0 else "FAILED"
    out.append(f"check lost == 0 over {rounds} rounds: lost {lost_total} {verdict}")
    out.append(f"ratio EventBus/raw-one-by-one: "
               f"{best['EventBus publish+flush'] / best['raw js.publish one by one']:.2f}x")
    return out
