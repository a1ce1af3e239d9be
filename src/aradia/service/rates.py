"""Events per second per VM and kind over the last minutes (the dashboard's sparklines and charts)."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Any

WINDOW_SECONDS = 600


class Rates:
    """Per-second event counts for each (VM, kind), kept for :data:`WINDOW_SECONDS`."""

    def __init__(self, window: int = WINDOW_SECONDS, clock: Any = time.time) -> None:
        self.window = window
        self.clock = clock
        self._lock = threading.Lock()
        # vm -> kind -> {second: count}
        self._counts: dict[str, dict[str, dict[int, int]]] = defaultdict(lambda: defaultdict(dict))

    def add(self, vm: str, kind: str, when: float) -> None:
        """Count one event of ``kind`` on ``vm`` at wall time ``when``."""
        second = int(when)
        with self._lock:
            per = self._counts[vm][kind]
            per[second] = per.get(second, 0) + 1
            if len(per) > self.window + 60:
                cut = int(self.clock()) - self.window
                for s in [s for s in per if s < cut]:
                    del per[s]

    def series(self, vm: str, seconds: int = 120) -> dict[str, Any]:
        """``{"start": first second, "seconds": n, "kinds": {kind: [count per second, oldest first]},
        "total": events in the window}`` for the last ``seconds`` (at most the window) up to now."""
        seconds = max(1, min(int(seconds), self.window))
        end = int(self.clock())
        start = end - seconds + 1
        with self._lock:
            kinds = {kind: [per.get(s, 0) for s in range(start, end + 1)]
                     for kind, per in self._counts.get(vm, {}).items()}
        kinds = {k: v for k, v in kinds.items() if any(v)}
        return {"start": start, "seconds": seconds, "kinds": kinds,
                "total": sum(sum(v) for v in kinds.values())}
