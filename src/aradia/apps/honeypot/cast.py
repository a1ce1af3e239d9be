"""A session's terminal as an asciicast v2 file (``asciinema play`` plays it): a JSON header line, then
one ``[seconds, "o" | "i", text]`` line per chunk the pseudo-terminal passed on, output and typed input.

Bytes are decoded as UTF-8 by one incremental decoder per direction, so a character split over two
writes is kept whole; the output text is exactly what the client received.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path


class Cast:
    """One session's asciicast, written as it happens (the header when the terminal's size is known)."""

    def __init__(self, path: Path, start_wall: float, start_mono: float, title: str) -> None:
        self.path = path
        self.start_wall, self.start_mono = start_wall, start_mono
        self.title = title
        self._decoders = {d: codecs.getincrementaldecoder("utf-8")(errors="replace") for d in "io"}
        self._started = False

    def add(self, when: float, direction: str, data: bytes, cols: int, rows: int) -> None:
        """Append ``data`` (``direction`` "o" output or "i" input) seen at monotonic time ``when``."""
        text = self._decoders[direction].decode(data)
        lines = []
        if not self._started:
            self._started = True
            lines.append(json.dumps({"version": 2, "width": cols or 80, "height": rows or 24,
                                     "timestamp": int(self.start_wall), "title": self.title}))
        if text:
            lines.append(json.dumps([round(max(0.0, when - self.start_mono), 6), direction, text]))
        if lines:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write("\n".join(lines) + "\n")


def read_cast(path: Path) -> tuple[dict, list[tuple[float, str, str]]]:
    """An asciicast v2 file's header and events."""
    header, *rest = path.read_text(encoding="utf-8").splitlines()
    return json.loads(header), [tuple(json.loads(x)) for x in rest if x]  # type: ignore[misc]
