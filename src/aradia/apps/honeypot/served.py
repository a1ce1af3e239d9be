"""The honeypot monitor as an app of ``aradia serve``: started like a trace, its records in the store.

A client posts ``{"kind": "honeypot", "accept_any_password": ["root"]}`` to
``/api/v1/vms/{vm}/traces`` (its tenant needs ``honeypot`` besides ``trace``). The monitor digests the
tracer's events into its own ``honeypot`` records (session start and end, every password attempt,
command, typed line, file and connection) which go, as a trace's events do, to the store, the bus,
the live stream and the dashboard; the transcripts (asciicast) and kept files go under the service's
``apps/VM-TRACEID/`` beside its store. The service arms it again after a restart (sessions open then
are adopted). Its hooks include ``security_path_unlink``/``rename``: it cannot share a VM with a guard.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from aradia.apps.honeypot.monitor import Honeypot
from aradia.service.apps import AppSink
from aradia.trace.events import Event
from aradia.trace.tracer import Tracer

UserName = Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_.-]{0,31}$")]


class HoneypotSpec(BaseModel):
    """The honeypot as a service app: which users log in with any password."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["honeypot"]
    accept_any_password: tuple[UserName, ...] = Field((), max_length=16,
                                                      description="users whose password check always passes")


class HoneypotApp:
    """The honeypot for :class:`aradia.service.apps.ServiceApp`."""

    name = "honeypot"
    permission = "honeypot"
    event_kind = None  # it makes its own records from the tracer's events

    def parse(self, data: dict[str, Any]) -> HoneypotSpec:
        """The validated spec."""
        return HoneypotSpec.model_validate(data)

    def arm(self, tracer: Tracer, spec: Any, sink: AppSink) -> Honeypot:
        """Arm the monitor; its records go to ``sink``, its transcripts and files under its directory."""
        hp = Honeypot(tracer, sink.directory, sink.records, accept_any=spec.accept_any_password,
                      show=sink.emit)
        hp.start()
        return hp

    def handle(self, handle: Any, ev: Event) -> None:
        """Attribute one tracer event to its session."""
        handle.handle(ev)

    def update(self, tracer: Tracer, handle: Any, spec: Any) -> None:
        """Another list of users whose password check always passes, taken at once."""
        handle.accept_any = handle.check.accept_any = frozenset(spec.accept_any_password)

    def disarm(self, tracer: Tracer, handle: Any) -> None:
        """Disarm the monitor and write the summaries of sessions still open."""
        handle.stop()
        handle.close()
