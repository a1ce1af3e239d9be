"""The guard as an app of ``aradia serve``: started like a trace, its alerts go where traces' events go.

A client posts ``{"kind": "guard", "policy": "<the policy file's TOML>", "dry_run": false}`` to
``/api/v1/vms/{vm}/traces`` (its tenant needs ``guard`` besides ``trace``). The service keeps the spec
and arms the guard again when it restarts or the VM comes back, so the protection lives as long as the
service does (a guard run from the CLI lives only as long as its process). Alerts are ``guard`` events
(one per attempt) in the store, on the bus and on the live stream and dashboard. One guard per VM:
a second, different policy on the same VM is refused (409) until the first is stopped; ``PUT
/api/v1/traces/{id}`` with a new spec changes the policy in place (no moment unguarded).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from aradia.apps.guard.guard import Guard
from aradia.apps.guard.policy import parse_policy
from aradia.service.apps import AppSink
from aradia.trace.events import Event
from aradia.trace.tracer import Tracer

MAX_POLICY = 64 * 1024  # characters of TOML: far beyond any real policy, small beside a body limit


class GuardSpec(BaseModel):
    """A guard as a service app: the policy's TOML text and whether it only reports (dry run)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["guard"]
    policy: str = Field(min_length=1, max_length=MAX_POLICY, description="the policy file's TOML")
    dry_run: bool = Field(False, description="report what would be blocked, block nothing")


class GuardApp:
    """The guard for :class:`aradia.service.apps.ServiceApp`."""

    name = "guard"
    permission = "guard"
    event_kind = "guard"

    def parse(self, data: dict[str, Any]) -> GuardSpec:
        """The spec, its policy parsed once now so a bad one is refused before anything is armed."""
        spec = GuardSpec.model_validate(data)
        parse_policy(spec.policy, "policy")
        return spec

    def arm(self, tracer: Tracer, spec: Any, sink: AppSink) -> Guard:
        """Resolve the policy in the guest and arm the guard's hooks on ``tracer`` (its alerts are the
        tracer's ``guard`` events: the sink is not needed)."""
        guard = Guard(tracer, parse_policy(spec.policy, "policy"), dry_run=spec.dry_run)
        guard.start()
        return guard

    def handle(self, handle: Any, ev: Event) -> None:
        """Nothing: the guard decides at its hooks."""

    def disarm(self, tracer: Tracer, handle: Any) -> None:
        """Disarm the guard's hooks."""
        handle.stop()

    def update(self, tracer: Tracer, handle: Any, spec: Any) -> None:
        """A new policy (and dry-run setting) for the armed guard, swapped in at once: no moment
        unguarded; a policy that does not resolve in the guest keeps the old one."""
        handle.reload(parse_policy(spec.policy, "policy"))
        handle.dry_run = spec.dry_run
