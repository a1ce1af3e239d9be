"""The TCG plugin fast path: build aradia's QEMU plugin and talk to it through shared memory.

:func:`build_plugin` compiles ``plugin/counter.c`` against ``qemu-plugin.h`` of exactly the
installed QEMU: Debian does not ship the header, so it comes from Debian's source package of that
version (``apt-get source --download-only`` through a private deb-src list, only the header is
taken out of the orig tarball). The ``.so`` is cached under ``$ARADIA_CACHE/plugins/<qemu>/``; a
second build only looks the QEMU version up.

:class:`PluginShm` is the shared file the plugin maps (``-plugin counter.so,shm=PATH``, see
:func:`plugin_args`): up to :data:`MAX_TARGETS` target addresses that aradia changes at run time,
per-vCPU hit counters and a ring of logged hits (vCPU, target, address, host ``CLOCK_MONOTONIC``
ns). TCG instruments code when it translates it, so after a target change the old and new
addresses must be re-translated: :func:`force_retranslation` writes back the byte already there
through the GDB stub, which makes QEMU drop the translations that hold it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import lzma
import mmap
import os
import re
import secrets
import shutil
import struct
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from aradia.errors import AradiaError
from aradia.machine.debian import PrivateApt, run_tool
from aradia.machine.images import cache_lock, default_cache_dir

if TYPE_CHECKING:
    from aradia.proto.gdbrsp import GdbClient

SOURCE = Path(__file__).resolve().parent / "plugin" / "counter.c"
"""The plugin's C source, shipped as package data."""

MAX_TARGETS = 64
"""Target slots in the shared file (fixed by the plugin's layout)."""

_MAGIC = 0x31474C5044415241  # "ARADPLG1"
_LAYOUT = 2
_HEADER_SIZE = 4096
_HIT_SIZE = 32
_TF_ACTIVE, _TF_LOG, _TF_INLINE = 1, 2, 4
_CAP_INSN_INLINE, _CAP_READ_REGISTER, _CAP_READ_MEMORY = 1, 2, 4
_BUILD_FORMAT = 1  # bump when the compile command or the manifest changes
_HEADER_MEMBER = "include/qemu/qemu-plugin.h"
_MAX_HEADER_BYTES = 1 << 20
_QEMU_BINARY = "qemu-system-x86_64"
_QEMU_PACKAGE = "qemu-system-x86"

# header struct (see counter.c): creation fields, plugin-written fields, control, targets, ring head
_H_CREATE = struct.Struct("<QIIIIII QQQQ")
_H_PLUGIN = struct.Struct("<IIII QQ QQQQ")
_H_PLUGIN_OFF = 64
_H_TARGETS_VERSION = 128
_H_TARGETS = 256
_TARGET = struct.Struct("<QQII Q")
_RING_HEAD_SIZE = 64

Progress = Callable[[str], None]


class PluginError(AradiaError):
    """The plugin could not be built or loaded, or its shared file is not what aradia made."""


# ----------------------------------------------------------------------------------------------------
# build


@dataclass(frozen=True)
class QemuBuildInfo:
    """The installed QEMU the plugin must match."""

    version: str  # QEMU's own, e.g. "7.2.22"
    package_version: str  # Debian binary package version, "" if QEMU is not Debian's
    source_package: str
    source_version: str

    @property
    def cache_name(self) -> str:
        """Directory name under ``plugins/`` (no ``,`` or ``:``: the path goes into ``-plugin``)."""
        name = f"{self.version}_{self.package_version}" if self.package_version else self.version
        return re.sub(r"[^A-Za-z0-9.+~_-]", "_", name)


@dataclass(frozen=True)
class PluginCapabilities:
    """What the header of the installed QEMU offers plugins."""

    api_version: int  # QEMU_PLUGIN_VERSION
    insn_inline: bool  # qemu_plugin_register_vcpu_insn_exec_inline (shared counter, no call)
    read_register: bool  # qemu_plugin_read_register (QEMU >= 9)
    read_memory: bool  # qemu_plugin_read_memory_vaddr (QEMU >= 9.2)

    def defines(self) -> list[str]:
        """The ``-D`` flags ``counter.c`` is compiled with."""
        flags = []
        if self.insn_inline:
            flags.append("-DARADIA_HAVE_INSN_INLINE")
        if self.read_register:
            flags.append("-DARADIA_HAVE_READ_REGISTER")
        if self.read_memory:
            flags.append("-DARADIA_HAVE_READ_MEMORY")
        return flags


def header_capabilities(text: str) -> PluginCapabilities:
    """Detect the plugin API version and optional calls from the text of ``qemu-plugin.h``."""
    m = re.search(r"^\s*#\s*define\s+QEMU_PLUGIN_VERSION\s+(\d+)\s*$", text, re.MULTILINE)
    if m is None:
        raise PluginError("qemu-plugin.h defines no QEMU_PLUGIN_VERSION")

    def declares(name: str) -> bool:
        return re.search(rf"\b{name}\s*\(", text) is not None

    return PluginCapabilities(int(m.group(1)),
                              insn_inline=declares("qemu_plugin_register_vcpu_insn_exec_inline"),
                              read_register=declares("qemu_plugin_read_register"),
                              read_memory=declares("qemu_plugin_read_memory_vaddr"))


def _run(cmd: list[str], *, timeout: float, what: str, cwd: Path | None = None) -> str:
    return run_tool(cmd, timeout=timeout, what=what, cwd=cwd, error=PluginError)


def installed_qemu(binary: str = _QEMU_BINARY) -> QemuBuildInfo:
    """Version of the installed ``qemu-system-x86_64`` and of the Debian packages it comes from."""
    out = _run([binary, "--version"], timeout=30, what=f"{binary} --version")
    m = re.search(r"version\s+(\d+\.\d+(?:\.\d+)?)", out)
    if m is None:
        raise PluginError(f"cannot read the QEMU version from {out[:200]!r}")
    debian = re.search(r"\(Debian\s+([^)\s]+)\)", out)
    if debian is None:
        return QemuBuildInfo(m.group(1), "", "", "")
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
        text = Path("/etc/os-release").read_text()
    except OSError as exc:
        raise PluginError(f"cannot read /etc/os-release: {exc}") from exc
    m = re.search(r"^VERSION_CODENAME=\"?([a-z]+)\"?$", text, re.MULTILINE)
    if m is None or "ID=debian" not in text:
        raise PluginError("the host is not a Debian release with a VERSION_CODENAME:"
                          " pass header= to build_plugin")
    return m.group(1)


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
    suite = _host_suite()
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
    digest = hashlib.sha256(f"{_BUILD_FORMAT}\0".encode() + SOURCE.read_bytes()).hexdigest()[:12]
    return f"counter-{digest}.so"


_BUILT: dict[tuple[str, str], Path] = {}


def build_plugin(cache_dir: Path | None = None, *, header: Path | None = None,
                 progress: Progress | None = None) -> Path:
    """Build (or find in the cache) the plugin for the installed QEMU; returns the ``.so`` path.

    ``header`` overrides the download with a ``qemu-plugin.h`` of the installed QEMU's version (for
    a QEMU that is not Debian's). Raises :class:`PluginError` when a tool or the download fails.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    say = progress or (lambda _msg: None)
    info = installed_qemu()
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
    tmp_so = directory / f".{so.name}.{os.getpid()}.tmp"
    say(f"gcc {SOURCE.name} (plugin API {caps.api_version})")
    _run([gcc, "-O2", "-fPIC", "-shared", "-Wall", "-Wextra", "-Werror", "-std=gnu11", f"-I{directory}",
          *caps.defines(), "-o", str(tmp_so), str(SOURCE)], timeout=120, what=f"gcc {SOURCE.name}")
    manifest = {"qemu": asdict(info), "capabilities": asdict(caps), "source_sha256":
                hashlib.sha256(SOURCE.read_bytes()).hexdigest()}
    so.with_suffix(".json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    tmp_so.rename(so)


def plugin_capabilities(so: Path) -> PluginCapabilities:
    """The capabilities a built plugin was compiled with (from the manifest next to it)."""
    try:
        data = json.loads(so.with_suffix(".json").read_text())
        return PluginCapabilities(**data["capabilities"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PluginError(f"{so} has no readable build manifest: {exc}") from exc


def plugin_args(shm_path: Path | str, so: Path | None = None) -> str:
    """The ``-plugin`` value (for ``launch(..., plugins=[...])``) loading the plugin on ``shm_path``."""
    so = so or build_plugin()
    for part in (str(so), str(shm_path)):
        if "," in part:
            raise PluginError(f"{part!r}: a path in -plugin cannot contain ','")
    return f"{so},shm={shm_path}"


# ----------------------------------------------------------------------------------------------------
# the shared file


@dataclass(frozen=True, slots=True)
class Hit:
    """One logged execution of a target."""

    vcpu: int
    target: int  # slot index
    vaddr: int
    time_ns: int  # host CLOCK_MONOTONIC (time.monotonic_ns())


@dataclass
class HitBatch:
    """Logged hits in columns (index i of each list is one hit); iterating yields :class:`Hit`."""

    vcpu: list[int]
    target: list[int]
    vaddr: list[int]
    time_ns: list[int]

    def __len__(self) -> int:
        return len(self.time_ns)

    def __iter__(self) -> Iterator[Hit]:
        return map(Hit, self.vcpu, self.target, self.vaddr, self.time_ns)


@dataclass(frozen=True)
class PluginStatus:
    """What the plugin reports about itself (zeros until QEMU has loaded it)."""

    pid: int
    plugin_api: int
    qemu_api: int
    smp_vcpus: int
    insn_inline: bool
    read_register: bool
    read_memory: bool
    translations: int
    instrumented: int
    stale_hits: int
    bad_vcpu: int


class PluginShm:
    """The shared file between aradia and one QEMU's plugin: targets, counters, hit log.

    Create it before launching QEMU and pass :meth:`plugin_arg` (or :func:`plugin_args`) to
    ``launch(plugins=...)``. One process (the VM's owner) drives it: setting targets and draining
    the log are not meant to race with another :class:`PluginShm` on the same file.
    """

    def __init__(self, path: Path | str | None = None, *, max_vcpus: int = 16,
                 ring_entries: int = 1 << 16) -> None:
        if not 1 <= max_vcpus <= 1024:
            raise PluginError(f"max_vcpus {max_vcpus} is out of range 1..1024")
        if ring_entries < 1 or ring_entries & (ring_entries - 1) or ring_entries > 1 << 24:
            raise PluginError(f"ring_entries {ring_entries} is not a power of two up to 2**24")
        self.path = Path(path) if path is not None else Path(
            f"/dev/shm/aradia-plugin-{os.getpid()}-{secrets.token_hex(4)}")
        self.max_vcpus = max_vcpus
        self.ring_entries = ring_entries
        self.counters_off = _HEADER_SIZE
        self.inline_off = self.counters_off + max_vcpus * MAX_TARGETS * 8
        self.ring_off = self.inline_off + MAX_TARGETS * 64
        self.ring_block = _RING_HEAD_SIZE + ring_entries * _HIT_SIZE
        size = self.ring_off + max_vcpus * self.ring_block
        self.size = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, self.size)
            self._map = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        os.close(fd)
        self._mv = memoryview(self._map)
        _H_CREATE.pack_into(self._map, 0, _MAGIC, _LAYOUT, _HEADER_SIZE, MAX_TARGETS, max_vcpus,
                            ring_entries, 0, self.counters_off, self.inline_off, self.ring_off, self.size)
        self._lock = threading.Lock()
        self._targets: list[tuple[int, int] | None] = [None] * MAX_TARGETS  # (vaddr, flags)
        self._gens = [0] * MAX_TARGETS
        self._base: list[list[int]] = [[0] * max_vcpus for _ in range(MAX_TARGETS)]
        self._inline_base = [0] * MAX_TARGETS
        self._tails = [0] * max_vcpus
        self._lost = 0

    # -- life cycle ---------------------------------------------------------------------------------
    def plugin_arg(self, so: Path | None = None) -> str:
        """The ``-plugin`` value for this file (builds the plugin if needed)."""
        return plugin_args(self.path, so)

    def close(self) -> None:
        """Unmap and remove the file (QEMU keeps its own mapping until it exits)."""
        with contextlib.suppress(Exception):
            self._mv.release()
        with contextlib.suppress(Exception):
            self._map.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> PluginShm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def status(self) -> PluginStatus:
        """The plugin's self-report (pid 0: not loaded yet)."""
        api, qapi, smp, caps, pid, _loaded, trans, instr, stale, bad = _H_PLUGIN.unpack_from(
            self._map, _H_PLUGIN_OFF)
        return PluginStatus(pid, api, qapi, smp, bool(caps & _CAP_INSN_INLINE),
                            bool(caps & _CAP_READ_REGISTER), bool(caps & _CAP_READ_MEMORY),
                            trans, instr, stale, bad)

    @property
    def loaded(self) -> bool:
        """Whether a QEMU has loaded the plugin on this file."""
        return self.status().pid != 0

    # -- targets ------------------------------------------------------------------------------------
    def targets(self) -> list[int | None]:
        """The address in each slot (None: empty)."""
        return [t[0] if t else None for t in self._targets]

    def set_target(self, index: int, vaddr: int | None, *, log: bool = True,
                   inline: bool = False) -> list[int]:
        """Point slot ``index`` at guest-virtual ``vaddr`` (None clears it); its count restarts at 0.

        ``log`` appends every hit to the ring; ``inline`` counts with a counter add compiled into
        the translated code instead of a call (no log, no per-vCPU split; only where the QEMU has
        it, see :attr:`PluginStatus.insn_inline`). Returns the addresses whose translations must be
        redone (:func:`force_retranslation`) before the change is fully in effect.
        """
        if not 0 <= index < MAX_TARGETS:
            raise PluginError(f"target slot {index} is out of range 0..{MAX_TARGETS - 1}")
        if vaddr is not None and not 0 <= vaddr < 1 << 64:
            raise PluginError(f"target address {vaddr:#x} is not a 64-bit address")
        if inline and log:
            raise PluginError("an inline counter cannot log hits: pass log=False")
        if inline and self.loaded and not self.status().insn_inline:
            raise PluginError("this QEMU's plugin API has no shared inline counter")
        flags = _TF_ACTIVE | (_TF_LOG if log else 0) | (_TF_INLINE if inline else 0)
        with self._lock:
            old = self._targets[index]
            new = None if vaddr is None else (vaddr, flags)
            if old == new:
                return []
            off = _H_TARGETS + index * _TARGET.size
            # deactivate, then change address and generation, then activate: a translation racing
            # this sees the slot off or a mismatched generation, both harmless
            struct.pack_into("<I", self._map, off + 16, 0)
            self._gens[index] += 1
            struct.pack_into("<QQ", self._map, off, vaddr or 0, self._gens[index])
            self._base[index] = self._vcpu_counts(index)
            self._inline_base[index] = self._inline_raw(index)
            if new is not None:
                struct.pack_into("<I", self._map, off + 16, flags)
            self._targets[index] = new
            version = struct.unpack_from("<Q", self._map, _H_TARGETS_VERSION)[0]
            struct.pack_into("<Q", self._map, _H_TARGETS_VERSION, version + 1)
        return sorted({t[0] for t in (old, new) if t is not None})

    def set_targets(self, vaddrs: Sequence[int], *, log: bool = True, inline: bool = False) -> list[int]:
        """Slots 0.. get ``vaddrs`` in order, the rest are cleared; returns addresses to re-translate."""
        if len(vaddrs) > MAX_TARGETS:
            raise PluginError(f"{len(vaddrs)} targets: at most {MAX_TARGETS}")
        changed: set[int] = set()
        for i in range(MAX_TARGETS):
            changed.update(self.set_target(i, vaddrs[i] if i < len(vaddrs) else None, log=log, inline=inline))
        return sorted(changed)

    # -- counters -----------------------------------------------------------------------------------
    def _vcpu_counts(self, index: int) -> list[int]:
        first = self.counters_off + index * 8
        stride = MAX_TARGETS * 8
        return [struct.unpack_from("<Q", self._map, first + v * stride)[0] for v in range(self.max_vcpus)]

    def _inline_raw(self, index: int) -> int:
        return int(struct.unpack_from("<Q", self._map, self.inline_off + index * 64)[0])

    def counts(self, index: int) -> list[int]:
        """Per-vCPU hits of slot ``index`` since its target was set (callback counting)."""
        if not 0 <= index < MAX_TARGETS:
            raise PluginError(f"target slot {index} is out of range 0..{MAX_TARGETS - 1}")
        return [max(0, n - b) for n, b in zip(self._vcpu_counts(index), self._base[index], strict=True)]

    def count(self, index: int) -> int:
        """Hits of slot ``index`` since its target was set (callback or inline counter)."""
        target = self._targets[index] if 0 <= index < MAX_TARGETS else None
        # a plugin without inline counters serves an inline target with the callback instead
        if target is not None and target[1] & _TF_INLINE and self.status().insn_inline:
            return self._inline_raw(index) - self._inline_base[index]
        return sum(self.counts(index))

    # -- the hit log --------------------------------------------------------------------------------
    @property
    def lost(self) -> int:
        """Logged hits overwritten before :meth:`drain` read them, since the file was made."""
        return self._lost

    def drain(self) -> HitBatch:
        """The hits logged since the last drain, in host-time order.

        Each vCPU logs into a ring of its own; hits a ring overwrote before they were read are
        counted in :attr:`lost`. The batch is columnar: reading 100 000 hits takes milliseconds,
        :class:`Hit` objects are only made on iteration.
        """
        batch = HitBatch([], [], [], [])
        with self._lock:
            for vcpu in range(self.max_vcpus):
                self._drain_vcpu(vcpu, batch)
        if len(set(batch.vcpu)) > 1:
            order = sorted(range(len(batch)), key=batch.time_ns.__getitem__)
            batch = HitBatch(*([col[i] for i in order] for col in
                               (batch.vcpu, batch.target, batch.vaddr, batch.time_ns)))
        return batch

    def _drain_vcpu(self, vcpu: int, batch: HitBatch) -> None:
        block = self.ring_off + vcpu * self.ring_block
        head = struct.unpack_from("<Q", self._map, block)[0]
        tail = self._tails[vcpu]
        if head == tail:
            return
        if head < tail or head - tail > 1 << 62:
            raise PluginError(f"vCPU {vcpu}'s ring head went backwards ({head} < {tail})")
        if head - tail > self.ring_entries:
            self._lost += head - tail - self.ring_entries
            tail = head - self.ring_entries
        words: list[int] = []
        pos = tail
        while pos < head:  # at most two runs: up to the ring's end, then from its start
            slot = pos % self.ring_entries
            n = min(head - pos, self.ring_entries - slot)
            start = block + _RING_HEAD_SIZE + slot * _HIT_SIZE
            words += self._mv[start:start + n * _HIT_SIZE].cast("Q").tolist()
            pos += n
        # entries the vCPU may have overwritten while we copied them are lost, not read
        head_after = struct.unpack_from("<Q", self._map, block)[0]
        skip = max(0, head_after - self.ring_entries - tail)
        if skip:
            self._lost += min(skip, head - tail)
            words = words[skip * 4:]
        batch.time_ns += words[0::4]
        batch.vaddr += words[1::4]
        batch.target += (x & 0xFFFFFFFF for x in words[2::4])
        batch.vcpu += [vcpu] * (len(words) // 4)
        self._tails[vcpu] = head


def force_retranslation(gdb: GdbClient, vaddrs: Iterable[int]) -> list[int]:
    """Make TCG re-translate the code at ``vaddrs`` by writing back each byte already there.

    Uses the GDB stub (virtual addresses through the current vCPU's page tables: give kernel
    addresses, or user addresses while their process is current). Returns the addresses it could
    not reach (unmapped now); the others are re-instrumented at their next execution.
    """
    missed: list[int] = []
    with gdb.halted():
        for va in sorted(set(vaddrs)):
            try:
                byte = gdb.read_memory(va, 1)
                gdb.write_memory(va, byte)
            except AradiaError:
                missed.append(va)
    return missed


__all__ = ["MAX_TARGETS", "SOURCE", "Hit", "HitBatch", "PluginCapabilities", "PluginError", "PluginShm",
           "PluginStatus", "QemuBuildInfo", "build_plugin", "force_retranslation", "header_capabilities",
           "installed_qemu", "plugin_args", "plugin_capabilities"]
