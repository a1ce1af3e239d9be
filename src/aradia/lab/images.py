"""Real test guests built from Debian packages: a stock cloud kernel plus a small initramfs.

``build_guest("6.1")`` downloads Debian's ``linux-image-*-cloud-amd64`` of that series, busybox, bash
and dropbear (with their shared libraries) through a *private* apt configuration (the host's apt state
is never touched; signatures are checked against the host's Debian archive keyring), compiles the
guest helper programs in ``aradia/guest/`` with ``gcc -static`` and packs an initramfs whose ``/init``
brings up the network and ssh, then prints :data:`READY_MARKER`.

Everything lands in a cache (``$ARADIA_CACHE`` or ``~/.cache/aradia``); a build whose result is
already cached only reads a small manifest. Concurrent builds serialise on a file lock and publish
their results with atomic renames.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aradia.cache
from aradia.cache import cache_lock
from aradia.lab import GuestError
from aradia.lab.debian import PrivateApt, deb_field, run_tool
from aradia.lab.guest_arch import X86_64, GuestArch, guest_arch
from aradia.lab.initramfs import (
    GUEST_IP,
    READY_MARKER,
    ROOT_PASSWORD,
    Rootfs,
    guest_sources,
    init_script,
    populate,
)
from aradia.lab.openssh import PACKAGES as OPENSSH_PACKAGES
from aradia.progress import Progress

# Bump when the layout of a built image changes so stale caches are rebuilt.
_IMAGE_FORMAT = 3
_USERLAND_SUITE = "bookworm"
_USERLAND_PACKAGES = ("busybox-static", "bash", "dropbear-bin")
_USERLAND_FORMAT = 2  # bump when the way the userland closure is chosen changes


@dataclass(frozen=True)
class Variant:
    """What an image variant adds to the default image."""

    packages: tuple[str, ...] = ()  # userland packages (with their library closure)
    modules: tuple[str, ...] = ()  # kernel modules the initramfs loads after the usual ones
    ssh: str = "dropbear"  # the ssh server /init starts: dropbear or openssh


VARIANTS: dict[str, Variant] = {
    "dropbear": Variant(),
    "openssh": Variant(packages=OPENSSH_PACKAGES, ssh="openssh"),  # Debian's sshd (dropbear stays in)
    # a virtio-blk disk (ext4, jbd2, mbcache, crc16 and crc32c are built into Debian's cloud kernels;
    # virtio_blk is a module): the disk itself is made by the test (aradia.lab.disk)
    "disk": Variant(modules=("virtio_blk",)),
}
"""Image variants by name; ``dropbear`` is the default image."""


@dataclass(frozen=True)
class KernelSeries:
    """A Debian kernel series aradia can build a guest for."""

    series: str
    suite: str
    package_re: str  # full match on the package name; group 1 is the ABI/patch number to maximise


SERIES: dict[str, KernelSeries] = {
    "5.10": KernelSeries("5.10", "bullseye", r"linux-image-5\.10\.0-(\d+)-cloud-amd64(?:-unsigned)?"),
    "6.1": KernelSeries("6.1", "bookworm", r"linux-image-6\.1\.0-(\d+)-cloud-amd64(?:-unsigned)?"),
    "6.12": KernelSeries("6.12", "trixie", r"linux-image-6\.12\.(\d+)\+deb13-cloud-amd64(?:-unsigned)?"),
}




@dataclass(frozen=True)
class GuestImage:
    """A bootable guest: a Debian kernel, its modules and the initramfs aradia built for it."""

    series: str
    release: str
    kernel_path: Path
    initrd_path: Path
    modules_dir: Path
    config_path: Path
    package: str
    package_version: str
    userland_versions: dict[str, str]
    root_password: str
    ssh_key: Path | None
    host_key_line: str
    ready_marker: str = READY_MARKER
    ssh_daemon: str = "dropbear"  # the ssh server /init starts: "dropbear" or "openssh" (sshd)
    arch: str = "x86_64"  # the guest's architecture (a key of aradia.lab.guest_arch.GUEST_ARCHES)

    @property
    def vmlinuz(self) -> Path:
        """The compressed kernel image as Debian ships it (the same file QEMU boots)."""
        return self.kernel_path

    @property
    def guest_arch(self) -> GuestArch:
        """The lab's facts about the image's architecture (QEMU binary, machine, console, truth tty)."""
        return guest_arch(self.arch)


def build_guest(
    kernel: str = "6.1", cache_dir: Path | None = None, progress: Progress | None = None,
    variant: str = "dropbear", arch: str = "x86_64",
) -> GuestImage:
    """Build (or reuse from the cache) a guest image for kernel series ``kernel``.

    ``variant`` (a key of :data:`VARIANTS`) picks the ssh server (``dropbear``; ``openssh``: Debian's
    sshd) and extra kernel modules (``disk``: virtio-blk); each variant is cached apart (the default
    image's key is what it always was). ``arch`` (``x86_64`` or ``arm64``) picks Debian's
    ``cloud-amd64`` or ``cloud-arm64`` kernel and that architecture's userland and compiler.
    ``progress``, if given, is called with one short line per slow step. Raises :class:`GuestError`
    when a tool or a download fails.
    """
    if kernel not in SERIES:
        raise GuestError(f"unknown kernel series {kernel!r}; known: {', '.join(SERIES)}")
    if variant not in VARIANTS:
        raise GuestError(f"unknown guest variant {variant!r}; known: {', '.join(VARIANTS)}")
    garch = guest_arch(arch)
    cache = Path(cache_dir) if cache_dir is not None else aradia.cache.cache_dir()
    say = progress or (lambda _msg: None)
    name = kernel if variant == "dropbear" else f"{kernel}-{variant}"
    if garch is not X86_64:
        name += f"-{garch.name}"
    image_dir = cache / "images" / f"{name}-{_image_key(kernel, variant, garch)}"
    cached = _load_image(cache, image_dir)
    if cached is not None:
        return cached
    cache.mkdir(parents=True, exist_ok=True)
    with cache_lock(cache / ".lock"):
        cached = _load_image(cache, image_dir)
        if cached is not None:
            return cached
        builder = _Builder(cache, say)
        kernel_dir = builder.kernel(SERIES[kernel], garch)
        userland_dir = builder.userland(VARIANTS[variant].packages, garch)
        builder.image(kernel, kernel_dir, userland_dir, image_dir, VARIANTS[variant], garch)
    image = _load_image(cache, image_dir)
    if image is None:
        raise GuestError(f"guest image in {image_dir} is incomplete right after building it")
    return image


# ----------------------------------------------------------------------------------------------------
# cache plumbing


def _image_key(series: str, variant: str = "dropbear", arch: GuestArch = X86_64) -> str:
    v = VARIANTS[variant]
    h = hashlib.sha256(f"{_IMAGE_FORMAT}\0{series}\0{_USERLAND_SUITE}\0".encode())
    if arch is not X86_64:  # (x86 keys stay what they were)
        h.update(f"arch\0{arch.name}\0".encode())
    if v.packages:  # (the default image adds nothing: its key stays what it was)
        h.update(f"{variant}\0{' '.join(v.packages)}\0".encode())
    if v.modules:
        h.update(f"variant\0{variant}\0{' '.join(v.modules)}\0".encode())
    h.update(init_script(v.ssh, arch).encode())
    for src in guest_sources():
        h.update(src.name.encode() + b"\0" + src.read_bytes())
    return h.hexdigest()[:12]


def _read_manifest(directory: Path) -> dict | None:
    try:
        data = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_manifest(directory: Path, data: dict) -> None:
    tmp = directory / "manifest.json.tmp"
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.rename(directory / "manifest.json")


def _load_image(cache: Path, image_dir: Path) -> GuestImage | None:
    m = _read_manifest(image_dir)
    if m is None:
        return None
    try:
        kernel_dir = cache / m["kernel_dir"]
        image = GuestImage(
            series=m["series"],
            release=m["release"],
            kernel_path=kernel_dir / m["vmlinuz"],
            initrd_path=image_dir / "initrd.gz",
            modules_dir=kernel_dir / m["modules"],
            config_path=kernel_dir / m["config"],
            package=m["package"],
            package_version=m["package_version"],
            userland_versions=dict(m["userland_versions"]),
            root_password=ROOT_PASSWORD,
            ssh_key=image_dir / "ssh_key" if m["ssh_key"] else None,
            host_key_line=m["host_key_line"],
            ssh_daemon=m.get("ssh_daemon", "dropbear"),
            arch=m.get("arch", "x86_64"),
        )
    except (KeyError, TypeError):
        return None
    needed = [image.kernel_path, image.initrd_path, image.modules_dir]
    if image.ssh_key is not None:
        needed.append(image.ssh_key)
    return image if all(p.exists() for p in needed) else None


def _publish(tmp: Path, final: Path) -> None:
    """Atomically move a finished build directory into place (replacing an incomplete one)."""
    if final.exists():
        stale = final.with_name(final.name + f".stale-{os.getpid()}")
        final.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
    tmp.rename(final)


def _choose_kernel_package(names: list[str], spec: KernelSeries, arch: GuestArch = X86_64) -> str:
    best: tuple[int, int, str] | None = None
    package_re = arch.kernel_package_re(spec.package_re)
    for name in names:
        m = re.fullmatch(package_re, name)
        if not m:
            continue
        # Prefer the signed package over -unsigned for the same ABI: both carry vmlinuz + modules.
        key = (int(m.group(1)), 0 if name.endswith("-unsigned") else 1, name)
        if best is None or key > best:
            best = key
    if best is None:
        raise GuestError(f"no cloud-{arch.debian} kernel package of series {spec.series} "
                         f"in Debian {spec.suite}")
    return best[2]


# ----------------------------------------------------------------------------------------------------
# the build steps


class _Builder:
    """The slow path of :func:`build_guest`; always runs under the cache lock."""

    def __init__(self, cache: Path, say: Progress) -> None:
        self.cache = cache
        self.say = say
        self._apts: dict[tuple[str, str], PrivateApt] = {}

    def apt(self, suite: str, arch: GuestArch = X86_64) -> PrivateApt:
        if (suite, arch.debian) not in self._apts:
            # each architecture has its own lists (amd64 keeps the directory it always had)
            root = self.cache / "apt" / (suite if arch is X86_64 else f"{suite}-{arch.debian}")
            apt = PrivateApt(root, suite, arch=arch.debian)
            self.say(f"apt-get update (Debian {suite} {arch.debian}, private lists)")
            apt.update()
            self._apts[suite, arch.debian] = apt
        return self._apts[suite, arch.debian]

    @contextlib.contextmanager
    def _staged(self, name: str, final: Path) -> Iterator[Path]:
        """A fresh build directory; moved into place as ``final`` if the block succeeds, removed if not."""
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-tmp-", dir=self.cache))
        tmp.chmod(0o755)
        try:
            yield tmp
            final.parent.mkdir(parents=True, exist_ok=True)
            _publish(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def kernel(self, spec: KernelSeries, arch: GuestArch = X86_64) -> Path:
        final = self.cache / "kernels" / (spec.series if arch is X86_64 else f"{spec.series}-{arch.name}")
        if _read_manifest(final) is not None:
            return final
        apt = self.apt(spec.suite, arch)
        package = _choose_kernel_package(apt.pkgnames("linux-image-"), spec, arch)
        self.say(f"downloading {package} (Debian {spec.suite})")
        (deb,) = apt.download([package], self.cache / "debs")
        with self._staged("kernel", final) as tmp:
            root = tmp / "root"
            run_tool(["dpkg-deb", "-x", str(deb), str(root)], timeout=300, what=f"dpkg-deb -x {deb.name}")
            module_dirs = [d for base in ("lib/modules", "usr/lib/modules") if (root / base).is_dir()
                           for d in (root / base).iterdir() if d.is_dir()]
            if len(module_dirs) != 1:
                raise GuestError(f"{deb.name}: expected one modules directory, found {module_dirs}")
            release = module_dirs[0].name
            vmlinuz = root / "boot" / f"vmlinuz-{release}"
            config = root / "boot" / f"config-{release}"
            if not vmlinuz.is_file():
                raise GuestError(f"{deb.name} carries no boot/vmlinuz-{release}")
            shutil.rmtree(root / "usr" / "share", ignore_errors=True)
            _write_manifest(tmp, {
                "package": package,
                "version": deb_field(deb, "Version"),
                "release": release,
                "vmlinuz": str(vmlinuz.relative_to(tmp)),
                "config": str(config.relative_to(tmp)),
                "modules": str(module_dirs[0].relative_to(tmp)),
                "arch": arch.name,
            })
        return final

    def userland(self, extra: tuple[str, ...] = (), arch: GuestArch = X86_64) -> Path:
        wanted = (*_USERLAND_PACKAGES, *extra)
        key_text = f"{_USERLAND_FORMAT}\0{' '.join(wanted)}" + ("" if arch is X86_64 else f"\0{arch.debian}")
        key = hashlib.sha256(key_text.encode()).hexdigest()[:8]
        name = _USERLAND_SUITE if arch is X86_64 else f"{_USERLAND_SUITE}-{arch.debian}"
        final = self.cache / "userland" / f"{name}-{key}"
        if _read_manifest(final) is not None:
            return final
        apt = self.apt(_USERLAND_SUITE, arch)
        packages = apt.library_closure(wanted)
        self.say(f"downloading {', '.join(packages)} (Debian {_USERLAND_SUITE})")
        debs = apt.download(packages, self.cache / "debs")
        with self._staged("userland", final) as tmp:
            versions = {}
            for pkg, deb in zip(packages, debs, strict=True):
                run_tool(["dpkg-deb", "-x", str(deb), str(tmp / "root")], timeout=300,
                         what=f"dpkg-deb -x {deb.name}")
                versions[pkg] = deb_field(deb, "Version")
            _write_manifest(tmp, {"suite": _USERLAND_SUITE, "arch": arch.debian, "versions": versions})
        return final

    def image(self, series: str, kernel_dir: Path, userland_dir: Path, final: Path,
              variant: Variant = Variant(), arch: GuestArch = X86_64) -> None:
        kman = _read_manifest(kernel_dir)
        uman = _read_manifest(userland_dir)
        assert kman is not None and uman is not None
        self.say(f"packing initramfs for {kman['release']}")
        with self._staged("image", final) as tmp:
            ssh_key = _make_client_key(tmp / "ssh_key")
            rootfs = Rootfs(userland_dir / "root", arch.multiarch)
            # the host runs the x86-64 userland's dropbearkey for a guest of another architecture
            host = None if arch is X86_64 else Rootfs(self.userland() / "root")
            host_key_line = populate(rootfs, kernel_dir / kman["modules"], tmp, ssh_key, variant.ssh,
                                     variant.modules, arch, host)
            (tmp / "initrd.gz").write_bytes(gzip.compress(rootfs.cpio(), compresslevel=6, mtime=0))
            _write_manifest(tmp, {
                "series": series,
                "release": kman["release"],
                "kernel_dir": str(kernel_dir.relative_to(self.cache)),
                "vmlinuz": kman["vmlinuz"],
                "config": kman["config"],
                "modules": kman["modules"],
                "package": kman["package"],
                "package_version": kman["version"],
                "userland_versions": uman["versions"],
                "ssh_key": ssh_key is not None,
                "host_key_line": host_key_line,
                "ssh_daemon": variant.ssh,
                "arch": arch.name,
            })


def _make_client_key(path: Path) -> Path | None:
    """An ed25519 key for the tests' ssh client (None when the host has no ssh-keygen)."""
    if shutil.which("ssh-keygen") is None:
        return None
    run_tool(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "aradia-test", "-f", str(path)],
         timeout=60, what="ssh-keygen")
    return path


def _main(argv: list[str]) -> int:
    """``python -m aradia.lab.images [--arch ARCH] [SERIES[:VARIANT]...]``: build (or find cached) guest
    images (``--arch arm64``: Debian's arm64 kernels and userland; default x86_64)."""
    import sys
    import time

    arch = "x86_64"
    if argv[:1] == ["--arch"] and len(argv) > 1:
        arch, argv = argv[1], argv[2:]
    for name in argv or ["6.1"]:
        series, _, variant = name.partition(":")
        started = time.monotonic()
        try:
            image = build_guest(series, variant=variant or "dropbear", arch=arch,
                                progress=lambda msg: print(f"  {msg}", file=sys.stderr, flush=True))
        except GuestError as exc:
            print(f"aradia: building the {series} guest failed: {exc}", file=sys.stderr)
            return 2
        print(f"{series}: {image.release} ({image.package} {image.package_version})"
              f" in {time.monotonic() - started:.1f}s -> {image.initrd_path}")
    return 0


__all__ = ["GUEST_IP", "READY_MARKER", "ROOT_PASSWORD", "SERIES", "VARIANTS", "GuestImage", "KernelSeries",
           "build_guest"]


if __name__ == "__main__":
    import sys

    raise SystemExit(_main(sys.argv[1:]))
