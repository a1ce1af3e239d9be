"""Which QEMU is "the other one" (another Debian release's, unpacked by :mod:`aradia.lab.otherqemu`)
and what its wrapper's manifest says: read by the plugin builder too, so it is its own module."""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from aradia.lab import GuestError

#: The Debian release whose QEMU is "the other one", by the host's release.
OTHER_SUITE = {"bookworm": "trixie", "trixie": "bookworm"}

MANIFEST = "manifest.json"
FORMAT = 1  # bump when the tree's layout or the wrapper changes


@dataclass(frozen=True)
class OtherQemu:
    """A QEMU unpacked from another Debian release and the wrapper that runs it."""

    suite: str  # Debian suite it came from, e.g. "trixie"
    version: str  # QEMU's own version, e.g. "10.0.13"
    package_version: str  # Debian version of qemu-system-x86, e.g. "1:10.0.13+ds-0+deb13u1"
    source_package: str  # "qemu"
    source_version: str
    wrapper: Path  # run this as qemu-system-x86_64 ($ARADIA_QEMU)
    tree: Path


def host_suite() -> str:
    """The host's Debian codename (``VERSION_CODENAME`` of ``/etc/os-release``)."""
    try:
        text = Path("/etc/os-release").read_text()
    except OSError as exc:
        raise GuestError(f"cannot read /etc/os-release: {exc}") from exc
    m = re.search(r"^VERSION_CODENAME=\"?([a-z]+)\"?$", text, re.MULTILINE)
    if m is None or not re.search(r"^ID=\"?debian\"?$", text, re.MULTILINE):
        raise GuestError("the host is not a Debian release with a VERSION_CODENAME")
    return m.group(1)


def other_suite(host: str | None = None) -> str:
    """The Debian release whose QEMU aradia also tests on, given the host's (default: this host)."""
    host = host or host_suite()
    if host not in OTHER_SUITE:
        raise GuestError(f"no other QEMU is known for Debian {host}: aradia pairs "
                         + ", ".join(f"{a} with {b}" for a, b in OTHER_SUITE.items()))
    return OTHER_SUITE[host]


def wrapper_info(binary: str | os.PathLike[str]) -> OtherQemu | None:
    """The :class:`OtherQemu` whose wrapper ``binary`` is (a path or a name on ``$PATH``), else None."""
    found = shutil.which(str(binary))
    if found is None:
        return None
    path = Path(found).resolve()
    manifest = path.parent / MANIFEST
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("wrapper") != path.name or data.get("format") != FORMAT:
        return None
    return OtherQemu(data["suite"], data["version"], data["package_version"], data["source_package"],
                     data["source_version"], path, path.parent / "tree")
