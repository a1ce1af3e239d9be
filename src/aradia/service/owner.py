"""The one owner of a VM's connections inside the service: views, memory reads and one shared tracer.

QEMU serves one QMP client and one GDB-stub client, so everything the service does to a VM goes
through its :class:`VMOwner`. Traces (:class:`Subscription`) share one tracer: each probe is armed
once however many traces need it, and each event is handed on (``emit``) with the ids of the traces
it belongs to. When the tracer fails (the guest rebooted, QEMU went away) the owner drops the VM and
arms every trace again once the VM can be reached (a supervisor thread retries).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aradia.errors import AradiaError, Busy, NotAttached, ProbeClash
from aradia.service.apps import AppSink
from aradia.service.config import VMConfig
from aradia.service.schema import Records
from aradia.service.tracespec import (
    AppSpec,
    ProbeKey,
    SpecError,
    arm,
    disarm,
    event_filter,
    event_keys,
    matches,
    probe_keys,
    spec_json,
)
from aradia.trace.events import Event
from aradia.trace.migration import Migration
from aradia.trace.probes import Filter
from aradia.trace.tracer import Tracer
from aradia.vm import VM, attach

#: emit(record, ids of the traces it belongs to): called from the tracer's thread
Emit = Callable[[dict[str, Any], list[str]], None]
RETRY_SECONDS = 3.0


@dataclass
class Subscription:
    """A trace: a probe spec armed on one VM, with its filter and what it has seen."""

    id: str
    vm: str
    tenant: str
    spec: Any
    created: float = field(default_factory=time.time)
    events: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    keys: set[tuple[str, str]] = field(init=False)
    filter: Filter = field(init=False)

    def __post_init__(self) -> None:
        self.keys = event_keys(self.spec)
        self.filter = event_filter(self.spec)

    def describe(self) -> dict[str, Any]:
        """The trace as the API shows it."""
        out = {"id": self.id, "vm": self.vm, "tenant": self.tenant, "spec": spec_json(self.spec),
               "created": self.created, "events": self.events}
        if self.spec.kind == "count":
            out["counts"] = dict(self.counts)
        return out


class VMOwner:
    """Holds one VM's QMP and GDB-stub connections for the service."""

    def __init__(self, config: VMConfig, *, host: str, emit: Emit, log: logging.Logger | None = None,
                 data_dir: Path | None = None) -> None:
        self.config = config
        self.data_dir = data_dir  # apps' files go under it (e.g. the honeypot's transcripts)
        self.name = config.name
        self.host = host
        self._emit = emit
        self.log = log or logging.getLogger("aradia.service")
        self._vm: VM | None = None
        self._vm_lock = threading.RLock()  # attach/detach, views (one drgn user at a time)
        self._trace_lock = threading.RLock()  # subscriptions, probes, the tracer's life
        self.error: str | None = None
        self._tracer: Tracer | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._subs: dict[str, Subscription] = {}
        self._probes: dict[ProbeKey, list[Any]] = {}  # key -> [handle, how many traces use it]
        self._records = Records(host, config.name)  # event ids unique across restarts of the service
        self._closed = False
        self._supervisor: threading.Thread | None = None
        self._summary: dict[str, Any] = {}  # kernel banner, vCPUs, memory path: found at attach

    # --- the VM ------------------------------------------------------------------------------------
    def vm(self) -> VM:
        """The attached VM (attached now if it was not)."""
        with self._vm_lock:
            if self._vm is None:
                try:
                    self._vm = attach(f"qmp:{self.config.qmp}", memory=self.config.memory)
                except AradiaError as e:
                    # clients are told the VM's name, never the host's socket path
                    self.error = f"VM {self.name} is not reachable: {self.redact(str(e))}"
                    raise NotAttached(self.error) from e
                self.error = None
                info = self._vm.info()
                self._summary = {"kernel": info.get("kernel"), "vcpus": len(info["vcpus"]),
                                 "memory_path": info["memory_path"], "ram_bytes": info["ram_bytes"]}
                self.log.info("attached", extra={"vm": self.name, "qmp": self.config.qmp})
            return self._vm

    def redact(self, message: str) -> str:
        """``message`` with the VM's host paths replaced by its name."""
        return message.replace(self.config.qmp, f"<{self.name} QMP socket>")

    def _drop_vm(self, why: str) -> None:
        with self._vm_lock:
            if self._vm is not None:
                with contextlib.suppress(Exception):
                    self._vm.close()
                self._vm = None
            self.error = why

    @contextlib.contextmanager
    def _kernel_use(self) -> Iterator[VM]:
        """The VM with its kernel loaded, for one drgn user at a time (the tracer waits between hits)."""
        with self._vm_lock:
            vm = self.vm()
            try:
                vm.load_kernel(btf_source=self.config.btf)
                tracer = self._tracer
                with tracer.held() if tracer is not None else contextlib.nullcontext():
                    yield vm
            except NotAttached as e:
                self._drop_vm(str(e))
                raise

    def state(self) -> dict[str, Any]:
        """Owner state: ``attached``/``detached``/``error`` (with the error), QEMU's run state, traces."""
        with self._trace_lock:
            traces = len(self._subs)
            tracing = self._tracer is not None
        out: dict[str, Any] = {"name": self.name, "traces": traces, "tracing": tracing, **self._summary}
        vm = self._vm
        if vm is None:
            out.update(owner="error" if self.error else "detached", state="unknown", error=self.error)
            return out
        try:
            out.update(owner="attached", state=vm.status(), error=None)
        except AradiaError as e:
            out.update(owner="error", state="unknown", error=str(e))
        return out

    def info(self) -> dict[str, Any]:
        """``aradia info --json`` of the VM (kernel banner included) plus the owner state."""
        with self._vm_lock:
            vm = self.vm()
            try:
                out = vm.info()
            except NotAttached as e:
                self._drop_vm(str(e))
                raise
        out["spec"] = self.name  # never a host path
        out["owner"] = self.state()
        return out

    def view(self, name: str, pid: int | None = None) -> dict[str, Any]:
        """One view (see :meth:`aradia.linux.kernel.Kernel.view`)."""
        with self._kernel_use() as vm:
            return vm.linux.view(name, pid)

    def read(self, size: int, *, phys: int | None = None, virt: int | None = None,
             pid: int | None = None) -> bytes:
        """Guest memory: physical, kernel-virtual, or a process's virtual (``virt`` with ``pid``)."""
        _check_where(phys, virt, pid)
        if phys is not None:
            with self._vm_lock:
                return self.vm().read(phys, size)
        if pid is not None:
            with self._kernel_use() as vm:
                return vm.linux.read_user(pid, int(virt), size)  # type: ignore[arg-type]
        with self._kernel_use() as vm:
            return vm.read_virt(int(virt), size)  # type: ignore[arg-type]

    def write(self, data: bytes, *, phys: int | None = None, virt: int | None = None,
              pid: int | None = None) -> None:
        """Write guest memory: physical, kernel-virtual, or a process's virtual (``virt`` with ``pid``)."""
        _check_where(phys, virt, pid)
        if phys is not None:
            with self._vm_lock:
                self.vm().write(phys, data)
            return
        with self._kernel_use() as vm:
            if pid is not None:
                vm.linux.write_user(pid, int(virt), data)  # type: ignore[arg-type]
            else:
                vm.write_virt(int(virt), data)  # type: ignore[arg-type]

    def dump(self, path: str, *, format: str = "elf", pause: bool = True) -> None:
        """Write the VM's RAM to ``path`` (see :meth:`aradia.vm.VM.dump`)."""
        with self._vm_lock:
            vm = self.vm()
            try:
                vm.dump(path, format=format, pause=pause)
            except NotAttached as e:
                self._drop_vm(str(e))
                raise

    # --- live migration ----------------------------------------------------------------------------
    def migrate_to(self, slot: VMOwner, uri: str | None = None, timeout: float = 120.0) -> dict[str, Any]:
        """Live-migrate this VM into the QEMU behind ``slot`` (a VM of this service whose QEMU waits with
        ``-incoming``; ``uri`` defaults to that argument), its traces going on across the switch.

        This owner keeps the VM's name and its traces: afterwards it holds the destination QEMU, and
        ``slot`` the migrated-away source (run state ``postmigrate``). Every subscriber sees one event
        sequence with a ``migrated`` marker. A failed migration leaves everything as it was.
        """
        if slot is self:
            raise AradiaError(f"{self.name} cannot migrate into itself")
        if slot.subscriptions():
            raise Busy(f"{slot.name} has traces of its own: it is not a free destination slot")
        slot._drop_vm("handed to a migration")  # QEMU serves one QMP client: the migration needs it
        with self._trace_lock, self._vm_lock:
            tracer = self._tracer
            temporary = tracer is None
            if tracer is None:
                vm = self.vm()
                vm.load_kernel(btf_source=self.config.btf)
                tracer = Tracer.open(vm)  # nothing armed: the same safe stop and hand-over
            try:
                result = Migration(tracer, f"qmp:{slot.config.qmp}", uri, timeout=timeout, keep_vm=True,
                                   labels=(f"{self.host}/{self.name}", f"{self.host}/{slot.name}")).run()
            except BaseException as e:
                if temporary:
                    tracer.close()
                if isinstance(e, AradiaError):  # clients are told VM names, never host paths
                    raise type(e)(slot.redact(self.redact(str(e)))) from None
                raise
            source_qmp = self.config.qmp
            self.config = dataclasses.replace(self.config, qmp=slot.config.qmp)
            slot.config = dataclasses.replace(slot.config, qmp=source_qmp)
            slot.error = None
            self._vm = tracer.vm  # the destination, already attached (same kernel profile)
            if temporary:
                tracer.close()
        self.log.info("migrated", extra={"vm": self.name, "slot": slot.name, "paused": result.paused})
        out = result.as_dict()
        out.update(source=slot.name, destination=self.name, uri=None)  # names, never host paths
        return out

    # --- traces ------------------------------------------------------------------------------------
    def subscriptions(self) -> list[Subscription]:
        """The traces armed (or waiting to be armed) on this VM."""
        with self._trace_lock:
            return list(self._subs.values())

    def subscription(self, trace_id: str) -> Subscription | None:
        """One trace by id."""
        with self._trace_lock:
            return self._subs.get(trace_id)

    def add(self, sub: Subscription, *, pending_ok: bool = False) -> None:
        """Arm ``sub``'s probes (those another trace armed already are shared).

        A spec the kernel cannot serve (unknown symbol, probe clash) raises and arms nothing. With
        ``pending_ok`` (re-arming stored traces at start) an unreachable VM keeps the trace waiting:
        the supervisor arms it once the VM is back.
        """
        with self._trace_lock:
            try:
                self._arm(sub)
            except NotAttached as e:
                if not pending_ok:
                    raise
                self.log.warning("trace waits for its VM", extra={"vm": self.name, "trace": sub.id,
                                                                   "error": str(e)})
                self._drop_tracer(str(e))
            self._subs[sub.id] = sub
        self._ensure_supervisor()

    def _arm(self, sub: Subscription) -> None:
        tracer = self._ensure_tracer()
        done: list[ProbeKey] = []
        try:
            for key in probe_keys(sub.spec):
                have = self._probes.get(key)
                if have is None:
                    sink = self._sink(sub) if key[0] == "app" else None
                    self._probes[key] = [arm(tracer, key, sink), 1]
                    if sink is not None:
                        sink.handle = self._probes[key][0]
                else:
                    have[1] += 1
                done.append(key)
        except BaseException:
            for key in done:
                self._release(key)
            if not self._subs:
                self._drop_tracer(None)
            raise

    def _sink(self, sub: Subscription) -> AppSink:
        """Where the app ``sub`` starts puts its records (to every trace sharing the armed app; while it
        arms, to ``sub`` alone) and its files."""

        def emit(record: dict[str, Any]) -> None:
            subs = self._app_subs(sink.handle) or [sub]
            for s in subs:
                s.events += 1
            try:
                self._emit(record, [s.id for s in subs])
            except Exception:  # a sink's trouble never stops the guest's tracing
                self.log.exception("event sink failed", extra={"vm": self.name})

        base = self.data_dir if self.data_dir is not None else Path("aradia-apps")
        sink = AppSink(self._records, emit, base / f"{self.name}-{sub.id}")
        return sink

    def _app_subs(self, handle: Any) -> list[Subscription]:
        """The traces of the armed app ``handle`` (none before it is armed)."""
        if handle is None:
            return []
        keys = {k for k, have in self._probes.items() if k[0] == "app" and have[0] is handle}
        return [s for s in list(self._subs.values())
                if isinstance(s.spec, AppSpec) and probe_keys(s.spec)[0] in keys]

    def _release(self, key: ProbeKey) -> None:
        have = self._probes.get(key)
        if have is None:
            return
        have[1] -= 1
        if have[1] <= 0:
            del self._probes[key]
            if self._tracer is not None:
                with contextlib.suppress(AradiaError):
                    disarm(self._tracer, key, have[0])

    def remove(self, trace_id: str) -> Subscription | None:
        """Disarm one trace (probes other traces use stay); the last one closes the tracer."""
        with self._trace_lock:
            sub = self._subs.pop(trace_id, None)
            if sub is None:
                return None
            if self._tracer is not None:
                for key in probe_keys(sub.spec):
                    self._release(key)
            if not self._subs:
                self._drop_tracer(None)
            return sub

    def update(self, trace_id: str, spec: Any) -> Subscription:
        """Give trace ``trace_id`` (an app's) a new spec of the same app without disarming it; the
        old spec stays when the app refuses the new one or another trace shares the armed app."""
        with self._trace_lock:
            sub = self._subs.get(trace_id)
            if sub is None:
                raise AradiaError(f"no trace {trace_id!r} on {self.name}")
            old_keys, new_keys = probe_keys(sub.spec), probe_keys(spec)
            if not (isinstance(sub.spec, AppSpec) and isinstance(spec, AppSpec)
                    and sub.spec.app is spec.app):
                raise SpecError(f"only an app's spec can be changed in place, by one of the same app "
                                f"({sub.spec.kind}); stop the trace and start another")
            if old_keys == new_keys:
                return sub
            if new_keys[0] in self._probes:
                raise ProbeClash(f"another trace on {self.name} already has that spec armed")
            have = self._probes.get(old_keys[0])
            if have is not None and have[1] > 1:
                raise ProbeClash(f"trace {trace_id} shares its armed {sub.spec.kind} with another "
                                 "trace: already changed by both")
            if have is not None and self._tracer is not None:
                spec.app.update(self._tracer, have[0], spec.spec)
                del self._probes[old_keys[0]]
                self._probes[new_keys[0]] = have
            sub.spec = spec  # (unarmed, waiting for its VM: armed with the new spec when it is back)
            sub.keys = event_keys(spec)
            sub.filter = event_filter(spec)
            return sub

    def _ensure_tracer(self) -> Tracer:
        if self._tracer is not None:
            return self._tracer
        with self._vm_lock:
            vm = self.vm()
            try:
                vm.load_kernel(btf_source=self.config.btf)
                tracer = Tracer.open(vm)
            except NotAttached as e:
                self._drop_vm(str(e))
                raise
        self._tracer = tracer
        self._probes.clear()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(tracer, self._stop),
                                        name=f"aradia-trace-{self.name}", daemon=True)
        self._thread.start()
        return tracer

    def _drop_tracer(self, why: str | None) -> None:
        """Close the tracer (the guardian disarms everything and lets the guest run)."""
        tracer, self._tracer = self._tracer, None
        self._probes.clear()
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)
        if tracer is not None:
            with contextlib.suppress(Exception):
                tracer.close()
        if why is not None:
            self._drop_vm(why)

    def _loop(self, tracer: Tracer, stop: threading.Event) -> None:
        """The tracer's thread: run the guest, hand every event on."""
        try:
            for ev in tracer.events(until=stop.is_set):
                self._dispatch(ev)
        except AradiaError as e:
            self.log.warning("tracer stopped", extra={"vm": self.name, "error": str(e)})
            self._tracer_failed(tracer, str(e))
        except Exception:
            self.log.exception("tracer failed", extra={"vm": self.name})
            self._tracer_failed(tracer, "the tracer failed (see the service log)")

    def _tracer_failed(self, tracer: Tracer, why: str) -> None:
        """Forget a tracer that stopped by itself (its guardian has disarmed everything); the
        supervisor arms the traces again once the VM is back."""
        with self._trace_lock:
            if self._tracer is tracer:
                self._tracer = None
                self._probes.clear()
                with contextlib.suppress(Exception):
                    tracer.close()
                self._drop_vm(why)

    def _dispatch(self, ev: Event) -> None:
        for key, (handle, _n) in list(self._probes.items()):
            if key[0] == "app":
                try:
                    key[1].app.handle(handle, ev)
                except Exception:  # an app's trouble never stops the guest's tracing
                    self.log.exception("app failed on an event", extra={"vm": self.name, "app": key[1].kind})
        subs = [s for s in list(self._subs.values()) if matches(s.spec, s.keys, s.filter, ev)]
        if not subs:
            return
        if ev.kind == "count":
            for s in subs:
                s.counts[ev.name] = s.counts.get(ev.name, 0) + 1
            return
        for s in subs:
            s.events += 1
        record = self._records.record(ev)
        try:
            self._emit(record, [s.id for s in subs])
        except Exception:  # a sink's trouble never stops the guest's tracing
            self.log.exception("event sink failed", extra={"vm": self.name})

    def _ensure_supervisor(self) -> None:
        if self._supervisor is None or not self._supervisor.is_alive():
            self._supervisor = threading.Thread(target=self._supervise, name=f"aradia-owner-{self.name}",
                                                daemon=True)
            self._supervisor.start()

    def _supervise(self) -> None:
        """Re-arm every trace once the VM is reachable again after the tracer stopped."""
        while not self._closed:
            time.sleep(RETRY_SECONDS)
            with self._trace_lock:
                if self._closed or not self._subs or self._tracer is not None:
                    continue
                try:
                    for sub in list(self._subs.values()):
                        self._arm(sub)
                    self.log.info("traces armed again", extra={"vm": self.name, "traces": len(self._subs)})
                except AradiaError as e:
                    self._drop_tracer(str(e))

    def close(self) -> None:
        """Close the tracer (everything disarmed, the guest running) and the VM's connections."""
        self._closed = True
        with self._trace_lock:
            self._drop_tracer(None)
        self._drop_vm("closed")


def _check_where(phys: int | None, virt: int | None, pid: int | None) -> None:
    """A memory address is one of ``phys`` or ``virt`` (with ``pid``: in that process)."""
    if (phys is None) == (virt is None):
        raise AradiaError("give exactly one of phys or virt")
    if pid is not None and virt is None:
        raise AradiaError("pid goes with virt")
