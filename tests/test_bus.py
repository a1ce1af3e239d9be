"""EventBus against a real nats-server with JetStream (no guest): every record in the stream exactly
once, on its subject, through duplicates, a broker killed mid-publish, a broker away at start and a
full spool. Commands: ``test_bus_commands.py``; the fleet aggregator: ``test_bus_aggregate.py``."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from aradia.errors import AradiaError
from aradia.service.bus import STREAM, BusError, EventBus, command_subject, event_subject
from aradia.service.spool import Spool
from bus_helpers import make_record, read_stream, stream_messages
from nats_server import NatsServer, nats_server

__all__ = ["nats_server"]


@pytest.mark.timeout(10)
def test_subjects() -> None:
    r = make_record(1, host="hv-1", vm="web_2", kind="syscall")
    assert event_subject(r) == "aradia.events.hv-1.web_2.syscall"
    # a kind with characters that are not token-safe (".", "*", ">", space) becomes one safe token
    assert event_subject({**r, "kind": "a.b*> c"}) == "aradia.events.hv-1.web_2.a_b___c"
    assert event_subject({**r, "kind": ""}) == "aradia.events.hv-1.web_2._"
    assert command_subject("hv-1", "web_2") == "aradia.cmd.hv-1.web_2"
    for bad in ("a.b", "*", ">", "", "x" * 65, "a b"):
        with pytest.raises(BusError, match="not a name"):
            event_subject({**r, "host": bad})
        with pytest.raises(BusError, match="not a name"):
            event_subject({**r, "vm": bad})
        with pytest.raises(BusError, match="not a name"):
            command_subject("hv1", bad)
    assert issubclass(BusError, AradiaError)


@pytest.mark.timeout(10)
def test_spool_order_limit_and_settle() -> None:
    woken: list[int] = []
    spool: Spool[int] = Spool(5, lambda: woken.append(1))
    assert [spool.put(i) for i in range(7)] == [True] * 5 + [False] * 2
    assert (len(spool), spool.dropped, spool.high_water, len(woken)) == (5, 2, 5, 1)
    assert spool.peek(3) == [0, 1, 2]
    spool.settle(3, [1])            # 0 and 2 delivered, 1 failed: it stays first
    assert spool.peek(10) == [1, 3, 4]
    spool.settle(3, [])
    assert (spool.peek(10), len(woken)) == ([], 1)
    assert spool.put(9) and len(woken) == 2     # the empty peek armed the wake-up again
    assert spool.put(10) and len(woken) == 2
    with pytest.raises(AradiaError, match="positive integer"):
        Spool(0)


@pytest.mark.timeout(60)
def test_publish_5000_each_in_the_stream_once_on_its_subject(nats_server: NatsServer) -> None:
    n = 5000
    kinds = ("syscall", "call", "return")
    records = [make_record(i, vm=f"vm{i % 2}", kind=kinds[i % 3]) for i in range(n)]

    async def scenario() -> tuple[dict, list]:
        bus = EventBus(nats_server.url, "hv1")
        await bus.start()
        assert bus.stats()["connected"] is True
        for r in records:
            bus.publish(r)
        await bus.flush(30)
        stats = bus.stats()
        await bus.close()
        return stats, await read_stream(nats_server.url)

    stats, got = asyncio.run(scenario())
    assert (stats["published"], stats["spooled"], stats["dropped"], stats["rejected"]) == (n, 0, 0, 0)
    assert len(got) == n
    assert len({rid for _, rid, _ in got}) == n
    assert [rec for _, _, rec in got] == records            # in order, unchanged
    for subject, rid, rec in got:
        assert rid == rec["id"]
        assert subject == f"aradia.events.hv1.{rec['vm']}.{rec['kind']}"
    assert asyncio.run(stream_messages(nats_server.url)) == n


@pytest.mark.timeout(60)
def test_same_id_twice_is_stored_once(nats_server: NatsServer) -> None:
    first, other = make_record(1), make_record(2)

    async def scenario() -> dict:
        bus = EventBus(nats_server.url, "hv1")
        await bus.start()
        bus.publish(first)
        await bus.flush()
        bus.publish({**first, "comm": "changed"})   # a retry of the same id: the broker keeps the first
        bus.publish(other)
        await bus.flush()
        stats = bus.stats()
        await bus.close()
        return stats

    stats = asyncio.run(scenario())
    assert (stats["published"], stats["duplicates"]) == (3, 1)
    got = asyncio.run(read_stream(nats_server.url))
    assert [rec for _, _, rec in got] == [first, other]


@pytest.mark.timeout(120)
def test_broker_killed_mid_publish_loses_nothing(nats_server: NatsServer) -> None:
    """SIGKILL the broker while a thread publishes (the tracer's worker), restart it on the same port
    and store: every record is in the stream exactly once, and none was dropped."""
    n, rate = 30_000, 10_000            # records, per second: 3 s of publishing
    records = [make_record(i, kind="syscall" if i % 2 else "call") for i in range(n)]

    def produce(bus: EventBus) -> None:
        t0 = time.monotonic()
        for i, r in enumerate(records):
            bus.publish(r)
            if i % 100 == 99:
                time.sleep(max(0.0, t0 + (i + 1) / rate - time.monotonic()))

    async def scenario() -> tuple[dict, int, int, bool]:
        bus = EventBus(nats_server.url, "hv1", reconnect_wait=0.2, ack_timeout=2.0)
        await bus.start()
        producer = threading.Thread(target=produce, args=(bus,))
        producer.start()
        while bus.stats()["published"] < 5000:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(nats_server.kill)
        await asyncio.sleep(1.0)                    # the broker is away for a second; the tracer goes on
        spooled_while_down = bus.stats()["spooled"]
        connected_while_down = bus.stats()["connected"]
        published_while_down = bus.stats()["published"]
        await asyncio.to_thread(nats_server.start)
        await asyncio.to_thread(producer.join)
        await bus.flush(60)
        stats = bus.stats()
        await bus.close()
        return stats, spooled_while_down, published_while_down, connected_while_down

    stats, spooled_down, published_down, connected_down = asyncio.run(scenario())
    assert connected_down is False
    assert spooled_down > 1000, "records spool while the broker is away"
    assert published_down < n
    assert (stats["published"], stats["spooled"], stats["dropped"]) == (n, 0, 0)
    got = asyncio.run(read_stream(nats_server.url))
    ids = [rid for _, rid, _ in got]
    assert len(set(ids)) == n, f"{n - len(set(ids))} records lost"
    assert len(ids) == n, f"{len(ids) - n} records stored twice"
    assert {rec["id"] for _, _, rec in got} == {r["id"] for r in records}


@pytest.mark.timeout(60)
def test_broker_down_at_start_then_drained(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "js")        # not started yet
    records = [make_record(i) for i in range(100)]

    async def scenario() -> tuple[float, dict, dict]:
        bus = EventBus(server.url, "hv1", reconnect_wait=0.2, start_wait=1.0)
        t0 = time.monotonic()
        await bus.start()
        start_took = time.monotonic() - t0
        for r in records:
            bus.publish(r)
        await asyncio.sleep(0.3)
        down = bus.stats()
        await asyncio.to_thread(server.start)
        await bus.flush(30)
        up = bus.stats()
        await bus.close()
        return start_took, down, up

    try:
        start_took, down, up = asyncio.run(scenario())
        got = asyncio.run(read_stream(server.url))
    finally:
        server.kill()
    assert start_took < 5.0
    assert (down["connected"], down["spooled"], down["published"]) == (False, 100, 0)
    assert (up["connected"], up["spooled"], up["published"], up["dropped"]) == (True, 0, 100, 0)
    assert [rec for _, _, rec in got] == records


@pytest.mark.timeout(60)
def test_full_spool_refuses_the_newest_counted_exactly(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "js")
    records = [make_record(i) for i in range(1500)]

    async def scenario() -> tuple[dict, dict]:
        bus = EventBus(server.url, "hv1", spool_limit=1000, reconnect_wait=0.2, start_wait=0.5)
        await bus.start()
        for r in records:
            bus.publish(r)
        full = bus.stats()
        await asyncio.to_thread(server.start)
        await bus.flush(30)
        after = bus.stats()
        await bus.close()
        return full, after

    try:
        full, after = asyncio.run(scenario())
        got = asyncio.run(read_stream(server.url))
    finally:
        server.kill()
    assert (full["spooled"], full["dropped"], full["spool_high"]) == (1000, 500, 1000)
    assert (after["published"], after["dropped"], after["spooled"]) == (1000, 500, 0)
    assert [rec["id"] for _, _, rec in got] == [r["id"] for r in records[:1000]]


@pytest.mark.timeout(60)
def test_bad_records_raise_oversize_is_rejected(nats_server: NatsServer) -> None:
    async def scenario() -> dict:
        bus = EventBus(nats_server.url, "hv1")
        await bus.start()
        with pytest.raises(BusError, match="string id"):
            bus.publish({**make_record(1), "id": None})
        with pytest.raises(BusError, match="not a name"):
            bus.publish({**make_record(1), "vm": "a.b"})
        with pytest.raises(BusError, match="not JSON"):
            bus.publish({**make_record(1), "args": {"x": object()}})
        with pytest.raises(BusError, match="dict"):
            bus.publish(["not", "a", "record"])     # type: ignore[arg-type]
        bus.publish({**make_record(2), "args": {"data": "x" * (2 << 20)}})     # 2 MiB: more than the broker takes
        bus.publish(make_record(3))
        await bus.flush()
        stats = bus.stats()
        await bus.close()
        return stats

    stats = asyncio.run(scenario())
    assert (stats["rejected"], stats["published"], stats["spooled"]) == (1, 1, 0)
    got = asyncio.run(read_stream(nats_server.url))
    assert [rec["id"] for _, _, rec in got] == [make_record(3)["id"]]
    with pytest.raises(BusError, match="not a name"):
        EventBus("nats://127.0.0.1:1", "bad.host")
    assert STREAM == "ARADIA_EVENTS"


@pytest.mark.timeout(60)
def test_stream_retention_is_set_when_configured_and_left_alone_otherwise(nats_server: NatsServer) -> None:
    import nats

    async def limits() -> tuple[float | None, int | None]:
        nc = await nats.connect(nats_server.url)
        try:
            cfg = (await nc.jetstream().stream_info(STREAM)).config
            return cfg.max_age, cfg.max_bytes
        finally:
            await nc.close()

    async def start(**kw: object) -> None:
        bus = EventBus(nats_server.url, "hv1", **kw)  # type: ignore[arg-type]
        await bus.start()
        bus.publish(make_record(1))
        await bus.flush(30)
        await bus.close()

    asyncio.run(start())
    age, size = asyncio.run(limits())
    assert (age or 0, size if size and size > 0 else None) == (0, None)  # created with no limits
    asyncio.run(start(max_age=3600.0, max_bytes=64 << 20))
    assert asyncio.run(limits()) == (3600.0, 64 << 20)  # an existing stream gets the configured limits
    asyncio.run(start())
    assert asyncio.run(limits()) == (3600.0, 64 << 20)  # not configured: the stream's limits stay
