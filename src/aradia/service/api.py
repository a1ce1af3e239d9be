"""The HTTP API (``/api/v1``): thin FastAPI routes over :meth:`Service.execute`.

Authentication is a dependency (:func:`caller`): ``Authorization: Bearer TOKEN``. Every route names
its operation; the service checks, runs and audits it. WebSocket and SSE streams carry the live
events of one VM (a browser cannot set headers on a WebSocket, so there the token may also come as
the first message, ``{"token": "…"}``; never in a URL).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, FastAPI, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aradia._version import __version__
from aradia.errors import AradiaError
from aradia.service.live import LiveFilter, Subscriber
from aradia.service.operations import ANONYMOUS, Service, status_of
from aradia.service.policy import AccessError, Principal, TooLarge
from aradia.service.web import mount_dashboard

WS_AUTH_SECONDS = 5.0
HEARTBEAT_SECONDS = 15.0


@dataclass
class Caller:
    """Who is asking (an authenticated principal) and from where."""

    principal: Principal
    client: str
    service: Service

    async def run(self, operation: str, vm: str | None = None, **params: Any) -> Any:
        """Run one operation for this caller in a worker thread (views and reads block)."""
        clean = {k: v for k, v in params.items() if v is not None}
        return await run_in_threadpool(self.service.execute, self.principal, operation, vm, clean,
                                       client=self.client)


def _client(scope_client: Any) -> str:
    return f"{scope_client[0]}:{scope_client[1]}" if scope_client else "unknown"


def _bearer(value: str | None) -> str | None:
    if value and value[:7].lower() == "bearer ":
        return value[7:].strip()
    return None


async def caller(request: Request) -> Caller:
    """The dependency every route takes: the authenticated caller (401 otherwise, audited)."""
    service: Service = request.app.state.service
    route = request.scope.get("route")
    client = _client(request.client and (request.client.host, request.client.port))
    principal = service.authenticate(_bearer(request.headers.get("authorization")), client=client,
                                     operation=getattr(route, "name", "request"),
                                     vm=request.path_params.get("vm"))
    return Caller(principal, client, service)


CallerDep = Annotated[Caller, Depends(caller)]
router = APIRouter(prefix="/api/v1")


@router.get("/health", name="health")
async def health(c: CallerDep) -> Any:
    """Owner state of each of the caller's VMs, the store's lag and drops, the bus's spool and drops."""
    return await c.run("health")


@router.get("/whoami", name="whoami")
async def whoami(c: CallerDep) -> Any:
    """Who the token belongs to: name, operator or not, the operations it may use, the service's host
    and whether it is a read-only aggregate (the dashboard hides what it cannot do; the policy decides)."""
    return await c.run("whoami")


@router.get("/vms", name="vms")
async def vms(c: CallerDep) -> Any:
    """The caller's VMs with their run state."""
    return await c.run("vms")


@router.get("/vms/{vm}", name="info")
async def info(vm: str, c: CallerDep) -> Any:
    """``aradia info`` of one VM."""
    return await c.run("info", vm)


@router.get("/vms/{vm}/memory", name="memory", response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}}}})
async def memory(vm: str, c: CallerDep, size: str, phys: str | None = None, virt: str | None = None,
                 pid: int | None = None) -> Response:
    """``size`` bytes of guest memory at ``phys``, or at ``virt`` (kernel, or process ``pid``'s)."""
    data = await c.run("memory", vm, size=size, phys=phys, virt=virt, pid=pid)
    return Response(data, media_type="application/octet-stream")


@router.put("/vms/{vm}/memory", name="memory.write")
async def write_memory(vm: str, request: Request, c: CallerDep, phys: str | None = None,
                       virt: str | None = None, pid: int | None = None) -> Any:
    """Write the request body (raw bytes, at most the service's ``max_body``) at ``phys``, or at
    ``virt`` (kernel, or process ``pid``'s). Needs the ``write`` permission."""
    data = await request.body()
    return await c.run("memory.write", vm, data=data, phys=phys, virt=virt, pid=pid)


@router.get("/vms/{vm}/dump", name="dump", response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {}}}})
async def dump(vm: str, c: CallerDep, format: str = "elf", pause: bool = True) -> FileResponse:
    """The VM's RAM as one file: ``elf`` (VMCOREINFO and registers: drgn and crash read it), ``raw``
    or ``lime``; the guest is paused while it is written (``pause=false``: not). Needs ``dump``."""
    path = await c.run("dump", vm, format=format, pause=pause)
    return FileResponse(path, media_type="application/octet-stream", filename=f"{vm}.{format}",
                        background=BackgroundTask(os.unlink, path))


@router.post("/vms/{vm}/migrate", name="migrate")
async def migrate(vm: str, body: Annotated[Any, Body()], c: CallerDep) -> Any:
    """Live-migrate the VM into the QEMU of VM slot ``to`` (``{"to": "slot", "uri": "unix:PATH",
    "timeout": 120}``; ``uri`` defaults to the slot's ``-incoming``): traces go on across the switch,
    their subscribers see a ``migrated`` marker. Needs ``migrate`` on both VMs; 422 when it fails (the
    VM runs on, traced, where it was)."""
    params = body if isinstance(body, dict) else {}  # (anything else: 400, "migrate needs to")
    return await c.run("migrate", vm, **{k: params.get(k) for k in ("to", "uri", "timeout")})


@router.get("/vms/{vm}/maps/{pid}", name="view")
async def maps(vm: str, pid: int, c: CallerDep) -> Any:
    """Memory maps of one process."""
    return await c.run("view", vm, name="maps", pid=pid)


@router.get("/vms/{vm}/files/{pid}", name="view")
async def files(vm: str, pid: int, c: CallerDep) -> Any:
    """Open files of one process."""
    return await c.run("view", vm, name="files", pid=pid)


@router.post("/vms/{vm}/traces", name="trace.start", status_code=201)
async def start_trace(vm: str, spec: Annotated[Any, Body()], c: CallerDep) -> Any:
    """Arm a trace from a probe spec (see ``aradia.service.tracespec``: ``{"kind": "syscalls",
    "syscalls": ["execve"]}``, ``probe``, ``uprobe``, ``procs``, ``count``, ``watch``; filters ``pid``,
    ``comm``, ``uid``). It is kept across restarts of the service; its events go to the store, the bus
    and live subscribers. A malformed spec is 400 (and audited)."""
    return await c.run("trace.start", vm, spec=spec)


@router.get("/vms/{vm}/events/sse", name="live")
async def events_sse(vm: str, request: Request, c: CallerDep,
                     kind: Annotated[list[str] | None, Query()] = None,
                     name: Annotated[list[str] | None, Query()] = None,
                     pid: Annotated[list[int] | None, Query()] = None,
                     comm: Annotated[list[str] | None, Query()] = None,
                     trace: Annotated[list[str] | None, Query()] = None,
                     uid: Annotated[list[int] | None, Query()] = None,
                     q: str | None = None) -> StreamingResponse:
    """Live events of one VM as Server-Sent Events (filters as the WebSocket's)."""
    await c.run("live", vm)
    sub = c.service.hub.subscribe(c.principal.name, vm, _filter(kind, name, pid, comm, trace, q, uid))

    async def stream() -> AsyncIterator[bytes]:
        try:
            yield b": aradia live events\n\n"
            while not await request.is_disconnected():
                try:
                    record = await asyncio.wait_for(sub.queue.get(), HEARTBEAT_SECONDS)
                except TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                lost = sub.take_dropped()
                if lost:
                    yield f"event: dropped\ndata: {json.dumps({'dropped': lost})}\n\n".encode()
                yield f"data: {json.dumps(record)}\n\n".encode()
        finally:
            c.service.hub.unsubscribe(sub)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store"})


@router.get("/vms/{vm}/rates", name="rates")
async def rates(vm: str, c: CallerDep, seconds: int = 300) -> Any:
    """Events per second per kind over the last ``seconds`` (at most 600): ``{"start", "seconds",
    "kinds": {kind: [counts, oldest first]}, "total"}``."""
    return await c.run("rates", vm, seconds=seconds)


@router.get("/vms/{vm}/{view}", name="view")
async def view(vm: str, view: str, c: CallerDep) -> Any:
    """One view: processes, threads, modules, sockets, mounts, dmesg (as the CLI's ``--json``)."""
    return await c.run("view", vm, name=view)


@router.get("/traces", name="traces")
async def traces(c: CallerDep) -> Any:
    """The caller's traces."""
    return await c.run("traces")


@router.get("/traces/{trace_id}", name="trace.get")
async def get_trace(trace_id: str, c: CallerDep) -> Any:
    """One trace: spec, events seen, counts."""
    return await c.run("trace.get", id=trace_id)


@router.put("/traces/{trace_id}", name="trace.update")
async def update_trace(trace_id: str, spec: Annotated[Any, Body()], c: CallerDep) -> Any:
    """A new spec for an app's trace, of the same app (the guard's policy), taken without disarming:
    no moment unguarded. A spec the app cannot use keeps the old one (400; 422 when it is well-formed
    but the guest cannot serve it)."""
    return await c.run("trace.update", id=trace_id, spec=spec)


@router.delete("/traces/{trace_id}", name="trace.stop")
async def stop_trace(trace_id: str, c: CallerDep) -> Any:
    """Disarm and forget a trace."""
    return await c.run("trace.stop", id=trace_id)


@router.get("/events", name="events")
async def events(c: CallerDep, vm: str | None = None, kind: Annotated[list[str] | None, Query()] = None,
                 pid: int | None = None, since: float | None = None, until: float | None = None,
                 q: str | None = None, limit: int = 100, cursor: str | None = None) -> Any:
    """Stored events of the caller's VMs, oldest first; ``next`` is the cursor of the next page."""
    return await c.run("events", vm=vm, kind=kind, pid=pid, since=since, until=until, q=q,
                       limit=limit, cursor=cursor)


@router.get("/audit", name="audit")
async def audit(c: CallerDep, limit: int = 100, cursor: str | None = None, tenant: str | None = None,
                allowed: bool | None = None) -> Any:
    """Audit rows (operator only)."""
    return await c.run("audit", limit=limit, cursor=cursor, tenant=tenant, allowed=allowed)


def _filter(kind: list[str] | None, name: list[str] | None, pid: list[int] | None, comm: list[str] | None,
            trace: list[str] | None, q: str | None, uid: list[int] | None = None) -> LiveFilter:
    return LiveFilter(kinds=set(kind) if kind else None, names=set(name) if name else None,
                      pids=set(pid) if pid else None, uids=set(uid) if uid else None,
                      comms=set(comm) if comm else None, traces=set(trace) if trace else None,
                      text=q or None)


async def events_ws(websocket: WebSocket, vm: str) -> None:
    """Live events of one VM as WebSocket text messages (one JSON record each; ``{"dropped": N}``
    when this client fell behind). Filters: ``kind``, ``name``, ``pid``, ``comm``, ``uid``, ``trace`` (each
    repeatable), ``q``."""
    service: Service = websocket.app.state.service
    client = _client(websocket.client and (websocket.client.host, websocket.client.port))
    await websocket.accept()
    token = _bearer(websocket.headers.get("authorization"))
    try:
        if token is None:
            first = await asyncio.wait_for(websocket.receive_text(), WS_AUTH_SECONDS)
            message = json.loads(first) if len(first) < 4096 else None
            token = message.get("token") if isinstance(message, dict) else None
        principal = service.authenticate(token, client=client, operation="live", vm=vm)
        service.check(principal, "live", vm, client)
        qp = websocket.query_params
        pids = [int(p) for p in qp.getlist("pid")] or None
        flt = _filter(qp.getlist("kind") or None, qp.getlist("name") or None, pids,
                      qp.getlist("comm") or None, qp.getlist("trace") or None, qp.get("q"),
                      [int(u) for u in qp.getlist("uid")] or None)
        sub = service.hub.subscribe(principal.name, vm, flt)
    except (TimeoutError, json.JSONDecodeError, ValueError) as e:
        await websocket.close(code=4400, reason=f"bad request: {e}"[:120])
        return
    except AccessError as e:
        await websocket.close(code=4000 + e.status, reason=str(e)[:120])
        return
    except WebSocketDisconnect:
        return
    service.audit(principal.name, vm, "live", 200, client, "websocket")
    await websocket.send_text(json.dumps({"subscribed": vm}))
    try:
        await _pump(sub, websocket.send_text, websocket)
    except WebSocketDisconnect:
        pass
    finally:
        service.hub.unsubscribe(sub)


async def _pump(sub: Subscriber, send: Callable[[str], Awaitable[None]], websocket: WebSocket) -> None:
    closed = asyncio.ensure_future(websocket.receive())  # the client's close (we expect no messages)
    try:
        while True:
            getter = asyncio.ensure_future(sub.queue.get())
            done, _ = await asyncio.wait({getter, closed}, return_when=asyncio.FIRST_COMPLETED)
            if closed in done:
                getter.cancel()
                return
            lost = sub.take_dropped()
            if lost:
                await send(json.dumps({"dropped": lost}))
            await send(json.dumps(getter.result()))
    finally:
        closed.cancel()


class BodyLimit:
    """ASGI middleware: a request body past ``limit`` bytes is 413 (declared or streamed)."""

    def __init__(self, app: ASGIApp, limit: int, on_refused: Callable[[Scope], None]) -> None:
        self.app = app
        self.limit = limit
        self.on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            self.on_refused(scope)
            await _too_large(self.limit)(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise TooLarge(f"request body over {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse({"error": f"request body over {limit} bytes", "status": 413}, status_code=413)


def error_response(exc: Exception) -> JSONResponse:
    """The JSON error reply of an exception (with Retry-After / WWW-Authenticate where they belong)."""
    status = status_of(exc)
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    retry = getattr(exc, "retry_after", None)
    if status == 429 and retry is not None:
        headers["Retry-After"] = str(max(1, int(retry + 0.999)))
    message = str(exc) if status != 500 else "internal error (see the service log)"
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


def create_app(service: Service, *, lifespan: Any = None) -> FastAPI:
    """The ASGI application of ``service``."""
    app = FastAPI(title="aradia", version=__version__, lifespan=lifespan,
                  description="Virtual machine introspection as a service: views, memory, traces and "
                              "events of the VMs this host's aradia owns.")
    app.state.service = service
    app.include_router(router)
    app.add_api_websocket_route("/api/v1/vms/{vm}/events/ws", events_ws, name="live")

    async def aradia_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)

    async def malformed(request: Request, exc: Exception) -> JSONResponse:
        # FastAPI's own parameter checks (a query value of the wrong type, a body that is not JSON):
        # the same JSON error shape as every other refusal
        errors = getattr(exc, "errors", lambda: [])()
        where = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg', '')}" for e in errors[:3])
        return JSONResponse({"error": f"malformed request: {where}", "status": 400}, status_code=400)

    app.add_exception_handler(AradiaError, aradia_error)
    app.add_exception_handler(ValueError, aradia_error)
    app.add_exception_handler(RequestValidationError, malformed)

    def refused(scope: Scope) -> None:
        service.audit(ANONYMOUS, None, "request", 413, _client(scope.get("client")),
                      f"body over {service.config.limits.max_body} bytes: {scope.get('path', '')}"[:200])

    app.add_middleware(BodyLimit, limit=service.config.limits.max_body, on_refused=refused)
    mount_dashboard(app)
    return app
