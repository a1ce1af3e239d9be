#!/usr/bin/env python3
"""Fetch the dashboard's chart library (uPlot) from the npm registry into the Python package.

The tarball's ``dist.integrity`` (SHA-512) is pinned here and checked before anything is extracted;
only ``dist/uPlot.iife.min.js``, ``dist/uPlot.min.css`` and ``LICENSE`` land in
``src/aradia/service/dashboard/vendor/`` (ignored by git, shipped as package data). Idempotent: when
the files are there and their recorded tarball hash is the pinned one, nothing is downloaded.
Standard library only. Usage: ``python scripts/vendor.py [--force]``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import sys
import tarfile
import urllib.request
from pathlib import Path

NAME = "uplot"
VERSION = "1.6.32"
TARBALL = f"https://registry.npmjs.org/{NAME}/-/{NAME}-{VERSION}.tgz"
INTEGRITY = "sha512-KIMVnG68zvu5XXUbC4LQEPnhwOxBuLyW1AHtpm6IKTXImkbLgkMy+jabjLgSLMasNuGGzQm/ep3tOkyTxpiQIw=="
#: member of the tarball -> file name in vendor/
FILES = {"package/dist/uPlot.iife.min.js": "uPlot.iife.min.js",
         "package/dist/uPlot.min.css": "uPlot.min.css",
         "package/LICENSE": "uPlot.LICENSE"}
VENDOR = Path(__file__).resolve().parent.parent / "src" / "aradia" / "service" / "dashboard" / "vendor"
STAMP = VENDOR / "uPlot.integrity"


def integrity_of(data: bytes) -> str:
    """The npm ``dist.integrity`` string (``sha512-`` + base64) of ``data``."""
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def present() -> bool:
    """Whether every file is in place and was extracted from the pinned tarball."""
    return all((VENDOR / f).is_file() for f in FILES.values()) and STAMP.is_file() \
        and STAMP.read_text().strip() == INTEGRITY


def fetch(url: str = TARBALL) -> bytes:
    """The tarball's bytes (raises on an HTTP error)."""
    with urllib.request.urlopen(url, timeout=60) as r:
        return bytes(r.read())


def extract(data: bytes) -> None:
    """Check ``data`` against :data:`INTEGRITY`, then write :data:`FILES` and the stamp."""
    got = integrity_of(data)
    if got != INTEGRITY:
        raise SystemExit(f"vendor: {TARBALL} has integrity {got}, expected {INTEGRITY}: not extracted")
    VENDOR.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member, name in FILES.items():
            f = tar.extractfile(member)
            if f is None:
                raise SystemExit(f"vendor: {member} is not a file in {TARBALL}")
            (VENDOR / name).write_bytes(f.read())
    STAMP.write_text(INTEGRITY + "\n")


def main(argv: list[str]) -> int:
    """Vendor uPlot unless it is already there (``--force``: again)."""
    if present() and "--force" not in argv:
        print(f"vendor: {NAME} {VERSION} already in {VENDOR}")
        return 0
    extract(fetch())
    print(f"vendor: {NAME} {VERSION} ({INTEGRITY[:20]}…) into {VENDOR}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
