"""One GDB-stub interface: the direct client and the guarded stub both satisfy ``GdbStub``.

The signature test fails when a method of either class (or of the protocol) drifts: a renamed
method, a parameter renamed, moved, added without a default, given another default, kind or type,
or another return type. The pass-through test drives :class:`GuardedStub` through the guardian's
request handler (no watchdog, no QEMU) against a recording client and checks that every operation reaches
the client with the arguments a direct call would pass, and comes back as the same value. The same
scenario against a real stub, through both classes, is in ``test_gdbrsp.py``.
"""

from __future__ import annotations

import inspect
import socket
import typing
from typing import Any

import pytest

from aradia.proto.gdbrsp import GdbClient
from aradia.proto.gdbstub_api import BP_HARDWARE, BP_SOFTWARE, WP_ACCESS, WP_READ, WP_WRITE, GdbStub
from aradia.proto.gdbwire import StopEvent, parse_stop_reply
from aradia.trace import guardian
from aradia.trace.guardian import GuardedStub

IMPLEMENTATIONS = [GdbClient, GuardedStub]
#: What the tracer, counting, the GDB memory source and the benchmark need from a stub.
EXPECTED = {"read_memory", "write_memory", "registers", "read_register", "write_register", "threads",
            "set_breakpoint", "remove_breakpoint", "cont", "resume", "step", "wait_stop", "interrupt", "monitor", "close"}


def protocol_methods() -> list[str]:
    """The methods :class:`GdbStub` declares (its own, not those of ``Protocol``)."""
    return sorted(name for name, value in vars(GdbStub).items()
                  if inspect.isfunction(value) and not name.startswith("_"))


def test_the_protocol_declares_what_its_users_need() -> None:
    assert set(protocol_methods()) == EXPECTED
    assert [BP_SOFTWARE, BP_HARDWARE, WP_WRITE, WP_READ, WP_ACCESS] == [0, 1, 2, 3, 4]  # the Z packet types


@pytest.mark.parametrize("cls", IMPLEMENTATIONS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", protocol_methods())
def test_signature_matches_the_protocol(cls: type, name: str) -> None:
    want = inspect.signature(getattr(GdbStub, name))
    impl = getattr(cls, name, None)
    assert impl is not None and callable(impl), f"{cls.__name__} has no method {name}"
    have = inspect.signature(impl)
    want_params = list(want.parameters.values())
    have_params = list(have.parameters.values())
    shape = [(p.name, p.kind, p.default) for p in want_params]
    assert [(p.name, p.kind, p.default) for p in have_params[:len(want_params)]] == shape, \
        f"{cls.__name__}.{name}{have} differs from GdbStub.{name}{want}"
    for extra in have_params[len(want_params):]:  # more is allowed only where callers of the protocol need not know
        assert extra.default is not inspect.Parameter.empty or extra.kind in (
            inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD), \
            f"{cls.__name__}.{name} needs {extra.name}, which GdbStub.{name} does not pass"
    want_types = typing.get_type_hints(getattr(GdbStub, name))
    have_types = typing.get_type_hints(impl)
    for p in [*want_params[1:], "return"]:
        key = p if isinstance(p, str) else p.name
        assert have_types.get(key) == want_types.get(key), (
            f"{cls.__name__}.{name}: {key} is {have_types.get(key)}, GdbStub says {want_types.get(key)}")


def test_isinstance_sees_both_classes_as_stubs() -> None:
    for cls in IMPLEMENTATIONS:
        assert isinstance(object.__new__(cls), GdbStub), cls.__name__
    assert not isinstance(object(), GdbStub)


# --- the guardian's pipe ----------------------------------------------------------------------------------
HIT = parse_stop_reply(b"T05thread:p01.02;swbreak:;")
WATCH = parse_stop_reply(b"T05thread:p01.01;watch:8000;")


class Recorder:
    """A stand-in for the :class:`GdbClient` a guardian holds: records each call, answers in kind."""

    running = False

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[tuple[str, Any], ...]]] = []

    def _record(self, name: str, args: tuple[Any, ...], kw: dict[str, Any], result: Any) -> Any:
        # as GdbClient's signature binds them, so positional and keyword spellings compare equal
        bound = inspect.signature(getattr(GdbClient, name)).bind(None, *args, **kw)
        bound.apply_defaults()
        self.calls.append((name, tuple(bound.arguments.items())[1:]))
        return result

    def read_memory(self, *a: Any, **k: Any) -> bytes:
        return self._record("read_memory", a, k, b"\x00\x01}#$*")  # bytes the RSP would escape

    def write_memory(self, *a: Any, **k: Any) -> None:
        return self._record("write_memory", a, k, None)

    def registers(self, *a: Any, **k: Any) -> dict[str, int]:
        return self._record("registers", a, k, {"rip": 0xFFFFFFFF81000000, "cr3": 0x1000})

    def read_register(self, *a: Any, **k: Any) -> int:
        return self._record("read_register", a, k, 1 << 63)

    def write_register(self, *a: Any, **k: Any) -> None:
        return self._record("write_register", a, k, None)

    def threads(self, *a: Any, **k: Any) -> list[str]:
        return self._record("threads", a, k, ["p01.01", "p01.02"])

    def set_breakpoint(self, *a: Any, **k: Any) -> None:
        return self._record("set_breakpoint", a, k, None)

    def remove_breakpoint(self, *a: Any, **k: Any) -> None:
        return self._record("remove_breakpoint", a, k, None)

    def cont(self, *a: Any, **k: Any) -> None:
        return self._record("cont", a, k, None)

    def step(self, *a: Any, **k: Any) -> StopEvent:
        return self._record("step", a, k, HIT)

    def wait_stop(self, *a: Any, **k: Any) -> StopEvent | None:
        self.calls.append(("wait_stop", ()))  # (the guardian bounds each wait: not compared)
        return WATCH

    def interrupt(self, *a: Any, **k: Any) -> StopEvent | None:
        return self._record("interrupt", a, k, StopEvent("signal", 2, "p01.01", {}, "T02"))

    def monitor(self, *a: Any, **k: Any) -> str:
        return self._record("monitor", a, k, "VM status: paused\n")


class NoGuard:
    """The guardian's migration checks, with no migration."""

    said_at_stop: str | None = None

    def check(self, what: str, said: str | None = None) -> None:
        """Nothing to refuse."""

    def watch_migration(self, said: str | None = None) -> None:
        """No migration under way."""


CALLS: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
    ("read_memory", (0xFFFF888000001000, 6), {}),
    ("read_memory", (0x1000, 6), {"physical": True}),
    ("write_memory", (0x2000, b"\x7d\x23\x24\x2a\x00"), {}),
    ("write_memory", (0x2000, b"ab"), {"physical": True}),
    ("registers", (), {}),
    ("registers", ("p01.02",), {}),
    ("read_register", ("cr3",), {}),
    ("read_register", ("rip", "p01.02"), {}),
    ("write_register", ("rip", 0xFFFFFFFF81000005, "p01.02"), {}),
    ("threads", (), {}),
    ("set_breakpoint", (0xFFFFFFFF81000000,), {}),
    ("set_breakpoint", (0x8000, WP_WRITE, 8), {}),
    ("set_breakpoint", (0x8000,), {"kind": WP_ACCESS, "length": 2}),
    ("remove_breakpoint", (0x8000, WP_READ, 4), {}),
    ("cont", (), {}),
    ("step", ("p01.02",), {"until_pc_changes": True}),
    ("step", (), {"timeout": 1.5, "max_attempts": 3}),
    ("interrupt", (), {}),
    ("monitor", ("info status",), {}),
    ("monitor", ("info mtree -f",), {"timeout": 20.0}),
]


WATCHDOG_ENDS: list[socket.socket] = []


def piped_stub(client: Recorder) -> GuardedStub:
    """A :class:`GuardedStub` whose requests go straight to the guardian's handler (as its own do)."""
    stub = object.__new__(GuardedStub)
    stub._dead, stub._done = None, False
    stub._ctl, watchdog = socket.socketpair()  # (the watchdog's notes land in a socket nobody reads)
    WATCHDOG_ENDS.append(watchdog)

    def call(op: str, **kw: Any) -> Any:
        return guardian._handle(client, NoGuard(), {"op": op, **kw})  # type: ignore[arg-type]

    stub.call = call  # type: ignore[method-assign]
    return stub


@pytest.mark.parametrize(("name", "args", "kw"), CALLS, ids=[f"{c[0]}-{i}" for i, c in enumerate(CALLS)])
def test_guarded_stub_passes_calls_through_the_guardian_unchanged(name: str, args: tuple[Any, ...],
                                                                  kw: dict[str, Any]) -> None:
    direct, piped = Recorder(), Recorder()
    want = getattr(direct, name)(*args, **kw)
    got = getattr(piped_stub(piped), name)(*args, **kw)
    assert piped.calls == direct.calls
    assert got == want and type(got) is type(want)


def test_stops_come_through_the_guardian_as_stop_events() -> None:
    client = Recorder()
    stub = piped_stub(client)
    ev = stub.wait_stop(0.1)
    assert ev == WATCH and isinstance(ev, StopEvent)
    assert (ev.watch_address, ev.watch_kind, ev.thread) == (0x8000, "watch", "p01.01")
