"""aradia: virtual machine introspection for stock QEMU/KVM guests and memory dumps."""

from aradia.errors import AradiaError
from aradia.vm import VM, attach, open_dump

__all__ = ["VM", "AradiaError", "attach", "open_dump"]
__version__ = "0.1.0"
