"""Loaded kernel modules (what ``lsmod`` and ``/proc/modules`` show)."""

from __future__ import annotations

from dataclasses import dataclass

import drgn
from drgn.helpers.linux.module import for_each_module

from aradia.linux.bounds import Warnings, bounded


@dataclass
class Module:
    """One loaded module: name, base address of its code and total size in bytes (as /proc/modules)."""

    name: str
    base: int
    size: int
    address: int = 0  # the struct module in guest memory


def _layout(mod: drgn.Object) -> tuple[int, int]:
    try:
        mems = mod.mem  # 6.4+: one region per type; /proc/modules sums them and shows the text base
    except AttributeError:
        return int(mod.core_layout.base), int(mod.core_layout.size) + int(mod.init_layout.size)
    size = sum(int(m.size) for m in mems)
    return int(mems[0].base), size


def modules(prog: drgn.Program, *, warnings: Warnings | None = None) -> list[Module]:
    """Every module on the kernel's module list, in list order (newest first, like lsmod)."""
    warnings = Warnings() if warnings is None else warnings
    out = []
    for mod in bounded(for_each_module(prog), "module list", warnings, limit=1 << 16,
                       key=lambda m: m.value_()):
        try:
            base, size = _layout(mod)
            out.append(Module(mod.name.string_().decode(errors="replace"), base, size, mod.value_()))
        except (drgn.FaultError, ValueError) as e:
            warnings.add(f"module at {mod.value_():#x}: unreadable ({e})")
    return out
