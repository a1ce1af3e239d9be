"""Sessions and the processes that belong to them: one per connection the ssh daemon accepted,
rooted at the daemon's per-connection process; every process it (or its descendants) started joins
it. A pseudo-terminal belongs to the session whose process first wrote to it (its echoes, written by
a kernel worker, follow it there)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Session:
    """One ssh session as recorded: the connection, the daemon, and what happened in it."""

    sid: str
    daemon_pid: int
    daemon: str
    start: float  # wall clock
    start_mono: float
    client: str | None = None
    client_port: int | None = None
    server: str | None = None
    server_port: int | None = None
    end: float | None = None
    user: str | None = None  # the name the daemon last looked up (getpwnam)
    auth: list[dict[str, Any]] = field(default_factory=list)
    commands: list[dict[str, Any]] = field(default_factory=list)
    lines: list[dict[str, Any]] = field(default_factory=list)
    files: list[dict[str, Any]] = field(default_factory=list)
    net: list[dict[str, Any]] = field(default_factory=list)
    ttys: set[int] = field(default_factory=set)
    cast: str | None = None  # the asciicast's file name, once there is terminal traffic
    adopted: bool = False  # open before the monitor started: ``start`` is the monitor's start

    def summary(self) -> dict[str, Any]:
        """The session as one JSON document."""
        return {"session": self.sid, "daemon": self.daemon, "daemon_pid": self.daemon_pid,
                "client": self.client, "client_port": self.client_port, "server": self.server,
                "server_port": self.server_port, "start": self.start, "end": self.end, "user": self.user,
                "auth": self.auth, "commands": self.commands, "lines": self.lines, "files": self.files,
                "net": self.net, "ttys": sorted(self.ttys), "cast": self.cast, "adopted": self.adopted}


class SessionTable:
    """Which session each process (tgid) and pseudo-terminal (pts index) belongs to now."""

    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}
        self.by_tgid: dict[int, Session] = {}
        self.by_pts: dict[int, Session] = {}
        self._n = itertools.count(1)

    def open(self, daemon_pid: int, daemon: str, start: float, start_mono: float,
             conn: dict[str, Any] | None) -> Session:
        """A new session rooted at the daemon's per-connection process ``daemon_pid``."""
        s = Session(f"s{next(self._n)}-{daemon_pid}", daemon_pid, daemon, start, start_mono, **(conn or {}))
        self.sessions[s.sid] = s
        self.by_tgid[daemon_pid] = s
        return s

    def of(self, tgid: int) -> Session | None:
        """The session process ``tgid`` belongs to."""
        return self.by_tgid.get(tgid)

    def join(self, child: int, parent: int) -> Session | None:
        """``child`` (just forked by ``parent``) joins the parent's session, if any."""
        s = self.by_tgid.get(parent)
        if s is not None:
            self.by_tgid[child] = s
        return s

    def pts(self, index: int, writer: int) -> Session | None:
        """The session of pseudo-terminal ``index``, learnt from the first write by a session's process."""
        s = self.by_tgid.get(writer)
        if s is not None and index not in self.by_pts:
            self.by_pts[index] = s
            s.ttys.add(index)
        return self.by_pts.get(index)

    def leave(self, tgid: int) -> Session | None:
        """Process ``tgid`` exited; its session (ended, and its terminals freed, if it was the root)."""
        s = self.by_tgid.pop(tgid, None)
        if s is not None and s.daemon_pid == tgid:
            for index in [i for i, x in self.by_pts.items() if x is s]:
                del self.by_pts[index]
        return s

    def open_sessions(self) -> list[Session]:
        """Sessions that have not ended."""
        return [s for s in self.sessions.values() if s.end is None]
