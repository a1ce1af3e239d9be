"""The hot path's protocol pieces, on crafted inputs (no QEMU): registers that come with a stop
(expedited in the stop reply, or fetched by the guardian at the stop) and the one-request resume.

The same against a real stub is in ``test_gdbrsp.py`` (``test_hot_path_through_either_gdb_stub``).
"""

from __future__ import annotations

from collections import deque
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aradia.errors import AradiaError, Migrated
from aradia.proto.gdbrsp import GdbClient
from aradia.proto.gdbwire import (
    StopEvent,
    expedited_registers,
    g_decoder,
    parse_stop_reply,
    parse_target_xml,
    with_g_offsets,
)
from aradia.trace import guardian

# a small x86-64-like target: rax..rip in the g packet, one register (cr3) only through p
TARGET = (b'<?xml version="1.0"?><target><architecture>i386:x86-64</architecture>'
          b'<reg name="rax" bitsize="64" regnum="0"/><reg name="rbx" bitsize="64"/>'
          b'<reg name="rip" bitsize="64" regnum="16"/><reg name="eflags" bitsize="32" regnum="17"/>'
          b'<reg name="cr3" bitsize="64" regnum="40"/></target>')


def crafted_client() -> GdbClient:
    """A GdbClient that knows TARGET's registers and is connected to nothing (for its decoding)."""
    client = object.__new__(GdbClient)
    _, regs = parse_target_xml(lambda annex: TARGET)
    client._regs = with_g_offsets(regs, 8 + 8)  # g carries rax and rbx only
    client._reg_by_name = {r.name: r for r in client._regs}
    client.byteorder = "little"
    return client


def le(value: int, size: int = 8) -> str:
    """A register value as the stub sends it: hex digits in target (little-endian) order."""
    return value.to_bytes(size, "little").hex()


def test_expedited_registers_are_parsed_from_the_stop_reply() -> None:
    payload = f"T05thread:p01.02;06:{le(0x7fff0000)};10:{le(0xffffffff81000005)};core:1;watch:8000;"
    ev = parse_stop_reply(payload.encode())
    assert ev.thread == "p01.02" and ev.watch_address == 0x8000
    assert ev.expedited == {0x06: le(0x7fff0000).encode(), 0x10: le(0xffffffff81000005).encode()}
    # named fields, odd-length values and unavailable bytes (xx) are not registers
    assert expedited_registers({"thread": "p01.01", "core": "1", "07": "abc", "08": "xxxxxxxxxxxxxxxx",
                                "09": le(1)}) == {0x09: le(1).encode()}


def test_qemus_stop_reply_expedites_nothing() -> None:
    # what QEMU 7.2 sends at a breakpoint (measured): no register values
    ev = parse_stop_reply(b"T05thread:p01.01;")
    assert ev.expedited == {} and ev.registers is None


def test_expedited_registers_are_used_only_when_they_cover_the_g_packet() -> None:
    client = crafted_client()
    full = parse_stop_reply(f"T05thread:p01.01;00:{le(7)};01:{le(0x1234)};10:{le(0xffff8000)};".encode())
    assert client._decode_expedited(full.expedited) == {"rax": 7, "rbx": 0x1234, "rip": 0xffff8000}
    partial = parse_stop_reply(f"T05thread:p01.01;00:{le(7)};10:{le(0xffff8000)};".encode())
    assert client._decode_expedited(partial.expedited) is None  # rbx (in g) missing: read g instead
    wrong_size = parse_stop_reply(f"T05thread:p01.01;00:{le(7)};01:{le(1, 4)};".encode())
    assert client._decode_expedited(wrong_size.expedited) is None
    assert client._decode_expedited({}) is None


class HitClient:
    """Records what the guardian asks of its GdbClient on the hot path; answers like QEMU would."""

    def __init__(self, *, running: bool = False, status: str = "VM status: paused (debug)\n",
                 migration: str = "") -> None:
        self.running = running
        self.status = status
        self.migration = migration  # what "info migrate" prints ("" before any migration)
        self.monitor_works = True
        self.calls: list[tuple[Any, ...]] = []

    def _say(self, command: str) -> str:
        return self.status if command == "info status" else self.migration

    def registers_and_monitor(self, thread: str | None = None,
                              commands: list[str] | tuple[str, ...] = ()) -> tuple[dict[str, int], str | None]:
        self.calls.append(("registers_and_monitor", thread, list(commands)))
        text = "".join(self._say(c) for c in commands) if self.monitor_works else None
        return {"rip": 0xFFFFFFFF81000000, "rdi": 0x1000}, text

    def resume(self, registers: dict[str, int] | None = None, thread: str | None = None) -> None:
        self.calls.append(("resume", registers, thread))

    def cont(self) -> None:
        self.calls.append(("cont",))

    def detach(self) -> None:
        self.calls.append(("detach",))

    def monitor(self, command: str, timeout: float | None = None) -> str:
        self.calls.append(("monitor", command))
        if not self.monitor_works:
            raise AradiaError("GDB stub does not support monitor commands")
        return self._say(command)

    def wait_stop(self, timeout: float, *, registers: bool = False) -> StopEvent | None:
        self.calls.append(("wait_stop", registers))
        return StopEvent("signal", 5, "p01.01", {}, "T05thread:p01.01;")


def request(client: HitClient, guard: guardian._Guard, **req: Any) -> Any:
    """One request through the guardian's handler (as :class:`guardian.GuardedStub` makes it)."""
    return guardian._handle(client, guard, req)


def guard_for(client: HitClient, *, migration_due: bool = False) -> guardian._Guard:
    """The guardian's migration guard over ``client``; the periodic migration check due or not."""
    guard = guardian._Guard(client)
    guard.migration_checked = 0.0 if migration_due else float("inf")
    return guard


def test_a_hit_reads_registers_and_run_state_in_one_exchange_and_resumes_in_one_packet() -> None:
    client = HitClient()
    guard = guard_for(client)
    ev = request(client, guard, op="wait", timeout=0.1, registers=True)
    assert ev.registers == {"rip": 0xFFFFFFFF81000000, "rdi": 0x1000}
    assert request(client, guard, op="resume", registers={"rip": 0xFFFFFFFF81000005}, thread="p01.01") is None
    assert client.calls == [("wait_stop", False), ("registers_and_monitor", "p01.01", ["info status"]),
                            ("resume", {"rip": 0xFFFFFFFF81000005}, "p01.01")]  # no round trip of its own


def test_the_migration_status_rides_along_when_due() -> None:
    client = HitClient()
    request(client, guard_for(client, migration_due=True), op="wait", timeout=0.1, registers=True)
    assert client.calls[1] == ("registers_and_monitor", "p01.01", ["info status", "info migrate"])
    # a migration under way, seen at the stop: the guardian steps aside and says so
    client = HitClient(migration="Migration status: active\n")
    guard = guard_for(client, migration_due=True)
    with pytest.raises(Migrated, match="under way"):
        request(client, guard, op="wait", timeout=0.1, registers=True)
    assert guard.left and ("detach",) in client.calls and not any(c[0] == "resume" for c in client.calls)


def test_resume_refuses_to_continue_a_migrated_source() -> None:
    client = HitClient(status="VM status: paused (postmigrate)\n")
    guard = guard_for(client)
    request(client, guard, op="wait", timeout=0.1, registers=True)
    with pytest.raises(Migrated, match="live-migrated away"):
        request(client, guard, op="resume", registers={"rip": 1}, thread="p01.01")
    assert not any(c[0] in ("resume", "cont") for c in client.calls)
    assert guard.migrated_state == "postmigrate"
    client.calls.clear()
    with pytest.raises(Migrated):  # once seen, never resumed: refused again without asking
        request(client, guard, op="resume", registers={}, thread=None)
    assert client.calls == []


def test_the_run_state_read_at_a_stop_is_forgotten_once_anything_may_have_resumed() -> None:
    for between in ({"op": "cont"}, {"op": "monitor", "command": "cont"}):
        client = HitClient()
        guard = guard_for(client)
        request(client, guard, op="wait", timeout=0.1, registers=True)
        request(client, guard, **between)
        client.calls.clear()
        request(client, guard, op="resume", registers={"rip": 1}, thread="p01.01")
        assert client.calls[0] == ("monitor", "info status"), between  # asked afresh


def test_resume_copes_with_a_stub_without_monitor_commands() -> None:
    # as before the hot path: a stub that cannot say its run state does not stop the trace
    client = HitClient()
    client.monitor_works = False
    guard = guard_for(client)
    request(client, guard, op="wait", timeout=0.1, registers=True)
    request(client, guard, op="resume", registers={"rip": 1}, thread="p01.01")
    assert client.calls[-2:] == [("monitor", "info status"), ("resume", {"rip": 1}, "p01.01")]


def test_resume_of_a_running_vm_asks_nothing() -> None:
    client = HitClient(running=True)
    request(client, guard_for(client), op="resume", registers=None, thread=None)
    assert client.calls == [("resume", {}, None)]  # asking the run state would stop a running VM


def test_wait_without_registers_reads_nothing_more() -> None:
    client = HitClient()
    ev = request(client, guard_for(client), op="wait", timeout=0.1)
    assert ev.registers is None and client.calls == [("wait_stop", False)]


# x86-64's widths in a g packet: 8-byte GPRs, a 4-byte eflags, a 10-byte x87 register, a 16-byte xmm
WIDE = (b'<target><architecture>i386:x86-64</architecture><reg name="rax" bitsize="64" regnum="0"/>'
        b'<reg name="eflags" bitsize="32"/><reg name="st0" bitsize="80"/><reg name="xmm0" bitsize="128"/>'
        b'<reg name="fop" bitsize="32"/><reg name="cr8" bitsize="64" regnum="9"/></target>')


@given(st.binary(min_size=42, max_size=42))
def test_the_one_unpack_decodes_a_g_reply_as_register_by_register_does(data: bytes) -> None:
    client = object.__new__(GdbClient)
    _, regs = parse_target_xml(lambda annex: WIDE)
    client._regs = with_g_offsets(regs, 42)
    client.byteorder = "little"
    g = data.hex().encode()
    slow = {r.name: client._decode(r, g[2 * r.offset:2 * (r.offset + r.size)]) for r in client._regs
            if r.offset is not None}
    assert client._decode_g(g) == slow and set(slow) == {"rax", "eflags", "st0", "xmm0", "fop"}
    assert g_decoder(client._regs, "little")(g) == slow


def test_a_g_reply_with_unavailable_bytes_is_decoded_register_by_register() -> None:
    client = object.__new__(GdbClient)
    _, regs = parse_target_xml(lambda annex: WIDE)
    client._regs = with_g_offsets(regs, 42)
    client.byteorder = "little"
    g = (le(7) + "xxxxxxxx" + "00" * 30).encode()  # eflags unavailable
    assert g_decoder(client._regs, "little")(g) is None
    assert client._decode_g(g) == {"rax": 7, "st0": 0, "xmm0": 0, "fop": 0}
    assert client._decode_g(le(7).encode()) == {"rax": 7}  # a short reply: what it holds


def test_a_breakpoint_stop_leaves_the_stopped_vcpu_selected_for_register_reads() -> None:
    # QEMU points g at the vCPU a breakpoint stopped (gdb_set_stop_cpu): no Hg before reading it;
    # after any other stop (an interrupt) the selection is unknown and Hg goes first again
    client = crafted_client()
    client.running, client._events, client.stop_thread = True, deque(), None
    client._resume_on_exit = client._want_running = False
    client._on_stop(parse_stop_reply(b"T05thread:p01.02;swbreak:;"), provoked=False)
    assert client._select("p01.02") == [] and client._select("p01.01") == [b"Hgp01.01"]
    client._on_stop(parse_stop_reply(b"T02thread:p01.02;"), provoked=True)
    assert client._select("p01.02") == [b"Hgp01.02"]
