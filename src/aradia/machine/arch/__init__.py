"""One module per guest CPU architecture, and how to tell which one a VM has.

:mod:`~aradia.machine.arch.x86_64` and :mod:`~aradia.machine.arch.arm64` each define an
:class:`~aradia.machine.arch.base.Architecture`: register names (program counter, stack pointer,
argument and return registers), the ELF machine number, QEMU's target name and the page-table walk.
A live VM's architecture comes from QEMU (QMP ``query-target``), a dump's from its ELF header
(``e_machine``); raw and LiME dumps say nothing: they are told (``--arch``) or their Linux kernel's
VMCOREINFO text in RAM decides, else x86-64 is assumed (:func:`aradia.vm.dump_architecture`).
"""

from __future__ import annotations

from aradia.errors import UnsupportedKernel
from aradia.machine.arch.arm64 import ARM64, Arm64
from aradia.machine.arch.base import Architecture
from aradia.machine.arch.x86_64 import X86_64

X86 = X86_64()

ARCHITECTURES: dict[str, Architecture] = {"x86_64": X86, "arm64": ARM64}
"""The architectures by aradia's name (arm64 with its default 48-bit VA)."""

_ALIASES = {"aarch64": "arm64", "amd64": "x86_64", "x86-64": "x86_64"}


def architecture(name: str) -> Architecture:
    """The architecture called ``name`` (``x86_64``/``amd64``, ``arm64``/``aarch64``)."""
    key = _ALIASES.get(name.lower(), name.lower())
    try:
        return ARCHITECTURES[key]
    except KeyError:
        raise UnsupportedKernel(f"unsupported guest architecture {name!r} (aradia knows "
                                f"{', '.join(ARCHITECTURES)})") from None


def from_qemu_target(target: str) -> Architecture:
    """The architecture of a QEMU whose QMP ``query-target`` says ``{"arch": target}``."""
    for arch in ARCHITECTURES.values():
        if arch.qemu_target == target:
            return arch
    raise UnsupportedKernel(f"QEMU emulates {target!r}: aradia supports x86_64 and aarch64 guests")


def from_elf_machine(machine: int) -> Architecture:
    """The architecture of an ELF file or core whose header says ``e_machine == machine``."""
    for arch in ARCHITECTURES.values():
        if arch.elf_machine == machine:
            return arch
    raise UnsupportedKernel(f"ELF machine {machine}: aradia supports EM_X86_64 (62) and EM_AARCH64 (183)")


__all__ = [
    "ARCHITECTURES",
    "ARM64",
    "X86",
    "X86_64",
    "Architecture",
    "Arm64",
    "architecture",
    "from_elf_machine",
    "from_qemu_target",
]
