"""Every operation of the service, with its policy check and its audit row: one path for HTTP and the bus.

:meth:`Service.execute` is the only way in: the HTTP routes and the bus's command handler both call it
with a principal, an operation name, a VM and JSON parameters, so both get the same checks (token,
tenant, permission, rate, sizes), the same audit rows and the same results.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aradia.errors import AradiaError, NotAttached, NotRAM, PageFault, ProbeClash
from aradia.linux.kernel import VIEWS
from aradia.service.apps import Apps
from aradia.service.config import ServiceConfig
from aradia.service.live import LiveHub
from aradia.service.owner import Subscription, VMOwner
from aradia.service.policy import AccessError, NotFound, Policy, Principal
from aradia.service.rates import Rates
from aradia.service.store import EventStore
from aradia.service.store_sql import StoreError
from aradia.service.tracespec import AppSpec, SpecError, parse_spec, spec_json

log = logging.getLogger("aradia.service")
ANONYMOUS = "-"


class Conflict(AradiaError):
    """The request clashes with the state (a probe another trace holds differently)."""

    status = 409


def status_of(exc: BaseException) -> int:
    """The HTTP status an error stands for."""
    if isinstance(exc, AccessError):
        return exc.status
    if isinstance(exc, SpecError | ValueError | StoreError):
        return 400  # (a StoreError reaching a client is about its filters, cursor or limit)
    if isinstance(exc, NotRAM | PageFault):
        return 422
    if isinstance(exc, NotAttached):
        return 503
    if isinstance(exc, AradiaError):
        return getattr(exc, "status", 422)
    return 500


@dataclass(frozen=True)
class Operation:
    """One operation: the permission it needs and whether it names a VM."""

    permission: str
    needs_vm: bool
    write: bool = False  # changes state (refused by a read-only aggregate service)


OPERATIONS: dict[str, Operation] = {
    "vms": Operation("list", False),
    "whoami": Operation("list", False),
    "health": Operation("list", False),
    "info": Operation("views", True),
    "view": Operation("views", True),
    "memory": Operation("read", True),
    "memory.write": Operation("write", True, write=True),
    "dump": Operation("dump", True),
    "migrate": Operation("migrate", True, write=True),
    "trace.start": Operation("trace", True, write=True),
    "trace.get": Operation("trace", False),
    "trace.stop": Operation("trace", False, write=True),
    "trace.update": Operation("trace", False, write=True),
    "traces": Operation("trace", False),
    "events": Operation("trace", False),
    "live": Operation("trace", True),
    "rates": Operation("trace", True),
    "audit": Operation("audit", False),
}


def _int(params: dict[str, Any], key: str, *, required: bool = False) -> int | None:
    value = params.get(key)
    if value is None:
        if required:
            raise ValueError(f"{key} is required")
        return None
    if isinstance(value, bool):
        raise ValueError(f"{key} must be an integer")
    if isinstance(value, str):
        try:
            return int(value, 0)
        except ValueError:
            raise ValueError(f"{key}={value!r} is not a number") from None
    if not isinstance(value, int):
        raise ValueError(f"{key} must be an integer")
    return value


class Service:
    """The service's state: owners of the configured VMs, store, bus, hub of live subscribers."""

    def __init__(self, config: ServiceConfig, *, aggregate: bool = False, apps: Apps | None = None) -> None:
        self.config = config
        self.aggregate = aggregate
        self.apps: Apps = dict(apps or {})  # started like traces (a spec whose kind is the app's name)
        self.policy = Policy(config)
        days, mb = config.store.max_age_days, config.store.max_mb
        self.store = EventStore(config.store.path, max_age=days * 86400 if days else None,
                                max_bytes=int(mb * (1 << 20)) if mb else None)
        self.hub = LiveHub(max_per_principal=config.limits.max_subscribers)
        self.rates = Rates()
        self.bus: Any = None  # EventBus when [nats] is configured (set by the server)
        self.aggregator: Any = None  # Aggregator of an --aggregate service with [nats]
        #: apps' files (the honeypot's transcripts and kept files), beside the store: the service's own
        self.apps_dir = Path(os.path.dirname(os.path.abspath(config.store.path))) / "apps"
        self.owners: dict[str, VMOwner] = {} if aggregate else {
            vm.name: VMOwner(vm, host=config.host, emit=self._emit, log=log, data_dir=self.apps_dir)
            for vm in config.vms}
        self._lock = threading.Lock()
        self._traces: dict[str, Subscription] = {}
        #: dumps wait here while they are streamed to the client (beside the store, the service's own)
        self.dump_dir = os.path.join(os.path.dirname(os.path.abspath(config.store.path)), "dumps")

    # --- events from the owners' tracers --------------------------------------------------------------
    def _emit(self, record: dict[str, Any], trace_ids: list[str]) -> None:
        """A new event: into the store, onto the bus, to live subscribers (never blocks the tracer)."""
        if not self.store.append(record):
            log.warning("store queue full: event dropped", extra={"vm": record["vm"]})
        if self.bus is not None:
            self.bus.publish(record)
        self.relay(record, trace_ids)

    def relay(self, record: dict[str, Any], trace_ids: Sequence[str] = ()) -> None:
        """An event to the rates and live subscribers: this host's own (of ``trace_ids``), or one another
        host stored through the bus (an aggregate service)."""
        self.rates.add(record["vm"], record["kind"], record["time"])
        self.hub.route(record, list(trace_ids))

    # --- life cycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Attach the VMs and arm the stored traces again (a VM that is away is retried)."""
        for owner in self.owners.values():
            try:
                owner.vm()
            except AradiaError as e:
                log.warning("VM not reachable", extra={"vm": owner.name, "error": str(e)})
        for row in self.store.traces():
            owner = self.owners.get(row["vm"])
            if owner is None:
                log.warning("stored trace for a VM not in the config", extra={"trace": row["id"]})
                continue
            try:
                sub = Subscription(row["id"], row["vm"], row["tenant"], parse_spec(row["spec"], self.apps),
                                   created=row["created"])
                owner.add(sub, pending_ok=True)
            except AradiaError as e:
                log.warning("stored trace could not be armed", extra={"trace": row["id"], "error": str(e)})
                continue
            with self._lock:
                self._traces[sub.id] = sub
            log.info("trace armed again", extra={"trace": sub.id, "vm": sub.vm})

    def close_owners(self) -> None:
        """Disarm everything and drop the VMs' connections (the guests keep running)."""
        for owner in self.owners.values():
            owner.close()

    def close(self) -> None:
        """:meth:`close_owners`, then flush and close the store."""
        self.close_owners()
        self.store.close()

    # --- the one entry ---------------------------------------------------------------------------------
    def authenticate(self, token: str | None, *, client: str, operation: str,
                     vm: str | None = None) -> Principal:
        """The principal of ``token``; a refusal is audited."""
        try:
            return self.policy.authenticate(token)
        except AccessError as e:
            self.audit(ANONYMOUS, vm, operation, e.status, client, str(e))
            raise

    def audit(self, tenant: str, vm: str | None, operation: str, status: int, client: str,
              detail: str = "") -> None:
        """One audit row."""
        self.store.audit(tenant=tenant, vm=vm, operation=operation, allowed=status < 400, status=status,
                         client=client, detail=detail[:500])

    def check(self, principal: Principal, operation: str, vm: str | None, client: str) -> Operation:
        """Rate, operation and permission checks for one request (refusals audited)."""
        op = OPERATIONS.get(operation)
        try:
            if op is None:
                raise NotFound(f"no operation {operation!r}")
            self.policy.check_rate(principal)
            if op.needs_vm and not vm:
                raise ValueError(f"{operation} needs a vm")
            if op.write and self.aggregate:
                raise AccessErrorReadOnly(f"{operation}: this aggregate service is read-only")
            # an aggregate's VMs are every host's (not in its config): the operator may see any of them
            named = vm if op.needs_vm and not (self.aggregate and principal.operator) else None
            self.policy.authorize(principal, op.permission, named)
            if op.needs_vm and not self.aggregate and vm not in self.owners:
                raise NotFound(f"no VM {vm!r}")
        except (AccessError, ValueError) as e:
            self.audit(principal.name, vm, operation, status_of(e), client, str(e))
            raise
        return op

    def execute(self, principal: Principal, operation: str, vm: str | None, params: dict[str, Any],
                *, client: str) -> Any:
        """Run one operation for ``principal``: checked, audited, and its JSON-able result returned."""
        self.check(principal, operation, vm, client)
        handler: Callable[[Principal, str | None, dict[str, Any]], Any] = getattr(
            self, "op_" + operation.replace(".", "_"))
        try:
            result = handler(principal, vm, params)
        except Exception as e:
            self.audit(principal.name, vm, operation, status_of(e), client, str(e))
            raise
        self.audit(principal.name, vm, operation, 200, client, _detail(operation, params))
        return result

    # --- operations ------------------------------------------------------------------------------------
    def op_vms(self, principal: Principal, vm: str | None, params: dict[str, Any]) -> list[dict[str, Any]]:
        """The caller's VMs with their owner and run state (an aggregate: every host's VMs with events)."""
        if self.aggregate:
            rows = self.store.sources()
            return rows if principal.operator else [r for r in rows if r["name"] in principal.vms]
        return [{**self.owners[n].state(), "rate": self.rates.series(n, 60)}
                for n in self.policy.visible_vms(principal) if n in self.owners]

    def op_whoami(self, principal: Principal, vm: str | None, params: dict[str, Any]) -> dict[str, Any]:
        """The caller: name, operator or not, the operations it may use (those the service would refuse
        as read-only left out), the service's host and whether it is an aggregate."""
        allowed = [name for name, op in OPERATIONS.items()
                   if (principal.operator or op.permission == "list" or op.permission in principal.allow)
                   and not (op.write and self.aggregate) and (principal.operator or name != "audit")]
        return {"name": principal.name, "operator": principal.operator, "allow": sorted(principal.allow),
                "operations": allowed, "host": self.config.host, "aggregate": self.aggregate}

    def op_health(self, principal: Principal, vm: str | None, params: dict[str, Any]) -> dict[str, Any]:
        """Owner state of each visible VM, the store's and the bus's lag and drop counts."""
        out: dict[str, Any] = {"host": self.config.host, "aggregate": self.aggregate,
                               "vms": self.op_vms(principal, None, {}), "store": self.store.stats(),
                               "live": self.hub.stats()}
        if self.bus is not None:
            out["bus"] = self.bus.stats()
        if self.aggregator is not None:
            out["aggregator"] = self.aggregator.stats()
        return out

    def op_info(self, principal: Principal, vm: str | None, params: dict[str, Any]) -> dict[str, Any]:
        """``aradia info`` of the VM."""
        return self.owners[str(vm)].info()

    def op_view(self, principal: Principal, vm: str | None, params: dict[str, Any]) -> dict[str, Any]:
        """One view (``name``: processes, threads, modules, maps, files, sockets, mounts, dmesg)."""
        name = params.get("name")
        if name not in VIEWS:
            raise ValueError(f"no view {name!r} (one of {', '.join(VIEWS)})")
        pid = _int(params, "pid", required=VIEWS[str(name)])
        return self.owners[str(vm)].view(str(name), pid)

    def op_memory(self, principal: Principal, vm: str | None, params: dict[str, Any]) -> bytes:
        """Guest memory: ``size`` bytes at ``phys``, or ``virt`` (kernel, or a process's with ``pid``)."""
        size = _int(params, "size", required=True)
        assert size is not None
        if size <= 0:
            raise ValueError("size must be positive")
        self.policy.check_size("memory read", size, self.config.limits.max_read)
        return self.owners[str(vm)].read(size, phys=_int(params, "phys"), virt=_int(params, "virt"),
                                         pid=_int(params, "pid"))

    def op_memory_write(self, principal: Principal, vm: str | None, params: dict[str, Any]) -> dict[str, Any]:
        """Write ``data`` (bytes; over the bus ``base64``) at ``phys``, or ``virt`` (with ``pid``: in that
        process)."""
        data = params.get("data")
        if data is None and isinstance(params.get("base64"), str):
            try:
                data = base64.b64decode(params["base64"], validate=True)
            except ValueError:
                raise ValueError("base64 is not valid base64") from None
        if not isinstance(data, bytes | bytearray) or not data:
            raise ValueError("nothing to write (data)")
        self.policy.check_size("memory write", len(data), self.config.limits.max_body)
        self.owners[str(vm)].write(bytes(data), phys=_int(params, "phys"), virt=_int(params, "virt"),
                                   pid=_int(params, "pid"))
        return {"written": len(data)}

    def op_migrate(self, principal: Principal, vm: str | None, params: dict[str, Any]) -> dict[str, Any]:
        """Live-migrate the VM into the QEMU of VM slot ``to`` (its ``-incoming`` waiting; ``uri``
        defaults to that argument; ``timeout`` seconds): its traces, live subscribers, store and bus
        go on with one ``migrated`` marker. The caller needs ``migrate`` on both VMs."""
        to = params.get("to")
        if not isinstance(to, str) or not to:
            raise ValueError("migrate needs to: the destination VM slot")
        self.policy.authorize(principal, "migrate", to)
        if to not in self.owners:
            raise NotFound(f"no VM {to!r}")
        uri = params.get("uri")
        if uri is not None and not isinstance(uri, str):
            raise ValueError("uri must be a string")
        timeout = _float(params, "timeout") or 120.0
        return self.owners[str(vm)].migrate_to(self.owners[to], uri, timeout)

    def op_dump(self, principal: Principal, vm: str | None, params: dict[str, Any]) -> str:
        """Write the VM's RAM (``format`` elf, raw or lime; ``pause``) to a file of the service's own,
        whose path only the transport sees (it streams the file back and removes it)."""
        fmt = str(params.get("format") or "elf")
        if fmt not in ("elf", "raw", "lime"):
            raise ValueError(f"format {fmt!r}: one of elf, raw, lime")
        pause = str(params.get("pause", "true")).lower() not in ("0", "false", "no")
        os.makedirs(self.dump_dir, mode=0o700, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix=f"{vm}-", suffix=f".{fmt}", dir=self.dump_dir)
        os.close(fd)
        try:
            self.owners[str(vm)].dump(path, format=fmt, pause=pause)
        except BaseException:
            os.unlink(path)
            raise
        return path

    def op_trace_start(self, principal: Principal, vm: str | None, params: dict[str, Any]) -> dict[str, Any]:
        """Arm a trace from a probe spec (or an app from its spec); it is stored (armed again after a
        restart)."""
        spec = parse_spec(params.get("spec"), self.apps)
        if isinstance(spec, AppSpec):
            self.policy.authorize(principal, spec.app.permission, vm)
        with self._lock:
            mine = sum(1 for t in self._traces.values() if t.tenant == principal.name)
            if mine >= self.config.limits.max_traces:
                raise TooManyTraces(f"{principal.name} has {mine} traces, the limit is "
                                    f"{self.config.limits.max_traces}: stop one first")
        sub = Subscription(uuid.uuid4().hex[:16], str(vm), principal.name, spec)
        with _clash_is_conflict():
            self.owners[str(vm)].add(sub)
        self._save_trace(sub)
        with self._lock:
            self._traces[sub.id] = sub
        return sub.describe()

    def _save_trace(self, sub: Subscription) -> None:
        """Store ``sub`` (armed again after a restart) with its current spec."""
        self.store.save_trace({"id": sub.id, "vm": sub.vm, "tenant": sub.tenant, "spec": spec_json(sub.spec),
                               "created": sub.created})

    def _own_trace(self, principal: Principal, params: dict[str, Any]) -> Subscription:
        trace_id = params.get("id")
        with self._lock:
            sub = self._traces.get(str(trace_id))
        # another tenant's trace is "not found": ids do not reveal what others trace
        if sub is None or not (principal.operator or sub.tenant == principal.name):
            raise NotFound(f"no trace {trace_id!r}")
        self.policy.authorize(principal, "trace", sub.vm)
        return sub

    def op_trace_get(self, principal: Principal, vm: str | None, params: dict[str, Any]) -> dict[str, Any]:
        """One trace: its spec, how many events it has seen (counts for a count trace)."""
        return self._own_trace(principal, params).describe()

    def op_trace_stop(self, principal: Principal, vm: str | None, params: dict[str, Any]) -> dict[str, Any]:
        """Disarm and forget a trace."""
        sub = self._own_trace(principal, params)
        self.owners[sub.vm].remove(sub.id)
        self.store.delete_trace(sub.id)
        with self._lock:
            self._traces.pop(sub.id, None)
        return sub.describe()

    def op_trace_update(self, principal: Principal, vm: str | None, params: dict[str, Any]) -> dict[str, Any]:
        """A new spec for an app's trace (the guard's policy), taken without disarming; stored."""
        sub = self._own_trace(principal, params)
        spec = parse_spec(params.get("spec"), self.apps)
        if isinstance(spec, AppSpec):
            self.policy.authorize(principal, spec.app.permission, sub.vm)
        with _clash_is_conflict():
            self.owners[sub.vm].update(sub.id, spec)
        self._save_trace(sub)
        return sub.describe()

    def op_traces(self, principal: Principal, vm: str | None, params: dict[str, Any]) -> list[dict[str, Any]]:
        """The caller's traces (every trace for the operator)."""
        with self._lock:
            subs = list(self._traces.values())
        return [s.describe() for s in subs if principal.operator or s.tenant == principal.name]

    def op_events(self, principal: Principal, vm: str | None, params: dict[str, Any]) -> dict[str, Any]:
        """Stored events of the caller's VMs: filters vm, kind, pid, since, until, q; cursor paging."""
        vms: list[str] | None = None if principal.operator else self.policy.visible_vms(principal)
        if params.get("vm"):
            if vms is not None and params["vm"] not in vms:
                raise NotFound(f"no VM {params['vm']!r}")
            vms = [str(params["vm"])]
        limit = _int(params, "limit")
        limit = 100 if limit is None else limit
        if not 1 <= limit <= 10_000:
            raise ValueError("limit must be 1..10000")
        kinds = params.get("kind")
        pid = _int(params, "pid")
        items, cursor = self.store.events(
            vms=vms, kinds=[kinds] if isinstance(kinds, str) else kinds,
            pids=[pid] if pid is not None else None, since=_float(params, "since"),
            until=_float(params, "until"), text=params.get("q") or None, limit=limit,
            cursor=params.get("cursor") or None)
        return {"items": items, "next": cursor}

    def op_rates(self, principal: Principal, vm: str | None, params: dict[str, Any]) -> dict[str, Any]:
        """Events per second per kind on ``vm`` over the last ``seconds`` (default 300, at most 600)."""
        seconds = _int(params, "seconds")
        return self.rates.series(str(vm), 300 if seconds is None else seconds)

    def op_live(self, principal: Principal, vm: str | None, params: dict[str, Any]) -> None:
        """Permission to subscribe to live events (the subscription itself is the transport's)."""
        return None

    def op_audit(self, principal: Principal, vm: str | None, params: dict[str, Any]) -> dict[str, Any]:
        """Audit rows, newest last (operator only); everything audited before this request is in."""
        self.store.flush()
        limit = _int(params, "limit")
        limit = 100 if limit is None else limit
        allowed = params.get("allowed")
        if isinstance(allowed, str):
            allowed = allowed.lower() in ("1", "true", "yes")
        rows, cursor = self.store.audit_rows(limit=limit, cursor=params.get("cursor") or None,
                                             tenant=params.get("tenant") or None, allowed=allowed)
        return {"items": rows, "next": cursor}


@contextlib.contextmanager
def _clash_is_conflict() -> Iterator[None]:
    """A probe or app another trace holds already (:class:`ProbeClash`): 409, not 422."""
    try:
        yield
    except ProbeClash as e:
        raise Conflict(str(e)) from e


class AccessErrorReadOnly(AccessError):
    """A state-changing operation on a read-only (aggregate) service."""

    status = 405


class TooManyTraces(AccessError):
    """A tenant at its trace limit."""

    status = 429


def _float(params: dict[str, Any], key: str) -> float | None:
    value = params.get(key)
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}={value!r} is not a number") from None


def _detail(operation: str, params: dict[str, Any]) -> str:
    """What the audit row says about a request (never memory contents)."""
    if operation == "view":
        pid = params.get("pid")
        return f"view={params.get('name')}" + (f" pid={pid}" if pid is not None else "")
    if operation in ("memory", "memory.write"):
        size = len(params["data"]) if isinstance(params.get("data"), bytes) else params.get("size")
        where = (("phys", params.get("phys")), ("virt", params.get("virt")), ("pid", params.get("pid")),
                 ("size", size))
        return " ".join(f"{k}={v}" for k, v in where if v is not None)
    if operation == "dump":
        return f"format={params.get('format') or 'elf'}"
    if operation == "migrate":
        return f"to={params.get('to')}"
    if operation in ("trace.get", "trace.stop"):
        return f"id={params.get('id')}"
    if operation == "trace.update":
        spec = params.get("spec")
        return f"id={params.get('id')}" + (f" kind={spec.get('kind')}" if isinstance(spec, dict) else "")
    if operation == "trace.start":
        spec = params.get("spec")
        return f"kind={spec.get('kind')}" if isinstance(spec, dict) else ""
    return ""


def memory_json(data: bytes) -> dict[str, Any]:
    """Memory bytes for a JSON reply (the bus): base64."""
    return {"size": len(data), "base64": base64.b64encode(data).decode()}

