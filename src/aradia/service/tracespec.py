"""What a client asks to trace (a probe spec), which probes it needs and which events are its own.

A spec is JSON, one of (``kind`` picks)::

    {"kind": "syscalls", "syscalls": ["execve", "openat"]}
    {"kind": "probe", "symbols": ["do_sys_openat2"], "ret": false}
    {"kind": "uprobe", "specs": ["libcrypt.so.1:crypt"], "process": "dropbear", "ret": false}
    {"kind": "procs", "events": ["fork", "exec", "exit"]}
    {"kind": "count", "symbols": ["__x64_sys_getppid"]}
    {"kind": "watch", "address": 140737488346112, "length": 8, "access": "w", "in_pid": 812}

each with optional event filters ``pid``, ``comm``, ``uid`` (lists), as ``aradia trace`` has them;
or the spec of an app the service offers (:mod:`aradia.service.apps`: ``{"kind": "guard", …}``).
Many specs share one tracer per VM: each probe is armed once however many specs need it
(:class:`ProbeKey` counts them) and an event goes to the specs whose :func:`matches` says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from aradia.errors import AradiaError
from aradia.service.apps import Apps, AppSink, ServiceApp
from aradia.trace.events import Event
from aradia.trace.probes import Filter
from aradia.trace.tracer import LIFECYCLE, Tracer

Symbol = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.$]{1,128}$")]
SyscallName = Annotated[str, Field(pattern=r"^[a-z0-9_]{1,40}$")]
UserSpec = Annotated[str, Field(pattern=r"^[^\s:]{1,200}:[A-Za-z0-9_.$@]{1,128}$")]
MAX_ITEMS = 64


class SpecError(AradiaError):
    """A probe spec that is malformed or asks for something this VM cannot do."""


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pid: list[int] | None = Field(None, max_length=MAX_ITEMS, description="only these processes")
    comm: list[Annotated[str, Field(max_length=64)]] | None = Field(
        None, max_length=MAX_ITEMS, description="only tasks with these names")
    uid: list[int] | None = Field(None, max_length=MAX_ITEMS, description="only these users")


class SyscallsSpec(_Spec):
    """Syscalls with decoded arguments."""

    kind: Literal["syscalls"]
    syscalls: list[SyscallName] = Field(min_length=1, max_length=MAX_ITEMS)


class ProbeSpec(_Spec):
    """Kernel functions: entry with argument registers, or the return value (``ret``)."""

    kind: Literal["probe"]
    symbols: list[Symbol] = Field(min_length=1, max_length=MAX_ITEMS)
    ret: bool = False


class UprobeSpec(_Spec):
    """User-space functions ``LIB:SYMBOL``."""

    kind: Literal["uprobe"]
    specs: list[UserSpec] = Field(min_length=1, max_length=MAX_ITEMS)
    process: Annotated[str, Field(max_length=64)] | None = None
    in_pid: int | None = None
    ret: bool = False
    args: Annotated[str, Field(max_length=200)] | None = None


class ProcsSpec(_Spec):
    """Process lifecycle: fork, exec (program and argv), exit (status)."""

    kind: Literal["procs"]
    events: list[Literal["fork", "exec", "exit"]] = Field(default=["fork", "exec", "exit"], min_length=1)


class CountSpec(_Spec):
    """Calls of kernel functions, counted (no per-call events are stored)."""

    kind: Literal["count"]
    symbols: list[Symbol] = Field(min_length=1, max_length=MAX_ITEMS)


class WatchSpec(_Spec):
    """A watchpoint on a guest-virtual range."""

    kind: Literal["watch"]
    address: int = Field(ge=0, lt=1 << 64)
    length: int = Field(gt=0, le=1 << 20)
    access: Literal["w", "r", "rw"] = "w"
    in_pid: int | None = None


TraceSpec = Annotated[SyscallsSpec | ProbeSpec | UprobeSpec | ProcsSpec | CountSpec | WatchSpec,
                      Field(discriminator="kind")]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(TraceSpec)

#: One armed probe, as a hashable key: (what, *its parameters).
ProbeKey = tuple[Any, ...]
#: in an event key: every event of that kind
ANY_NAME = "*"


@dataclass(frozen=True)
class AppSpec:
    """The spec of an app the service offers (``spec`` as the app validated it), with the app."""

    app: ServiceApp
    spec: BaseModel

    @property
    def kind(self) -> str:
        """The app's name (the spec's ``kind``)."""
        return self.app.name


def parse_spec(data: Any, apps: Apps | None = None) -> Any:
    """A validated spec (a ``*Spec`` model, or an :class:`AppSpec` for one of ``apps``) from JSON data;
    :class:`SpecError` says what is wrong."""
    app = (apps or {}).get(str(data.get("kind"))) if isinstance(data, dict) else None
    try:
        if app is not None:
            return AppSpec(app, app.parse(data))
        return _ADAPTER.validate_python(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'spec'}: {err['msg']}"
                             for err in e.errors()[:5])
        raise SpecError(f"bad {'app' if app else 'probe'} spec: {problems}") from None
    except SpecError:
        raise
    except AradiaError as e:
        raise SpecError(f"bad {app.name if app else 'probe'} spec: {e}") from None


def spec_json(spec: Any) -> dict[str, Any]:
    """The spec as JSON data (what is stored and shown)."""
    if isinstance(spec, AppSpec):
        return spec.spec.model_dump(exclude_none=True)
    return spec.model_dump(exclude_none=True)


def probe_keys(spec: Any) -> list[ProbeKey]:
    """The probes ``spec`` needs armed."""
    if isinstance(spec, SyscallsSpec):
        return [("syscall", n) for n in dict.fromkeys(spec.syscalls)]
    if isinstance(spec, ProbeSpec):
        return [("kprobe", s, spec.ret) for s in dict.fromkeys(spec.symbols)]
    if isinstance(spec, UprobeSpec):
        return [("uprobe", s, spec.process, spec.in_pid, spec.ret, spec.args)
                for s in dict.fromkeys(spec.specs)]
    if isinstance(spec, ProcsSpec):
        return [("lifecycle", k) for k in dict.fromkeys(spec.events)]
    if isinstance(spec, CountSpec):
        return [("count", s) for s in dict.fromkeys(spec.symbols)]
    if isinstance(spec, WatchSpec):
        return [("watch", spec.address, spec.length, spec.access, spec.in_pid)]
    if isinstance(spec, AppSpec):
        return [("app", spec)]  # the same app spec twice is armed once (a different one clashes)
    raise SpecError(f"unknown spec {spec!r}")


def event_keys(spec: Any) -> set[tuple[str, str]]:
    """The (kind, name) pairs of the events ``spec``'s probes make."""
    if isinstance(spec, SyscallsSpec):
        return {("syscall", n) for n in spec.syscalls}
    if isinstance(spec, ProbeSpec):
        return {("kretprobe" if spec.ret else "kprobe", s) for s in spec.symbols}
    if isinstance(spec, UprobeSpec):
        return {("uretprobe" if spec.ret else "uprobe", s) for s in spec.specs}
    if isinstance(spec, ProcsSpec):
        return {(k, k) for k in spec.events}
    if isinstance(spec, CountSpec):
        return {("count", s) for s in spec.symbols}
    if isinstance(spec, WatchSpec):
        return {("watch", f"{spec.address:#x}")}
    if isinstance(spec, AppSpec):
        kind = spec.app.event_kind  # (None: the app emits its records itself, through its sink)
        return {(kind, ANY_NAME)} if kind else set()
    return set()


def event_filter(spec: Any) -> Filter:
    """The spec's pid/comm/uid filter (an app's spec has none: all its events are its own)."""
    pid, comm, uid = (getattr(spec, k, None) for k in ("pid", "comm", "uid"))
    return Filter(pids=set(pid) if pid else None, comms=set(comm) if comm else None,
                  uids=set(uid) if uid else None)


def matches(spec: Any, keys: set[tuple[str, str]], flt: Filter, ev: Event) -> bool:
    """Whether event ``ev`` belongs to ``spec`` (its ``event_keys`` and ``event_filter`` given); a
    ``migrated`` marker belongs to every trace of the VM (its sequence goes on on another QEMU)."""
    named = (ev.kind, ev.name) in keys or (ev.kind, ANY_NAME) in keys
    return ev.kind == "migrated" or (named and flt.keep(ev))


def arm(tracer: Tracer, key: ProbeKey, sink: AppSink | None = None) -> Any:
    """Arm the probe ``key`` names on ``tracer`` (an app with its ``sink``); the handle :func:`disarm`
    takes."""
    what = key[0]
    if what == "syscall":
        return tracer.add_syscall(key[1])
    if what == "kprobe":
        return tracer.add_kprobe(key[1], ret=key[2])
    if what == "uprobe":
        _, spec, process, in_pid, ret, args = key
        return tracer.add_uprobe(spec, process=process, pid=in_pid, ret=ret, args=args)
    if what == "lifecycle":
        if key[1] not in LIFECYCLE:
            raise SpecError(f"unknown lifecycle event {key[1]!r}")
        return tracer.add_lifecycle((key[1],))
    if what == "count":
        return tracer.add_kprobe(key[1], count_only=True)
    if what == "watch":
        _, address, length, access, in_pid = key
        return tracer.add_watch(address, length, access, pid=in_pid)
    if what == "app":
        if sink is None:
            raise SpecError(f"app {key[1].kind} needs a sink to arm")
        return key[1].app.arm(tracer, key[1].spec, sink)
    raise SpecError(f"unknown probe {what!r}")


def disarm(tracer: Tracer, key: ProbeKey, handle: Any) -> None:
    """Disarm a probe :func:`arm` armed."""
    what = key[0]
    if what == "uprobe":
        tracer.remove_uprobe(handle)
    elif what == "watch":
        tracer.remove_watch(handle)
    elif what == "lifecycle":
        for probe in handle:
            tracer.remove(probe)
    elif what == "app":
        key[1].app.disarm(tracer, handle)
    else:
        tracer.remove(handle)
