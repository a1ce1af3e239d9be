"""The other Debian release's QEMU, unpacked under the cache and run through a wrapper script.

aradia is tested on the QEMU of the host's Debian release and on the other one's (Debian 12
"bookworm": QEMU 7.2; Debian 13 "trixie": QEMU 10.0): their plugin API and GDB stub differ.
:func:`build_other_qemu` fetches the other release's ``qemu-system-x86`` with the packages it needs
at run time (``qemu-system-common``/``-data``, SeaBIOS, iPXE ROMs and the closure of library packages,
glibc included) through the lab's private apt configuration (:class:`~aradia.lab.debian.PrivateApt`:
signature-checked, the host's apt state untouched), unpacks them with ``dpkg -x`` into one tree under
``$ARADIA_CACHE/otherqemu/<suite>/`` and writes a wrapper ``qemu-system-x86_64`` beside it. Point
``$ARADIA_QEMU`` at the wrapper to run the lab, the tests and the plugin builder on that QEMU.

The wrapper runs the tree's QEMU with the tree's own dynamic loader (``ld-linux-x86-64.so.2
--library-path TREE/...``), the firmware directories given by ``-L`` and the module directory by
``$QEMU_MODULE_DIR``. Why not a chroot: QEMU is handed host paths everywhere (the shared RAM file in
``/dev/shm``, sockets and logs in test work directories, the plugin's ``.so`` in the cache, kernels
and initramfs images, ``/proc/PID/mem`` readers outside): in a chroot each of them needs a bind mount
and a mount namespace (root only), and a path that was not foreseen fails. With the loader the QEMU
process lives in the host's file system and namespaces like the installed one; its pid is the QMP
peer's pid and its command line still carries ``-plugin``. Nothing of the host's libraries is mixed
in: every library comes from the tree (``--library-path`` comes first, the tree's loader knows no
host cache). Absolute symlinks in the packages are rewritten to point inside the tree.

``python -m aradia.lab.otherqemu`` builds (or finds cached) the tree and prints the wrapper's path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import sys
import tempfile
from pathlib import Path

import aradia.cache
from aradia.cache import cache_lock
from aradia.lab import GuestError
from aradia.lab.debian import PrivateApt, deb_field, run_tool
from aradia.lab.qemu_release import (
    FORMAT,
    MANIFEST,
    OTHER_SUITE,
    OtherQemu,
    host_suite,
    other_suite,
    wrapper_info,
)
from aradia.progress import Progress

#: What QEMU needs beyond its libraries: its modules and data, the BIOS, the NICs' option ROMs.
PACKAGES = ("qemu-system-x86", "qemu-system-common", "qemu-system-data", "seabios", "ipxe-qemu")

WRAPPER_NAME = "qemu-system-x86_64"
_LOADER = "ld-linux-x86-64.so.2"
_LIB_DIRS = ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu", "usr/lib64", "lib64")


def build_other_qemu(suite: str | None = None, cache_dir: Path | None = None, *,
                     progress: Progress | None = None) -> OtherQemu:
    """Build (or find in the cache) the QEMU of Debian ``suite`` (default: the other release).

    Raises :class:`~aradia.lab.GuestError` when a download, the unpacking or the first run of the
    wrapper (``--version``) fails.
    """
    suite = suite or other_suite()
    if suite not in OTHER_SUITE:
        raise GuestError(f"Debian {suite}: aradia builds the QEMU of {' or '.join(sorted(OTHER_SUITE))} only")
    cache = Path(cache_dir) if cache_dir is not None else aradia.cache.cache_dir()
    say = progress or (lambda _msg: None)
    final = cache / "otherqemu" / suite
    found = wrapper_info(final / WRAPPER_NAME)
    if found is not None:
        return found
    final.parent.mkdir(parents=True, exist_ok=True)
    with cache_lock(final.parent / ".lock"):
        found = wrapper_info(final / WRAPPER_NAME)
        if found is not None:
            return found
        tmp = Path(tempfile.mkdtemp(prefix=f".{suite}-tmp-", dir=final.parent))
        try:
            _build(suite, cache, tmp, final, say)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    found = wrapper_info(final / WRAPPER_NAME)
    if found is None:
        raise GuestError(f"{final}: the QEMU just built has no readable manifest")
    return found


def _build(suite: str, cache: Path, work: Path, final: Path, say: Progress) -> None:
    """Download, unpack and wrap into ``work`` (paths in the wrapper name ``final``)."""
    apt = PrivateApt(cache / "apt" / suite, suite)
    say(f"apt-get update (Debian {suite}, private lists)")
    apt.update()
    packages = apt.library_closure(PACKAGES)
    say(f"apt-get download: {len(packages)} packages of Debian {suite}")
    debs = apt.download(packages, work / "debs")
    tree = work / "tree"
    tree.mkdir()
    for deb in debs:
        run_tool(["dpkg-deb", "-x", str(deb), str(tree)], timeout=300, what=f"dpkg-deb -x {deb.name}")
    qemu_deb = debs[packages.index("qemu-system-x86")]
    package_version = deb_field(qemu_deb, "Version")
    source = deb_field(qemu_deb, "Source") or "qemu"
    m = re.fullmatch(r"(\S+)(?:\s+\((\S+)\))?", source)
    source_package = m.group(1) if m else "qemu"
    source_version = (m.group(2) if m and m.group(2) else package_version)
    shutil.rmtree(work / "debs")
    _relativise_symlinks(tree)
    loader = _find_loader(tree)
    final_tree = final / "tree"
    script = _wrapper_script(final_tree, loader.relative_to(tree), suite, package_version)
    wrapper = work / WRAPPER_NAME
    wrapper.write_text(script)
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    # the first run goes through the work directory's copy of the script (paths swapped)
    trial = work / f".{WRAPPER_NAME}.trial"
    trial.write_text(script.replace(_quote(str(final_tree)), _quote(str(tree))))
    trial.chmod(0o755)
    out = run_tool([str(trial), "--version"], timeout=60, what=f"the {suite} QEMU --version")
    trial.unlink()
    v = re.search(r"version\s+(\d+\.\d+(?:\.\d+)?)", out)
    if v is None:
        raise GuestError(f"the {suite} QEMU printed no version: {out[:200]!r}")
    say(f"QEMU {v.group(1)} (Debian {package_version}) from {suite}")
    (work / MANIFEST).write_text(json.dumps({
        "format": FORMAT, "wrapper": WRAPPER_NAME, "suite": suite, "version": v.group(1),
        "package_version": package_version, "source_package": source_package,
        "source_version": source_version, "packages": packages}, indent=1))


def _relativise_symlinks(tree: Path) -> None:
    """Point every absolute symlink of the unpacked packages at the same path inside ``tree``."""
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in [*dirnames, *filenames]:
            link = Path(dirpath) / name
            if not link.is_symlink():
                continue
            target = os.readlink(link)
            if target.startswith("/"):
                link.unlink()
                link.symlink_to(os.path.relpath(tree / target.lstrip("/"), link.parent))


def _find_loader(tree: Path) -> Path:
    """The tree's own dynamic loader (a regular file, wherever this release's libc6 puts it)."""
    for d in _LIB_DIRS:
        candidate = tree / d / _LOADER
        if candidate.exists():
            return candidate.resolve()
    raise GuestError(f"the unpacked libc6 has no {_LOADER} under {', '.join(_LIB_DIRS)}")


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _wrapper_script(tree: Path, loader: Path, suite: str, package_version: str) -> str:
    lib_path = ":".join(f"$T/{d}" for d in _LIB_DIRS)
    return f"""#!/bin/sh
# QEMU {package_version} of Debian {suite}, run by its own dynamic loader with its own libraries,
# firmware and modules (made by aradia.lab.otherqemu; the tree is next to this script).
T={_quote(str(tree))}
export QEMU_MODULE_DIR="$T/usr/lib/x86_64-linux-gnu/qemu"
exec "$T/{loader}" --library-path "{lib_path}" "$T/usr/bin/qemu-system-x86_64" \\
  -L "$T/usr/share/qemu" -L "$T/usr/share/seabios" -L "$T/usr/lib/ipxe/qemu" "$@"
"""


def _main(argv: list[str]) -> int:
    """``python -m aradia.lab.otherqemu [SUITE]``: build (or find) it and aradia's plugin for it (the
    plugin header comes from the same point release's source, fetched now while the archive has it);
    print the wrapper's path."""
    from aradia.errors import AradiaError
    from aradia.lab.plugin_build import build_plugin

    def say(msg: str) -> None:
        print(f"  {msg}", file=sys.stderr, flush=True)

    try:
        other = build_other_qemu(argv[0] if argv else None, progress=say)
        build_plugin(binary=str(other.wrapper), progress=say)
    except AradiaError as exc:
        print(f"aradia: building the other Debian release's QEMU or its plugin failed: {exc}",
              file=sys.stderr)
        return 2
    print(other.wrapper)
    return 0


__all__ = ["OTHER_SUITE", "PACKAGES", "OtherQemu", "build_other_qemu", "host_suite", "other_suite",
           "wrapper_info"]


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
