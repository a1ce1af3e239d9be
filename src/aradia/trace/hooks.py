"""Decision hooks: a kernel function's entry where aradia decides, with the vCPU stopped, whether
the call goes on or returns an error at once.

:meth:`aradia.trace.tracer.Tracer.add_hook` arms one; at each hit the tracer calls the hook's
``decide(ctx)`` with a :class:`HookContext` (registers, the current task, the drgn Program, a
reader of the calling process's memory). ``decide`` returns ``None`` (the function runs) or an
errno: then the function is not run and returns ``-errno`` to its caller — at the function's entry
the return address is at ``[RSP]``, so RAX = -errno, RIP = that address, RSP += 8 is exactly what a
``return -errno;`` as its first statement would have done. A hook on an LSM entry point
(``security_file_open``...) thereby makes the system call fail with that errno in the guest.

A decision may instead set a return value (:meth:`HookContext.return_value`): the function returns
that value at once, the same way. User-space functions take decisions too
(:meth:`aradia.trace.tracer.Tracer.add_uprobe` with ``decide``): a honeypot makes ``crypt`` return
the stored hash, so the daemon's comparison says the password was right.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import drgn

from aradia.trace.abi import KernelABI
from aradia.trace.events import Event
from aradia.trace.uprobes import CALL_ARG_REGS

MAX_ERRNO = 4095


@dataclass
class HookContext:
    """What a decision sees at a hook's hit (valid only during the call: the guest runs afterwards)."""

    name: str
    regs: dict[str, int]
    prog: drgn.Program
    task: drgn.Object | None
    read: Callable[[int, int], bytes]
    vcpu: int
    events: list[Event] = field(default_factory=list)
    #: set by :meth:`return_value`: the function is skipped and returns this (an errno wins over it)
    returns: int | None = None
    _make_event: Callable[[str, str, dict[str, Any]], Event] | None = None
    #: the integer argument registers of a call on the guest's architecture (x86-64: System V)
    arg_regs: tuple[str, ...] = CALL_ARG_REGS

    def arg(self, index: int) -> int:
        """The ``index``-th integer or pointer argument of the function (``rdi``... on x86-64,
        ``x0``... on arm64)."""
        return self.regs.get(self.arg_regs[index], 0)

    def obj(self, index: int, type_name: str) -> drgn.Object:
        """Argument ``index`` as a drgn object of type ``type_name`` (e.g. ``"struct file *"``)."""
        return drgn.Object(self.prog, type_name, value=self.arg(index))

    def return_value(self, value: int) -> None:
        """Skip the function: it returns ``value`` (a 64-bit register value) to its caller at once."""
        self.returns = value & (1 << 64) - 1

    def emit(self, kind: str, name: str, args: dict[str, Any]) -> Event:
        """Report an event from this hit (with the task's pid, comm and uid): the tracer yields it."""
        assert self._make_event is not None
        ev = self._make_event(kind, name, args)
        self.events.append(ev)
        return ev


Decide = Callable[[HookContext], "int | None"]
"""A decision: ``None`` lets the function run; an errno (1..4095) makes it return ``-errno``."""


def return_now(regs: dict[str, int], ret_addr: int, errno: int | None, value: int = 0,
               abi: KernelABI | None = None) -> dict[str, int]:
    """The registers to write at a function's entry so it returns ``-errno`` (or, with ``errno``
    None, ``value``) to ``ret_addr`` at once (``abi``: the guest's; x86-64 when None)."""
    if errno is not None and not 0 < errno <= MAX_ERRNO:
        raise ValueError(f"errno {errno} is out of range 1..{MAX_ERRNO}")
    rax = (-errno) & (1 << 64) - 1 if errno is not None else value & (1 << 64) - 1
    if abi is not None:
        return abi.return_now(regs, ret_addr, rax)
    return {"rax": rax, "rip": ret_addr, "rsp": regs["rsp"] + 8}
