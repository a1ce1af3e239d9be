"""Applications the service runs on a VM's shared tracer, beside plain traces (the guard, for one).

The service sits below ``aradia.apps`` and never imports it: whoever starts the service (``aradia
serve``) hands it the apps it offers, each a :class:`ServiceApp`. A client starts an app as it starts
a trace, with a spec whose ``kind`` is the app's name (``{"kind": "guard", "policy": "…"}``); the
service checks the app's own permission besides ``trace``, stores the spec (so the app is armed again
after a restart, as a trace is), and hands the app's events on as a trace's (store, bus, live).

An app's events reach the service one of two ways: as the tracer's own events of its
``event_kind`` (the guard's hooks emit ``guard`` events), or, for an app that digests the tracer's
events into records of its own (the honeypot), through :meth:`ServiceApp.handle` and the
:class:`AppSink` it was armed with (its ``event_kind`` is None).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel

from aradia.service.schema import Records
from aradia.trace.events import Event
from aradia.trace.tracer import Tracer


@dataclass
class AppSink:
    """Where an armed app puts what it makes: event records (``emit``, made with ``records``: the
    VM's one id scheme) and files (under ``directory``, its own on the service's host)."""

    records: Records
    emit: Callable[[dict[str, Any]], None]
    directory: Path
    handle: Any = None  # what the app's arm returned (set by the service once it is armed)


class ServiceApp(Protocol):
    """One application the service can arm on a VM's tracer."""

    #: the spec ``kind`` that starts it, e.g. ``guard``
    name: str
    #: what a tenant's ``allow`` must hold to start it (besides ``trace``)
    permission: str
    #: the ``kind`` of the tracer's events that are its own (None: it emits records through its sink)
    event_kind: str | None

    def parse(self, data: dict[str, Any]) -> BaseModel:
        """The validated spec (a frozen pydantic model with a ``kind`` field); raise
        :class:`pydantic.ValidationError` or :class:`aradia.errors.AradiaError` if it is malformed."""
        ...

    def arm(self, tracer: Tracer, spec: Any, sink: AppSink) -> Any:
        """Arm the app on ``tracer``; a handle for :meth:`disarm`. Raise
        :class:`aradia.errors.AradiaError` when this VM cannot serve the spec."""
        ...

    def handle(self, handle: Any, ev: Event) -> None:
        """Every event of the tracer, in order (an app that only reports its own events ignores them)."""
        ...

    def disarm(self, tracer: Tracer, handle: Any) -> None:
        """Undo :meth:`arm` (the guest runs on as if the app had never been there)."""
        ...

    def update(self, tracer: Tracer, handle: Any, spec: Any) -> None:
        """Take a new spec on the armed ``handle`` without disarming (``PUT /api/v1/traces/{id}``);
        raise :class:`aradia.errors.AradiaError` and keep the old one when it cannot be used."""
        ...


#: the apps a service offers, by spec kind
Apps = dict[str, ServiceApp]
