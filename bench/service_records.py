"""Synthetic event records for the service benchmarks (well-formed, like a syscall probe's)."""

from __future__ import annotations

import time
from typing import Any


def synthetic_records(n: int, tag: str) -> list[dict[str, Any]]:
    """``n`` well-formed event records like a syscall probe's (3 VMs, 40 pids, ~100 bytes of args)."""
    t0 = time.time()
    names = ("execve", "openat", "read", "write", "connect")
    return [{"schema": 1, "id": f"hv1-{tag}-{i:012d}", "time": t0 + i * 1e-5, "host": "hv1",
             "vm": f"vm{i % 3}", "vcpu": i % 2, "kind": "syscall", "name": names[i % 5], "pid": 1000 + i % 40,
             "tgid": 1000 + i % 40, "comm": "worker", "uid": 1000,
             "args": {"fd": i % 64, "path": f"/srv/data/file{i % 977}.dat", "flags": 524288, "count": 4096}}
            for i in range(n)]
