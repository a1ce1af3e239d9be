"""The apps ``aradia serve`` offers beside traces (see :mod:`aradia.service.apps`)."""

from __future__ import annotations

from aradia.service.apps import Apps


def service_apps() -> Apps:
    """Every app the service runs, by the spec ``kind`` that starts it."""
    from aradia.apps.guard.served import GuardApp
    from aradia.apps.honeypot.served import HoneypotApp

    apps = (GuardApp(), HoneypotApp())
    return {app.name: app for app in apps}
