"""The other Debian release's QEMU (aradia.lab.otherqemu): built from Debian's packages, run by a wrapper."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from aradia.lab import GuestError
from aradia.lab.otherqemu import OTHER_SUITE, build_other_qemu, host_suite, other_suite, wrapper_info
from aradia.lab.plugin_build import build_plugin, installed_qemu
from cli_runner import SRC

pytestmark = pytest.mark.timeout(900)


def _version_line(binary: str | Path) -> str:
    res = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    return res.stdout.splitlines()[0]


def test_pairs_and_bad_host() -> None:
    """Each of Debian 12 and 13 names the other; any other release is a clear error."""
    assert other_suite("bookworm") == "trixie" and other_suite("trixie") == "bookworm"
    assert set(OTHER_SUITE) == {"bookworm", "trixie"}
    with pytest.raises(GuestError, match="no other QEMU is known for Debian bullseye"):
        other_suite("bullseye")


def test_wrapper_runs_the_other_qemu() -> None:
    """The wrapper runs the other release's QEMU: its version is the manifest's, not the installed one's,
    and the plugin builder takes the header's suite and version from the wrapper."""
    other = build_other_qemu()
    assert other.suite == other_suite(host_suite())
    line = _version_line(other.wrapper)
    m = re.search(r"version (\d+\.\d+\.\d+) \(Debian ([^)]+)\)", line)
    assert m is not None, line
    assert (m.group(1), m.group(2)) == (other.version, other.package_version)
    installed = _version_line("qemu-system-x86_64")
    assert other.version not in installed and m.group(1).split(".")[0] != re.search(
        r"version (\d+)", installed).group(1)  # type: ignore[union-attr]
    # the tree's own loader and libraries: none of the host's libc is mapped (ldd would show the host's)
    assert wrapper_info(other.wrapper) == other and wrapper_info("qemu-system-x86_64") is None
    info = installed_qemu(str(other.wrapper))
    assert (info.version, info.package_version, info.suite) == (other.version, other.package_version,
                                                                other.suite)
    # a second build finds the cache (same wrapper, nothing rebuilt)
    mtime = other.wrapper.stat().st_mtime_ns
    assert build_other_qemu() == other and other.wrapper.stat().st_mtime_ns == mtime


def test_wrapper_boots_firmware() -> None:
    """Firmware and option ROMs come from the tree: a machine with a virtio NIC starts and QMP answers."""
    other = build_other_qemu()
    res = subprocess.run([str(other.wrapper), "-accel", "tcg", "-nodefaults", "-display", "none", "-m", "64M",
                          "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0", "-S", "-qmp", "stdio"],
                         input='{"execute":"qmp_capabilities"}\n{"execute":"query-version"}\n'
                               '{"execute":"quit"}\n', capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    replies = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    version = next(r["return"]["qemu"] for r in replies if "qemu" in r.get("return", {}))
    assert "{major}.{minor}.{micro}".format(**version) == other.version


def test_setup_command_builds_the_plugin_too() -> None:
    """``python -m aradia.lab.otherqemu`` (what dev.sh runs) prints the wrapper and leaves aradia's plugin
    built for that QEMU (its header fetched with the tree, while the archive has that point release)."""
    res = subprocess.run([sys.executable, "-m", "aradia.lab.otherqemu"], capture_output=True, text=True,
                         timeout=900, check=False, env={**os.environ, "PYTHONPATH": str(SRC)})
    assert res.returncode == 0, res.stderr[-2000:]
    other = build_other_qemu()
    assert res.stdout == f"{other.wrapper}\n"
    so = build_plugin(binary=str(other.wrapper))
    manifest = json.loads(so.with_suffix(".json").read_text())
    assert (manifest["qemu"]["version"], manifest["qemu"]["suite"]) == (other.version, other.suite)
    bad = subprocess.run([sys.executable, "-m", "aradia.lab.otherqemu", "sid"], capture_output=True, text=True,
                         timeout=300, check=False, env={**os.environ, "PYTHONPATH": str(SRC)})
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == ["aradia: building the other Debian release's QEMU or its plugin "
                                               "failed: Debian sid: aradia builds the QEMU of bookworm or trixie only"]
