"""What differs between test guests of two architectures: packages, toolchain, QEMU, devices.

One :class:`GuestArch` per architecture aradia builds test guests for (``x86_64``, the default, and
``arm64``); the image builder (:mod:`~aradia.lab.images`, :mod:`~aradia.lab.initramfs`) and the
launcher (:mod:`~aradia.lab.launcher`) ask it instead of assuming x86. The x86-64 values are exactly
what the lab always used, so x86 images keep their cache keys.

The arm64 guest runs on ``qemu-system-aarch64 -M virt -cpu max,pauth-impdef=on``: the ``max`` CPU
with QEMU's cheap IMPDEF pointer-authentication algorithm instead of QARMA5, which TCG emulates slowly
(Debian's 6.1 guest boots in ~2.2 s instead of ~7-10 s; the guest still signs its pointers, with
another key algorithm, so nothing aradia sees changes). Its console is the PL011 UART
(``ttyAMA0``); virt has no second UART on QEMU 7.2, so the ground-truth channel is a virtio console
(``hvc0``, module ``virtio_console``) written to a file on the host, as ttyS1 is on x86.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from aradia.lab import GuestError
from aradia.machine.qemu import QEMU_BINARY


@dataclass(frozen=True)
class GuestArch:
    """The lab's facts about one guest architecture."""

    name: str  # aradia's name: x86_64, arm64
    debian: str  # Debian's architecture name (apt, .deb file names)
    multiarch: str  # the multiarch triplet of library directories
    gcc: str  # the C compiler that builds static guest programs
    gcc_package: str  # Debian package of that compiler (for error messages)
    qemu: str  # the qemu-system binary
    qemu_package: str  # Debian package of that binary
    machine: str  # default -machine
    cpu: str | None  # default -cpu (None: QEMU's default)
    console: str  # kernel console device (the launcher's console socket)
    truth_tty: str  # guest device of the ground-truth channel (written to a file on the host)
    ld_so: str  # the dynamic loader's path in the guest
    extra_modules: tuple[str, ...] = ()  # kernel modules the initramfs loads besides the usual ones

    def truth_args(self, path: str) -> list[str]:
        """QEMU arguments that write the ground-truth device's output to ``path``."""
        if self.truth_tty == "/dev/ttyS1":
            return ["-serial", f"file:{path}"]
        return ["-device", "virtio-serial-pci,id=vser0", "-chardev", f"file,id=truth0,path={path}",
                "-device", "virtconsole,chardev=truth0,bus=vser0.0"]

    def kernel_package_re(self, pattern: str) -> str:
        """A kernel package regular expression written for amd64 (``...-cloud-amd64...``) for this arch."""
        return pattern.replace("-amd64", f"-{self.debian}")


X86_64 = GuestArch(
    name="x86_64", debian="amd64", multiarch="x86_64-linux-gnu", gcc="gcc", gcc_package="gcc, libc6-dev",
    qemu=QEMU_BINARY, qemu_package="qemu-system-x86", machine="pc", cpu=None, console="ttyS0",
    truth_tty="/dev/ttyS1", ld_so="lib64/ld-linux-x86-64.so.2",
)

ARM64 = GuestArch(
    name="arm64", debian="arm64", multiarch="aarch64-linux-gnu", gcc="aarch64-linux-gnu-gcc",
    gcc_package="gcc-aarch64-linux-gnu", qemu=os.environ.get("ARADIA_QEMU_ARM64", "qemu-system-aarch64"),
    qemu_package="qemu-system-arm", machine="virt", cpu="max,pauth-impdef=on", console="ttyAMA0",
    truth_tty="/dev/hvc0",
    ld_so="lib/ld-linux-aarch64.so.1", extra_modules=("virtio_console",),
)

GUEST_ARCHES: dict[str, GuestArch] = {"x86_64": X86_64, "arm64": ARM64}
"""Guest architectures by name; ``x86_64`` is the default everywhere."""


def guest_arch(name: str) -> GuestArch:
    """The :class:`GuestArch` called ``name`` (``aarch64`` is taken for ``arm64``, ``amd64`` for x86_64)."""
    alias = {"aarch64": "arm64", "amd64": "x86_64"}.get(name, name)
    try:
        return GUEST_ARCHES[alias]
    except KeyError:
        raise GuestError(f"unknown guest architecture {name!r}; known: {', '.join(GUEST_ARCHES)}") from None


__all__ = ["ARM64", "GUEST_ARCHES", "X86_64", "GuestArch", "guest_arch"]
