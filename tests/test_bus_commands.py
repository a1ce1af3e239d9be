"""Commands over NATS request/reply against a real nats-server (no guest): the handler's answer with a
good token, a refusal with a bad one, and 400/404/413/500 for what the handler never sees or fails on."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import nats
import pytest

from aradia.service.bus import MAX_COMMAND_BYTES, BusError, EventBus, command_subject, request
from nats_server import NatsServer, nats_server

__all__ = ["nats_server"]

TOKEN = "s3cret-token"


async def handler(vm: str, message: dict[str, Any]) -> dict[str, Any]:
    """A stand-in for the service's operations: checks the token in the message, echoes, or fails."""
    if message.get("token") != TOKEN:
        return {"ok": False, "status": 401, "error": "bad token"}
    if message.get("op") == "explode":
        raise RuntimeError("the operation failed")
    return {"ok": True, "status": 200, "vm": vm, "op": message.get("op")}


async def raw_request(url: str, subject: str, data: bytes) -> dict[str, Any]:
    nc = await nats.connect(url)
    try:
        return json.loads((await nc.request(subject, data, timeout=5)).data)
    finally:
        await nc.close()


@pytest.mark.timeout(60)
def test_commands_round_trip_and_refusals(nats_server: NatsServer) -> None:
    url = nats_server.url

    async def scenario() -> dict[str, Any]:
        bus = EventBus(url, "hv1")
        await bus.start()
        await bus.serve_commands(["vm1", "vm2"], handler)
        out: dict[str, Any] = {}
        out["good"] = await request(url, "hv1", "vm2", {"token": TOKEN, "op": "ps"})
        out["bad_token"] = await request(url, "hv1", "vm2", {"token": "wrong", "op": "ps"})
        out["no_token"] = await request(url, "hv1", "vm1", {"op": "ps"})
        out["unknown_vm"] = await request(url, "hv1", "vm9", {"token": TOKEN, "op": "ps"})
        subject = command_subject("hv1", "vm1")
        out["not_json"] = await raw_request(url, subject, b"{not json")
        out["not_object"] = await raw_request(url, subject, b'["token"]')
        out["not_utf8"] = await raw_request(url, subject, b"\xff\xfe")
        big = json.dumps({"token": TOKEN, "op": "ps", "pad": "x" * MAX_COMMAND_BYTES}).encode()
        out["oversize"] = await raw_request(url, subject, big)
        fits = json.dumps({"token": TOKEN, "op": "fits", "pad": "x" * (MAX_COMMAND_BYTES - 100)}).encode()
        out["just_fits"] = await raw_request(url, subject, fits)
        out["explodes"] = await request(url, "hv1", "vm1", {"token": TOKEN, "op": "explode"})
        out["after"] = await request(url, "hv1", "vm1", {"token": TOKEN, "op": "after"})
        out["stats"] = bus.stats()
        await bus.close()
        return out

    out = asyncio.run(scenario())
    assert out["good"] == {"ok": True, "status": 200, "vm": "vm2", "op": "ps"}
    assert out["bad_token"] == {"ok": False, "status": 401, "error": "bad token"}
    assert out["no_token"]["status"] == 401
    assert out["unknown_vm"]["status"] == 404 and "vm9" in out["unknown_vm"]["error"]
    for case in ("not_json", "not_object", "not_utf8"):
        assert out[case]["ok"] is False and out[case]["status"] == 400, case
    assert out["oversize"]["status"] == 413 and str(MAX_COMMAND_BYTES) in out["oversize"]["error"]
    assert out["just_fits"] == {"ok": True, "status": 200, "vm": "vm1", "op": "fits"}
    assert out["explodes"] == {"ok": False, "status": 500, "error": "internal error: RuntimeError"}
    assert out["after"] == {"ok": True, "status": 200, "vm": "vm1", "op": "after"}   # the subscription lives
    assert out["stats"]["commands"] == 11


@pytest.mark.timeout(60)
def test_command_client_errors(nats_server: NatsServer) -> None:
    url = nats_server.url

    async def scenario() -> None:
        bus = EventBus(url, "hv1")
        await bus.start()
        await bus.serve_commands(["vm1"], handler)
        assert (await request(url, "hv1", "vm1", {"token": TOKEN}))["ok"] is True
        with pytest.raises(BusError, match=r"no aradia service answers on aradia\.cmd\.hv2\.vm1"):
            await request(url, "hv2", "vm1", {"token": TOKEN})
        with pytest.raises(BusError, match="at most"):
            await request(url, "hv1", "vm1", {"token": TOKEN, "pad": "x" * MAX_COMMAND_BYTES})
        with pytest.raises(BusError, match="not a name"):
            await request(url, "hv1", "vm.1", {"token": TOKEN})
        with pytest.raises(BusError, match="JSON object"):
            await request(url, "hv1", "vm1", ["token"])     # type: ignore[arg-type]
        with pytest.raises(BusError, match="not names"):
            await bus.serve_commands(["vm1", "a>b"], handler)
        await bus.close()
        with pytest.raises(BusError, match="cannot reach the NATS broker"):
            await request("nats://127.0.0.1:1", "hv1", "vm1", {"token": TOKEN}, timeout=2)

    asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_commands_served_once_a_late_broker_comes_up(tmp_path: Any) -> None:
    server = NatsServer(tmp_path / "js")

    async def scenario() -> tuple[bool, dict[str, Any]]:
        bus = EventBus(server.url, "hv1", reconnect_wait=0.2, start_wait=0.5)
        await bus.start()
        await bus.serve_commands(["vm1"], handler)      # before the broker is there
        connected_before = bus.stats()["connected"]
        await asyncio.to_thread(server.start)
        for _ in range(100):
            if bus.stats()["connected"]:
                break
            await asyncio.sleep(0.1)
        reply = await request(server.url, "hv1", "vm1", {"token": TOKEN, "op": "late"})
        await bus.close()
        return connected_before, reply

    try:
        connected_before, reply = asyncio.run(scenario())
    finally:
        server.kill()
    assert connected_before is False
    assert reply == {"ok": True, "status": 200, "vm": "vm1", "op": "late"}
