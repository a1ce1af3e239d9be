"""The one exception hierarchy of aradia.

Every failure a user can cause or meet (bad input, a guest that lies, a QEMU that went away) is an
``AradiaError``; the CLI turns each into one line and exit status 2. Anything else is a bug.
"""

from __future__ import annotations


class AradiaError(Exception):
    """Base class of every error aradia raises on purpose."""


class NotAttached(AradiaError):
    """The VM could not be reached, or went away while attached."""


class Busy(AradiaError):
    """The VM's QMP socket or GDB stub is already held by another client."""


class Migrated(AradiaError):
    """The VM was live-migrated away (or waits for an incoming migration): it must not be resumed here.

    QEMU's GDB stub resumes a VM on ``c``/``s``/``D`` whatever its run state, so a stale continue to
    a migration *source* (run state ``finish-migrate`` or ``postmigrate``) would run the guest twice.
    """


class ProbeClash(AradiaError):
    """What was asked is armed already: the address is probed or watched, or another trace holds the
    same app spec (the service answers 409 Conflict)."""


class MigrationFailed(AradiaError):
    """A live migration aradia drove did not complete (failed, cancelled, timed out, or the destination
    never came up); the source VM is left running, traced as before."""


class NotRAM(AradiaError):
    """A guest-physical address is not backed by RAM (or by the dump)."""

    def __init__(self, address: int, size: int = 1, detail: str = "") -> None:
        self.address = address
        self.size = size
        msg = f"guest-physical address {address:#x} is not RAM"
        if size > 1:
            msg = f"guest-physical range {address:#x}+{size:#x} is not RAM"
        super().__init__(msg + (f" ({detail})" if detail else ""))


class PageFault(AradiaError):
    """A guest-virtual address has no valid translation."""

    def __init__(self, vaddr: int, root: int, level: str = "") -> None:
        self.vaddr = vaddr
        self.root = root
        where = f" at {level}" if level else ""
        super().__init__(f"virtual address {vaddr:#x} is not mapped (page-table root {root:#x}{where})")


class GuestDataCorrupt(AradiaError):
    """Guest data does not make sense (cycles, wild pointers, absurd lengths)."""


class DumpFormatError(AradiaError):
    """A dump file is truncated, corrupt or of an unknown format."""


class UnsupportedKernel(AradiaError):
    """The guest kernel (or its layout) is one aradia cannot interpret."""


class ProtocolError(AradiaError):
    """A peer (QMP, GDB stub) answered something the protocol does not allow."""
