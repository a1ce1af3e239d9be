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
import lzma
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile

import aradia.cache
from aradia.cache import cache_lock
from aradia.lab import GuestError
from aradia.lab.debian import PrivateApt, deb_field, run_tool
from aradia.progress import Progress

ROOT_PASSWORD = "aradia-root"
"""The guest's root password (ssh password logins and the console use it)."""

# SHA-512 crypt of ROOT_PASSWORD (openssl passwd -6 -salt aradiasalt); a constant so building needs
# no crypt implementation on the host.
_ROOT_HASH = (
    "$6$aradiasalt$MtO3/riYLRbo89oR1MG1FElJHv/iv5LavDUZqy.q5eVcWDtlL3gMs8Escu4JAFzGd8zARNFay93KDx6o1ffme/"
)

READY_MARKER = "ARADIA-GUEST-READY"
"""Printed by the guest's /init (console and ttyS1) once network and sshd are up."""

GUEST_IP = "10.0.2.15"

# Bump when the layout of a built image changes so stale caches are rebuilt.
_IMAGE_FORMAT = 3
_USERLAND_SUITE = "bookworm"
_USERLAND_PACKAGES = ("busybox-static", "bash", "dropbear-bin")
_USERLAND_FORMAT = 2  # bump when the way the userland closure is chosen changes
_GUEST_PROGRAMS_DIR = Path(__file__).resolve().parent.parent / "guest"
_MULTIARCH = "x86_64-linux-gnu"

# Modules wanted in the guest, in load order; names resolve to files through each .ko's modinfo
# `depends=`. Optional ones are skipped when the kernel has neither the module nor a built-in.
_WANTED_MODULES: tuple[tuple[str, bool], ...] = (
    ("virtio_pci", True),
    ("virtio_net", True),
    ("virtio_rng", False),
    ("qemu_fw_cfg", False),
)


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

    @property
    def vmlinuz(self) -> Path:
        """The compressed kernel image as Debian ships it (the same file QEMU boots)."""
        return self.kernel_path


def build_guest(
    kernel: str = "6.1", cache_dir: Path | None = None, progress: Progress | None = None
) -> GuestImage:
    """Build (or reuse from the cache) a guest image for kernel series ``kernel``.

    ``progress``, if given, is called with one short line per slow step. Raises :class:`GuestError`
    when a tool or a download fails.
    """
    if kernel not in SERIES:
        raise GuestError(f"unknown kernel series {kernel!r}; known: {', '.join(SERIES)}")
    cache = Path(cache_dir) if cache_dir is not None else aradia.cache.cache_dir()
    say = progress or (lambda _msg: None)
    image_dir = cache / "images" / f"{kernel}-{_image_key(kernel)}"
    cached = _load_image(cache, image_dir)
    if cached is not None:
        return cached
    cache.mkdir(parents=True, exist_ok=True)
    with cache_lock(cache / ".lock"):
        cached = _load_image(cache, image_dir)
        if cached is not None:
            return cached
        builder = _Builder(cache, say)
        kernel_dir = builder.kernel(SERIES[kernel])
        userland_dir = builder.userland()
        builder.image(kernel, kernel_dir, userland_dir, image_dir)
    image = _load_image(cache, image_dir)
    if image is None:
        raise GuestError(f"guest image in {image_dir} is incomplete right after building it")
    return image


# ----------------------------------------------------------------------------------------------------
# cache plumbing


def _guest_sources() -> list[Path]:
    return sorted(_GUEST_PROGRAMS_DIR.glob("*.c"))


def _image_key(series: str) -> str:
    h = hashlib.sha256(f"{_IMAGE_FORMAT}\0{series}\0{_USERLAND_SUITE}\0".encode())
    h.update(_INIT_SCRIPT.encode())
    for src in _guest_sources():
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


def _choose_kernel_package(names: list[str], spec: KernelSeries) -> str:
    best: tuple[int, int, str] | None = None
    for name in names:
        m = re.fullmatch(spec.package_re, name)
        if not m:
            continue
        # Prefer the signed package over -unsigned for the same ABI: both carry vmlinuz + modules.
        key = (int(m.group(1)), 0 if name.endswith("-unsigned") else 1, name)
        if best is None or key > best:
            best = key
    if best is None:
        raise GuestError(f"no cloud-amd64 kernel package of series {spec.series} in Debian {spec.suite}")
    return best[2]


# ----------------------------------------------------------------------------------------------------
# the build steps


class _Builder:
    """The slow path of :func:`build_guest`; always runs under the cache lock."""

    def __init__(self, cache: Path, say: Progress) -> None:
        self.cache = cache
        self.say = say
        self._apts: dict[str, PrivateApt] = {}

    def apt(self, suite: str) -> PrivateApt:
        if suite not in self._apts:
            apt = PrivateApt(self.cache / "apt" / suite, suite)
            self.say(f"apt-get update (Debian {suite}, private lists)")
            apt.update()
            self._apts[suite] = apt
        return self._apts[suite]

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

    def kernel(self, spec: KernelSeries) -> Path:
        final = self.cache / "kernels" / spec.series
        if _read_manifest(final) is not None:
            return final
        apt = self.apt(spec.suite)
        package = _choose_kernel_package(apt.pkgnames("linux-image-"), spec)
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
            })
        return final

    def userland(self) -> Path:
        key = hashlib.sha256(f"{_USERLAND_FORMAT}\0{' '.join(_USERLAND_PACKAGES)}".encode()).hexdigest()[:8]
        final = self.cache / "userland" / f"{_USERLAND_SUITE}-{key}"
        if _read_manifest(final) is not None:
            return final
        apt = self.apt(_USERLAND_SUITE)
        packages = apt.library_closure(_USERLAND_PACKAGES)
        self.say(f"downloading {', '.join(packages)} (Debian {_USERLAND_SUITE})")
        debs = apt.download(packages, self.cache / "debs")
        with self._staged("userland", final) as tmp:
            versions = {}
            for pkg, deb in zip(packages, debs, strict=True):
                run_tool(["dpkg-deb", "-x", str(deb), str(tmp / "root")], timeout=300,
                         what=f"dpkg-deb -x {deb.name}")
                versions[pkg] = deb_field(deb, "Version")
            _write_manifest(tmp, {"suite": _USERLAND_SUITE, "versions": versions})
        return final

    def image(self, series: str, kernel_dir: Path, userland_dir: Path, final: Path) -> None:
        kman = _read_manifest(kernel_dir)
        uman = _read_manifest(userland_dir)
        assert kman is not None and uman is not None
        self.say(f"packing initramfs for {kman['release']}")
        with self._staged("image", final) as tmp:
            ssh_key = _make_client_key(tmp / "ssh_key")
            rootfs = _Rootfs(userland_dir / "root")
            host_key_line = _populate(rootfs, kernel_dir / kman["modules"], tmp, ssh_key)
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
            })


def _make_client_key(path: Path) -> Path | None:
    """An ed25519 key for the tests' ssh client (None when the host has no ssh-keygen)."""
    if shutil.which("ssh-keygen") is None:
        return None
    run_tool(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "aradia-test", "-f", str(path)],
         timeout=60, what="ssh-keygen")
    return path


# ----------------------------------------------------------------------------------------------------
# the initramfs


class _Rootfs:
    """The initramfs being assembled: paths -> (mode, data or symlink target or device number)."""

    def __init__(self, userland: Path) -> None:
        self.userland = userland
        self.entries: dict[str, tuple[int, bytes, int]] = {}  # path -> (mode, data, rdev)

    def dir(self, path: str, perm: int = 0o755) -> None:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):
            p = "/".join(parts[:i])
            if p not in self.entries:
                self.entries[p] = (stat.S_IFDIR | 0o755, b"", 0)
        self.entries["/".join(parts)] = (stat.S_IFDIR | perm, b"", 0)

    def file(self, path: str, data: bytes, perm: int = 0o644) -> None:
        path = path.strip("/")
        self.dir(os.path.dirname(path) or ".")
        self.entries[path] = (stat.S_IFREG | perm, data, 0)

    def symlink(self, path: str, target: str) -> None:
        path = path.strip("/")
        self.dir(os.path.dirname(path) or ".")
        self.entries[path] = (stat.S_IFLNK | 0o777, target.encode(), 0)

    def chardev(self, path: str, major: int, minor: int, perm: int = 0o600) -> None:
        path = path.strip("/")
        self.dir(os.path.dirname(path))
        self.entries[path] = (stat.S_IFCHR | perm, b"", os.makedev(major, minor))

    def resolve(self, path: str) -> Path:
        """A path inside the userland tree, following symlinks (absolute ones stay inside the tree)."""
        rel = path.strip("/")
        for _hop in range(40):
            parts = rel.split("/")
            for i in range(1, len(parts) + 1):
                cur = self.userland.joinpath(*parts[:i])
                if cur.is_symlink():
                    target = os.readlink(cur)
                    base = "" if target.startswith("/") else "/".join(parts[: i - 1])
                    rel = os.path.normpath(os.path.join(base, target.lstrip("/"), *parts[i:])).lstrip("/")
                    break
            else:
                return self.userland / rel
        raise GuestError(f"symlink loop resolving {path} in the guest userland")

    def add_program(self, dest: str, candidates: Iterable[str]) -> None:
        """Copy a userland binary to ``dest`` together with its shared-library closure."""
        src = next((self.resolve(c) for c in candidates if self.resolve(c).is_file()), None)
        if src is None:
            raise GuestError(f"guest userland lacks {dest} (looked for {', '.join(candidates)})")
        self.file(dest, src.read_bytes(), 0o755)
        self._add_libraries(src)

    def _add_libraries(self, binary: Path) -> None:
        todo = [binary]
        done: set[str] = set()
        while todo:
            interp, needed = _elf_deps(todo.pop())
            if interp and interp not in self.entries:
                self.file(interp, self.resolve(interp).read_bytes(), 0o755)
            for lib in needed:
                if lib in done:
                    continue
                done.add(lib)
                for libdir in (f"lib/{_MULTIARCH}", f"usr/lib/{_MULTIARCH}", "lib", "usr/lib"):
                    path = self.resolve(f"{libdir}/{lib}")
                    if path.is_file():
                        self.file(f"lib/{_MULTIARCH}/{lib}", path.read_bytes(), 0o755)
                        todo.append(path)
                        break
                else:
                    raise GuestError(f"shared library {lib} (needed by {binary.name}) is not in the userland")

    def cpio(self) -> bytes:
        """The newc-format archive of all entries (directories before their contents)."""
        out = bytearray()
        paths = sorted(self.entries, key=lambda p: (p.count("/"), p) if p != "." else (-1, p))
        for ino, path in enumerate(paths, 1):
            mode, data, rdev = self.entries[path]
            out += _cpio_entry(path, mode, data, ino, rdev)
        out += _cpio_entry("TRAILER!!!", 0, b"", 0, 0)
        return bytes(out)


def _cpio_entry(name: str, mode: int, data: bytes, ino: int, rdev: int) -> bytes:
    nlink = 2 if stat.S_ISDIR(mode) else 1
    encoded = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, os.major(rdev), os.minor(rdev), len(encoded), 0)
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    blob = header + encoded
    blob += b"\0" * (-len(blob) % 4)
    blob += data + b"\0" * (-len(data) % 4)
    return blob


def _elf_deps(path: Path) -> tuple[str | None, list[str]]:
    """PT_INTERP and DT_NEEDED of an ELF file."""
    try:
        with open(path, "rb") as fh:
            elf = ELFFile(fh)
            interp = None
            for seg in elf.iter_segments():
                if seg["p_type"] == "PT_INTERP":
                    interp = seg.get_interp_name()
            needed = [tag.needed for sec in elf.iter_sections() if isinstance(sec, DynamicSection)
                      for tag in sec.iter_tags() if tag.entry.d_tag == "DT_NEEDED"]
    except (OSError, ELFError) as exc:
        raise GuestError(f"cannot read ELF {path}: {exc}") from exc
    return interp, needed


def _module_files(modules_dir: Path) -> tuple[dict[str, Path], set[str]]:
    """Module name -> file, and the set of built-in module names, of one kernel."""
    files: dict[str, Path] = {}
    for path in (modules_dir / "kernel").rglob("*.ko*"):
        name = path.name.split(".ko")[0].replace("-", "_")
        files[name] = path
    builtin: set[str] = set()
    with contextlib.suppress(OSError):
        for line in (modules_dir / "modules.builtin").read_text().splitlines():
            builtin.add(os.path.basename(line).split(".ko")[0].replace("-", "_"))
    return files, builtin


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    return data


def _modinfo_depends(ko: bytes, name: str) -> list[str]:
    import io

    try:
        elf = ELFFile(io.BytesIO(ko))
        sec = elf.get_section_by_name(".modinfo")
    except ELFError as exc:
        raise GuestError(f"kernel module {name} is not a valid ELF file: {exc}") from exc
    if sec is None:
        return []
    for item in sec.data().split(b"\0"):
        if item.startswith(b"depends="):
            return [d.replace("-", "_") for d in item[8:].decode().split(",") if d]
    return []


def _module_load_order(modules_dir: Path) -> list[tuple[str, bytes]]:
    """The wanted modules and their dependencies, dependencies first, decompressed."""
    files, builtin = _module_files(modules_dir)
    order: list[tuple[str, bytes]] = []
    placed: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in placed or name in builtin:
            return
        if name in chain or len(chain) > 32:
            raise GuestError(f"kernel module dependency cycle: {' -> '.join((*chain, name))}")
        if name not in files:
            raise GuestError(f"kernel module {name} is neither built in nor shipped in {modules_dir}")
        ko = _module_bytes(files[name])
        for dep in _modinfo_depends(ko, name):
            visit(dep, (*chain, name))
        placed.add(name)
        order.append((name, ko))

    for name, required in _WANTED_MODULES:
        if name in files or name in builtin or required:
            visit(name, ())
    return order


def _compile_guest_programs(out_dir: Path) -> dict[str, bytes]:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise GuestError("gcc is not installed (needed to build the guest helper programs)")
    programs = {}
    for src in _guest_sources():
        exe = out_dir / src.stem
        run_tool([gcc, "-static", "-O2", "-s", "-Wall", "-o", str(exe), str(src)], timeout=300,
             what=f"gcc -static {src.name} (needs libc6-dev)")
        programs[src.stem] = exe.read_bytes()
    return programs


def _dropbear_host_key(rootfs: _Rootfs, out: Path) -> str:
    """Generate an ed25519 host key with the guest's own dropbearkey, run through the guest's ld.so."""
    ld = rootfs.resolve("lib64/ld-linux-x86-64.so.2")
    keygen = rootfs.resolve("usr/bin/dropbearkey")
    libpath = ":".join(str(rootfs.userland / d) for d in (f"lib/{_MULTIARCH}", f"usr/lib/{_MULTIARCH}"))
    base = [str(ld), "--library-path", libpath, str(keygen)]
    run_tool([*base, "-t", "ed25519", "-f", str(out)], timeout=120, what="dropbearkey")
    pub = run_tool([*base, "-y", "-f", str(out)], timeout=60, what="dropbearkey -y")
    line = next((ln for ln in pub.splitlines() if ln.startswith("ssh-ed25519 ")), None)
    if line is None:
        raise GuestError(f"dropbearkey -y printed no public key: {pub[-500:]}")
    return " ".join(line.split()[:2])


def _populate(rootfs: _Rootfs, modules_dir: Path, work: Path, ssh_key: Path | None) -> str:
    """Fill the initramfs; returns the ssh host public key line."""
    for d in ("proc", "sys", "dev", "run", "var/log", "usr/bin", "usr/sbin", "sbin", "etc/dropbear"):
        rootfs.dir(d)
    rootfs.dir("root", 0o700)
    rootfs.dir("tmp", 0o1777)
    rootfs.chardev("dev/console", 5, 1)
    rootfs.chardev("dev/null", 1, 3, 0o666)
    rootfs.add_program("bin/busybox", ["bin/busybox", "usr/bin/busybox"])
    rootfs.symlink("bin/sh", "busybox")
    rootfs.add_program("bin/bash", ["bin/bash", "usr/bin/bash"])
    rootfs.add_program("usr/sbin/dropbear", ["usr/sbin/dropbear", "sbin/dropbear"])
    rootfs.add_program("usr/bin/dropbearkey", ["usr/bin/dropbearkey"])
    rootfs.file("init", _INIT_SCRIPT.encode(), 0o755)
    rootfs.file("etc/passwd", b"root:x:0:0:root:/root:/bin/bash\n")
    rootfs.file("etc/group", b"root:x:0:\ntty:x:5:\n")
    rootfs.file("etc/shadow", f"root:{_ROOT_HASH}:19000:0:99999:7:::\n".encode(), 0o600)
    rootfs.file("etc/shells", b"/bin/sh\n/bin/bash\n")
    rootfs.file("etc/hostname", b"aradia-guest\n")
    rootfs.file("etc/profile", b"export PATH=/usr/sbin:/usr/bin:/sbin:/bin\n")
    rootfs.file("root/.bashrc", b"export PATH=/usr/sbin:/usr/bin:/sbin:/bin\n")
    key_file = work / "dropbear_ed25519_host_key"
    host_key_line = _dropbear_host_key(rootfs, key_file)
    rootfs.file("etc/dropbear/dropbear_ed25519_host_key", key_file.read_bytes(), 0o600)
    key_file.unlink()
    if ssh_key is not None:
        rootfs.dir("root/.ssh", 0o700)
        rootfs.file("root/.ssh/authorized_keys", ssh_key.with_suffix(".pub").read_bytes(), 0o600)
    names = []
    for name, ko in _module_load_order(modules_dir):
        rootfs.file(f"lib/modules/aradia/{name}.ko", ko)
        names.append(name)
    rootfs.file("etc/aradia-modules", ("\n".join(names) + "\n").encode())
    build = work / "programs"
    build.mkdir()
    for name, data in _compile_guest_programs(build).items():
        rootfs.file(f"usr/bin/{name}", data, 0o755)
    shutil.rmtree(build)
    return host_key_line


_INIT_SCRIPT = r"""#!/bin/busybox sh
# aradia test guest init: mounts, modules, network, sshd, ground-truth serial, console shell.
/bin/busybox --install -s
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=linux
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs tmpfs /run
hostname aradia-guest
for m in $(cat /etc/aradia-modules); do
    insmod /lib/modules/aradia/$m.ko || echo "aradia-init: insmod $m failed"
done
ip link set lo up
n=0
while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 20 ]; do sleep 0.1; n=$((n+1)); done
if [ -e /sys/class/net/eth0 ]; then
    ip addr add 10.0.2.15/24 dev eth0
    ip link set eth0 up
    ip route add default via 10.0.2.2
fi
dropbear -r /etc/dropbear/dropbear_ed25519_host_key -p 22 -P /run/dropbear.pid
if [ -e /dev/ttyS1 ]; then
    stty -F /dev/ttyS1 115200 raw -echo
    # keep ttyS1 open so its raw settings stick for every later writer
    exec 9>/dev/ttyS1
    echo "ARADIA-GUEST-READY $(uname -r)" >&9
fi
echo "ARADIA-GUEST-READY $(uname -r)"
while :; do
    setsid cttyhack /bin/bash --noediting -i
    sleep 1
done
"""


def _main(argv: list[str]) -> int:
    """``python -m aradia.lab.images [SERIES...]``: build (or find cached) guest images."""
    import sys
    import time

    for series in argv or ["6.1"]:
        started = time.monotonic()
        try:
            image = build_guest(series, progress=lambda msg: print(f"  {msg}", file=sys.stderr, flush=True))
        except GuestError as exc:
            print(f"aradia: building the {series} guest failed: {exc}", file=sys.stderr)
            return 2
        print(f"{series}: {image.release} ({image.package} {image.package_version})"
              f" in {time.monotonic() - started:.1f}s -> {image.initrd_path}")
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(_main(sys.argv[1:]))
