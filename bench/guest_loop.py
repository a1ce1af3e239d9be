"""What the guest-loop benchmarks share: the guest programs' builders (``tests/guest_programs.py``,
imported by its path: the benches import nothing from ``tests/`` as a package) and their error."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and why."""


def guest_programs() -> ModuleType:
    """``tests/guest_programs.py`` (the loop program's source and builder), imported by its path."""
    path = REPO / "tests" / "guest_programs.py"
    spec = importlib.util.spec_from_file_location("aradia_bench_guest_programs", path)
    if spec is None or spec.loader is None:
        raise BenchError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
