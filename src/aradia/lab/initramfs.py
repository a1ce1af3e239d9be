"""The test guests' initramfs: a small userland, the kernel's modules, aradia's helper programs, /init.

:class:`Rootfs` assembles the tree in memory and packs it as a newc cpio archive. :func:`populate`
fills it: busybox, bash and dropbear from Debian's packages with their shared-library closure, an ssh
host key made by the guest's own ``dropbearkey``, the virtio modules the kernel needs in dependency
order (decompressed; names resolved through each ``.ko``'s modinfo ``depends=``), the helper programs
in ``aradia/guest/`` compiled with ``gcc -static``, and :data:`INIT_SCRIPT`, which brings up the
network and sshd and prints :data:`READY_MARKER` on the console and ttyS1.
"""

from __future__ import annotations

import contextlib
import gzip
import lzma
import os
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile

from aradia.lab import GuestError
from aradia.lab.debian import run_tool
from aradia.lab.guest_arch import X86_64, GuestArch

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
"""The guest's address on QEMU's user-mode network (``/init`` sets it on eth0)."""

GUEST_PROGRAMS_DIR = Path(__file__).resolve().parent.parent / "guest"
"""The C sources of the helper programs every guest gets in ``/usr/bin``."""

# Modules wanted in the guest, in load order; names resolve to files through each .ko's modinfo
# `depends=`. Optional ones are skipped when the kernel has neither the module nor a built-in.
_WANTED_MODULES: tuple[tuple[str, bool], ...] = (
    ("virtio_pci", True),
    ("virtio_net", True),
    ("virtio_rng", False),
    ("qemu_fw_cfg", False),
)


def guest_sources() -> list[Path]:
    """The helper programs' C sources (their text is part of an image's cache key)."""
    return sorted(GUEST_PROGRAMS_DIR.glob("*.c"))


class Rootfs:
    """The initramfs being assembled: paths -> (mode, data or symlink target or device number)."""

    def __init__(self, userland: Path, multiarch: str = X86_64.multiarch) -> None:
        """``userland`` is the unpacked packages' tree; ``multiarch`` the triplet of its library dirs."""
        self.userland = userland
        self.multiarch = multiarch
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
                for libdir in (f"lib/{self.multiarch}", f"usr/lib/{self.multiarch}", "lib", "usr/lib"):
                    path = self.resolve(f"{libdir}/{lib}")
                    if path.is_file():
                        self.file(f"lib/{self.multiarch}/{lib}", path.read_bytes(), 0o755)
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


def _module_load_order(modules_dir: Path, extra: tuple[str, ...] = ()) -> list[tuple[str, bytes]]:
    """The wanted modules (and ``extra``, required) with their dependencies, dependencies first,
    decompressed."""
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

    for name, required in (*_WANTED_MODULES, *((m, True) for m in extra)):
        if name in files or name in builtin or required:
            visit(name, ())
    return order


def _compile_guest_programs(out_dir: Path, arch: GuestArch = X86_64) -> dict[str, bytes]:
    gcc = shutil.which(arch.gcc) or (shutil.which("cc") if arch is X86_64 else None)
    if gcc is None:
        raise GuestError(f"{arch.gcc} is not installed (needed to build the guest helper programs; "
                         f"Debian: {arch.gcc_package})")
    programs = {}
    for src in guest_sources():
        exe = out_dir / src.stem
        run_tool([gcc, "-static", "-O2", "-s", "-Wall", "-o", str(exe), str(src)], timeout=300,
             what=f"{arch.gcc} -static {src.name} (needs {arch.gcc_package})")
        programs[src.stem] = exe.read_bytes()
    return programs


def _dropbear_host_key(rootfs: Rootfs, out: Path) -> str:
    """Generate an ed25519 host key with ``rootfs``'s dropbearkey, run through its ld.so (so ``rootfs``
    must be of the host's architecture; the key file's format is the same on every architecture)."""
    ld = rootfs.resolve(X86_64.ld_so)
    keygen = rootfs.resolve("usr/bin/dropbearkey")
    libdirs = (f"lib/{rootfs.multiarch}", f"usr/lib/{rootfs.multiarch}")
    libpath = ":".join(str(rootfs.userland / d) for d in libdirs)
    base = [str(ld), "--library-path", libpath, str(keygen)]
    run_tool([*base, "-t", "ed25519", "-f", str(out)], timeout=120, what="dropbearkey")
    pub = run_tool([*base, "-y", "-f", str(out)], timeout=60, what="dropbearkey -y")
    line = next((ln for ln in pub.splitlines() if ln.startswith("ssh-ed25519 ")), None)
    if line is None:
        raise GuestError(f"dropbearkey -y printed no public key: {pub[-500:]}")
    return " ".join(line.split()[:2])


DROPBEAR_START = "dropbear -r /etc/dropbear/dropbear_ed25519_host_key -p 22 -P /run/dropbear.pid"


def init_script(daemon: str = "dropbear", arch: GuestArch = X86_64) -> str:
    """``/init`` starting ``daemon`` (``dropbear``, or ``openssh``'s sshd) as the guest's ssh server and
    writing ground truth to ``arch``'s truth device (x86: ``/dev/ttyS1``, the script as it always was)."""
    script = INIT_SCRIPT
    if daemon != "dropbear":
        from aradia.lab.openssh import START

        script = script.replace(DROPBEAR_START, START)
    if arch.truth_tty != "/dev/ttyS1":
        # a virtio console appears a moment after its module is loaded: wait for it as for eth0
        tty = arch.truth_tty
        wait = f"n=0\nwhile [ ! -e {tty} ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n+1)); done\n"
        script = script.replace("if [ -e /dev/ttyS1 ]; then", f"{wait}if [ -e {tty} ]; then")
        # A virtio console has no line speed (stty would refuse the whole request, raw included), and
        # hvc resets its settings when the last file closes: open it first, then make it raw.
        script = script.replace("    stty -F /dev/ttyS1 115200 raw -echo\n", "")
        script = script.replace("    exec 9>/dev/ttyS1\n", f"    exec 9>{tty}\n    stty -F {tty} raw -echo\n")
        script = script.replace("/dev/ttyS1", tty)
    return script


def populate(rootfs: Rootfs, modules_dir: Path, work: Path, ssh_key: Path | None,
             daemon: str = "dropbear", extra_modules: tuple[str, ...] = (), arch: GuestArch = X86_64,
             host_userland: Rootfs | None = None) -> str:
    """Fill the initramfs (the ssh server ``daemon``: ``dropbear`` or ``openssh``; ``extra_modules``
    loaded after the usual ones; programs for ``arch``); returns the ssh host public key line.

    ``host_userland`` (the x86-64 userland) runs dropbearkey when ``rootfs`` is of another
    architecture than the host's."""
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
    rootfs.file("init", init_script(daemon, arch).encode(), 0o755)
    rootfs.file("etc/passwd", b"root:x:0:0:root:/root:/bin/bash\n")
    rootfs.file("etc/group", b"root:x:0:\ntty:x:5:\n")
    rootfs.file("etc/shadow", f"root:{_ROOT_HASH}:19000:0:99999:7:::\n".encode(), 0o600)
    rootfs.file("etc/shells", b"/bin/sh\n/bin/bash\n")
    rootfs.file("etc/hostname", b"aradia-guest\n")
    rootfs.file("etc/profile", b"export PATH=/usr/sbin:/usr/bin:/sbin:/bin\n")
    rootfs.file("root/.bashrc", b"export PATH=/usr/sbin:/usr/bin:/sbin:/bin\n")
    key_file = work / "dropbear_ed25519_host_key"
    host_key_line = _dropbear_host_key(host_userland or rootfs, key_file)
    rootfs.file("etc/dropbear/dropbear_ed25519_host_key", key_file.read_bytes(), 0o600)
    key_file.unlink()
    if daemon == "openssh":
        from aradia.lab.openssh import add_openssh

        host_key_line = add_openssh(rootfs, work)
    if ssh_key is not None:
        rootfs.dir("root/.ssh", 0o700)
        rootfs.file("root/.ssh/authorized_keys", ssh_key.with_suffix(".pub").read_bytes(), 0o600)
    names = []
    for name, ko in _module_load_order(modules_dir, (*arch.extra_modules, *extra_modules)):
        rootfs.file(f"lib/modules/aradia/{name}.ko", ko)
        names.append(name)
    rootfs.file("etc/aradia-modules", ("\n".join(names) + "\n").encode())
    build = work / "programs"
    build.mkdir()
    for name, data in _compile_guest_programs(build, arch).items():
        rootfs.file(f"usr/bin/{name}", data, 0o755)
    shutil.rmtree(build)
    return host_key_line


INIT_SCRIPT = r"""#!/bin/busybox sh
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


__all__ = ["GUEST_IP", "GUEST_PROGRAMS_DIR", "INIT_SCRIPT", "READY_MARKER", "ROOT_PASSWORD", "Rootfs",
           "guest_sources", "populate"]
