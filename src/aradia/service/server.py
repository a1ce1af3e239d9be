"""The ``aradia serve`` process: the service, its HTTP server (uvicorn, TLS), its bus, structured logs.

One process per host owns the VMs named in its config. With ``[nats]`` every event is also published
to JetStream and commands are served on ``aradia.cmd.<host>.<vm>``; with ``--aggregate`` the process
owns no VM and serves, read-only, the events every host publishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import FastAPI

from aradia.errors import AradiaError
from aradia.service.api import create_app
from aradia.service.apps import Apps
from aradia.service.config import ServiceConfig, parse_listen
from aradia.service.operations import Service, memory_json, status_of

log = logging.getLogger("aradia.service")
#: operations the bus does not carry, and where to ask instead
HTTP_ONLY = {"dump": "a dump is a file: GET /api/v1/vms/{vm}/dump over HTTP",
             "live": "live events over the bus are the aradia.events.> subjects themselves"}
#: attributes every LogRecord has: the rest are the structured fields a call passed in ``extra``
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonLines(logging.Formatter):
    """One JSON object per log line: time, level, message and the call's ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        """The line."""
        out: dict[str, Any] = {"time": round(record.created, 6), "level": record.levelname.lower(),
                               "logger": record.name, "msg": record.getMessage()}
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: int = logging.INFO) -> None:
    """Structured lines on stderr for the service's loggers (uvicorn's access log included)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines())
    for name in ("aradia", "uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False


async def handle_command(service: Service, vm: str, request: dict[str, Any]) -> dict[str, Any]:
    """One command from the bus (``{"token", "op", "params"}``): the same checks and audit as HTTP."""
    op = request.get("op")
    params = request.get("params") or {}
    client = "nats"
    if not isinstance(op, str) or not isinstance(params, dict):
        return {"ok": False, "status": 400, "error": 'a command is {"token": …, "op": …, "params": {…}}'}
    try:
        principal = service.authenticate(request.get("token"), client=client, operation=op, vm=vm)
        if op in HTTP_ONLY:
            service.audit(principal.name, vm, op, 400, client, "over the bus")
            return {"ok": False, "status": 400, "error": HTTP_ONLY[op]}
        result = await asyncio.to_thread(service.execute, principal, op, vm, params, client=client)
    except Exception as e:
        status = status_of(e)
        if status == 500:
            log.exception("command failed", extra={"vm": vm, "op": op})
        return {"ok": False, "status": status,
                "error": str(e) if status != 500 else "internal error (see the service log)"}
    if isinstance(result, bytes):
        result = memory_json(result)
    return {"ok": True, "result": result}


def build(config: ServiceConfig, *, aggregate: bool = False, apps: Apps | None = None) -> FastAPI:
    """The service (offering ``apps``) and its ASGI app; the lifespan starts and stops the VMs' owners,
    bus and aggregator."""
    service = Service(config, aggregate=aggregate, apps=apps)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        t0 = time.monotonic()
        await asyncio.to_thread(service.start)
        bus = aggregator = None
        if config.nats is not None:
            from aradia.service.aggregate import Aggregator
            from aradia.service.bus import EventBus

            if aggregate:
                aggregator = Aggregator(config.nats.url, service.store, log=log, on_stored=service.relay)
                await aggregator.start()
                service.aggregator = aggregator
            else:
                days, mb = config.nats.max_age_days, config.nats.max_mb
                bus = EventBus(config.nats.url, config.host, spool_limit=config.nats.spool_events, log=log,
                               max_age=days * 86400 if days else None,
                               max_bytes=int(mb * (1 << 20)) if mb else None)
                await bus.start()
                service.bus = bus

                async def command(vm: str, request: dict[str, Any]) -> dict[str, Any]:
                    return await handle_command(service, vm, request)

                await bus.serve_commands(list(service.owners), command)
        log.info("service ready", extra={"host": config.host, "vms": list(service.owners),
                                          "aggregate": aggregate, "nats": bool(config.nats),
                                          "seconds": round(time.monotonic() - t0, 3)})
        try:
            yield
        finally:
            log.info("service stopping")
            await asyncio.to_thread(service.close_owners)
            if bus is not None:
                await bus.close()
            if aggregator is not None:
                await aggregator.close()
            await asyncio.to_thread(service.store.close)

    return create_app(service, lifespan=lifespan)


def serve(config: ServiceConfig, *, listen: str | None = None, aggregate: bool = False,
          apps: Apps | None = None) -> int:
    """Run the service (offering ``apps``: see :mod:`aradia.service.apps`) until SIGINT/SIGTERM."""
    setup_logging()
    host, port = parse_listen(listen or config.listen)
    app = build(config, aggregate=aggregate or config.aggregate, apps=apps)
    tls: dict[str, Any] = {}
    if config.tls is not None:
        tls = {"ssl_certfile": config.tls.cert, "ssl_keyfile": config.tls.key}
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_config=None, access_log=True,
                                           ws="auto", lifespan="on", **tls))
    try:
        server.run()
    except AradiaError:
        raise
    except OSError as e:
        raise AradiaError(f"cannot listen on {host}:{port}: {e}") from e
    return 0 if server.started else 1
