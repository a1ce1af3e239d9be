"""The guard's alerts as the user reads them: one line each, or the service's one event record."""

from __future__ import annotations

import re
import socket
import time
from typing import Any

from aradia.service.schema import Records


def alert_line(record: dict[str, Any]) -> str:
    """One human-readable line of an alert's event record: time, action, operation, object, process,
    session, ancestry."""
    a = record.get("args") or {}
    obj = a.get("object") or {}
    when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record["time"]))
    proc = a.get("process") or {"pid": record.get("tgid"), "comm": record.get("comm"),
                                "uid": record.get("uid"), "exe": None}
    s = a.get("session")
    session = "no login session" if not s else (f"session {s['user']} (uid {s['uid']}) from {s['client']}:"
                                                f"{s['client_port']} (daemon pid {s['daemon_pid']})")
    chain = " < ".join(f"{p['comm']}[{p['pid']}]" for p in a.get("ancestry") or [])
    return (f"{when}Z {a.get('action', '?').upper()} {record.get('name')} {obj.get('path')} "
            f"(dev {obj.get('dev')} ino {obj.get('ino')}) by {proc['comm']}[{proc['pid']}] uid={proc['uid']} "
            f"exe={proc.get('exe')}; "
            f"{session}; ancestry {chain or '-'}; rule {a.get('rule')}")


def records(vm: str, host: str | None = None) -> Records:
    """A record maker for the alerts of VM ``vm`` (any text: made a schema name) on ``host`` (default:
    this machine's name)."""
    return Records(_name(host or socket.gethostname()), _name(vm))


def _name(text: str) -> str:
    """A host or VM name as the schema accepts it (``[A-Za-z0-9_-]{1,64}``)."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", text)[-64:] or "vm"
