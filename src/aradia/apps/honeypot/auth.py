"""Passwords as the ssh daemon checks them: ``crypt`` in its own libcrypt, seen (and, for
``--accept-any-password``, answered) from outside.

Both dropbear and OpenSSH (``UsePAM no``) check a password by ``crypt(password, stored_hash)`` and a
comparison of the result with the stored hash. The probe at ``crypt``'s entry reads both; its return
says whether they matched, so the daemon's own verdict is recorded. For a user given to
``--accept-any-password`` the decision skips ``crypt`` and returns the stored hash itself: the
daemon's comparison succeeds whatever was typed (the event says so: ``forced``). The user is the
last name the session's daemon looked up with ``getpwnam`` before the check.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from aradia.linux.bounds import GUEST_ERRORS
from aradia.trace.hooks import HookContext
from aradia.trace.syscalls import user_cstring

CRYPT = "libcrypt.so.1:crypt"
GETPWNAM = "libc.so.6:getpwnam"


class PasswordCheck:
    """The ``crypt`` decision: ``user_of(tgid)`` is the user a session's daemon is checking (None:
    not a session's process), ``accept_any`` the users whose every password is taken."""

    def __init__(self, user_of: Callable[[int], str | None], accept_any: frozenset[str]) -> None:
        self.user_of = user_of
        self.accept_any = accept_any

    def decide(self, ctx: HookContext) -> int | None:
        """At ``crypt``'s entry: for an accept-any user, return the stored hash at once (and report the
        attempt); else let it run (its return is reported with the arguments)."""
        with contextlib.suppress(*GUEST_ERRORS):
            if ctx.task is None or not self.accept_any:
                return None
            user = self.user_of(int(ctx.task.tgid))
            if user is None or user not in self.accept_any:
                return None
            setting = user_cstring(ctx.read, ctx.arg(1))
            if not setting or setting[:1] in ("*", "!"):
                return None  # a locked or password-less account stays so
            ctx.emit("honeypot", "auth", {"method": "password", "user": user,
                                          "password": user_cstring(ctx.read, ctx.arg(0)),
                                          "accepted": True, "forced": True})
            ctx.return_value(ctx.arg(1))
        return None
