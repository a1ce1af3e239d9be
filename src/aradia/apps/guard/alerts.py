"""The guard's alerts as the user reads them: one line each, or the service's one event record."""

from __future__ import annotations

import time
from typing import Any


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
