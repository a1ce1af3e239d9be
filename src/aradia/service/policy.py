"""Who may do what in ``aradia serve``: tokens, principals, per-VM and per-operation access, rates, sizes.

A token is ``aradia_`` + 43 URL-safe characters (256 random bits); the configuration keeps only its
SHA-256. :meth:`Policy.authenticate` turns a presented token into a :class:`Principal` (the operator
or one tenant), :meth:`Policy.authorize` checks an operation on a VM, :meth:`Policy.check_rate` spends
one request from the principal's token bucket and :meth:`Policy.check_size` bounds a request.
Each refusal is an :class:`AccessError` carrying its HTTP status, so the API and the bus answer alike.

A tenant never learns which VMs exist beyond its own: another tenant's VM and a VM that does not exist
are refused with the same :class:`Forbidden` message.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from aradia.errors import AradiaError
from aradia.service.config import OPERATIONS, OPERATOR_NAME, ConfigError, ServiceConfig
from aradia.service.schema import NAME_RE

#: operations beside :data:`OPERATIONS`: ``list`` (one's own VMs) for every principal, the rest operator only
LIST, AUDIT, ADMIN = "list", "audit", "admin"
ALL_OPERATIONS: tuple[str, ...] = (*OPERATIONS, LIST, AUDIT, ADMIN)
#: longer tokens are refused before hashing (a real one is 50 characters)
MAX_TOKEN_LENGTH = 512
TOKEN_PREFIX = "aradia_"
# a refill that lands a hair under one whole token (float rounding of clock differences) still counts
_EPSILON = 1e-9


class AccessError(AradiaError):
    """A request refused by policy; ``status`` is its HTTP status, ``retry_after`` seconds (429 only)."""

    status: int = 403

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BadRequest(AccessError):
    """The request itself is malformed (e.g. a negative size)."""

    status = 400


class Unauthorized(AccessError):
    """No token, or a token no principal holds."""

    status = 401


class Forbidden(AccessError):
    """The principal may not use this operation or reach this VM."""

    status = 403


class NotFound(AccessError):
    """No such VM (told to the operator only; a tenant gets :class:`Forbidden`)."""

    status = 404


class TooLarge(AccessError):
    """A request or a read past a size limit."""

    status = 413


class TooManyRequests(AccessError):
    """The principal's request rate is spent; ``retry_after`` says when one more request will pass."""

    status = 429


def new_token() -> tuple[str, str]:
    """A fresh token and its SHA-256 hex: ``("aradia_…", "…")``; only the hash goes in the config."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    return token, token_sha256(token)


def token_sha256(token: str) -> str:
    """The SHA-256 (64 lowercase hex digits) of ``token``'s UTF-8 bytes."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def token_config_line(token_sha256: str, name: str | None) -> str:
    """The TOML to paste into the service config for a new token: an ``[operator]`` block when
    ``name`` is None, else a ``[[tenant]]`` block called ``name`` (its ``allow`` line commented out)."""
    if not isinstance(token_sha256, str) or len(token_sha256) != 64 \
            or any(c not in "0123456789abcdef" for c in token_sha256):
        raise ConfigError("token_sha256 must be 64 lowercase hex digits (the hash, never the token)")
    if name is None:
        return f'[operator]\ntoken_sha256 = "{token_sha256}"\n'
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(f"tenant name {name!r} is not a name ([A-Za-z0-9_-]{{1,64}})")
    if name == OPERATOR_NAME:
        raise ConfigError(f"tenant name {name!r} is reserved for the operator")
    ops = ", ".join(f'"{op}"' for op in OPERATIONS)
    return (f'[[tenant]]\nname = "{name}"\ntoken_sha256 = "{token_sha256}"\n'
            f"# allow = [{ops}]\n")


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: the operator or a tenant, with its operations and its VMs."""

    name: str
    operator: bool
    allow: frozenset[str]
    vms: frozenset[str]


class _Bucket:
    """A token bucket: ``burst`` requests at once, refilled at ``rate`` per second."""

    __slots__ = ("burst", "last", "level", "rate")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.level = float(burst)
        self.last = now

    def take(self, now: float) -> float | None:
        """Spend one request; None when it passes, else the seconds until one more would pass."""
        if now > self.last:
            self.level = min(float(self.burst), self.level + (now - self.last) * self.rate)
            self.last = now
        if self.level >= 1.0 - _EPSILON:
            self.level = max(0.0, self.level - 1.0)
            return None
        return (1.0 - self.level) / self.rate


class Policy:
    """Authentication, authorization and limits for one :class:`ServiceConfig` (thread-safe)."""

    def __init__(self, config: ServiceConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, _Bucket] = {}
        all_vms = frozenset(v.name for v in config.vms)
        # (hash as bytes, principal) for every principal; authenticate compares against all of them
        self._hashes: list[tuple[bytes, Principal]] = []
        if config.operator_sha256 is not None:
            op = Principal(OPERATOR_NAME, True, frozenset(OPERATIONS), all_vms)
            self._hashes.append((config.operator_sha256.encode("ascii"), op))
        for t in config.tenants:
            own = frozenset(v.name for v in config.vms if v.tenant == t.name)
            self._hashes.append((t.token_sha256.encode("ascii"), Principal(t.name, False, t.allow, own)))

    def authenticate(self, token: str | None) -> Principal:
        """The principal holding ``token``; :class:`Unauthorized` when it is missing or nobody's.

        The presented token's hash is compared with every principal's hash in constant time, all of
        them whatever matched, so the timing tells nothing about which principal came close.
        """
        if not token:
            raise Unauthorized("a token is required (Authorization: Bearer TOKEN)")
        if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
            raise Unauthorized("the token is not valid")
        digest = token_sha256(token).encode("ascii")
        found: Principal | None = None
        for stored, principal in self._hashes:
            if hmac.compare_digest(digest, stored) and found is None:
                found = principal
        if found is None:
            raise Unauthorized("the token is not valid")
        return found

    def authorize(self, principal: Principal, operation: str, vm: str | None = None) -> None:
        """Return if ``principal`` may use ``operation`` (on ``vm``, if given), else raise.

        ``operation`` is one of :data:`OPERATIONS`, ``list`` (every principal, its own VMs) or
        ``audit``/``admin`` (operator only); any other is a :class:`ValueError` (a bug in the caller).
        A tenant gets :class:`Forbidden` for an operation it lacks and for any VM not its own,
        existing or not; the operator gets :class:`NotFound` for a VM that does not exist.
        """
        if operation not in ALL_OPERATIONS:
            raise ValueError(f"unknown operation {operation!r} (known: {', '.join(ALL_OPERATIONS)})")
        if principal.operator:
            if vm is not None and self.config.vm(vm) is None:
                raise NotFound(f"no VM named {vm!r}")
            return
        if operation in (AUDIT, ADMIN):
            raise Forbidden(f"{operation!r} is for the operator only")
        if operation != LIST and operation not in principal.allow:
            raise Forbidden(f"tenant {principal.name!r} may not use {operation!r}")
        if vm is not None and vm not in principal.vms:
            raise Forbidden(f"tenant {principal.name!r} has no VM named {vm!r}")

    def visible_vms(self, principal: Principal) -> list[str]:
        """The names of the VMs ``principal`` may reach, in configuration order."""
        return [v.name for v in self.config.vms if principal.operator or v.name in principal.vms]

    def check_rate(self, principal: Principal) -> None:
        """Spend one request of ``principal``'s rate; :class:`TooManyRequests` (with ``retry_after``
        seconds) when its bucket is empty. A tenant's own ``rate``/``burst`` override ``[limits]``."""
        with self._lock:
            bucket = self._buckets.get(principal.name)
            now = self._clock()
            if bucket is None:
                rate, burst = self._rate_of(principal)
                bucket = self._buckets[principal.name] = _Bucket(rate, burst, now)
            wait = bucket.take(now)
        if wait is not None:
            raise TooManyRequests(f"{principal.name!r} is past {bucket.rate:g} requests/s "
                                  f"(burst {bucket.burst}): retry in {wait:.3f} s", retry_after=wait)

    def _rate_of(self, principal: Principal) -> tuple[float, int]:
        limits = self.config.limits
        tenant = None if principal.operator else self.config.tenant(principal.name)
        rate = tenant.rate if tenant is not None and tenant.rate is not None else limits.rate
        burst = tenant.burst if tenant is not None and tenant.burst is not None else limits.burst
        return rate, burst

    def check_size(self, what: str, size: int, limit: int) -> None:
        """Return if ``size`` bytes of ``what`` are within ``limit``; :class:`TooLarge` naming both if
        not, :class:`BadRequest` for a negative size."""
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise BadRequest(f"{what}: size {size!r} is not a byte count")
        if size > limit:
            raise TooLarge(f"{what} of {size} bytes is past the limit of {limit} bytes")
