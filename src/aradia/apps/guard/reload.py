"""Policy reload without a restart: on SIGHUP or when the policy file's mtime changes."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

from aradia.errors import AradiaError

POLL_SECONDS = 0.5


class PolicyWatcher:
    """A thread that calls ``reload(path)`` (a guard's :meth:`~aradia.apps.guard.guard.Guard.reload`,
    or a service's trace update) on SIGHUP (installed by :meth:`start`, from the main thread) or when
    ``path``'s mtime changes; ``reload`` returns warnings and raises :class:`AradiaError` for a policy
    it cannot use (the previous one stays in force); ``report(text)`` hears each reload and failure."""

    def __init__(self, reload: Callable[[str], list[str]], path: str, report: Callable[[str], None]) -> None:
        self.reload = reload
        self.path = path
        self.report = report
        self.reloads = 0
        self._hup = threading.Event()
        self._stop = threading.Event()
        self._mtime = self._stat()
        self._thread = threading.Thread(target=self._run, name="aradia-guard-policy", daemon=True)

    def _stat(self) -> float | None:
        try:
            return os.stat(self.path).st_mtime_ns
        except OSError:
            return None

    def start(self, *, sighup: bool = True) -> None:
        """Start watching (and handle SIGHUP when ``sighup``; call from the main thread then)."""
        if sighup:
            signal.signal(signal.SIGHUP, lambda *_: self._hup.set())
        self._thread.start()

    def stop(self) -> None:
        """Stop watching."""
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            mtime = self._stat()
            if not self._hup.is_set() and mtime == self._mtime:
                continue
            why = "SIGHUP" if self._hup.is_set() else "file changed"
            self._hup.clear()
            self._mtime = mtime
            try:
                warnings = self.reload(self.path)
            except AradiaError as e:
                self.report(f"policy reload ({why}) failed, the previous policy stays: {e}")
                continue
            self.reloads += 1
            self.report(f"policy reloaded ({why}): {self.path}")
            for w in warnings:
                self.report(f"warning: {w}")
