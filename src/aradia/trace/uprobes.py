"""User-space probe targets: ``LIB:SYMBOL`` in one process, in processes of one name, or in all.

A target resolves to one breakpoint address per address space that maps LIB (ASLR puts a library
at a different address in each process). QEMU's breakpoints match a virtual address in whatever
process runs, so a hit is accepted only when the current task passes the target's process filter
and its own mapping puts the symbol at that address (checked once per address space and cached).
Processes that map LIB later (a new login, a re-exec) are found by the tracer's hook on the
kernel's ``perf_event_mmap``, which runs for every new mapping.

Arguments are decoded by a signature: ``str`` (a C string in user memory), ``int`` (a C ``int``:
the low 32 bits of the register, signed; the x86-64 ABI leaves the upper half undefined, and a
function returning -1 leaves 0xffffffff in ``rax``), ``hex`` (the whole register, unsigned);
well-known functions have one built in (:data:`SIGNATURES`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import drgn

from aradia.errors import AradiaError
from aradia.linux.bounds import GUEST_ERRORS
from aradia.linux.usersyms import UserSymbols, load_address, parse_spec
from aradia.linux.walks import d_path, each_task
from aradia.trace.syscalls import user_cstring

#: a decision at a user-space function's entry: ``decide(ctx)`` with a
#: :class:`~aradia.trace.hooks.HookContext` (typed loosely here: hooks.py imports this module)
UserDecide = Callable[[Any], "int | None"]

#: Registers of a function call's integer arguments (System V AMD64 ABI), as the GDB stub names them.
CALL_ARG_REGS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")
TYPES = ("str", "int", "hex")


@dataclass(frozen=True)
class Signature:
    """Argument names and types, and the return type (None: not decoded, the raw value)."""

    args: tuple[tuple[str, str], ...] = ()
    ret: str | None = None


def _sig(args: str, ret: str | None = None) -> Signature:
    pairs = tuple((p.split(":")[0], p.split(":")[1]) for p in args.split(",")) if args else ()
    return Signature(pairs, ret)


#: Functions whose arguments aradia decodes without being told (libc, libcrypt, readline, PAM).
SIGNATURES: dict[str, Signature] = {
    "crypt": _sig("phrase:str,setting:str", "str"),
    "crypt_r": _sig("phrase:str,setting:str,data:hex", "str"),
    "crypt_rn": _sig("phrase:str,setting:str,data:hex,size:int", "str"),
    "crypt_ra": _sig("phrase:str,setting:str,data:hex,size:hex", "str"),
    "getpwnam": _sig("name:str", "hex"),
    "getpwnam_r": _sig("name:str,pwd:hex,buf:hex,buflen:hex,result:hex", "int"),  # buflen: a size_t
    "getspnam": _sig("name:str", "hex"),
    "readline": _sig("prompt:str", "str"),
    "system": _sig("command:str", "int"),
    "popen": _sig("command:str,type:str", "hex"),
    "execve": _sig("path:str,argv:hex,envp:hex", "int"),
    "open": _sig("path:str,flags:hex", "int"),
    "fopen": _sig("path:str,mode:str", "hex"),
    "pam_authenticate": _sig("pamh:hex,flags:hex", "int"),
    "pam_start": _sig("service:str,user:str,conv:hex,pamh:hex", "int"),
}


def parse_signature(text: str) -> Signature:
    """``str,str`` or ``name:str,len:int`` or ``str->str`` (return type after ``->``)."""
    args, _, ret = text.partition("->")
    pairs = []
    for i, part in enumerate(p.strip() for p in args.split(",") if p.strip()):
        name, _, typ = part.rpartition(":")
        if typ not in TYPES or (name and not re.fullmatch(r"[A-Za-z_]\w*", name)):
            raise AradiaError(f"argument {part!r}: give TYPE or NAME:TYPE, TYPE one of {', '.join(TYPES)}")
        pairs.append((name or f"arg{i}", typ))
    if len(pairs) > len(CALL_ARG_REGS):
        raise AradiaError(f"at most {len(CALL_ARG_REGS)} register arguments")
    ret = ret.strip() or None
    if ret is not None and ret not in TYPES:
        raise AradiaError(f"return type {ret!r} is not one of {', '.join(TYPES)}")
    return Signature(tuple(pairs), ret)


def decode_value(typ: str, value: int, read: Callable[[int, int], bytes]) -> Any:
    """One register value as ``typ`` says (a string is read from user memory; None if unreadable)."""
    if typ == "str":
        return user_cstring(read, value)
    if typ == "int":
        low = value & 0xFFFFFFFF
        return low - (1 << 32) if low >= 1 << 31 else low
    return value


@dataclass
class UserTarget:
    """One ``LIB:SYMBOL`` probe and the addresses it is armed at."""

    spec: str
    ret: bool = False
    process: str | None = None  # comm, or basename of the executable
    pid: int | None = None  # tgid
    signature: Signature = field(default_factory=Signature)
    #: armed address -> address spaces (``struct mm_struct`` addresses) known to map the symbol there
    addresses: dict[int, set[int]] = field(default_factory=dict)
    #: with ``ret``: the return event also carries the arguments decoded at entry (``args``)
    keep_args: bool = False
    #: a decision at entry (see :mod:`aradia.trace.hooks`): it may emit events and make the function
    #: return a value at once (then no return is reported)
    decide: UserDecide | None = None

    def __post_init__(self) -> None:
        self.lib, self.symbol = parse_spec(self.spec)

    @classmethod
    def make(cls, spec: str, *, ret: bool = False, process: str | None = None, pid: int | None = None,
             args: str | None = None, keep_args: bool = False,
             decide: UserDecide | None = None) -> UserTarget:
        """A target; ``args`` is a signature (:func:`parse_signature`), else the built-in one if any."""
        target = cls(spec, ret, process, pid, keep_args=keep_args, decide=decide)
        target.signature = (parse_signature(args) if args
                            else SIGNATURES.get(target.symbol.split("@", 1)[0], Signature()))
        return target

    def wants(self, tgid: int, comm: str, exe: Callable[[], str | None]) -> bool:
        """Whether a task (``exe`` gives its executable's path, called only if needed) passes the filter."""
        if self.pid is not None and tgid != self.pid:
            return False
        if self.process is None or comm == self.process:
            return True
        path = exe()
        return path is not None and path.rsplit("/", 1)[-1] == self.process

    def entry_args(self, regs: dict[str, int], read: Callable[[int, int], bytes],
                   arg_regs: tuple[str, ...] = CALL_ARG_REGS) -> dict[str, Any]:
        """The decoded arguments at function entry (raw argument registers without a signature);
        ``arg_regs``: the call's argument registers on the guest's architecture."""
        if not self.signature.args:
            return {r: regs.get(r, 0) for r in arg_regs}
        return {name: decode_value(typ, regs.get(reg, 0), read)
                for (name, typ), reg in zip(self.signature.args, arg_regs, strict=False)}

    def return_value(self, rax: int, read: Callable[[int, int], bytes]) -> Any:
        """The decoded return value."""
        return decode_value(self.signature.ret or "hex", rax, read)


@dataclass
class UserSpace:
    """The guest's address spaces as user-space probes see them: which processes a target takes,
    where a new mapping puts a target's symbol, and whether a hit is really the target's."""

    prog: drgn.Program
    targets: list[UserTarget] = field(default_factory=list)
    syms: UserSymbols = field(init=False)
    #: (mm, address) -> whether that address space has the target's symbol at that address
    accepted: dict[tuple[int, int], bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.syms = UserSymbols(self.prog)

    def address_spaces(self, target: UserTarget) -> list[drgn.Object]:
        """The ``mm`` of every process the target's filter takes now."""
        out = []
        for task in each_task(self.prog, self.syms.warnings):
            with contextlib.suppress(*GUEST_ERRORS):
                if int(task.pid) == int(task.tgid) and task.mm and _takes(target, task):
                    out.append(task.mm)
        return out

    def new_mapping(self, vma_address: int) -> list[tuple[UserTarget, int, int]]:
        """``(target, address, mm)`` for each target whose library a new VMA maps from offset 0.

        Every process is taken here (at mmap time an exec'ing task may not have its new name yet);
        :meth:`hit_ok` applies the target's filter when the breakpoint hits.
        """
        out: list[tuple[UserTarget, int, int]] = []
        if not self.targets:
            return out
        try:
            vma = drgn.Object(self.prog, "struct vm_area_struct *", value=vma_address)
            f = vma.vm_file
            if not f or int(vma.vm_pgoff):
                return out
            mm = int(vma.vm_mm.value_())
            for key in [k for k in self.accepted if k[0] == mm]:
                del self.accepted[key]  # the address space changed
            path = d_path(f.f_path).decode(errors="replace")
            for target in self.targets:
                found = self.syms.lookup(vma, path, target.lib, target.symbol)
                if found is not None and found[1] is not None:
                    out.append((target, load_address(int(vma.vm_start), found[0], found[1]), mm))
        except GUEST_ERRORS:
            return out
        return out

    def hit_ok(self, target: UserTarget, address: int, task: drgn.Object) -> bool:
        """Whether ``task`` (running at ``address``) passes the target's filter and has the target's
        symbol mapped there (checked once per address space)."""
        try:
            if not task.mm or not _takes(target, task):
                return False
            key = (int(task.mm.value_()), address)
            if key not in self.accepted:
                found = self.syms.resolve(task.mm, target.lib, target.symbol)
                self.accepted[key] = any(u.address == address for u in found)
            return self.accepted[key]
        except GUEST_ERRORS:
            return False


def _takes(target: UserTarget, task: drgn.Object) -> bool:
    """Whether ``task`` passes the target's process filter (its exe path is read only if needed)."""
    comm = task.comm.string_().decode(errors="replace")
    return target.wants(int(task.tgid), comm, lambda: exe_path(task))


def exe_path(task: drgn.Object) -> str | None:
    """The path of a task's executable (``/proc/PID/exe``), None for a kernel thread."""
    exe = task.mm.exe_file if task.mm else None
    return d_path(exe.f_path).decode(errors="replace") if exe else None
