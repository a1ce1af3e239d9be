"""aradia's test lab, beside the library and never imported by it.

Debian test-guest images built from Debian packages (:mod:`~aradia.lab.images`, through a private apt
configuration in :mod:`~aradia.lab.debian`; their initramfs in :mod:`~aradia.lab.initramfs`), a QEMU
launcher that boots them (:mod:`~aradia.lab.launcher`), the running guest and the ways to talk to it
(:mod:`~aradia.lab.guest`, with the ``memhold`` helper in :mod:`~aradia.lab.memhold`), the TCG plugin
builder (:mod:`~aradia.lab.plugin_build`), the other Debian release's QEMU
(:mod:`~aradia.lab.otherqemu`) and the demo (:mod:`~aradia.lab.demo`). The library
(``proto``, ``sources``, ``machine``, ``linux``, ``trace`` and what builds on them) must not import
this package: ``tests/test_layers.py`` keeps that rule.
"""

from aradia.errors import AradiaError


class GuestError(AradiaError):
    """A lab failure: a guest image could not be built, a guest did not boot or a guest command failed."""


__all__ = ["GuestError"]
