"""The kernel ABI facts a tracer reads a hit with, per architecture, on crafted instruction bytes and
registers (the arm64 heads are the bytes Debian's 6.1 arm64 kernel has at ``__arm64_sys_execve`` and
``__arm64_sys_connect``; real guests: tests/test_arm64_trace.py and tests/test_trace.py)."""

from __future__ import annotations

import struct

import pytest

from aradia.errors import AradiaError
from aradia.machine.arch import ARM64, X86
from aradia.machine.arch.base import Architecture
from aradia.trace.abi import X86_64ABI, Arm64ABI, kernel_abi
from aradia.trace.hooks import return_now


def words(*ws: int) -> bytes:
    return struct.pack(f"<{len(ws)}I", *ws)


MOV_X9_LR, NOP, PACIASP, BTI_C, STP = 0xAA1E03E9, 0xD503201F, 0xD503233F, 0xD503245F, 0xA9BE7BFD
BL_FTRACE = 0x94000123  # a bl: the second slot of a function ftrace traces


def test_kernel_abi_per_architecture() -> None:
    assert isinstance(kernel_abi(ARM64, lambda name: None), Arm64ABI)
    assert isinstance(kernel_abi(X86, lambda name: None), X86_64ABI)

    class Other(type(X86)):  # type: ignore[misc]
        name = "riscv64"

    with pytest.raises(AradiaError, match="riscv64"):
        kernel_abi(Other(), lambda name: None)


def test_syscall_entry_symbols() -> None:
    assert Arm64ABI(ARM64).syscall_symbols("execve") == ("__arm64_sys_execve",)
    assert X86_64ABI(X86).syscall_symbols("execve") == ("__x64_sys_execve", "__do_sys_execve", "sys_execve")


@pytest.mark.parametrize(("head", "want"), [
    (words(MOV_X9_LR, NOP, PACIASP, STP), (4, 4)),  # 6.1: the NOP after the ftrace slot, skipped
    (words(BTI_C, MOV_X9_LR, NOP, PACIASP), (8, 4)),  # with a BTI landing pad first
    (words(NOP, NOP, PACIASP, STP), (0, 4)),  # both slots still NOPs (before ftrace's init)
    (words(MOV_X9_LR, BL_FTRACE, PACIASP, STP), (0, 0)),  # traced by ftrace: stepped, never skipped
    (words(PACIASP, STP, NOP), (0, 0)),  # no patchable entry: paciasp is stepped, never skipped
    (words(BTI_C, PACIASP, NOP), (0, 0)),
    (words(0xD4200000, NOP, PACIASP), (0, 0)),  # a brk planted by someone (KVM): not taken for code
    (b"", (0, 0)),
])
def test_arm64_function_entry(head: bytes, want: tuple[int, int]) -> None:
    assert Arm64ABI(ARM64).kernel_entry(head) == want


@pytest.mark.parametrize(("head", "want"), [
    (bytes.fromhex("f30f1efa0f1f44000055"), (4, 5)),
    (bytes.fromhex("0f1f4400005548"), (0, 5)),
    (bytes.fromhex("f30f1efa5548"), (4, 0)),
    (bytes.fromhex("cc1f440000"), (0, 0)),  # an int3 where the NOP was: stepped
])
def test_x86_function_entry(head: bytes, want: tuple[int, int]) -> None:
    assert X86_64ABI(X86).kernel_entry(head) == want


def test_returns() -> None:
    a = Arm64ABI(ARM64)
    regs = {"pc": 0xFFFF800008001004, "sp": 0xFFFF80000A003E40, "x30": 0xFFFF800008123456, "x0": 7}
    assert a.return_address(regs, lambda addr, n: pytest.fail("arm64 reads no memory")) == regs["x30"]
    assert a.sp_after_return(regs) == regs["sp"]
    assert return_now(regs, regs["x30"], 13, abi=a) == {"x0": -13 & (1 << 64) - 1, "pc": regs["x30"],
                                                         "sp": regs["sp"]}
    x = X86_64ABI(X86)
    xregs = {"rip": 0x1000, "rsp": 0x7000, "rax": 1}
    stack = {0x7000: (0xFFFFFFFF81000123).to_bytes(8, "little")}
    assert x.return_address(xregs, lambda addr, n: stack[addr][:n]) == 0xFFFFFFFF81000123
    assert x.sp_after_return(xregs) == 0x7008
    # x86 without an abi: exactly what it always was
    assert return_now(xregs, 0x1234, None, 5) == return_now(xregs, 0x1234, None, 5, x) == \
        {"rax": 5, "rip": 0x1234, "rsp": 0x7008}


def test_arm64_current_at_el1_is_sp_el0() -> None:
    a = Arm64ABI(ARM64)
    el1 = {"cpsr": 0x3C5, "sp_el0": 0xFFFF0000C1234500}
    assert a.current(None, el1) == 0xFFFF0000C1234500  # type: ignore[arg-type]  (no memory read)
    assert a.current(None, {"cpsr": 0x3C5, "sp_el0": 0}) is None  # type: ignore[arg-type]
    assert a.current(None, {"cpsr": 0x0, "sp_el0": 0x0000FFFFF0000000, "sp_el1": 0}) is None  # type: ignore[arg-type]


def test_arm64_registers_a_hit_reads() -> None:
    a = Arm64ABI(ARM64)
    assert a.hit_registers is not None and {"sp_el0", "ttbr0_el1"} <= set(a.hit_registers)
    assert X86_64ABI(X86).hit_registers is None  # x86: every register, as always
    assert a.split_roots and not X86_64ABI(X86).split_roots
    assert (a.pc, a.sp, a.ret, a.call_args) == ("pc", "sp", "x0", ("x0", "x1", "x2", "x3", "x4", "x5"))
    assert isinstance(ARM64, Architecture) and ARM64.link == "x30" and X86.link is None
