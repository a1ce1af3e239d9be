"""The ``aradia serve`` configuration: one TOML file naming tenants, VMs, the store, the bus, limits.

::

    [service]                        # optional
    host = "hv1"                     # default: this machine's short host name
    listen = "127.0.0.1:8765"        # default; `--listen HOST:PORT` overrides it
    aggregate = false                # true: also run the fleet aggregator (needs [nats])
    [operator]                       # sees and may do everything
    token_sha256 = "…"
    [[tenant]]
    name = "alice"
    token_sha256 = "…"               # SHA-256 (hex) of the token: `aradia token new` prints both
    allow = ["views", "read", "trace"]   # of views, read, write, trace, dump, guard, honeypot; default: none
    rate = 5.0                       # optional: requests/s, overriding [limits] for this tenant
    burst = 10                       # optional
    [[vm]]
    name = "web1"
    qmp = "/run/vms/web1/qmp.sock"
    tenant = "alice"                 # optional: without it only the operator reaches the VM
    memory = "auto"                  # auto, shared-file, proc-mem or gdb
    btf = "vmlinux-6.1"              # optional: take kernel types from this file
    [store]
    path = "/var/lib/aradia/events.db"
    max_age_days = 30                # optional
    max_mb = 1024                    # optional
    [nats]                           # optional
    url = "nats://127.0.0.1:4222"
    spool_events = 100000
    [limits]                         # optional; the defaults of LimitsConfig
    rate = 20.0
    [tls]                            # optional: serve HTTPS
    cert = "cert.pem"
    key = "key.pem"

Every key is checked: an unknown key, a wrong type, a name that is not ``[A-Za-z0-9_-]{1,64}``, a token
in clear text, two principals with one token are each a :class:`ConfigError` naming the file and the
key path (``serve.toml: tenant[1].allow: unknown operation 'root'``). Relative paths are resolved
against the directory of the file. The file is the only place where host paths appear: nothing in the
API names one.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import socket
import tomllib
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from aradia.errors import AradiaError
from aradia.service.schema import NAME_RE

#: what a tenant may be allowed to do (``list``, its own VMs, every principal may)
#: (``guard``: arm the insider guard, which makes guest operations fail; ``honeypot``: the SSH honeypot
#: monitor, which records passwords and may let any password in; a tenant needs ``trace`` too;
#: ``migrate``: live-migrate a VM into another VM slot)
OPERATIONS: tuple[str, ...] = ("views", "read", "write", "trace", "dump", "guard", "honeypot", "migrate")
#: how the service reaches a VM's RAM (see :func:`aradia.vm.attach`)
MEMORY_PATHS: tuple[str, ...] = ("auto", "shared-file", "proc-mem", "gdb")
#: the name the operator goes by (in audit rows and rate buckets); no tenant may take it
OPERATOR_NAME = "operator"
DEFAULT_LISTEN = "127.0.0.1:8765"
#: URL schemes nats-py connects to
NATS_SCHEMES = ("nats", "tls", "ws", "wss")

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
_NAME_RULE = "[A-Za-z0-9_-]{1,64}"


class ConfigError(AradiaError):
    """The service configuration cannot be read or is not valid; the message names the file and key."""


@dataclass(frozen=True)
class TenantConfig:
    """A tenant: its name, the SHA-256 of its token, what it may do, an optional own rate limit."""

    name: str
    token_sha256: str
    allow: frozenset[str]
    rate: float | None = None
    burst: int | None = None


@dataclass(frozen=True)
class VMConfig:
    """A VM the service owns: its name in the API, its QMP socket, its tenant (None: operator only)."""

    name: str
    qmp: str
    tenant: str | None = None
    memory: str = "auto"
    btf: str | None = None


@dataclass(frozen=True)
class StoreConfig:
    """The SQLite event store and its optional retention (age in days, size in MB)."""

    path: str
    max_age_days: float | None = None
    max_mb: float | None = None


@dataclass(frozen=True)
class NatsConfig:
    """The NATS JetStream bus and how many events to spool while it is unreachable."""

    url: str
    spool_events: int = 100_000
    max_age_days: float | None = None  # the stream's retention (None: the broker keeps everything)
    max_mb: float | None = None


@dataclass(frozen=True)
class LimitsConfig:
    """Per-tenant limits: request rate (requests/s, bucket of ``burst``) and sizes (bytes)."""

    rate: float = 20.0
    burst: int = 40
    max_read: int = 1 << 20
    max_body: int = 64 << 10
    max_subscribers: int = 64
    max_traces: int = 32


@dataclass(frozen=True)
class TlsConfig:
    """The certificate and key files (PEM) to serve HTTPS with."""

    cert: str
    key: str


@dataclass(frozen=True)
class ServiceConfig:
    """The whole validated configuration of ``aradia serve``."""

    host: str
    listen: str
    operator_sha256: str | None
    tenants: tuple[TenantConfig, ...]
    vms: tuple[VMConfig, ...]
    store: StoreConfig
    nats: NatsConfig | None
    limits: LimitsConfig
    tls: TlsConfig | None
    aggregate: bool = False

    def vm(self, name: str) -> VMConfig | None:
        """The VM called ``name``, or None."""
        return next((v for v in self.vms if v.name == name), None)

    def tenant(self, name: str) -> TenantConfig | None:
        """The tenant called ``name``, or None."""
        return next((t for t in self.tenants if t.name == name), None)


def load_config(path: str | os.PathLike[str]) -> ServiceConfig:
    """Read and validate the TOML file at ``path``; relative paths in it are taken from its directory."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read the configuration: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{source}: not UTF-8 text (line {line})") from None
    return parse_config(text, source=source, base_dir=os.path.dirname(os.path.abspath(source)))


def parse_config(text: str, *, source: str = "<config>", base_dir: str | None = None) -> ServiceConfig:
    """Validate the TOML ``text``; ``source`` names it in errors, relative paths are taken from
    ``base_dir`` (default: the current directory) and returned absolute."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    return _Parser(source, os.path.abspath(base_dir or os.getcwd())).service(doc)


def parse_listen(text: str) -> tuple[str, int]:
    """``"HOST:PORT"`` or ``"[IPV6]:PORT"`` as ``(host, port)``; port 0 asks for any free port."""
    if not isinstance(text, str):
        raise ConfigError(f"listen address must be a string HOST:PORT, not {type(text).__name__}")
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"listen address {text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"listen address {text!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ConfigError(f"listen address {text!r}: an IPv6 address goes in brackets, [::1]:PORT")
    elif not _HOSTNAME_RE.match(host):
        raise ConfigError(f"listen address {text!r}: {host!r} is not a host name or address")
    if not port.isascii() or not port.isdigit() or len(port) > 5 or int(port) > 65535:
        raise ConfigError(f"listen address {text!r}: port {port!r} is not a number from 0 to 65535")
    return host, int(port)


def default_host() -> str:
    """This machine's host name cut at the first dot, if it is a valid name, else a :class:`ConfigError`."""
    host = socket.gethostname().split(".", 1)[0]
    if not NAME_RE.match(host):
        raise ConfigError(f"this machine's host name {host!r} is not a name ({_NAME_RULE}): "
                          "set [service] host in the configuration")
    return host


_SECTIONS = ("service", "operator", "tenant", "vm", "store", "nats", "limits", "tls")


class _Parser:
    """Turns the TOML document into a :class:`ServiceConfig`, checking every key on the way."""

    def __init__(self, source: str, base_dir: str) -> None:
        self.source = source
        self.base_dir = base_dir

    # --- errors and typed reads ---------------------------------------------------------------------
    def error(self, where: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {where}: {message}" if where else f"{self.source}: {message}")

    def table(self, doc: dict[str, Any], key: str, where: str,
              keys: tuple[str, ...]) -> dict[str, Any] | None:
        value = doc.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.error(where, f"must be a table [{key}]")
        self.known(value, where, keys)
        return value

    def tables(self, doc: dict[str, Any], key: str, keys: tuple[str, ...]) -> list[dict[str, Any]]:
        value = doc.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.error(key, f"must be [[{key}]] tables")
        for i, item in enumerate(value):
            self.known(item, f"{key}[{i}]", keys)
        return value

    def known(self, table: dict[str, Any], where: str, keys: tuple[str, ...]) -> None:
        unknown = sorted(set(table) - set(keys))
        if unknown:
            names = ", ".join(repr(k) for k in unknown)
            raise self.error(where, f"unknown key{'s' if len(unknown) > 1 else ''} {names} "
                                    f"(known: {', '.join(keys)})")

    def string(self, table: dict[str, Any], key: str, where: str, *, required: bool = False) -> str | None:
        value = table.get(key)
        if value is None:
            if required:
                raise self.error(where, f"missing key {key!r}")
            return None
        if not isinstance(value, str) or not value:
            raise self.error(f"{where}.{key}", "must be a non-empty string")
        return value

    def name(self, table: dict[str, Any], key: str, where: str, *, required: bool = False) -> str | None:
        value = self.string(table, key, where, required=required)
        if value is not None and not NAME_RE.match(value):
            raise self.error(f"{where}.{key}", f"{value!r} is not a name ({_NAME_RULE})")
        return value

    def path(self, table: dict[str, Any], key: str, where: str, *, required: bool = False) -> str | None:
        value = self.string(table, key, where, required=required)
        if value is None:
            return None
        if "\0" in value:
            raise self.error(f"{where}.{key}", "a path cannot hold a NUL character")
        return os.path.normpath(os.path.join(self.base_dir, value))

    def number(self, table: dict[str, Any], key: str, where: str, *, integer: bool = False) -> Any:
        value = table.get(key)
        if value is None:
            return None
        wrong_kind = integer and isinstance(value, float)
        if not isinstance(value, int | float) or isinstance(value, bool) or wrong_kind:
            raise self.error(f"{where}.{key}", f"must be {'an integer' if integer else 'a number'}")
        if not math.isfinite(value) or value <= 0:
            raise self.error(f"{where}.{key}", f"must be positive, not {value!r}")
        return float(value) if not integer else value

    def token_hash(self, table: dict[str, Any], where: str) -> str:
        value = table.get("token_sha256")
        if value is None:
            raise self.error(where, "missing key 'token_sha256'")
        if not isinstance(value, str):
            raise self.error(f"{where}.token_sha256", "must be a string of 64 hex digits")
        lowered = value.strip().lower()
        if _SHA256_RE.match(lowered):
            return lowered
        # never echo the value: it may be a secret pasted in the wrong place
        if value.startswith("aradia_"):
            raise self.error(f"{where}.token_sha256",
                             "holds a token in clear text, not its SHA-256: "
                             "use `aradia token new` to get a token and the line to paste")
        raise self.error(f"{where}.token_sha256", "is not a SHA-256 (64 hex digits); the file keeps only "
                                                  "the hash of a token: use `aradia token new`")

    # --- sections ---------------------------------------------------------------------------------------
    def service(self, doc: dict[str, Any]) -> ServiceConfig:
        unknown = sorted(set(doc) - set(_SECTIONS))
        if unknown:
            names = ", ".join(repr(k) for k in unknown)
            raise self.error("", f"unknown section{'s' if len(unknown) > 1 else ''} {names} "
                                 f"(known: {', '.join(_SECTIONS)})")
        svc = self.table(doc, "service", "service", ("host", "listen", "aggregate")) or {}
        host = self.name(svc, "host", "service") or default_host()
        listen = self.string(svc, "listen", "service") or DEFAULT_LISTEN
        try:
            parse_listen(listen)
        except ConfigError as exc:
            raise self.error("service.listen", str(exc)) from None
        aggregate = svc.get("aggregate", False)
        if not isinstance(aggregate, bool):
            raise self.error("service.aggregate", "must be true or false")

        op = self.table(doc, "operator", "operator", ("token_sha256",))
        operator = self.token_hash(op, "operator") if op is not None else None
        tenants = self.tenants(doc)
        if operator is None and not tenants:
            raise self.error("", "names no principal: give an [operator] token or at least one [[tenant]]")
        self.distinct_tokens(operator, tenants)
        vms = self.vms(doc, {t.name for t in tenants})
        store = self.store(doc)
        nats = self.nats(doc)
        if aggregate and nats is None:
            raise self.error("service.aggregate", "the aggregator reads the bus: it needs a [nats] section")
        return ServiceConfig(host=host, listen=listen, operator_sha256=operator, tenants=tenants, vms=vms,
                             store=store, nats=nats, limits=self.limits(doc), tls=self.tls(doc),
                             aggregate=aggregate)

    def tenants(self, doc: dict[str, Any]) -> tuple[TenantConfig, ...]:
        out: list[TenantConfig] = []
        seen: dict[str, int] = {}
        for i, t in enumerate(self.tables(doc, "tenant", ("name", "token_sha256", "allow", "rate", "burst"))):
            where = f"tenant[{i}]"
            name = self.name(t, "name", where, required=True)
            assert name is not None
            if name == OPERATOR_NAME:
                raise self.error(f"{where}.name", f"{name!r} is reserved for the operator")
            if name in seen:
                raise self.error(f"{where}.name", f"tenant {name!r} is already tenant[{seen[name]}]")
            seen[name] = i
            out.append(TenantConfig(name=name, token_sha256=self.token_hash(t, where),
                                    allow=self.allow(t, where), rate=self.number(t, "rate", where),
                                    burst=self.number(t, "burst", where, integer=True)))
        return tuple(out)

    def allow(self, table: dict[str, Any], where: str) -> frozenset[str]:
        value = table.get("allow", [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(f"{where}.allow", f"must be a list of operations ({', '.join(OPERATIONS)})")
        for op in value:
            if op not in OPERATIONS:
                raise self.error(f"{where}.allow",
                                 f"unknown operation {op!r} (known: {', '.join(OPERATIONS)})")
        return frozenset(value)

    def distinct_tokens(self, operator: str | None, tenants: tuple[TenantConfig, ...]) -> None:
        owner: dict[str, str] = {}
        if operator is not None:
            owner[operator] = "operator"
        for i, t in enumerate(tenants):
            if t.token_sha256 in owner:
                raise self.error(f"tenant[{i}].token_sha256", f"the same token as {owner[t.token_sha256]}: "
                                                              "every principal needs its own token")
            owner[t.token_sha256] = f"tenant[{i}]"

    def vms(self, doc: dict[str, Any], tenants: set[str]) -> tuple[VMConfig, ...]:
        out: list[VMConfig] = []
        names: dict[str, int] = {}
        sockets: dict[str, int] = {}
        for i, v in enumerate(self.tables(doc, "vm", ("name", "qmp", "tenant", "memory", "btf"))):
            where = f"vm[{i}]"
            name = self.name(v, "name", where, required=True)
            assert name is not None
            if name in names:
                raise self.error(f"{where}.name", f"VM {name!r} is already vm[{names[name]}]")
            names[name] = i
            qmp = self.path(v, "qmp", where, required=True)
            assert qmp is not None
            if qmp in sockets:
                raise self.error(f"{where}.qmp", f"the same QMP socket as vm[{sockets[qmp]}]")
            sockets[qmp] = i
            tenant = self.name(v, "tenant", where)
            if tenant is not None and tenant not in tenants:
                raise self.error(f"{where}.tenant", f"no [[tenant]] is named {tenant!r}")
            memory = self.string(v, "memory", where) or "auto"
            if memory not in MEMORY_PATHS:
                raise self.error(f"{where}.memory", f"{memory!r} is not one of {', '.join(MEMORY_PATHS)}")
            out.append(VMConfig(name=name, qmp=qmp, tenant=tenant, memory=memory,
                                btf=self.path(v, "btf", where)))
        return tuple(out)

    def store(self, doc: dict[str, Any]) -> StoreConfig:
        s = self.table(doc, "store", "store", ("path", "max_age_days", "max_mb"))
        if s is None:
            raise self.error("", "missing section [store] (path = the SQLite event store)")
        path = self.path(s, "path", "store", required=True)
        assert path is not None
        return StoreConfig(path=path, max_age_days=self.number(s, "max_age_days", "store"),
                           max_mb=self.number(s, "max_mb", "store"))

    def nats(self, doc: dict[str, Any]) -> NatsConfig | None:
        n = self.table(doc, "nats", "nats", ("url", "spool_events", "max_age_days", "max_mb"))
        if n is None:
            return None
        url = self.string(n, "url", "nats", required=True)
        assert url is not None
        parts = urlsplit(url)
        if parts.scheme not in NATS_SCHEMES or not parts.hostname:
            raise self.error("nats.url", f"{url!r} is not a NATS URL ({', '.join(NATS_SCHEMES)}://HOST:PORT)")
        spool = self.number(n, "spool_events", "nats", integer=True)
        return NatsConfig(url=url, spool_events=100_000 if spool is None else int(spool),
                          max_age_days=self.number(n, "max_age_days", "nats"),
                          max_mb=self.number(n, "max_mb", "nats"))

    def limits(self, doc: dict[str, Any]) -> LimitsConfig:
        keys = ("rate", "burst", "max_read", "max_body", "max_subscribers", "max_traces")
        lim = self.table(doc, "limits", "limits", keys) or {}
        given = {k: self.number(lim, k, "limits", integer=k != "rate") for k in keys}
        return LimitsConfig(**{k: v for k, v in given.items() if v is not None})

    def tls(self, doc: dict[str, Any]) -> TlsConfig | None:
        t = self.table(doc, "tls", "tls", ("cert", "key"))
        if t is None:
            return None
        cert = self.path(t, "cert", "tls", required=True)
        key = self.path(t, "key", "tls", required=True)
        assert cert is not None and key is not None
        return TlsConfig(cert=cert, key=key)
