"""The hot path's protocol pieces, on crafted inputs (no QEMU): registers that come with a stop
(expedited in the stop reply, or fetched by the guardian at the stop) and the one-request resume.

The same against a real stub is in ``test_gdbrsp.py`` (``test_hot_path_through_either_gdb_stub``).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from aradia.errors import AradiaError, Migrated
from aradia.proto.gdbrsp import GdbClient
from aradia.proto.gdbwire import (
    StopEvent,
    expedited_registers,
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


def test_a_stop_with_registers_crosses_the_guardians_pipe() -> None:
    regs = {"rip": 0xFFFFFFFF81000005, "rdi": 0xFFFFC90000123F58, "cr3": 0x1000}
    ev = StopEvent("signal", 5, "p01.02", {"swbreak": ""}, "T05thread:p01.02;swbreak:;", regs)
    back = guardian._stop_event(json.loads(json.dumps(guardian._event(ev))))
    assert back == ev and back.registers == regs
    bare = parse_stop_reply(b"T05thread:p01.01;")
    assert guardian._stop_event(json.loads(json.dumps(guardian._event(bare)))).registers is None


class HitClient:
    """Records what the guardian asks of its GdbClient on the hot path; answers like QEMU would."""

    def __init__(self, *, running: bool = False, status: str = "VM status: paused (debug)\n") -> None:
        self.running = running
        self.status = status
        self.monitor_works = True
        self.calls: list[tuple[Any, ...]] = []

    def write_registers(self, values: dict[str, int], thread: str | None = None, *,
                        monitor: str | None = None) -> str | None:
        self.calls.append(("write_registers", values, thread, monitor))
        if monitor is None:
            return ""
        return self.status if self.monitor_works else None

    def resume(self, registers: dict[str, int] | None = None, thread: str | None = None) -> None:
        self.calls.append(("resume", registers, thread))

    def cont(self) -> None:
        self.calls.append(("cont",))

    def monitor(self, command: str, timeout: float | None = None) -> str:
        self.calls.append(("monitor", command))
        if not self.monitor_works:
            raise AradiaError("GDB stub does not support monitor commands")
        return self.status

    def wait_stop(self, timeout: float, *, registers: bool = False) -> StopEvent | None:
        self.calls.append(("wait_stop", registers))
        return StopEvent("signal", 5, "p01.01", {}, "T05thread:p01.01;", {"rip": 5} if registers else None)


def request(client: HitClient, guard: guardian._Guard, **req: Any) -> Any:
    """One request through the guardian's handler, as JSON both ways (as over the pipe)."""
    return json.loads(json.dumps({"ok": guardian._handle(client, guard, json.loads(json.dumps(req)))}))["ok"]


def test_resume_writes_and_checks_the_run_state_in_one_exchange_then_continues() -> None:
    client = HitClient()
    guard = guardian._Guard(client)
    assert request(client, guard, op="resume", registers={"rip": 0xFFFFFFFF81000005}, thread="p01.01") is None
    assert client.calls == [("write_registers", {"rip": 0xFFFFFFFF81000005}, "p01.01", "info status"),
                            ("cont",)]  # no separate "info status" round trip
    assert not any(c[0] == "monitor" for c in client.calls)


def test_resume_refuses_to_continue_a_migrated_source() -> None:
    client = HitClient(status="VM status: paused (postmigrate)\n")
    guard = guardian._Guard(client)
    with pytest.raises(Migrated, match="live-migrated away"):
        request(client, guard, op="resume", registers={"rip": 1}, thread="p01.01")
    assert ("cont",) not in client.calls
    assert guard.migrated_state == "postmigrate"
    client.calls.clear()
    with pytest.raises(Migrated):  # once seen, never resumed: refused again without asking
        request(client, guard, op="resume", registers={}, thread=None)
    assert ("cont",) not in client.calls


def test_resume_copes_with_a_stub_without_monitor_commands() -> None:
    # as before the hot path: a stub that cannot say its run state does not stop the trace
    client = HitClient()
    client.monitor_works = False
    request(client, guardian._Guard(client), op="resume", registers={"rip": 1}, thread="p01.01")
    assert client.calls == [("write_registers", {"rip": 1}, "p01.01", "info status"),
                            ("monitor", "info status"), ("cont",)]


def test_resume_of_a_running_vm_asks_nothing() -> None:
    client = HitClient(running=True)
    request(client, guardian._Guard(client), op="resume", registers=None, thread=None)
    assert client.calls == [("resume", {}, None)]  # asking the run state would stop a running VM


def test_wait_with_registers_asks_the_client_for_them() -> None:
    client = HitClient()
    guard = guardian._Guard(client)
    guard.migration_checked = float("inf")  # (the periodic migration check is not under test here)
    ev = request(client, guard, op="wait", timeout=0.1, registers=True)
    assert ev["registers"] == {"rip": 5} and client.calls == [("wait_stop", True)]
    client.calls.clear()
    ev = request(client, guard, op="wait", timeout=0.1)
    assert ev["registers"] is None and client.calls == [("wait_stop", False)]
