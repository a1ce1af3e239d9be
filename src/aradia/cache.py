"""aradia's cache directory and its lock.

Kernel profiles, the TCG plugin and (for the test lab) guest images live under one directory:
``$ARADIA_CACHE`` if set, else ``~/.cache/aradia``. Writers serialise on :func:`cache_lock`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """``$ARADIA_CACHE`` (else ``~/.cache/aradia``), absolute, joined with ``parts``."""
    env = os.environ.get("ARADIA_CACHE")
    root = (Path(env) if env else Path.home() / ".cache" / "aradia").absolute()
    return root.joinpath(*parts)


@contextlib.contextmanager
def cache_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed) for the block: one writer at a time."""
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
