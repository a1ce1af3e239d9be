"""The fleet view against a real nats-server and the real EventStore (no guest): two services publish
into one broker; the aggregator's store holds both hosts' events with counts equal to each host's own
store; records that are not valid, or claim another host than their subject, are counted and dropped."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import nats
import pytest

from aradia.service.bus import Aggregator, EventBus
from aradia.service.store import EventStore
from bus_helpers import make_record
from nats_server import NatsServer, nats_server

__all__ = ["nats_server"]


async def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.mark.timeout(120)
def test_two_hosts_into_one_aggregate(nats_server: NatsServer, tmp_path: Path) -> None:
    url = nats_server.url
    counts = {"hvA": 3000, "hvB": 2000}
    own = {host: EventStore(tmp_path / f"{host}.db") for host in counts}      # each service's own store
    fleet = EventStore(tmp_path / "fleet.db")

    async def publish_hostile() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()
        good = make_record(0, host="hvA", vm="vm1")
        hostile = [
            b"{not json",
            json.dumps({k: v for k, v in good.items() if k != "uid"}).encode(),     # a field missing
            json.dumps({**good, "id": "hvB-forged-1", "host": "hvB"}).encode(),       # hvA writing as hvB
            json.dumps({**good, "id": "hvA-wrong-kind", "kind": "call"}).encode(),    # kind not its subject's
        ]
        for i, data in enumerate(hostile):
            await js.publish("aradia.events.hvA.vm1.syscall", data, headers={"Nats-Msg-Id": f"hostile-{i}"})
        await nc.close()

    async def scenario() -> dict[str, Any]:
        aggregator = Aggregator(url, fleet, batch=300)
        await aggregator.start()           # before any publisher: it creates the stream itself
        buses = {host: EventBus(url, host) for host in counts}
        for bus in buses.values():
            await bus.start()
        for host, n in counts.items():
            for i in range(n):
                r = make_record(i, host=host, vm=f"vm{i % 2}", kind="syscall" if i % 3 else "call")
                own[host].append(r)
                buses[host].publish(r)
        await publish_hostile()
        for host, bus in buses.items():
            await bus.flush(30)
            await asyncio.to_thread(own[host].flush)
        total = sum(counts.values()) + 4
        await wait_for(lambda: aggregator.stats()["acked"] >= total, 60, "the aggregator")
        # lag is the stream's backlog as of the last batch: it reaches 0 with the next (empty) fetch
        await wait_for(lambda: aggregator.stats()["lag"] == 0, 10, "lag 0")
        stats = aggregator.stats()
        for bus in buses.values():
            await bus.close()
        await aggregator.close()
        return stats

    try:
        stats = asyncio.run(scenario())
        assert (stats["consumed"], stats["acked"], stats["invalid"], stats["stored"]) == (5004, 5004, 4, 5000)
        events, _ = fleet.events(limit=10000)
        by_host = {h: sum(1 for e in events if e["host"] == h) for h in counts}
        assert by_host == {h: own[h].count_events() for h in counts} == counts
        assert fleet.count_events() == 5000
        assert fleet.count_events(vms=["vm0"]) == own["hvA"].count_events(vms=["vm0"]) + own["hvB"].count_events(vms=["vm0"])
        ids = {e["id"] for e in events}
        assert "hvB-forged-1" not in ids and "hvA-wrong-kind" not in ids
        assert make_record(2999, host="hvA", vm="vm1", kind="call")["id"] in ids
    finally:
        for store in (*own.values(), fleet):
            store.close()


@pytest.mark.timeout(120)
def test_aggregate_restart_resumes_and_store_ignores_copies(nats_server: NatsServer, tmp_path: Path) -> None:
    """A second aggregator on the same durable continues after what the first acked; a record sent
    again under a new message id (a re-publish after the duplicate window) is stored once."""
    url = nats_server.url
    fleet = EventStore(tmp_path / "fleet.db")

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        bus = EventBus(url, "hv1")
        await bus.start()
        first = Aggregator(url, fleet)
        await first.start()
        for i in range(1000):
            bus.publish(make_record(i))
        await bus.flush()
        await wait_for(lambda: first.stats()["acked"] >= 1000, 30, "the first aggregator")
        stats1 = first.stats()
        await first.close()
        for i in range(1000, 1500):
            bus.publish(make_record(i))
        nc = await nats.connect(url)
        await nc.jetstream().publish("aradia.events.hv1.vm1.syscall", json.dumps(make_record(5)).encode(),
                                     headers={"Nats-Msg-Id": "a-new-message-id"})
        await nc.close()
        await bus.flush()
        second = Aggregator(url, fleet)
        await second.start()
        await wait_for(lambda: second.stats()["acked"] >= 501, 30, "the second aggregator")
        await asyncio.sleep(1.5)            # nothing more comes
        stats2 = second.stats()
        await second.close()
        await bus.close()
        return stats1, stats2

    try:
        stats1, stats2 = asyncio.run(scenario())
        assert (stats1["acked"], stats1["invalid"]) == (1000, 0)
        assert (stats2["consumed"], stats2["acked"], stats2["invalid"]) == (501, 501, 0)
        assert fleet.count_events() == 1500
        assert fleet.stats()["duplicates"] == 1
    finally:
        fleet.close()


@pytest.mark.timeout(120)
def test_records_the_store_refuses_are_not_acked_and_come_again(nats_server: NatsServer, tmp_path: Path) -> None:
    """A store whose queue is full refuses records (append False): they are nak'ed, redelivered and
    stored later; nothing is acked before the store took it, so nothing is lost."""
    url = nats_server.url
    fleet = EventStore(tmp_path / "fleet.db", queue_limit=100)      # a batch of 300 cannot fit at once

    async def scenario() -> dict[str, Any]:
        bus = EventBus(url, "hv1")
        await bus.start()
        for i in range(1000):
            bus.publish(make_record(i))
        await bus.flush()
        await bus.close()
        aggregator = Aggregator(url, fleet, batch=300, reconnect_wait=0.05)
        await aggregator.start()
        await wait_for(lambda: aggregator.stats()["acked"] >= 1000, 60, "the aggregator")
        stats = aggregator.stats()
        await aggregator.close()
        return stats

    try:
        stats = asyncio.run(scenario())
        assert stats["refused"] > 0
        assert (stats["acked"], stats["stored"], stats["invalid"]) == (1000, 1000, 0)
        assert stats["consumed"] == 1000 + stats["refused"]
        assert fleet.count_events() == 1000
        assert fleet.stats()["dropped"] == stats["refused"]
    finally:
        fleet.close()
