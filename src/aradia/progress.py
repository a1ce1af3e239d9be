"""The one shape of a progress report: a callback given one short line before each slow step.

Finding a kernel profile, building its drgn program, building a test-guest image and building the
TCG plugin all take a ``progress: Progress | None`` and call it with lines such as ``"indexing BTF"``;
the CLI prints them on stderr, tests and the lab print or ignore them. A byte count while writing a
dump is another thing, :data:`aradia.sources.dumpwrite.ByteProgress`.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str], None]
"""Called with one short human-readable line (no newline) before a slow step."""

__all__ = ["Progress"]
