"""Debian packages without touching the host's apt state: a private apt configuration per suite.

Lists, caches and the dpkg status live under a directory of ours; signatures are checked against the
host's ``debian-archive-keyring``. Used to fetch test-guest kernels and userland, QEMU's source (for
the plugin header) and debug packages.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable
from pathlib import Path

from aradia.errors import AradiaError
from aradia.lab import GuestError

KEYRING_DIR = Path("/usr/share/keyrings")
MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"


def run_tool(cmd: list[str], *, timeout: float = 600, cwd: Path | None = None, what: str = "",
             error: type[AradiaError] = GuestError) -> str:
    """Run a host tool; its stdout, or ``error`` (an AradiaError class) with the tail of its output."""
    what = what or " ".join(cmd[:3])
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise error(f"{what}: {cmd[0]} is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise error(f"{what}: timed out after {timeout:.0f}s") from exc
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip()[-2000:]
        raise error(f"{what} failed (exit {res.returncode}): {tail}")
    return res.stdout


class PrivateApt:
    """apt-get/apt-cache against one Debian suite with lists, caches and status in a private dir."""

    def __init__(self, root: Path, suite: str, *, kind: str = "deb", backports: bool = False,
                 arch: str = "amd64") -> None:
        """``kind`` is ``deb`` (binary packages) or ``deb-src`` (source packages, for ``source``);
        ``arch`` is the Debian architecture of the binary packages (``amd64``, ``arm64``). Give each
        architecture its own ``root``: the lists differ."""
        self.root = root
        self.suite = suite
        self.arch = arch
        for sub in ("lists/partial", "cache/archives/partial"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        # The archive keyring, plus the suite's own keyrings should a later keyring package have
        # moved an old suite's keys out of the main one.
        keyrings = [KEYRING_DIR / "debian-archive-keyring.gpg",
                    *sorted(KEYRING_DIR.glob(f"debian-archive-{suite}-*.gpg"))]
        keyrings = [k for k in keyrings if k.exists()]
        if not keyrings:
            raise GuestError("the Debian archive keyring is missing: install debian-archive-keyring")
        signed_by = ",".join(str(k) for k in keyrings)
        suites = [(MIRROR, suite), (MIRROR, f"{suite}-updates"), (SECURITY_MIRROR, f"{suite}-security")]
        if backports:
            suites.append((MIRROR, f"{suite}-backports"))
        lines = [f"{kind} [signed-by={signed_by}] {mirror} {s} main" for mirror, s in suites]
        (root / "sources.list").write_text("\n".join(lines) + "\n")
        (root / "status").touch()
        self.options = [
            f"-oDir::Etc::SourceList={root / 'sources.list'}",
            "-oDir::Etc::SourceParts=/dev/null",
            "-oDir::Etc::Preferences=/dev/null",
            "-oDir::Etc::PreferencesParts=/dev/null",
            f"-oDir::State::Lists={root / 'lists'}",
            f"-oDir::State::status={root / 'status'}",
            f"-oDir::Cache={root / 'cache'}",
            f"-oDir::Cache::archives={root / 'cache' / 'archives'}",
            "-oDebug::NoLocking=1",
            "-oAcquire::Languages=none",
            f"-oAPT::Architecture={arch}",
            f"-oAPT::Architectures::={arch}",
            "-oAPT::Sandbox::User=root",
        ]

    def update(self) -> None:
        """``apt-get update`` of the private lists."""
        run_tool(["apt-get", *self.options, "-q", "update"], timeout=600,
                 what=f"apt-get update ({self.suite})")

    def pkgnames(self, prefix: str) -> list[str]:
        """Package names starting with ``prefix``."""
        out = run_tool(["apt-cache", *self.options, "pkgnames", prefix], timeout=120,
                       what="apt-cache pkgnames")
        return out.split()

    def library_closure(self, packages: Iterable[str]) -> list[str]:
        """The packages plus every library package (``lib*``, ``zlib*``) they (transitively) depend on."""
        seen: list[str] = []
        todo = list(packages)
        for _round in range(20):
            if not todo:
                break
            seen.extend(p for p in todo if p not in seen)
            out = run_tool(["apt-cache", *self.options, "depends", "--no-recommends", "--no-suggests",
                        "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances", *todo],
                       timeout=120, what="apt-cache depends")
            found: list[str] = []
            alternative = False
            for line in out.splitlines():
                m = re.match(r"\s+(\|?)(?:Pre)?Depends:\s+(\S+)", line)
                if not m:
                    continue
                name = m.group(2)
                chosen_already = alternative
                alternative = m.group(1) == "|"
                if chosen_already or name.startswith("<"):
                    continue
                name = name.split(":")[0]
                if name.startswith(("lib", "zlib")) and name not in seen and name not in found:
                    found.append(name)
            todo = found
        else:
            raise GuestError("apt-cache depends: dependency closure did not converge")
        return seen

    def download(self, packages: list[str], dest: Path) -> list[Path]:
        """``apt-get download`` into ``dest``; returns the .deb files (signature-checked by apt)."""
        dest.mkdir(parents=True, exist_ok=True)
        run_tool(["apt-get", *self.options, "-q", "download", *packages], cwd=dest, timeout=900,
             what=f"apt-get download {' '.join(packages)}")
        debs = []
        for pkg in packages:
            # one directory may hold several architectures' .debs of a package: take this one's
            matches = sorted((p for suffix in (self.arch, "all") for p in dest.glob(f"{pkg}_*_{suffix}.deb")),
                             key=lambda p: p.stat().st_mtime)
            if not matches:
                raise GuestError(f"apt-get download {pkg} left no .deb in {dest}")
            debs.append(matches[-1])
        return debs


def deb_field(deb: Path, field: str) -> str:
    """One control field of a .deb file."""
    return run_tool(["dpkg-deb", "-f", str(deb), field], timeout=60, what="dpkg-deb -f").strip()
