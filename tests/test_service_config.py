"""The ``aradia serve`` configuration (:mod:`aradia.service.config`): the issue's example parses to
exact dataclasses, every validation error names the file and key (each beside a valid twin that
parses), relative paths are taken from the file's directory, listen addresses parse. No guest."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest

from aradia.errors import AradiaError
from aradia.service import config as C
from aradia.service.config import (
    OPERATIONS,
    ConfigError,
    LimitsConfig,
    NatsConfig,
    ServiceConfig,
    StoreConfig,
    TenantConfig,
    TlsConfig,
    VMConfig,
    load_config,
    parse_config,
    parse_listen,
)

pytestmark = pytest.mark.timeout(30)

H_OP = hashlib.sha256(b"operator-token").hexdigest()
H_ALICE = hashlib.sha256(b"alice-token").hexdigest()
H_BOB = hashlib.sha256(b"bob-token").hexdigest()

EXAMPLE = f"""
[operator]
token_sha256 = "{H_OP}"
[[tenant]]
name = "alice"
token_sha256 = "{H_ALICE}"             # sha256 hex of the token
allow = ["views", "read", "trace"]
[[vm]]
name = "web1"
qmp = "/run/vms/web1/qmp.sock"
tenant = "alice"
[store]
path = "/var/lib/aradia/events.db"
[nats]                           # optional
url = "nats://127.0.0.1:4222"
"""

OP = f'[operator]\ntoken_sha256 = "{H_OP}"\n'
STORE = '[store]\npath = "/s/events.db"\n'
ALICE = f'[[tenant]]\nname = "alice"\ntoken_sha256 = "{H_ALICE}"\nallow = ["read"]\n'
BOB = f'[[tenant]]\nname = "bob"\ntoken_sha256 = "{H_BOB}"\n'
WEB1 = '[[vm]]\nname = "web1"\nqmp = "/q/web1.sock"\n'


@pytest.fixture(autouse=True)
def _hostname(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fixed host name: the default ``host`` comes from it."""
    monkeypatch.setattr(C.socket, "gethostname", lambda: "hv1.example.org")


def parse(text: str) -> ServiceConfig:
    return parse_config(text, source="serve.toml", base_dir="/etc/aradia")


@pytest.mark.timeout(10)
def test_the_issue_example_parses_to_exact_dataclasses() -> None:
    assert parse(EXAMPLE) == ServiceConfig(
        host="hv1", listen="127.0.0.1:8765", operator_sha256=H_OP,
        tenants=(TenantConfig(name="alice", token_sha256=H_ALICE,
                              allow=frozenset({"views", "read", "trace"})),),
        vms=(VMConfig(name="web1", qmp="/run/vms/web1/qmp.sock", tenant="alice", memory="auto", btf=None),),
        store=StoreConfig(path="/var/lib/aradia/events.db"),
        nats=NatsConfig(url="nats://127.0.0.1:4222", spool_events=100_000),
        limits=LimitsConfig(rate=20.0, burst=40, max_read=1 << 20, max_body=64 << 10, max_subscribers=64,
                            max_traces=32),
        tls=None, aggregate=False)


@pytest.mark.timeout(10)
def test_every_section_and_key_given() -> None:
    text = f"""
[service]
host = "hv7"
listen = "[::1]:9000"
aggregate = true
[operator]
token_sha256 = "{H_OP.upper()}"
[[tenant]]
name = "alice"
token_sha256 = "{H_ALICE}"
allow = ["views", "read", "write", "trace", "dump", "guard", "honeypot", "migrate"]
rate = 5
burst = 7
[[tenant]]
name = "bob"
token_sha256 = "{H_BOB}"
[[vm]]
name = "web1"
qmp = "run/web1.sock"
tenant = "bob"
memory = "proc-mem"
btf = "vmlinux-6.1"
[[vm]]
name = "db_2"
qmp = "/q/db.sock"
[store]
path = "events.db"
max_age_days = 30
max_mb = 512.5
[nats]
url = "tls://bus.example.org:4222"
spool_events = 1000
[limits]
rate = 2.5
burst = 3
max_read = 4096
max_body = 1024
max_subscribers = 2
max_traces = 1
[tls]
cert = "tls/cert.pem"
key = "/k/key.pem"
"""
    cfg = parse(text)
    assert cfg == ServiceConfig(
        host="hv7", listen="[::1]:9000", operator_sha256=H_OP,
        tenants=(TenantConfig("alice", H_ALICE, frozenset(OPERATIONS), rate=5.0, burst=7),
                 TenantConfig("bob", H_BOB, frozenset())),
        vms=(VMConfig("web1", "/etc/aradia/run/web1.sock", "bob", "proc-mem", "/etc/aradia/vmlinux-6.1"),
             VMConfig("db_2", "/q/db.sock")),
        store=StoreConfig("/etc/aradia/events.db", max_age_days=30.0, max_mb=512.5),
        nats=NatsConfig("tls://bus.example.org:4222", spool_events=1000),
        limits=LimitsConfig(rate=2.5, burst=3, max_read=4096, max_body=1024, max_subscribers=2, max_traces=1),
        tls=TlsConfig(cert="/etc/aradia/tls/cert.pem", key="/k/key.pem"), aggregate=True)
    assert type(cfg.tenants[0].rate) is float and type(cfg.store.max_age_days) is float
    assert cfg.vm("db_2") == VMConfig("db_2", "/q/db.sock") and cfg.vm("db2") is None
    assert cfg.tenant("bob") == TenantConfig("bob", H_BOB, frozenset()) and cfg.tenant("carol") is None


@pytest.mark.timeout(10)
def test_minimal_config_takes_the_defaults() -> None:
    cfg = parse(ALICE + STORE)
    assert (cfg.host, cfg.listen, cfg.operator_sha256, cfg.vms, cfg.nats, cfg.tls, cfg.aggregate) == \
        ("hv1", "127.0.0.1:8765", None, (), None, None, False)
    assert cfg.limits == LimitsConfig(20.0, 40, 1048576, 65536, 64, 32)
    assert cfg.tenants == (TenantConfig("alice", H_ALICE, frozenset({"read"}), None, None),)


# (valid twin, invalid text, the exact fragment of the message); the valid twin differs minimally
CASES = [
    ("unknown section", OP + STORE, OP + STORE + "[fo]\nx = 1\n",
     "serve.toml: unknown section 'fo' (known: service, operator, tenant, vm, store, nats, limits, tls)"),
    ("unknown top-level keys", OP + STORE, 'a = 1\nb = 2\n' + OP + STORE, "serve.toml: unknown sections 'a', 'b'"),
    ("unknown tenant key", OP + STORE + ALICE, OP + STORE + ALICE + 'colour = "red"\n',
     "serve.toml: tenant[0]: unknown key 'colour' (known: name, token_sha256, allow, rate, burst)"),
    ("unknown store keys", OP + '[store]\npath = "x"\nmax_mb = 1\n', OP + '[store]\npath = "x"\nmax_size = 1\nz = 2\n',
     "serve.toml: store: unknown keys 'max_size', 'z'"),
    ("unknown vm key", OP + STORE + WEB1, OP + STORE + WEB1 + 'ram = "x"\n', "serve.toml: vm[0]: unknown key 'ram'"),
    ("unknown limits key", OP + STORE + "[limits]\nburst = 1\n", OP + STORE + "[limits]\nbursts = 1\n",
     "serve.toml: limits: unknown key 'bursts'"),
    ("unknown service key", OP + STORE + '[service]\nhost = "h"\n', OP + STORE + '[service]\nhostname = "h"\n',
     "serve.toml: service: unknown key 'hostname'"),
    ("unknown operator key", OP + STORE, OP + 'name = "root"\n' + STORE, "serve.toml: operator: unknown key 'name'"),
    ("unknown operation", OP + STORE + ALICE + BOB + 'allow = ["dump"]\n',
     OP + STORE + ALICE + BOB + 'allow = ["dump", "root"]\n',
     "serve.toml: tenant[1].allow: unknown operation 'root' (known: views, read, write, trace, dump, guard, honeypot, migrate)"),
    ("allow not a list", OP + STORE + BOB + 'allow = ["read"]\n', OP + STORE + BOB + 'allow = "read"\n',
     "serve.toml: tenant[0].allow: must be a list of operations"),
    ("tenant name", OP + STORE + BOB.replace('"bob"', '"bob-2"'), OP + STORE + BOB.replace('"bob"', '"bob 2"'),
     "serve.toml: tenant[0].name: 'bob 2' is not a name ([A-Za-z0-9_-]{1,64})"),
    ("empty name", OP + STORE + BOB, OP + STORE + BOB.replace('"bob"', '""'),
     "serve.toml: tenant[0].name: must be a non-empty string"),
    ("tenant name missing", OP + STORE + BOB, OP + STORE + BOB.replace('name = "bob"\n', ""),
     "serve.toml: tenant[0]: missing key 'name'"),
    ("reserved name", OP + STORE + BOB.replace('"bob"', '"operators"'), OP + STORE + BOB.replace('"bob"', '"operator"'),
     "serve.toml: tenant[0].name: 'operator' is reserved for the operator"),
    ("vm name", OP + STORE + WEB1.replace('"web1"', '"web_1"'), OP + STORE + WEB1.replace('"web1"', '"web.1"'),
     "serve.toml: vm[0].name: 'web.1' is not a name ([A-Za-z0-9_-]{1,64})"),
    ("long vm name", OP + STORE + WEB1.replace('"web1"', '"' + "w" * 64 + '"'),
     OP + STORE + WEB1.replace('"web1"', '"' + "w" * 65 + '"'), "serve.toml: vm[0].name: 'wwww"),
    ("host name", OP + STORE + '[service]\nhost = "hv-1"\n', OP + STORE + '[service]\nhost = "hv/1"\n',
     "serve.toml: service.host: 'hv/1' is not a name"),
    ("duplicate tenant", OP + STORE + ALICE + BOB, OP + STORE + ALICE + BOB.replace('"bob"', '"alice"'),
     "serve.toml: tenant[1].name: tenant 'alice' is already tenant[0]"),
    ("duplicate vm", OP + STORE + WEB1 + WEB1.replace('web1', 'web2'),
     OP + STORE + WEB1 + WEB1.replace('web1.sock', 'web2.sock'), "serve.toml: vm[1].name: VM 'web1' is already vm[0]"),
    ("duplicate qmp socket", OP + STORE + WEB1 + WEB1.replace('web1', 'web2'),
     OP + STORE + WEB1 + WEB1.replace('"web1"', '"web2"'), "serve.toml: vm[1].qmp: the same QMP socket as vm[0]"),
    ("vm qmp missing", OP + STORE + WEB1, OP + STORE + '[[vm]]\nname = "web1"\n', "serve.toml: vm[0]: missing key 'qmp'"),
    ("token not a hash", OP + STORE + BOB, OP + STORE + BOB.replace(H_BOB, H_BOB[:63]),
     "serve.toml: tenant[0].token_sha256: is not a SHA-256 (64 hex digits); the file keeps only the hash of a "
     "token: use `aradia token new`"),
    ("token not hex", OP + STORE + BOB, OP + STORE + BOB.replace(H_BOB, "g" + H_BOB[1:]),
     "serve.toml: tenant[0].token_sha256: is not a SHA-256"),
    ("token missing", OP + STORE + BOB, OP + STORE + BOB.replace(f'token_sha256 = "{H_BOB}"\n', ""),
     "serve.toml: tenant[0]: missing key 'token_sha256'"),
    ("token not a string", OP + STORE, OP.replace(f'"{H_OP}"', "12") + STORE,
     "serve.toml: operator.token_sha256: must be a string of 64 hex digits"),
    ("tenant shares the operator's token", OP + STORE + BOB, OP + STORE + BOB.replace(H_BOB, H_OP.upper()),
     "serve.toml: tenant[0].token_sha256: the same token as operator: every principal needs its own token"),
    ("two tenants share a token", OP + STORE + ALICE + BOB, OP + STORE + ALICE + BOB.replace(H_BOB, H_ALICE),
     "serve.toml: tenant[1].token_sha256: the same token as tenant[0]"),
    ("vm of an unknown tenant", OP + STORE + BOB + WEB1 + 'tenant = "bob"\n', OP + STORE + BOB + WEB1 + 'tenant = "carol"\n',
     "serve.toml: vm[0].tenant: no [[tenant]] is named 'carol'"),
    ("memory path", OP + STORE + WEB1 + 'memory = "shared-file"\n', OP + STORE + WEB1 + 'memory = "mmap"\n',
     "serve.toml: vm[0].memory: 'mmap' is not one of auto, shared-file, proc-mem, gdb"),
    ("rate zero", OP + STORE + "[limits]\nrate = 0.5\n", OP + STORE + "[limits]\nrate = 0\n",
     "serve.toml: limits.rate: must be positive, not 0"),
    ("rate nan", OP + STORE + "[limits]\nrate = 1e9\n", OP + STORE + "[limits]\nrate = nan\n",
     "serve.toml: limits.rate: must be positive, not nan"),
    ("rate inf", OP + STORE + "[limits]\nrate = 1e9\n", OP + STORE + "[limits]\nrate = inf\n",
     "serve.toml: limits.rate: must be positive, not inf"),
    ("rate bool", OP + STORE + "[limits]\nrate = 1\n", OP + STORE + "[limits]\nrate = true\n",
     "serve.toml: limits.rate: must be a number"),
    ("burst negative", OP + STORE + "[limits]\nburst = 1\n", OP + STORE + "[limits]\nburst = -1\n",
     "serve.toml: limits.burst: must be positive, not -1"),
    ("burst fraction", OP + STORE + "[limits]\nburst = 2\n", OP + STORE + "[limits]\nburst = 2.5\n",
     "serve.toml: limits.burst: must be an integer"),
    ("max_read zero", OP + STORE + "[limits]\nmax_read = 1\n", OP + STORE + "[limits]\nmax_read = 0\n",
     "serve.toml: limits.max_read: must be positive, not 0"),
    ("tenant rate", OP + STORE + BOB + "rate = 0.1\n", OP + STORE + BOB + "rate = -0.1\n",
     "serve.toml: tenant[0].rate: must be positive, not -0.1"),
    ("tenant burst", OP + STORE + BOB + "burst = 1\n", OP + STORE + BOB + "burst = 0\n",
     "serve.toml: tenant[0].burst: must be positive, not 0"),
    ("store max_mb", OP + '[store]\npath = "x"\nmax_mb = 0.5\n', OP + '[store]\npath = "x"\nmax_mb = 0\n',
     "serve.toml: store.max_mb: must be positive, not 0"),
    ("store max_age_days", OP + '[store]\npath = "x"\nmax_age_days = 1\n', OP + '[store]\npath = "x"\nmax_age_days = "1"\n',
     "serve.toml: store.max_age_days: must be a number"),
    ("spool_events", OP + STORE + '[nats]\nurl = "nats://n:4222"\nspool_events = 1\n',
     OP + STORE + '[nats]\nurl = "nats://n:4222"\nspool_events = 0\n', "serve.toml: nats.spool_events: must be positive, not 0"),
    ("nats url", OP + STORE + '[nats]\nurl = "wss://n"\n', OP + STORE + '[nats]\nurl = "http://n:4222"\n',
     "serve.toml: nats.url: 'http://n:4222' is not a NATS URL (nats, tls, ws, wss://HOST:PORT)"),
    ("nats url missing", OP + STORE + '[nats]\nurl = "nats://n"\n', OP + STORE + '[nats]\nspool_events = 5\n',
     "serve.toml: nats: missing key 'url'"),
    ("no principal", STORE + BOB, STORE, "serve.toml: names no principal: give an [operator] token or at least one [[tenant]]"),
    ("no store", OP + STORE, OP, "serve.toml: missing section [store] (path = the SQLite event store)"),
    ("store path missing", OP + STORE, OP + "[store]\nmax_mb = 5\n", "serve.toml: store: missing key 'path'"),
    ("store not a table", OP + STORE, "store = 'x.db'\n" + OP, "serve.toml: store: must be a table [store]"),
    ("tenant not an array", OP + STORE + BOB, OP + STORE + BOB.replace("[[tenant]]", "[tenant]"),
     "serve.toml: tenant: must be [[tenant]] tables"),
    ("listen", OP + STORE + '[service]\nlisten = "0.0.0.0:8765"\n', OP + STORE + '[service]\nlisten = "8765"\n',
     "serve.toml: service.listen: listen address '8765' is not HOST:PORT"),
    ("aggregate needs nats", OP + STORE + '[service]\naggregate = true\n[nats]\nurl = "nats://n"\n',
     OP + STORE + '[service]\naggregate = true\n', "serve.toml: service.aggregate: the aggregator reads the bus: it needs a [nats] section"),
    ("aggregate bool", OP + STORE + '[service]\naggregate = false\n', OP + STORE + '[service]\naggregate = "yes"\n',
     "serve.toml: service.aggregate: must be true or false"),
    ("tls needs a key", OP + STORE + '[tls]\ncert = "c.pem"\nkey = "k.pem"\n', OP + STORE + '[tls]\ncert = "c.pem"\n',
     "serve.toml: tls: missing key 'key'"),
    ("bad TOML", OP + STORE, OP + STORE + "[limits]\nrate = \n",
     "serve.toml: not valid TOML: Invalid value (at line 6, column 8)"),
]


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("good", "bad", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_validation_error_and_its_valid_twin(good: str, bad: str, fragment: str) -> None:
    assert isinstance(parse(good), ServiceConfig)
    with pytest.raises(ConfigError) as err:
        parse(bad)
    assert fragment in str(err.value)
    assert isinstance(err.value, AradiaError)


@pytest.mark.timeout(10)
def test_a_token_in_clear_text_is_refused_without_echoing_it() -> None:
    token = "aradia_" + "x" * 43
    with pytest.raises(ConfigError) as err:
        parse(STORE + BOB.replace(H_BOB, token))
    assert str(err.value) == ("serve.toml: tenant[0].token_sha256: holds a token in clear text, not its SHA-256: "
                              "use `aradia token new` to get a token and the line to paste")
    assert token not in str(err.value)
    assert parse(STORE + BOB.replace(H_BOB, hashlib.sha256(token.encode()).hexdigest())).tenants[0].name == "bob"


@pytest.mark.timeout(10)
def test_an_uppercase_hash_is_lowered() -> None:
    cfg = parse(OP.replace(H_OP, H_OP.upper()) + STORE + BOB.replace(H_BOB, H_BOB.upper()))
    assert (cfg.operator_sha256, cfg.tenants[0].token_sha256) == (H_OP, H_BOB)


@pytest.mark.timeout(10)
def test_default_host_is_the_short_hostname_if_it_is_a_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(C.socket, "gethostname", lambda: "node-7.rack2.example.org")
    assert parse(OP + STORE).host == "node-7"
    monkeypatch.setattr(C.socket, "gethostname", lambda: "n\u00f6de.example.org")
    with pytest.raises(ConfigError, match=re.escape("this machine's host name 'n\u00f6de' is not a name "
                                                    "([A-Za-z0-9_-]{1,64}): set [service] host")):
        parse(OP + STORE)
    assert parse(OP + STORE + '[service]\nhost = "hv2"\n').host == "hv2"


@pytest.mark.timeout(10)
def test_relative_paths_are_taken_from_the_config_files_directory(tmp_path: Path) -> None:
    conf = tmp_path / "etc" / "serve.toml"
    conf.parent.mkdir()
    conf.write_text(OP + '[store]\npath = "data/events.db"\n'
                    '[[vm]]\nname = "web1"\nqmp = "../run/web1.sock"\nbtf = "./vmlinux"\n'
                    '[[vm]]\nname = "web2"\nqmp = "/abs/web2.sock"\n'
                    '[tls]\ncert = "tls/cert.pem"\nkey = "/k/key.pem"\n')
    cfg = load_config(conf)
    assert cfg.store.path == str(tmp_path / "etc" / "data" / "events.db")
    assert cfg.vms[0] == VMConfig("web1", str(tmp_path / "run" / "web1.sock"), btf=str(tmp_path / "etc" / "vmlinux"))
    assert cfg.vms[1].qmp == "/abs/web2.sock"
    assert cfg.tls == TlsConfig(str(tmp_path / "etc" / "tls" / "cert.pem"), "/k/key.pem")
    # a relative config path: still resolved against the file's directory, not the current one
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert load_config("etc/serve.toml").store.path == str(tmp_path / "etc" / "data" / "events.db")
    finally:
        os.chdir(cwd)


@pytest.mark.timeout(10)
def test_parse_config_without_base_dir_resolves_against_the_current_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_config(OP + '[store]\npath = "e.db"\n').store.path == str(tmp_path / "e.db")
    assert parse_config(OP + '[store]\npath = "e.db"\n', base_dir="/b").store.path == "/b/e.db"


@pytest.mark.timeout(10)
def test_load_config_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as err:
        load_config(missing)
    assert str(err.value) == f"{missing}: cannot read the configuration: No such file or directory"
    bad = tmp_path / "serve.toml"
    bad.write_text(OP + "[store\n")
    with pytest.raises(ConfigError, match=re.escape(f"{bad}: not valid TOML: ") + r".*\(at line 3, column \d+\)"):
        load_config(bad)
    bad.write_bytes(OP.encode() + b"# \xff\n" + STORE.encode())
    with pytest.raises(ConfigError, match=re.escape(f"{bad}: not UTF-8 text (line 3)")):
        load_config(bad)
    bad.write_text(OP + STORE)
    assert load_config(bad).store.path == "/s/events.db"


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("text", "parsed"), [
    ("127.0.0.1:8765", ("127.0.0.1", 8765)),
    ("0.0.0.0:443", ("0.0.0.0", 443)),
    ("localhost:0", ("localhost", 0)),
    ("hv1.example.org:65535", ("hv1.example.org", 65535)),
    ("[::1]:8765", ("::1", 8765)),
    ("[::]:80", ("::", 80)),
])
def test_parse_listen_accepts(text: str, parsed: tuple[str, int]) -> None:
    assert parse_listen(text) == parsed


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("text", "fragment"), [
    ("8765", "listen address '8765' is not HOST:PORT"),
    (":8765", "listen address ':8765' is not HOST:PORT"),
    ("::1:8765", "an IPv6 address goes in brackets, [::1]:PORT"),
    ("[::g]:80", "'::g' is not an IPv6 address"),
    ("localhost:65536", "port '65536' is not a number from 0 to 65535"),
    ("localhost:", "port '' is not a number from 0 to 65535"),
    ("localhost:-1", "port '-1' is not a number"),
    ("localhost:\u0665", "is not a number"),
    ("local host:80", "'local host' is not a host name or address"),
])
def test_parse_listen_refuses(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_listen(text)
    assert fragment in str(err.value)


@pytest.mark.timeout(10)
def test_nats_stream_retention_keys() -> None:
    h = "ab" * 32
    base = f'[operator]\ntoken_sha256 = "{h}"\n[store]\npath = "/tmp/e.db"\n'
    cfg = C.parse_config(base + '[nats]\nurl = "nats://127.0.0.1:4222"\nmax_age_days = 7\nmax_mb = 512\n')
    assert cfg.nats == C.NatsConfig(url="nats://127.0.0.1:4222", spool_events=100_000, max_age_days=7,
                                    max_mb=512)
    plain = C.parse_config(base + '[nats]\nurl = "nats://127.0.0.1:4222"\n')
    assert plain.nats is not None and (plain.nats.max_age_days, plain.nats.max_mb) == (None, None)
    with pytest.raises(C.ConfigError, match="max_age_days"):
        C.parse_config(base + '[nats]\nurl = "nats://127.0.0.1:4222"\nmax_age_days = -1\n')
