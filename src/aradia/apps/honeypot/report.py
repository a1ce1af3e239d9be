"""The honeypot's findings as text: one line per live event, a short report per recorded session."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import Any

from aradia.errors import AradiaError

MAX_SESSIONS = 100_000


def _when(t: float | None) -> str:
    return "?" if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _argv(argv: list[str] | None) -> str:
    return " ".join(shlex.quote(a) for a in argv or [])


def auth_text(a: dict[str, Any]) -> str:
    """One authentication attempt in words: the password or the key's fingerprint, and the verdict."""
    verdict = "accepted (forced)" if a.get("forced") else "accepted" if a["accepted"] else "rejected"
    if a.get("method") == "publickey":
        return f"{a.get('key_type') or 'public'} key {a['fingerprint']} for {a['user']}: {verdict}"
    return f"password {a['password']!r} for {a['user']}: {verdict}"


def event_line(rec: dict[str, Any]) -> str:
    """One live event record as a line: time, session, what happened."""
    a = rec["args"]
    head = f"{_when(rec['time'])} {a.get('session')} {rec['comm']}[{rec['tgid']}]"
    name = rec["name"]
    if name == "session.start":
        what = f"connection from {a['client']}:{a['client_port']} to port {a['server_port']} ({a['daemon']})"
    elif name == "session.end":
        what = f"ended ({a['attempts']} authentication attempts, {a['commands']} programs run)"
    elif name == "auth":
        what = auth_text(a)
    elif name == "exec":
        what = f"exec in {a.get('cwd')}: {_argv(a.get('argv'))}"
    elif name == "line":
        what = f"typed: {a['line']}"
    elif name == "file":
        what = f"file {a['op']} {a['path']} ({a.get('size')} bytes, sha256 {a.get('sha256')})"
    elif name == "net":
        addr = a.get("addr") or {}
        where = addr.get("path") or f"{addr.get('address')}:{addr.get('port')}"
        what = f"{a['syscall']} {where}"
    else:
        what = json.dumps(a)
    return f"{head} {what}"


def session_report(s: dict[str, Any]) -> str:
    """A short text report of one session summary (``sessions/SID.json``)."""
    dur = f"{s['end'] - s['start']:.1f} s" if s.get("end") else "still open"
    out = [f"session {s['session']}: {s.get('user') or '?'} from {s.get('client')}:{s.get('client_port')} "
           f"to port {s.get('server_port')} ({s['daemon']} pid {s['daemon_pid']}), "
           f"{_when(s['start'])}, {dur}"]
    for a in s["auth"]:
        out.append(f"  {auth_text(a)}")
    for c in s["commands"]:
        out.append(f"  exec [{c.get('cwd')}] {_argv(c.get('argv'))}")
    for line in s["lines"]:
        out.append(f"  typed: {line['line']}")
    for f in s["files"]:
        src = f" (from {f['from']})" if f.get("from") else ""
        out.append(f"  file {f['op']} {f['path']}{src}: {f.get('size')} bytes, sha256 {f.get('sha256')}")
    for n in s["net"]:
        addr = n.get("addr") or {}
        where = addr.get("path") or f"{addr.get('address')}:{addr.get('port')}"
        out.append(f"  {n['syscall']} {where}")
    if s.get("cast"):
        out.append(f"  terminal: {s['cast']}")
    return "\n".join(out)


def report(root: Path) -> str:
    """The report of every session recorded under ``root`` (oldest first)."""
    d = Path(root) / "sessions"
    if not d.is_dir():
        raise AradiaError(f"{root} holds no honeypot output (no sessions/ directory)")
    summaries = []
    for path in sorted(d.glob("*.json"))[:MAX_SESSIONS]:
        try:
            summaries.append(json.loads(path.read_text()))
        except (OSError, ValueError) as e:
            raise AradiaError(f"{path}: not a session summary ({e})") from None
    if not summaries:
        return "no sessions recorded"
    try:
        return "\n\n".join(session_report(s) for s in sorted(summaries, key=lambda s: s["start"]))
    except (KeyError, TypeError) as e:
        raise AradiaError(f"{d}: a session summary lacks {e}") from None
