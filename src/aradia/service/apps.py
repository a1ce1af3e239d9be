"""Applications the service runs on a VM's shared tracer, beside plain traces (the guard, for one).

The service sits below ``aradia.apps`` and never imports it: whoever starts the service (``aradia
serve``) hands it the apps it offers, each a :class:`ServiceApp`. A client starts an app as it starts
a trace, with a spec whose ``kind`` is the app's name (``{"kind": "guard", "policy": "…"}``); the
service checks the app's own permission besides ``trace``, stores the spec (so the app is armed again
after a restart, as a trace is), and hands the app's events on as a trace's (store, bus, live).
"""

from __future__ import annotations

from typing import Any, Protocol

from pydantic import BaseModel

from aradia.trace.tracer import Tracer


class ServiceApp(Protocol):
    """One application the service can arm on a VM's tracer."""

    #: the spec ``kind`` that starts it, e.g. ``guard``
    name: str
    #: what a tenant's ``allow`` must hold to start it (besides ``trace``)
    permission: str
    #: the ``kind`` of the events it reports
    event_kind: str

    def parse(self, data: dict[str, Any]) -> BaseModel:
        """The validated spec (a frozen pydantic model with a ``kind`` field); raise
        :class:`pydantic.ValidationError` or :class:`aradia.errors.AradiaError` if it is malformed."""
        ...

    def arm(self, tracer: Tracer, spec: Any) -> Any:
        """Arm the app on ``tracer`` (called with the tracer's loop held out); a handle for :meth:`disarm`.
        Raise :class:`aradia.errors.AradiaError` when this VM cannot serve the spec."""
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
