"""The one interface to a VM's GDB stub, whoever holds the connection.

Two classes satisfy :class:`GdbStub`: :class:`aradia.proto.gdbrsp.GdbClient` talks to QEMU's stub
directly, and :class:`aradia.trace.guardian.GuardedStub` reaches it through a guardian process that
disarms everything when its user goes away. Both take the same arguments in the same order and
return the same types (stops are :class:`~aradia.proto.gdbwire.StopEvent` objects from both), so
code written against :class:`GdbStub` runs on either. ``tests/test_gdbstub_api.py`` compares their
signatures with this protocol, so a change to one side alone fails there.

What only the direct client offers (holding the VM for a block with ``halted()``, the register map,
single-step flags, the breakpoints it set, raw packets) is not part of the interface.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from aradia.proto.gdbwire import StopEvent

#: Breakpoint and watchpoint kinds (the ``type`` of the ``Z``/``z`` packets).
BP_SOFTWARE = 0
BP_HARDWARE = 1
WP_WRITE = 2
WP_READ = 3
WP_ACCESS = 4
BREAKPOINT_KINDS = frozenset({BP_SOFTWARE, BP_HARDWARE, WP_WRITE, WP_READ, WP_ACCESS})


@runtime_checkable
class GdbStub(Protocol):
    """Operations on a VM's GDB stub (all-stop: a stop halts every vCPU).

    Addresses of breakpoints, watchpoints and non-physical memory accesses are guest-virtual, seen
    through the page tables of the vCPU the stub has selected. ``thread`` names a vCPU as the stub
    does (``p01.02``); None means the stub's current one (after a stop, the vCPU that stopped).
    """

    def read_memory(self, addr: int, size: int, *, physical: bool = False) -> bytes:
        """Read ``size`` bytes of guest memory at ``addr``, virtual or ``physical``."""
        ...

    def write_memory(self, addr: int, data: bytes, *, physical: bool = False) -> None:
        """Write guest memory (under TCG this also invalidates code translated from those bytes)."""
        ...

    def registers(self, thread: str | None = None) -> dict[str, int]:
        """All registers of a vCPU, by the target description's names (``rip``, ``cr3``, ...)."""
        ...

    def read_register(self, name: str, thread: str | None = None) -> int:
        """One register of a vCPU."""
        ...

    def write_register(self, name: str, value: int, thread: str | None = None) -> None:
        """Set one register of a vCPU."""
        ...

    def threads(self) -> list[str]:
        """The vCPU thread ids (``p01.01``, ``p01.02``, ...)."""
        ...

    def set_breakpoint(self, addr: int, kind: int = BP_SOFTWARE, length: int = 1) -> None:
        """Arm a breakpoint (:data:`BP_SOFTWARE`, :data:`BP_HARDWARE`) or a watchpoint on ``length``
        bytes (:data:`WP_WRITE`, :data:`WP_READ`, :data:`WP_ACCESS`) at ``addr``."""
        ...

    def remove_breakpoint(self, addr: int, kind: int = BP_SOFTWARE, length: int = 1) -> None:
        """Disarm what :meth:`set_breakpoint` armed with the same arguments."""
        ...

    def cont(self) -> None:
        """Let every vCPU run; the next stop comes from :meth:`wait_stop`."""
        ...

    def step(self, thread: str | None = None, *, timeout: float | None = None,
             until_pc_changes: bool = False, max_attempts: int = 8) -> StopEvent:
        """Single-step one vCPU and return its stop; ``until_pc_changes`` repeats a step that left
        the program counter where it was (QEMU does that now and then), at most ``max_attempts`` times."""
        ...

    def resume(self, registers: dict[str, int] | None = None, thread: str | None = None) -> None:
        """Write ``registers`` of the stopped vCPU ``thread`` (e.g. ``{"rip": ...}`` past a breakpoint)
        and let every vCPU run: the hot path's one call after a hit."""
        ...

    def wait_stop(self, timeout: float, *, registers: bool = False) -> StopEvent | None:
        """The next stop (breakpoint, watchpoint, a stop from elsewhere), or None after ``timeout``
        seconds or at once if the VM is stopped and no stop is pending. With ``registers`` the stop
        carries the stopped vCPU's registers (:attr:`StopEvent.registers`), fetched with it."""
        ...

    def interrupt(self) -> StopEvent | None:
        """Stop the VM; the stop it reported, or None if it was not running."""
        ...

    def monitor(self, command: str, timeout: float | None = None) -> str:
        """Run a QEMU monitor (HMP) command through the stub and return its output."""
        ...

    def close(self) -> None:
        """Disarm everything this user armed and leave the stub (see each class for the run state)."""
        ...


__all__ = ["BP_HARDWARE", "BP_SOFTWARE", "BREAKPOINT_KINDS", "WP_ACCESS", "WP_READ", "WP_WRITE", "GdbStub",
           "StopEvent"]
