"""Build aradia's TCG plugin for the installed QEMU (a lab tool: it needs Debian's source package).

:func:`build_plugin` compiles :data:`~aradia.trace.pluginload.SOURCE` (``trace/plugin/counter.c``)
against ``qemu-plugin.h`` of exactly the QEMU aradia launches (``$ARADIA_QEMU``, default
``qemu-system-x86_64``): Debian does not ship the header, so it comes from Debian's source package of
that version (``apt-get source --download-only`` through a private deb-src list,
:class:`~aradia.lab.debian.PrivateApt`; only the header is taken out of the orig tarball, with Debian's
patches to it applied). QEMU >= 9's header includes ``<glib.h>`` for two types; a minimal stand-in is
generated next to it, so glib's development files are not needed (QEMU itself links glib). The ``.so``
is cached under ``$ARADIA_CACHE/plugins/<qemu>/``; a second build only looks the QEMU version up.

The library never builds the plugin: it takes the ``.so`` path (:mod:`aradia.trace.pluginload`,
:mod:`aradia.trace.pluginshm`).
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import aradia.cache
from aradia.cache import cache_lock
from aradia.lab import GuestError
from aradia.lab.debian import PrivateApt, run_tool
from aradia.lab.qemu_release import host_suite, wrapper_info
from aradia.machine.qemu import QEMU_BINARY
from aradia.progress import Progress
from aradia.trace.pluginload import SO_PATTERN, SOURCE, PluginCapabilities, PluginError

_BUILD_FORMAT = 2  # bump when the compile command or the manifest changes
_HEADER_MEMBER = "include/qemu/qemu-plugin.h"
_MAX_HEADER_BYTES = 1 << 20
_QEMU_PACKAGE = "qemu-system-x86"

# what qemu-plugin.h (QEMU >= 9) needs of <glib.h>: the public heads of GArray and GByteArray (stable
# glib ABI) and the calls counter.c makes; QEMU links glib, so they resolve when it loads the plugin
_GLIB_STANDIN = """\
/* aradia's stand-in for <glib.h>: only what qemu-plugin.h and counter.c use (glib's stable ABI). */
#ifndef ARADIA_GLIB_STANDIN_H
#define ARADIA_GLIB_STANDIN_H
typedef char gchar;
typedef int gboolean;
typedef unsigned int guint;
typedef unsigned char guint8;
typedef struct _GArray { gchar *data; guint len; } GArray;
typedef struct _GByteArray { guint8 *data; guint len; } GByteArray;
GByteArray *g_byte_array_new(void);
GByteArray *g_byte_array_set_size(GByteArray *array, guint length);
gchar *g_array_free(GArray *array, gboolean free_segment);
#endif
"""


@dataclass(frozen=True)
class QemuBuildInfo:
    """The installed QEMU the plugin must match."""

    version: str  # QEMU's own, e.g. "7.2.22"
    package_version: str  # Debian binary package version, "" if QEMU is not Debian's
    source_package: str
    source_version: str
    suite: str = ""  # Debian suite of the deb-src to fetch the header from ("": the host's)

    @property
    def cache_name(self) -> str:
        """Directory name under ``plugins/`` (no ``,`` or ``:``: the path goes into ``-plugin``)."""
        name = f"{self.version}_{self.package_version}" if self.package_version else self.version
        return re.sub(r"[^A-Za-z0-9.+~_-]", "_", name)


def header_capabilities(text: str) -> PluginCapabilities:
    """Detect the plugin API version and optional calls from the text of ``qemu-plugin.h``."""
    m = re.search(r"^\s*#\s*define\s+QEMU_PLUGIN_VERSION\s+(\d+)\s*$", text, re.MULTILINE)
    if m is None:
        raise PluginError("qemu-plugin.h defines no QEMU_PLUGIN_VERSION")

    def declares(name: str) -> bool:
        return re.search(rf"\b{name}\s*\(", text) is not None

    return PluginCapabilities(int(m.group(1)),
                              insn_inline=declares("qemu_plugin_register_vcpu_insn_exec_inline"),
                              read_register=declares("qemu_plugin_read_register")
                              and declares("qemu_plugin_get_registers"),
                              read_memory=declares("qemu_plugin_read_memory_vaddr"),
                              glib=re.search(r"^\s*#\s*include\s*<glib\.h>", text, re.MULTILINE) is not None)


def _run(cmd: list[str], *, timeout: float, what: str, cwd: Path | None = None) -> str:
    return run_tool(cmd, timeout=timeout, what=what, cwd=cwd, error=PluginError)


def installed_qemu(binary: str | None = None) -> QemuBuildInfo:
    """Version of the QEMU aradia launches (``binary``, default ``$ARADIA_QEMU`` or
    ``qemu-system-x86_64``) and of the Debian packages it comes from."""
    binary = binary or QEMU_BINARY
    out = _run([binary, "--version"], timeout=30, what=f"{binary} --version")
    m = re.search(r"version\s+(\d+\.\d+(?:\.\d+)?)", out)
    if m is None:
        raise PluginError(f"cannot read the QEMU version from {out[:200]!r}")
    debian = re.search(r"\(Debian\s+([^)\s]+)\)", out)
    if debian is None:
        return QemuBuildInfo(m.group(1), "", "", "")
    other = wrapper_info(binary)  # another Debian release's QEMU (aradia.lab.otherqemu)
    if other is not None:
        if other.package_version != debian.group(1):
            raise PluginError(f"{binary} says it is Debian {debian.group(1)} but its manifest says "
                              f"{other.package_version}")
        return QemuBuildInfo(m.group(1), other.package_version, other.source_package, other.source_version,
                             other.suite)
    try:
        fields = _run(["dpkg-query", "-W", "-f", "${source:Package} ${source:Version} ${Version}",
                       _QEMU_PACKAGE], timeout=30, what="dpkg-query").split()
    except PluginError:
        fields = []
    if len(fields) != 3 or fields[2] != debian.group(1):
        raise PluginError(f"{binary} says it is Debian {debian.group(1)} but package {_QEMU_PACKAGE} is "
                          f"{' '.join(fields) or 'not installed'}: cannot tell which source to build against")
    return QemuBuildInfo(m.group(1), fields[2], fields[0], fields[1])


def _host_suite() -> str:
    try:
        return host_suite()
    except GuestError as exc:
        raise PluginError(f"{exc}: pass header= to build_plugin") from exc


def _source_apt(cache: Path, suite: str) -> PrivateApt:
    """A private apt with the suite's deb-src lines (its own dir: the image builder owns ``apt/``)."""
    return PrivateApt(cache / "apt-src" / suite, suite, kind="deb-src", backports=True)


def _orig_header(tarball: Path) -> bytes:
    """``include/qemu/qemu-plugin.h`` out of an upstream tarball, streaming (no full extraction)."""
    try:
        with tarfile.open(tarball, "r|*") as tf:
            for member in tf:
                parts = member.name.split("/", 1)
                if len(parts) == 2 and parts[1] == _HEADER_MEMBER and member.isfile():
                    if member.size > _MAX_HEADER_BYTES:
                        raise PluginError(f"{tarball.name}: {_HEADER_MEMBER} is {member.size} bytes")
                    fh = tf.extractfile(member)
                    assert fh is not None
                    return fh.read()
    except (tarfile.TarError, lzma.LZMAError, EOFError, OSError) as exc:
        raise PluginError(f"cannot read {tarball.name}: {exc}") from exc
    raise PluginError(f"{tarball.name} holds no {_HEADER_MEMBER}")


def _header_patches(debian_tar: Path) -> list[str]:
    """The hunks of Debian's patches (in series order) that change the plugin header."""
    patches: dict[str, bytes] = {}
    series = b""
    try:
        with tarfile.open(debian_tar, "r|*") as tf:
            for member in tf:
                if not member.isfile() or member.size > 64 << 20:
                    continue
                if member.name == "debian/patches/series" or member.name.startswith("debian/patches/"):
                    fh = tf.extractfile(member)
                    assert fh is not None
                    data = fh.read()
                    if member.name == "debian/patches/series":
                        series = data
                    elif _HEADER_MEMBER.encode() in data:
                        patches[member.name.removeprefix("debian/patches/")] = data
    except (tarfile.TarError, lzma.LZMAError, EOFError, OSError) as exc:
        raise PluginError(f"cannot read {debian_tar.name}: {exc}") from exc
    hunks = []
    for line in series.decode(errors="replace").splitlines():
        name = line.split("#", 1)[0].strip().split(" ")[0]
        if name in patches:
            hunks.append(_file_diff(patches[name].decode(errors="replace"), _HEADER_MEMBER))
    return [h for h in hunks if h]


def _file_diff(patch: str, path: str) -> str:
    """The part of a unified diff that changes ``path`` (``a/``-``b/``-prefixed or not)."""
    out: list[str] = []
    lines = patch.splitlines(keepends=True)
    keep = False
    for i, line in enumerate(lines):
        if line.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            target = lines[i + 1][4:].split("\t")[0].strip()
            keep = target.split("/", 1)[-1] == path or target == path
        elif line.startswith("diff "):
            keep = False
        if keep:
            out.append(line)
    return "".join(out)


def _fetch_header(info: QemuBuildInfo, cache: Path, say: Progress) -> bytes:
    """The plugin header of exactly the installed QEMU, from Debian's source package."""
    if not info.source_version:
        raise PluginError(f"QEMU {info.version} is not Debian's:"
                          " pass header= (its qemu-plugin.h) to build_plugin")
    suite = info.suite or _host_suite()
    apt = _source_apt(cache, suite)
    say(f"apt-get update (Debian {suite} sources, private lists)")
    _run(["apt-get", *apt.options, "-q", "update"], timeout=600, what=f"apt-get update ({suite} deb-src)")
    work = Path(tempfile.mkdtemp(prefix=".plugin-src-", dir=cache))
    try:
        spec = f"{info.source_package}={info.source_version}"
        say(f"apt-get source --download-only {spec}")
        _run(["apt-get", *apt.options, "-q", "source", "--download-only", spec], cwd=work, timeout=1800,
             what=f"apt-get source {spec} (needs Debian's deb-src for {suite})")
        upstream = info.source_version.split(":", 1)[-1].rsplit("-", 1)[0]
        origs = sorted(work.glob(f"{info.source_package}_{upstream}.orig.tar.*"))
        origs = [p for p in origs if not p.name.endswith(".asc")]
        if not origs:
            left = sorted(p.name for p in work.iterdir())
            raise PluginError(f"apt-get source {spec} left no orig tarball: {left}")
        say(f"extracting {_HEADER_MEMBER} from {origs[0].name}")
        header = _orig_header(origs[0])
        debian_tars = sorted(work.glob(f"{info.source_package}_*.debian.tar.*"))
        hunks = _header_patches(debian_tars[0]) if debian_tars else []
        if hunks:
            header = _apply_hunks(header, hunks, work)
        return header
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _apply_hunks(header: bytes, hunks: list[str], work: Path) -> bytes:
    """Apply Debian's changes to the header with ``patch`` (rare: 7.2 and 10.0 have none)."""
    target = work / "patched" / _HEADER_MEMBER
    target.parent.mkdir(parents=True)
    target.write_bytes(header)
    for hunk in hunks:
        res = subprocess.run(["patch", "--batch", "--forward", str(target)], input=hunk, text=True,
                             capture_output=True, timeout=60, check=False)
        if res.returncode != 0:
            raise PluginError(f"applying Debian's patch to {_HEADER_MEMBER} failed: {res.stdout[-500:]}")
    return target.read_bytes()


def _so_name() -> str:
    """The built plugin's file name: a hash of the source and of how it is built (see SO_PATTERN)."""
    stamp = f"{_BUILD_FORMAT}\0{_GLIB_STANDIN}\0".encode()
    digest = hashlib.sha256(stamp + SOURCE.read_bytes()).hexdigest()[:12]
    name = f"counter-{digest}.so"
    assert SO_PATTERN.fullmatch(name)
    return name


_BUILT: dict[tuple[str, str], Path] = {}


def build_plugin(cache_dir: Path | None = None, *, header: Path | None = None,
                 progress: Progress | None = None, binary: str | None = None) -> Path:
    """Build (or find in the cache) the plugin for the installed QEMU; returns the ``.so`` path.

    ``header`` overrides the download with a ``qemu-plugin.h`` of the installed QEMU's version (for
    a QEMU that is not Debian's); ``binary`` names another QEMU than ``$ARADIA_QEMU`` (default) to
    build for. Raises :class:`PluginError` when a tool or the download fails.
    """
    cache = Path(cache_dir) if cache_dir is not None else aradia.cache.cache_dir()
    say = progress or (lambda _msg: None)
    info = installed_qemu(binary)
    key = (str(cache), info.cache_name + (f"@{header}" if header else ""))
    if key in _BUILT and _BUILT[key].exists():
        return _BUILT[key]
    directory = cache / "plugins" / (info.cache_name if header is None else f"{info.cache_name}-custom")
    so = directory / _so_name()
    if not so.exists():
        directory.mkdir(parents=True, exist_ok=True)
        with cache_lock(directory / ".lock"):
            if not so.exists():
                _build(info, cache, directory, so, header, say)
    _BUILT[key] = so
    return so


def _build(info: QemuBuildInfo, cache: Path, directory: Path, so: Path, header: Path | None,
           say: Progress) -> None:
    hdr_path = directory / "qemu-plugin.h"
    if header is not None:
        shutil.copyfile(header, hdr_path)
    elif not hdr_path.exists():
        data = _fetch_header(info, cache, say)
        tmp = hdr_path.with_suffix(".h.tmp")
        tmp.write_bytes(data)
        tmp.rename(hdr_path)
    caps = header_capabilities(hdr_path.read_text(errors="replace"))
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise PluginError("gcc is not installed (needed to build the TCG plugin)")
    includes = [f"-I{directory}"]
    if caps.glib:
        standin = directory / "glib-standin"
        standin.mkdir(exist_ok=True)
        (standin / "glib.h").write_text(_GLIB_STANDIN)
        includes.append(f"-I{standin}")
    tmp_so = directory / f".{so.name}.{os.getpid()}.tmp"
    say(f"gcc {SOURCE.name} (plugin API {caps.api_version})")
    _run([gcc, "-O2", "-fPIC", "-shared", "-Wall", "-Wextra", "-Werror", "-std=gnu11", *includes,
          *caps.defines(), "-o", str(tmp_so), str(SOURCE)], timeout=120, what=f"gcc {SOURCE.name}")
    manifest = {"qemu": asdict(info), "capabilities": asdict(caps), "source_sha256":
                hashlib.sha256(SOURCE.read_bytes()).hexdigest()}
    so.with_suffix(".json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    tmp_so.rename(so)


__all__ = ["QemuBuildInfo", "build_plugin", "header_capabilities", "installed_qemu"]
