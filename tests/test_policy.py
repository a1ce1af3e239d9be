"""Access policy of ``aradia serve`` (:mod:`aradia.service.policy`): tokens, authentication, the
authorization matrix (two tenants x VMs x every operation), the per-principal token bucket on a fake
clock, size limits. No guest."""

from __future__ import annotations

import hashlib
import re

import pytest

from aradia.errors import AradiaError
from aradia.service.config import OPERATIONS, ConfigError, TenantConfig, parse_config
from aradia.service.policy import (
    ALL_OPERATIONS,
    AccessError,
    BadRequest,
    Forbidden,
    NotFound,
    Policy,
    Principal,
    TooLarge,
    TooManyRequests,
    Unauthorized,
    new_token,
    token_config_line,
    token_sha256,
)

pytestmark = pytest.mark.timeout(30)

T_OP, T_ALICE, T_BOB = "aradia_operator", "aradia_alice", "aradia_bob"
LONG_OK = "a" * 512  # the longest token accepted
LONG_BAD = "b" * 513  # one past: refused even though its hash is configured


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# VMs in a non-alphabetical order: visible_vms keeps config order
CONFIG = f"""
[service]
host = "hv1"
[operator]
token_sha256 = "{sha(T_OP)}"
[[tenant]]
name = "alice"
token_sha256 = "{sha(T_ALICE)}"
allow = ["views", "read", "trace", "guard"]
[[tenant]]
name = "bob"
token_sha256 = "{sha(T_BOB)}"
allow = ["read", "write", "dump"]
rate = 2.0
burst = 3
[[tenant]]
name = "long"
token_sha256 = "{sha(LONG_OK)}"
[[tenant]]
name = "toolong"
token_sha256 = "{sha(LONG_BAD)}"
[[vm]]
name = "web1"
qmp = "/q/web1.sock"
tenant = "alice"
[[vm]]
name = "db1"
qmp = "/q/db1.sock"
tenant = "bob"
[[vm]]
name = "spare"
qmp = "/q/spare.sock"
[[vm]]
name = "api"
qmp = "/q/api.sock"
tenant = "alice"
[store]
path = "/s/events.db"
"""

ALL_VMS = frozenset({"web1", "db1", "spare", "api"})
OPERATOR = Principal("operator", True, frozenset(OPERATIONS), ALL_VMS)
ALICE = Principal("alice", False, frozenset({"views", "read", "trace", "guard"}), frozenset({"web1", "api"}))
BOB = Principal("bob", False, frozenset({"read", "write", "dump"}), frozenset({"db1"}))


class FakeClock:
    """A monotonic clock the test moves by hand (started far from 0 so float rounding shows)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def policy(clock: FakeClock) -> Policy:
    return Policy(parse_config(CONFIG, source="serve.toml"), clock=clock)


# --- tokens ------------------------------------------------------------------------------------------
@pytest.mark.timeout(10)
def test_new_token_is_prefixed_random_and_comes_with_its_hash() -> None:
    token, digest = new_token()
    assert re.fullmatch(r"aradia_[A-Za-z0-9_-]{43}", token)
    assert digest == hashlib.sha256(token.encode()).hexdigest()
    assert new_token()[0] != token


@pytest.mark.timeout(10)
def test_token_sha256_known_vector() -> None:
    assert token_sha256("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert token_sha256("\udc80") == hashlib.sha256(b"\xed\xb2\x80").hexdigest()  # no UnicodeEncodeError


@pytest.mark.timeout(10)
def test_token_config_line_for_a_tenant_pastes_into_a_valid_config() -> None:
    digest = sha("carol-token")
    text = token_config_line(digest, "carol")
    assert text == ('[[tenant]]\nname = "carol"\n'
                    f'token_sha256 = "{digest}"\n'
                    '# allow = ["views", "read", "write", "trace", "dump", "guard", "honeypot", "migrate"]\n')
    cfg = parse_config(text + '[store]\npath = "/s.db"\n')
    assert cfg.tenants == (TenantConfig("carol", digest, frozenset()),)


@pytest.mark.timeout(10)
def test_token_config_line_for_the_operator_pastes_into_a_valid_config() -> None:
    digest = sha("op-token")
    text = token_config_line(digest, None)
    assert text == f'[operator]\ntoken_sha256 = "{digest}"\n'
    assert parse_config(text + '[store]\npath = "/s.db"\n').operator_sha256 == digest


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("digest", "name", "fragment"), [
    (sha("x"), "car ol", "tenant name 'car ol' is not a name"),
    (sha("x"), "operator", "tenant name 'operator' is reserved for the operator"),
    ("aradia_secret", "carol", "token_sha256 must be 64 lowercase hex digits"),
    (sha("x").upper(), "carol", "token_sha256 must be 64 lowercase hex digits"),
])
def test_token_config_line_refuses(digest: str, name: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        token_config_line(digest, name)
    assert fragment in str(err.value)
    assert token_config_line(sha("x"), "carol").startswith("[[tenant]]")


# --- errors ------------------------------------------------------------------------------------------
@pytest.mark.timeout(10)
def test_access_errors_carry_their_http_status() -> None:
    statuses = {cls: cls("m").status for cls in (BadRequest, Unauthorized, Forbidden, NotFound, TooLarge,
                                                  TooManyRequests)}
    assert statuses == {BadRequest: 400, Unauthorized: 401, Forbidden: 403, NotFound: 404, TooLarge: 413,
                        TooManyRequests: 429}
    assert all(issubclass(cls, AccessError) and issubclass(cls, AradiaError) for cls in statuses)
    assert Forbidden("m").retry_after is None and TooManyRequests("m", retry_after=1.5).retry_after == 1.5


# --- authenticate ------------------------------------------------------------------------------------
@pytest.mark.timeout(10)
def test_authenticate_good_tokens(policy: Policy) -> None:
    assert policy.authenticate(T_OP) == OPERATOR
    assert policy.authenticate(T_ALICE) == ALICE
    assert policy.authenticate(T_BOB) == BOB
    assert policy.authenticate(LONG_OK) == Principal("long", False, frozenset(), frozenset())


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("token", "message"), [
    (None, "a token is required (Authorization: Bearer TOKEN)"),
    ("", "a token is required (Authorization: Bearer TOKEN)"),
    ("aradia_mallory", "the token is not valid"),
    (T_ALICE + " ", "the token is not valid"),
    (sha(T_ALICE), "the token is not valid"),  # the stored hash is not a token
    (LONG_BAD, "the token is not valid"),  # its hash is configured: refused on length alone
    ("\udc80", "the token is not valid"),
])
def test_authenticate_refuses(policy: Policy, token: str | None, message: str) -> None:
    with pytest.raises(Unauthorized) as err:
        policy.authenticate(token)
    assert str(err.value) == message and err.value.status == 401


@pytest.mark.timeout(10)
def test_authenticate_without_an_operator() -> None:
    cfg = parse_config(f'[[tenant]]\nname = "alice"\ntoken_sha256 = "{sha(T_ALICE)}"\n[store]\npath = "/s"\n')
    policy = Policy(cfg)
    assert policy.authenticate(T_ALICE).name == "alice"
    with pytest.raises(Unauthorized):
        policy.authenticate(T_OP)


# --- authorize ---------------------------------------------------------------------------------------
# Every tenant x VM x operation, written out: "ok", 403 (Forbidden) or 404 (NotFound).
_OPS = ("views", "read", "write", "trace", "dump", "guard", "honeypot", "list", "audit", "admin", "migrate")
MATRIX: dict[tuple[str, str | None], tuple[object, ...]] = {
    #                    views  read   write  trace  dump   guard  hpot   list   audit  admin  migr
    ("alice", "web1"):  ("ok", "ok", 403, "ok", 403, "ok", 403, "ok", 403, 403, 403),
    ("alice", "api"):   ("ok", "ok", 403, "ok", 403, "ok", 403, "ok", 403, 403, 403),
    ("alice", "db1"):   (403, 403, 403, 403, 403, 403, 403, 403, 403, 403, 403),
    ("alice", "spare"): (403, 403, 403, 403, 403, 403, 403, 403, 403, 403, 403),
    ("alice", "ghost"): (403, 403, 403, 403, 403, 403, 403, 403, 403, 403, 403),
    ("alice", None):    ("ok", "ok", 403, "ok", 403, "ok", 403, "ok", 403, 403, 403),
    ("bob", "web1"):    (403, 403, 403, 403, 403, 403, 403, 403, 403, 403, 403),
    ("bob", "api"):     (403, 403, 403, 403, 403, 403, 403, 403, 403, 403, 403),
    ("bob", "db1"):     (403, "ok", "ok", 403, "ok", 403, 403, "ok", 403, 403, 403),
    ("bob", "spare"):   (403, 403, 403, 403, 403, 403, 403, 403, 403, 403, 403),
    ("bob", "ghost"):   (403, 403, 403, 403, 403, 403, 403, 403, 403, 403, 403),
    ("bob", None):      (403, "ok", "ok", 403, "ok", 403, 403, "ok", 403, 403, 403),
    ("operator", "web1"):  ("ok",) * 11,
    ("operator", "db1"):   ("ok",) * 11,
    ("operator", "spare"): ("ok",) * 11,
    ("operator", "api"):   ("ok",) * 11,
    ("operator", "ghost"): (404,) * 11,
    ("operator", None):    ("ok",) * 11,
}
PRINCIPALS = {"alice": ALICE, "bob": BOB, "operator": OPERATOR}
MATRIX_CASES = [(who, vm, op, row[i]) for (who, vm), row in MATRIX.items() for i, op in enumerate(_OPS)]


@pytest.mark.timeout(10)
def test_the_matrix_covers_every_operation() -> None:
    assert set(_OPS) == set(ALL_OPERATIONS) and len(MATRIX_CASES) == 18 * 11


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("who", "vm", "op", "expected"), MATRIX_CASES)
def test_authorize_matrix(policy: Policy, who: str, vm: str | None, op: str, expected: object) -> None:
    principal = PRINCIPALS[who]
    if expected == "ok":
        assert policy.authorize(principal, op, vm) is None
        return
    with pytest.raises(AccessError) as err:
        policy.authorize(principal, op, vm)
    assert err.value.status == expected
    assert type(err.value) is {403: Forbidden, 404: NotFound}[expected]


@pytest.mark.timeout(10)
def test_a_tenant_cannot_tell_a_missing_vm_from_anothers(policy: Policy) -> None:
    with pytest.raises(Forbidden) as other:
        policy.authorize(ALICE, "read", "db1")
    with pytest.raises(Forbidden) as missing:
        policy.authorize(ALICE, "read", "ghost")
    assert str(other.value) == "tenant 'alice' has no VM named 'db1'"
    assert str(missing.value) == "tenant 'alice' has no VM named 'ghost'"
    with pytest.raises(NotFound, match=r"^no VM named 'ghost'$"):
        policy.authorize(OPERATOR, "read", "ghost")


@pytest.mark.timeout(10)
def test_authorize_messages(policy: Policy) -> None:
    with pytest.raises(Forbidden, match=r"^tenant 'alice' may not use 'write'$"):
        policy.authorize(ALICE, "write", "web1")
    with pytest.raises(Forbidden, match=r"^'audit' is for the operator only$"):
        policy.authorize(BOB, "audit")
    with pytest.raises(ValueError, match="unknown operation 'root'"):
        policy.authorize(OPERATOR, "root")
    policy.authorize(OPERATOR, "audit")


@pytest.mark.timeout(10)
def test_visible_vms_in_config_order(policy: Policy) -> None:
    assert policy.visible_vms(OPERATOR) == ["web1", "db1", "spare", "api"]
    assert policy.visible_vms(ALICE) == ["web1", "api"]
    assert policy.visible_vms(BOB) == ["db1"]
    assert policy.visible_vms(policy.authenticate(LONG_OK)) == []


# --- rates -------------------------------------------------------------------------------------------
def spend(policy: Policy, principal: Principal, n: int) -> int:
    """How many of ``n`` requests at this instant pass."""
    passed = 0
    for _ in range(n):
        try:
            policy.check_rate(principal)
            passed += 1
        except TooManyRequests:
            pass
    return passed


@pytest.mark.timeout(10)
def test_rate_limit_burst_then_one_per_interval(policy: Policy, clock: FakeClock) -> None:
    # alice has no override: [limits] defaults, 20 requests/s, burst 40
    assert spend(policy, ALICE, 40) == 40
    with pytest.raises(TooManyRequests) as err:
        policy.check_rate(ALICE)
    assert err.value.status == 429
    assert err.value.retry_after == pytest.approx(0.05)
    assert str(err.value) == "'alice' is past 20 requests/s (burst 40): retry in 0.050 s"
    clock.now += 1 / 20
    policy.check_rate(ALICE)
    with pytest.raises(TooManyRequests):
        policy.check_rate(ALICE)
    clock.now += 0.025  # half an interval: still refused, the wait halves
    with pytest.raises(TooManyRequests) as err:
        policy.check_rate(ALICE)
    assert err.value.retry_after == pytest.approx(0.025)
    clock.now += 0.025
    policy.check_rate(ALICE)


@pytest.mark.timeout(10)
def test_a_long_pause_refills_to_burst_not_beyond(policy: Policy, clock: FakeClock) -> None:
    assert spend(policy, ALICE, 40) == 40
    clock.now += 3600
    assert spend(policy, ALICE, 41) == 40


@pytest.mark.timeout(10)
def test_per_tenant_override_and_independent_buckets(policy: Policy, clock: FakeClock) -> None:
    # bob: rate 2/s, burst 3
    assert spend(policy, BOB, 4) == 3
    with pytest.raises(TooManyRequests) as err:
        policy.check_rate(BOB)
    assert err.value.retry_after == pytest.approx(0.5)
    # bob's empty bucket leaves alice's and the operator's full
    assert spend(policy, ALICE, 40) == 40
    assert spend(policy, OPERATOR, 41) == 40
    clock.now += 0.5
    assert spend(policy, BOB, 2) == 1


@pytest.mark.timeout(10)
def test_a_burst_override_alone_keeps_the_default_rate(clock: FakeClock) -> None:
    cfg = parse_config(f'[[tenant]]\nname = "c"\ntoken_sha256 = "{sha("c")}"\nburst = 2\n'
                       '[store]\npath = "/s"\n[limits]\nrate = 4\n')
    policy = Policy(cfg, clock=clock)
    c = policy.authenticate("c")
    assert spend(policy, c, 3) == 2
    with pytest.raises(TooManyRequests) as err:
        policy.check_rate(c)
    assert err.value.retry_after == pytest.approx(0.25)


# --- sizes -------------------------------------------------------------------------------------------
@pytest.mark.timeout(10)
def test_check_size(policy: Policy) -> None:
    policy.check_size("read", 1 << 20, 1 << 20)
    policy.check_size("read", 0, 1 << 20)
    with pytest.raises(TooLarge) as err:
        policy.check_size("read", (1 << 20) + 1, 1 << 20)
    assert str(err.value) == "read of 1048577 bytes is past the limit of 1048576 bytes"
    assert err.value.status == 413
    with pytest.raises(BadRequest, match=r"^read: size -1 is not a byte count$"):
        policy.check_size("read", -1, 1 << 20)
