"""``aradia serve`` over real HTTP without a guest: tokens, tenants, policy, limits, audit, TLS, OpenAPI.

The VMs in this config point at QMP sockets that do not exist, so everything here is decided before
a VM is reached (or is the clear "unreachable" answer). The guest-backed behaviour is in
``test_service.py``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from aradia.service.config import parse_config
from cli_runner import run_cli
from service_env import ServiceProcess, VMEntry, api, config_text, principal

OPERATOR = principal("operator")
ALICE = principal("alice", ["views", "trace"])
BOB = principal("bob", ["views"])
CAROL = principal("carol", ["views"], rate=0.2, burst=3)
DAVE = principal("dave", ["trace", "guard"])


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    tmp = tmp_path_factory.mktemp("serve")
    cfg = tmp / "serve.toml"
    cfg.write_text(config_text(host="hv1", store=tmp / "events.db", operator=OPERATOR,
                               tenants=[ALICE, BOB, CAROL, DAVE],
                               vms=[VMEntry("web1", str(tmp / "absent1.sock"), "alice"),
                                    VMEntry("web2", str(tmp / "absent2.sock"), "bob"),
                                    VMEntry("web3", str(tmp / "absent3.sock"), "carol"),
                                    VMEntry("web4", str(tmp / "absent4.sock"), "dave")],
                               limits={"max_body": 4096, "max_read": 65536}))
    svc = ServiceProcess(cfg, tmp)
    svc.start(OPERATOR.token, timeout=60)
    try:
        yield svc
    finally:
        svc.stop()


def audit_rows(svc: ServiceProcess, **filters: object) -> list[dict[str, object]]:
    r = api(svc.url, OPERATOR.token, "GET", "/audit", params={"limit": 10000, **filters})
    assert r.status_code == 200, r.text
    return r.json()["items"]


@pytest.mark.timeout(60)
def test_openapi_describes_the_api(service: ServiceProcess) -> None:
    doc = httpx.get(f"{service.url}/openapi.json", timeout=30).json()
    paths = set(doc["paths"])
    for p in ("/api/v1/vms", "/api/v1/vms/{vm}", "/api/v1/vms/{vm}/{view}", "/api/v1/vms/{vm}/maps/{pid}",
              "/api/v1/vms/{vm}/files/{pid}", "/api/v1/vms/{vm}/memory", "/api/v1/vms/{vm}/traces",
              "/api/v1/traces/{trace_id}", "/api/v1/events", "/api/v1/audit", "/api/v1/health",
              "/api/v1/vms/{vm}/events/sse"):
        assert p in paths, p
    assert set(doc["paths"]["/api/v1/traces/{trace_id}"]) == {"get", "put", "delete"}


@pytest.mark.timeout(60)
def test_no_token_or_a_bad_one_is_401_and_audited(service: ServiceProcess) -> None:
    before = len(audit_rows(service, allowed=False))
    r = api(service.url, None, "GET", "/vms")
    assert (r.status_code, r.headers.get("www-authenticate")) == (401, "Bearer")
    assert r.json()["error"] == "a token is required (Authorization: Bearer TOKEN)"
    r = api(service.url, "aradia_not-a-token", "GET", "/vms/web1")
    assert r.status_code == 401 and r.json()["error"] == "the token is not valid"
    r = api(service.url, ALICE.token + "x", "GET", "/vms")
    assert r.status_code == 401
    rows = audit_rows(service, allowed=False)[before:]
    assert [(x["tenant"], x["operation"], x["vm"], x["status"], x["allowed"]) for x in rows] == [
        ("-", "vms", None, 401, False), ("-", "info", "web1", 401, False), ("-", "vms", None, 401, False)]
    assert all(str(x["client"]).startswith("127.0.0.1:") for x in rows)
    # the positive twin: the same request with the right token
    r = api(service.url, ALICE.token, "GET", "/vms")
    assert r.status_code == 200 and [v["name"] for v in r.json()] == ["web1"]


@pytest.mark.timeout(60)
def test_other_tenants_vm_and_forbidden_operations_are_403_and_audited(service: ServiceProcess) -> None:
    before = len(audit_rows(service))
    cases = [
        (ALICE, "GET", "/vms/web2", None, 403),                         # bob's VM
        (ALICE, "GET", "/vms/web2/processes", None, 403),
        (ALICE, "GET", "/vms/nosuch", None, 403),                       # a tenant never learns names
        (ALICE, "GET", "/vms/web1/memory?phys=0x1000&size=16", None, 403),  # alice lacks "read"
        (BOB, "POST", "/vms/web2/traces", {"kind": "syscalls", "syscalls": ["execve"]}, 403),  # no "trace"
        (ALICE, "GET", "/audit", None, 403),                            # operator only
        (OPERATOR, "GET", "/vms/nosuch", None, 404),
    ]
    for who, method, path, body, status in cases:
        r = api(service.url, who.token, method, path, json=body)
        assert r.status_code == status, (who.name, path, r.text)
        assert r.json()["status"] == status
    rows = audit_rows(service)[before:]
    # every refusal is one row (and the operator's own audit reads are rows too: allowed, status 200)
    refused = [(x["tenant"], x["operation"], x["vm"], x["status"]) for x in rows if not x["allowed"]]
    assert refused == [("alice", "info", "web2", 403), ("alice", "view", "web2", 403),
                       ("alice", "info", "nosuch", 403), ("alice", "memory", "web1", 403),
                       ("bob", "trace.start", "web2", 403), ("alice", "audit", None, 403),
                       ("operator", "info", "nosuch", 404)]


@pytest.mark.timeout(60)
def test_flooding_is_429_with_retry_after(service: ServiceProcess) -> None:
    # carol: rate 0.2/s, burst 3. The first three pass at once; a flood right after is refused, but
    # for one request per 5 s the flood took (a loaded machine may take seconds for 12 requests).
    t0 = time.monotonic()
    statuses = [api(service.url, CAROL.token, "GET", "/vms").status_code for _ in range(12)]
    refills = int((time.monotonic() - t0) * 0.2)
    assert statuses[:3] == [200, 200, 200]
    assert set(statuses) == {200, 429} and statuses.count(200) <= 3 + refills, statuses
    r = api(service.url, CAROL.token, "GET", "/vms")
    if r.status_code == 429:
        assert int(r.headers["retry-after"]) >= 1
    rows = [x for x in audit_rows(service, tenant="carol") if x["status"] == 429]
    assert len(rows) == statuses.count(429) + int(r.status_code == 429)
    # others are not slowed by carol's flood
    assert api(service.url, ALICE.token, "GET", "/vms").status_code == 200


@pytest.mark.timeout(60)
def test_size_limits_are_413(service: ServiceProcess) -> None:
    big = {"kind": "syscalls", "syscalls": ["execve"], "comm": ["x" * 60] * 100}  # > max_body 4096 bytes
    r = api(service.url, ALICE.token, "POST", "/vms/web1/traces", json=big)
    assert r.status_code == 413, r.text
    r = api(service.url, OPERATOR.token, "GET", "/vms/web1/memory", params={"phys": "0x1000", "size": 65537})
    assert r.status_code == 413 and "65536" in r.json()["error"]
    # the positive twin: within the limit the request reaches the VM (absent here: 503)
    r = api(service.url, OPERATOR.token, "GET", "/vms/web1/memory", params={"phys": "0x1000", "size": 65536})
    assert r.status_code == 503, r.text
    statuses = [x["status"] for x in audit_rows(service) if x["status"] == 413]
    assert len(statuses) == 2


@pytest.mark.timeout(60)
def test_bad_spec_is_400_and_unreachable_vm_503(service: ServiceProcess) -> None:
    for spec, fragment in (({"kind": "nope"}, "kind"), ({"kind": "syscalls", "syscalls": []}, "syscalls"),
                           ({"kind": "syscalls", "syscalls": ["execve"], "extra": 1}, "extra"),
                           ({"kind": "probe", "symbols": ["a;b"]}, "symbols")):
        r = api(service.url, ALICE.token, "POST", "/vms/web1/traces", json=spec)
        assert r.status_code == 400 and fragment in r.json()["error"], (spec, r.text)
    r = api(service.url, ALICE.token, "POST", "/vms/web1/traces", json={"kind": "syscalls", "syscalls": ["execve"]})
    assert r.status_code == 503, r.text
    assert "absent1.sock" not in r.json()["error"] and "web1" in r.json()["error"]  # no host path
    assert api(service.url, ALICE.token, "GET", "/traces").json() == []  # nothing half-made


GUARD_POLICY = '[[protect]]\npath = "/srv/app"\naction = "block"\n'


@pytest.mark.timeout(60)
def test_a_guard_needs_the_guard_permission_and_a_good_policy(service: ServiceProcess) -> None:
    guard = {"kind": "guard", "policy": GUARD_POLICY}
    # alice may trace but not guard: refused before her VM is reached, and audited as refused
    r = api(service.url, ALICE.token, "POST", "/vms/web1/traces", json=guard)
    assert r.status_code == 403 and "may not use 'guard'" in r.json()["error"], r.text
    rows = audit_rows(service, tenant="alice", allowed=False)
    assert rows[-1]["operation"] == "trace.start" and "guard" in rows[-1]["detail"], rows[-1]
    # dave may: a bad policy is a 400 naming the fault, a good one reaches the VM (here: unreachable)
    for policy, fragment in (('[[protect]]\npath = "srv"\n', "absolute path"),
                             ('[[protect]]\npath = "/srv"\nwho = 1\n', "unknown key who"),
                             ("[[protect]\n", "policy")):
        r = api(service.url, DAVE.token, "POST", "/vms/web4/traces", json={"kind": "guard", "policy": policy})
        assert r.status_code == 400 and fragment in r.json()["error"], (policy, r.text)
    r = api(service.url, DAVE.token, "POST", "/vms/web4/traces", json={**guard, "dry_run": True, "x": 1})
    assert r.status_code == 400 and "x" in r.json()["error"], r.text
    r = api(service.url, DAVE.token, "POST", "/vms/web4/traces", json=guard)
    assert r.status_code == 503 and "web4" in r.json()["error"], r.text
    # dave's guard permission is no way into alice's VM
    r = api(service.url, DAVE.token, "POST", "/vms/web1/traces", json=guard)
    assert r.status_code == 403, r.text


@pytest.mark.timeout(60)
def test_view_names_and_paging_parameters_are_checked(service: ServiceProcess) -> None:
    r = api(service.url, OPERATOR.token, "GET", "/vms/web1/nosuchview")
    assert r.status_code == 400 and "no view 'nosuchview'" in r.json()["error"]
    r = api(service.url, OPERATOR.token, "GET", "/events", params={"limit": 0})
    assert r.status_code == 400
    r = api(service.url, OPERATOR.token, "GET", "/events", params={"cursor": "'; drop table events; --"})
    assert r.status_code == 400
    r = api(service.url, OPERATOR.token, "GET", "/events", params={"limit": 5})
    assert r.status_code == 200 and r.json() == {"items": [], "next": None}
    r = api(service.url, OPERATOR.token, "GET", "/events", params={"pid": "one"})
    assert r.status_code == 400 and r.json()["error"].startswith("malformed request: query.pid")
    r = httpx.post(f"{service.url}/api/v1/vms/web1/traces", content=b"{not json", timeout=30,
                   headers={"Content-Type": "application/json", "Authorization": f"Bearer {ALICE.token}"})
    assert r.status_code == 400 and r.json()["status"] == 400


@pytest.mark.timeout(60)
def test_health_shows_owner_state_and_counters(service: ServiceProcess) -> None:
    h = api(service.url, OPERATOR.token, "GET", "/health").json()
    assert h["host"] == "hv1" and [v["name"] for v in h["vms"]] == ["web1", "web2", "web3", "web4"]
    assert all(v["owner"] == "error" and v["error"] for v in h["vms"])  # the sockets do not exist
    assert {"committed", "dropped", "lag"} <= set(h["store"])
    mine = api(service.url, BOB.token, "GET", "/health").json()
    assert [v["name"] for v in mine["vms"]] == ["web2"]


@pytest.mark.timeout(60)
def test_websocket_refuses_a_bad_token(service: ServiceProcess) -> None:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    uri = f"ws://127.0.0.1:{service.port}/api/v1/vms/web1/events/ws"
    with connect(uri, additional_headers={"Authorization": "Bearer nope"}) as ws:
        with pytest.raises(ConnectionClosed) as e:
            ws.recv(timeout=10)
        assert e.value.rcvd is not None and e.value.rcvd.code == 4401
    with connect(uri) as ws:  # token as the first message (what a browser does): bob is not web1's tenant
        ws.send(json.dumps({"token": BOB.token}))
        with pytest.raises(ConnectionClosed) as e:
            ws.recv(timeout=10)
        assert e.value.rcvd is not None and e.value.rcvd.code == 4403
    with connect(uri) as ws:  # alice is: subscribed
        ws.send(json.dumps({"token": ALICE.token}))
        assert json.loads(ws.recv(timeout=10)) == {"subscribed": "web1"}


@pytest.mark.timeout(60)
def test_token_new_prints_a_token_and_its_config_block(tmp_path: Path) -> None:
    r = run_cli("token", "new", "--tenant", "dave")
    assert r.returncode == 0, r.stderr
    token = r.stdout.splitlines()[0].removeprefix("token: ")
    block = "\n".join(r.stdout.splitlines()[1:])
    assert token.startswith("aradia_") and len(token) > 40 and token not in block
    assert hashlib.sha256(token.encode()).hexdigest() in block
    cfg = parse_config(block + f'\n[store]\npath = "{tmp_path}/e.db"\n')
    assert cfg.tenants[0].name == "dave" and cfg.tenants[0].token_sha256 == hashlib.sha256(token.encode()).hexdigest()
    r2 = run_cli("token", "new", "--operator")
    assert r2.returncode == 0 and "[operator]" in r2.stdout and r2.stdout.split()[1] != token


@pytest.mark.timeout(60)
def test_serve_refuses_a_bad_config_with_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[store]\npath = "e.db"\n[[tenant]]\nname = "x"\ntoken_sha256 = "plaintext-token"\n')
    r = run_cli("serve", "--config", str(cfg), timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("aradia: error: ") and "bad.toml" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    import ipaddress

    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.mark.timeout(90)
def test_tls(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    cfg = tmp_path / "tls.toml"
    cfg.write_text(config_text(host="hv1", store=tmp_path / "events.db", operator=OPERATOR, tls=(cert, key)))
    svc = ServiceProcess(cfg, tmp_path, scheme="https")
    svc.start(OPERATOR.token, verify=str(cert), timeout=60)
    try:
        r = api(svc.url, OPERATOR.token, "GET", "/health", verify=str(cert))
        assert r.status_code == 200 and r.json()["host"] == "hv1"
        with pytest.raises(httpx.HTTPError):  # plain HTTP to the TLS port
            httpx.get(f"http://127.0.0.1:{svc.port}/api/v1/health", timeout=10)
        with pytest.raises(httpx.HTTPError):  # a client that does not trust the certificate
            httpx.get(f"{svc.url}/api/v1/health", timeout=10)
        r = run_cli("info", "--server", svc.url, "--token", OPERATOR.token, "--cacert", str(cert),
                    "--vm", "nosuch")
        assert r.returncode == 2 and "HTTP 404" in r.stderr, r.stderr
    finally:
        svc.stop()


@pytest.mark.timeout(30)
def test_no_token_in_the_log(service: ServiceProcess) -> None:
    """Tokens never appear in the service's log (it logs every request), which does log requests."""
    log = service.log()
    assert ALICE.token not in log and OPERATOR.token not in log and BOB.token not in log
    access = [r["msg"] for r in service.log_records() if r["logger"] == "uvicorn.access"]
    assert any(m.endswith('"GET /api/v1/vms HTTP/1.1" 200') for m in access), access[:5]
