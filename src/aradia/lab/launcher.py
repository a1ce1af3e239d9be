"""Launch a QEMU guest from a :class:`~aradia.lab.images.GuestImage`.

``launch(image)`` starts the QEMU of the image's architecture (``qemu-system-x86_64 -M pc``, or
``qemu-system-aarch64 -M virt -cpu max,pauth-impdef=on``; TCG by default) with QMP on a unix socket,
the console (ttyS0; ttyAMA0 on arm64) on a unix-socket chardev, the ground-truth channel (ttyS1; a
virtio console on arm64) written to a file, user-mode networking with ssh forwarded to a free local
port, and optionally a GDB stub and guest RAM in a shared ``/dev/shm`` file; it waits until the
guest's init reports ready and returns the :class:`~aradia.lab.guest.Guest` (re-exported here, since
``launch`` returns it) that talks to it and always tears QEMU down.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from aradia.lab import GuestError
from aradia.lab.guest import Guest, Resources, pump_console
from aradia.lab.images import GuestImage
from aradia.machine.stubaddress import free_port

_SUN_PATH_MAX = 107
_SIZE_RE = re.compile(r"^(\d+)([KMGT]?)B?$", re.IGNORECASE)


def memory_bytes(memory: str | int) -> int:
    """QEMU's ``-m`` value (``"256M"``, ``"4G"``, a bare number = MiB, or an int of bytes) in bytes."""
    if isinstance(memory, int):
        return memory
    m = _SIZE_RE.match(memory.strip())
    if not m:
        raise GuestError(f"cannot parse memory size {memory!r}")
    shift = {"": 20, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2).upper()]
    return int(m.group(1)) << shift


def _qemu_args(image: GuestImage, guest: Guest, *, accel: str, smp: int, memory: str, cpu: str | None,
               machine: str, append: str, plugins: Iterable[str], vmcoreinfo: bool,
               extra_args: Sequence[str], incoming: str | None = None,
               start_paused: bool = False) -> list[str]:
    machine_opt = machine
    arch = image.guest_arch
    args = [arch.qemu, "-name", f"aradia-{image.series}", "-accel", accel, "-m", memory, "-smp", str(smp),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", str(image.kernel_path), "-initrd", str(image.initrd_path),
            "-append", f"console={arch.console} quiet panic=-1 {append}".strip(),
            "-chardev", f"socket,id=con0,path={guest.console_path},server=on,wait=on",
            "-serial", "chardev:con0", *arch.truth_args(str(guest.ttys1_path)),
            "-qmp", f"unix:{guest.qmp_path},server=on,wait=off"]
    if cpu:
        args += ["-cpu", cpu]
    if guest.shm_path is not None:
        args += ["-object", f"memory-backend-file,id=m0,size={guest.memory_size},"
                            f"mem-path={guest.shm_path},share=on"]
        machine_opt += ",memory-backend=m0"
    args += ["-machine", machine_opt]
    hostfwd = f",hostfwd=tcp:127.0.0.1:{guest.ssh_port}-:22" if guest.ssh_port else ""
    args += ["-netdev", f"user,id=n0{hostfwd}", "-device", "virtio-net-pci,netdev=n0",
             "-device", "virtio-rng-pci"]
    if guest.gdb_port is not None:
        args += ["-gdb", f"tcp:127.0.0.1:{guest.gdb_port}"]
    if vmcoreinfo:
        args += ["-device", "vmcoreinfo"]
    for plugin in plugins:
        args += ["-plugin", plugin]
    if incoming is not None:
        args += ["-incoming", incoming]
    if start_paused:
        args += ["-S"]
    return [*args, *extra_args]


def _dies_with_us() -> list[str]:
    """A prefix that SIGKILLs QEMU if this process dies without cleaning up (main thread only).

    PR_SET_PDEATHSIG fires when the *thread* that forked exits, so it is only safe from the main
    thread, whose end is the end of the process.
    """
    setpriv = shutil.which("setpriv")
    if setpriv and threading.current_thread() is threading.main_thread():
        return [setpriv, "--pdeathsig", "KILL", "--"]
    return []


def launch(image: GuestImage, *, accel: str = "tcg", smp: int = 1, memory: str = "256M",
           cpu: str | None = None, machine: str | None = None, gdb: bool = False, shared_memory: bool = False,
           ssh: bool = True, plugins: Iterable[str] = (), extra_args: Sequence[str] = (),
           workdir: Path | str | None = None, boot_timeout: float = 60, append: str = "",
           vmcoreinfo: bool = False, incoming: str | None = None, start_paused: bool = False) -> Guest:
    """Boot ``image`` in a new QEMU and wait until its init reports ready; returns the :class:`Guest`.

    ``accel`` is QEMU's accelerator (``"tcg"``; ``"kvm"`` where available), ``append`` adds to the
    kernel command line, ``plugins`` are ``-plugin`` values (``"lib.so,arg=v"``). ``machine`` and
    ``cpu`` default to the image architecture's (x86-64: ``pc`` and QEMU's default CPU; arm64:
    ``virt`` and ``max,pauth-impdef=on``; KASLR stays on: virt passes a seed in the device tree).
    Ports for ssh and the GDB stub are picked free at random; a start that loses a port race, or
    whose ttyS1 stays silent though the console says ready, is retried.

    ``incoming`` (``"unix:/path"``, ``"tcp:127.0.0.1:PORT"``, ``"defer"``) starts a live-migration
    *destination* instead (QEMU's ``-incoming``; the other options must match the source's): nothing
    boots, so this returns as soon as QEMU's QMP socket exists, with the VM in run state
    ``inmigrate``. Once a source migrated into it the guest runs on, and :meth:`Guest.run` works.
    ``start_paused`` (QEMU's ``-S``) keeps such a destination paused after the migration, until a
    ``cont`` (QMP or the GDB stub): aradia's traced migration arms its probes there first. With
    ``shared_memory`` the destination gets its own RAM file, as the source has.
    """
    plugins = tuple(plugins)
    machine = machine or image.guest_arch.machine
    cpu = cpu or image.guest_arch.cpu
    last_error: GuestError | None = None
    retries: list[str] = []
    for _attempt in range(3):
        try:
            guest = _launch_once(image, accel=accel, smp=smp, memory=memory, cpu=cpu, machine=machine,
                                 gdb=gdb, shared_memory=shared_memory, ssh=ssh, plugins=plugins,
                                 extra_args=extra_args, workdir=workdir, boot_timeout=boot_timeout,
                                 append=append, vmcoreinfo=vmcoreinfo, incoming=incoming,
                                 start_paused=start_paused)
        except (_PortRace, _StuckSerial, _BootPanic) as exc:
            last_error = GuestError(str(exc))
            retries.append(str(exc).splitlines()[0][:300])
            continue
        guest.boot_retries = retries
        return guest
    assert last_error is not None
    raise last_error


class _PortRace(GuestError):
    """QEMU could not bind a port another process took after we picked it."""


class _StuckSerial(GuestError):
    """The guest booted but its ttyS1 output never came: seen once on a heavily loaded host, with the
    kernel logging "No irq handler for vector" (the UART's transmit interrupt lost under TCG). The
    ground-truth channel is useless then, so the guest is booted again."""


class _BootPanic(GuestError):
    """The guest kernel panicked before its init reported ready, before aradia touched it: seen once
    in some fifteen full test runs (each boots ~95 guests, Debian's 6.12 x86 kernel ~8 times): 6.12
    with 2 vCPUs under TCG, an oops in an interrupt at ``sched_clock_cpu+0x9`` during the initcalls,
    QEMU 7.2. Such a boot is a fault of the emulated machine, not of what a test checks, so it is
    booted again; the retry is named in the test run's guest summary."""


_OOPS_LINE = re.compile(r"\]\s+((?:BUG|Oops|general protection fault|Kernel panic|Internal error"
                        r"|Unable to handle)[^\n]*|RIP: [^\n]*|pc : [^\n]*)")


def panic_summary(console: str) -> str:
    """The lines of a kernel oops/panic in ``console`` that name it (``BUG:``, ``RIP:``, the panic)."""
    lines = [m.group(1).strip() for m in _OOPS_LINE.finditer(console)]
    return "; ".join(dict.fromkeys(lines)) or "kernel panic"


def _launch_once(image: GuestImage, *, accel: str, smp: int, memory: str, cpu: str | None, machine: str,
                 gdb: bool, shared_memory: bool, ssh: bool, plugins: tuple[str, ...],
                 extra_args: Sequence[str], workdir: Path | str | None, boot_timeout: float, append: str,
                 vmcoreinfo: bool, incoming: str | None = None, start_paused: bool = False) -> Guest:
    arch = image.guest_arch
    if shutil.which(arch.qemu) is None:
        raise GuestError(f"{arch.qemu} is not installed (Debian package {arch.qemu_package})")
    res = Resources()
    if workdir is None:
        wd = Path(tempfile.mkdtemp(prefix="aradia-vm-"))
        res.remove_workdir = True
    else:
        wd = Path(workdir).absolute()  # QEMU runs in wd: relative paths would resolve twice
        wd.mkdir(parents=True, exist_ok=True)
    res.workdir = wd
    if shared_memory:
        res.shm_path = Path(f"/dev/shm/aradia-{os.getpid()}-{secrets.token_hex(4)}")
    guest = Guest(image, wd, res)
    try:
        if len(str(guest.console_path)) > _SUN_PATH_MAX:
            raise GuestError(f"workdir {wd} is too long for unix socket paths")
        for stale in (guest.console_path, guest.qmp_path, guest.ttys1_path, guest.console_log):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        guest.memory_size = memory_bytes(memory)
        guest.ssh_port = free_port() if ssh else None
        guest.gdb_port = free_port() if gdb else None
        guest.args = _qemu_args(image, guest, accel=accel, smp=smp, memory=memory, cpu=cpu, machine=machine,
                                append=append, plugins=plugins, vmcoreinfo=vmcoreinfo, extra_args=extra_args,
                                incoming=incoming, start_paused=start_paused)
        started = time.monotonic()
        res.stderr = open(guest.qemu_log, "wb")  # noqa: SIM115 (closed by _teardown)
        res.proc = subprocess.Popen([*_dies_with_us(), *guest.args], stdin=subprocess.DEVNULL,
                                    stdout=res.stderr, stderr=res.stderr, cwd=wd)
        res.console = _connect_console(guest, res, started + 30)
        res.reader = threading.Thread(target=pump_console, args=(res.console, guest.console_log, res.closed),
                                      name=f"aradia-console-{res.proc.pid}", daemon=True)
        res.reader.start()
        if incoming is not None:
            _wait_qmp_socket(guest, res, started + boot_timeout)
            guest.boot_seconds = time.monotonic() - started
            return guest
        marker = re.compile(re.escape(image.ready_marker.encode()) + rb" (\S+)\n")
        try:
            _, m = guest.wait_ttys1(0, marker, boot_timeout - (time.monotonic() - started))
        except GuestError as exc:
            console = guest.console_text()
            if not guest.alive and "Kernel panic - not syncing" in console:
                raise _BootPanic(f"guest {image.release} panicked while booting: {panic_summary(console)}\n"
                                 f"{exc}") from exc
            raise
        except TimeoutError:
            tail = guest.tail()
            if image.ready_marker in tail:
                raise _StuckSerial(f"guest {image.release} reported ready on its console but not on ttyS1 "
                                   f"within {boot_timeout}s (a lost serial interrupt); console tail:\n"
                                   f"{tail}") from None
            raise GuestError(f"guest {image.release} did not boot within {boot_timeout}s; console tail:\n"
                             f"{tail}") from None
        if m.group(1).decode() != image.release:
            raise GuestError(f"guest booted kernel {m.group(1).decode()!r}, expected {image.release!r}")
        guest.boot_seconds = time.monotonic() - started
        return guest
    except BaseException as exc:
        log = ""
        with contextlib.suppress(OSError):
            log = guest.qemu_log.read_text(errors="replace")
        guest.stop()
        if isinstance(exc, GuestError) and any(s in log for s in ("hostfwd", "host forwarding", "gdbstub",
                                                                   "Address already in use")):
            raise _PortRace(f"QEMU lost a port race: {log[-500:]}") from exc
        raise


def _wait_qmp_socket(guest: Guest, res: Resources, deadline: float) -> None:
    """Wait until QEMU created its QMP socket (a migration destination prints nothing to wait for)."""
    proc = res.proc
    assert proc is not None
    while not guest.qmp_path.exists():
        if proc.poll() is not None:
            raise GuestError(f"QEMU exited at start (status {proc.returncode}):\n{guest.tail()}")
        if time.monotonic() > deadline:
            raise GuestError(f"QEMU did not create its QMP socket:\n{guest.tail()}")
        time.sleep(0.01)


def _connect_console(guest: Guest, res: Resources, deadline: float) -> socket.socket:
    """Connect to the console socket as soon as QEMU creates it (QEMU waits for us with wait=on)."""
    proc = res.proc
    assert proc is not None
    while True:
        if proc.poll() is not None:
            raise GuestError(f"QEMU exited at start (status {proc.returncode}):\n{guest.tail()}")
        if guest.console_path.exists():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(guest.console_path))
                return sock
            except OSError:
                sock.close()
        if time.monotonic() > deadline:
            raise GuestError(f"QEMU did not create its console socket:\n{guest.tail()}")
        time.sleep(0.01)


__all__ = ["Guest", "launch", "memory_bytes"]
