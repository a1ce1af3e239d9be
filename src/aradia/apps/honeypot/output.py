"""The honeypot's output directory: ``events.jsonl`` (one event record per line, the service's record
schema), ``sessions/SID.json`` (each session's summary), ``sessions/SID.cast`` (its terminal, asciicast
v2) and ``files/SHA256`` (the contents of every file a session wrote or deleted, once per content)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from aradia.apps.honeypot.cast import Cast
from aradia.apps.honeypot.sessions import Session
from aradia.errors import AradiaError
from aradia.service.schema import Records
from aradia.trace.events import Event


class OutputDir:
    """Where one monitor run writes (created if missing; an existing directory is added to)."""

    def __init__(self, root: Path, records: Records) -> None:
        self.root = Path(root)
        try:
            (self.root / "sessions").mkdir(parents=True, exist_ok=True)
            (self.root / "files").mkdir(exist_ok=True)
            self._log = (self.root / "events.jsonl").open("a", encoding="utf-8")
        except OSError as e:
            raise AradiaError(f"cannot write the honeypot's output under {root}: {e.strerror or e}") from None
        self.records = records
        self.casts: dict[str, Cast] = {}

    def log(self, ev: Event) -> dict[str, Any]:
        """Write ``ev`` as one record line; the record."""
        rec = self.records.record(ev)
        self._log.write(json.dumps(rec) + "\n")
        self._log.flush()
        return rec

    def keep(self, sha256: str, content: bytes) -> str:
        """Store a file's contents under its hash; the path relative to the directory."""
        path = self.root / "files" / sha256
        if not path.exists():
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(content)
            tmp.rename(path)
        return f"files/{sha256}"

    def cast(self, s: Session) -> Cast:
        """The session's asciicast (made at its first terminal traffic)."""
        if s.sid not in self.casts:
            s.cast = f"sessions/{s.sid}.cast"
            self.casts[s.sid] = Cast(self.root / s.cast, s.start, s.start_mono,
                                     f"{s.daemon} session {s.sid} from {s.client}:{s.client_port}")
        return self.casts[s.sid]

    def summary(self, s: Session) -> None:
        """(Re)write the session's summary JSON."""
        path = self.root / "sessions" / f"{s.sid}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(s.summary(), indent=1))
        tmp.rename(path)

    def close(self) -> None:
        """Close the event log."""
        self._log.close()
