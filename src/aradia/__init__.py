"""aradia: virtual machine introspection for stock QEMU/KVM guests and memory dumps.

``aradia.attach("qmp:/path/qmp.sock")`` or ``aradia.open_dump("mem.elf")`` return a :class:`VM`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aradia._version import __version__
from aradia.errors import AradiaError

if TYPE_CHECKING:
    from aradia.vm import VM, attach, open_dump

__all__ = ["VM", "AradiaError", "__version__", "attach", "open_dump"]


def __getattr__(name: str) -> Any:
    # Lazy so that importing one layer (aradia.sources, aradia.proto) does not load all of them.
    if name in ("VM", "attach", "open_dump"):
        from aradia import vm

        return getattr(vm, name)
    raise AttributeError(f"module 'aradia' has no attribute {name!r}")
