"""Real guests built by aradia: each kernel series boots, answers over serial and ssh, runs memhold;
launcher options (shared RAM, GDB stub, vmcoreinfo) work; QEMU never outlives its Guest."""

from __future__ import annotations

import contextlib
import gc
import mmap
import os
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from aradia.lab import GuestError
from aradia.lab.images import GUEST_IP, GuestImage
from aradia.lab.launcher import Guest, launch
from aradia.lab.memhold import memhold_pattern

pytestmark = pytest.mark.guest

SERIES = ("6.1", "5.10", "6.12")
BootGuest = Callable[..., contextlib.AbstractContextManager[Guest]]


def _pid_running(pid: int, marker: str) -> bool:
    """Whether ``pid`` is a live process whose command line mentions ``marker`` (guards pid reuse)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return marker.encode() in cmdline


def _processes_mentioning(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _pid_running(int(entry), marker):
            found.append(int(entry))
    return found


@pytest.fixture(scope="module", params=SERIES)
def series_guest(request: pytest.FixtureRequest, boot_guest: BootGuest) -> Iterator[Guest]:
    """One guest per kernel series (one at a time)."""
    with boot_guest(request.param) as guest:
        yield guest


@pytest.fixture(scope="module")
def rich_guest(boot_guest: BootGuest) -> Iterator[Guest]:
    """A 6.1 guest with shared-file RAM, a GDB stub, the vmcoreinfo device and two vCPUs."""
    with boot_guest("6.1", shared_memory=True, gdb=True, vmcoreinfo=True, smp=2) as guest:
        yield guest


@pytest.mark.timeout(90)
def test_proc_version_and_release(series_guest: Guest) -> None:
    image = series_guest.image
    version = series_guest.run("cat /proc/version")
    assert version.startswith(f"Linux version {image.release} ")
    assert f"Debian {image.package_version.split(':')[-1]}" in version
    assert series_guest.run("uname -r") == image.release + "\n"
    assert image.release in image.kernel_path.name
    assert image.modules_dir.name == image.release


@pytest.mark.timeout(60)
def test_network_and_ssh(series_guest: Guest) -> None:
    assert f"inet {GUEST_IP}/24" in series_guest.run("ip -4 addr show dev eth0")
    assert series_guest.ssh("uname -r") == series_guest.image.release + "\n"
    assert series_guest.ssh("id -u", password=True) == "0\n"

    # guest -> host over slirp: 10.0.2.2 is the host's loopback
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(30)
        received: list[bytes] = []

        def accept() -> None:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(30)
                while chunk := conn.recv(4096):
                    received.append(chunk)

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        port = server.getsockname()[1]
        series_guest.run(f"echo hello-from-$(uname -r) | nc -w 5 10.0.2.2 {port}", timeout=30)
        thread.join(timeout=30)
    assert b"".join(received) == f"hello-from-{series_guest.image.release}\n".encode()


@pytest.mark.timeout(60)
def test_memhold_reports_its_pages(series_guest: Guest) -> None:
    mh = series_guest.start_memhold(seed=0xA5A5_0000 + len(series_guest.image.series))
    try:
        assert mh.size == 1 << 20
        assert mh.vaddr == 0x5A5A00000000
        assert len(mh.pages) == 256
        assert all(p and p % 4096 == 0 for p in mh.pages)
        assert len(set(mh.pages)) == 256
        maps = series_guest.run(f"cat /proc/{mh.pid}/maps")
        assert f"{mh.vaddr:x}-{mh.vaddr + mh.size:x} rw-p" in maps
        assert "Locked:             1024 kB" in series_guest.run(f"cat /proc/{mh.pid}/smaps")
        assert mh.dump(0, 64) == mh.expected(0, 64)
        assert mh.dump(mh.size - 100, 100) == mh.expected(mh.size - 100, 100)
        assert mh.check() == (0, -1)
        mh.poke(4096 + 8, b"\xde\xad\xbe\xef")
        assert mh.dump(4096 + 8, 4) == b"\xde\xad\xbe\xef"
        assert mh.check() == (1, 4096 + 8)
    finally:
        mh.stop()
    assert series_guest.run(f"kill -0 {mh.pid} 2>/dev/null && echo alive || echo gone") == "gone\n"


def test_memhold_pattern_matches_the_c_definition() -> None:
    seed = 7
    assert memhold_pattern(seed, 0, 16) == bytes.fromhex("0700000000000000127c4a7fb979379e")
    assert memhold_pattern(seed, 3, 10) == memhold_pattern(seed, 0, 16)[3:13]


@pytest.mark.timeout(60)
def test_run_is_clean_of_echo_and_kernel_messages(rich_guest: Guest) -> None:
    assert rich_guest.run("printf abc") == "abc"
    noisy = "for i in $(seq 1 40); do echo \"<2>aradia-noise $i\" > /dev/kmsg; echo \"line $i\"; done"
    assert rich_guest.run(noisy) == "".join(f"line {i}\n" for i in range(1, 41))
    assert "aradia-noise 40" in rich_guest.console_text()
    long_word = "x" * 7000  # several console lines of input
    assert rich_guest.run(f"echo {long_word} | wc -c; echo \"it's $HOME\"") == "7001\nit's /root\n"
    assert rich_guest.run("echo out; echo err >&2; exit 3", check=False) == "out\nerr\n"
    with pytest.raises(GuestError, match=r"exit 3.*\n.*err"):
        rich_guest.run("echo err >&2; exit 3")
    with pytest.raises(GuestError, match="timed out"):
        rich_guest.run("sleep 30", timeout=1)
    assert rich_guest.run("echo still-alive") == "still-alive\n"


@pytest.mark.timeout(60)
def test_shared_memory_is_guest_ram(rich_guest: Guest) -> None:
    assert rich_guest.shm_path is not None
    assert rich_guest.shm_path.stat().st_size == 256 << 20
    mh = rich_guest.start_memhold(seed=0x5EED, size=64 << 10)
    try:
        with open(rich_guest.shm_path, "r+b") as fh, mmap.mmap(fh.fileno(), 0) as ram:
            for i, phys in enumerate(mh.pages):  # pc machine <= 3 GiB: file offset == guest-physical
                assert ram[phys:phys + 4096] == mh.expected(i * 4096, 4096), f"page {i} at {phys:#x}"
            ram[mh.pages[3] + 16: mh.pages[3] + 24] = b"ARADIA!!"
        assert mh.dump(3 * 4096 + 16, 8) == b"ARADIA!!"
        assert mh.check() == (1, 3 * 4096 + 16)
    finally:
        mh.stop()


@pytest.mark.timeout(60)
def test_vmcoreinfo_and_gdb_stub(rich_guest: Guest) -> None:
    assert rich_guest.run("nproc") == "2\n"
    vmcoreinfo = "/sys/firmware/qemu_fw_cfg/by_name/etc/vmcoreinfo/raw"
    assert rich_guest.run(f"test -e {vmcoreinfo} && echo yes") == "yes\n"
    assert rich_guest.gdb_port is not None
    with socket.create_connection(("127.0.0.1", rich_guest.gdb_port), timeout=10) as gdb:
        gdb.sendall(b"$?#3f")
        reply = b""
        while b"#" not in reply.lstrip(b"+"):
            chunk = gdb.recv(4096)
            assert chunk, "GDB stub closed the connection"
            reply += chunk
        assert reply.lstrip(b"+")[:2] in (b"$S", b"$T")
        gdb.sendall(b"+$D#44")  # detach: the guest runs on
        reply = b""
        while b"#" not in reply.lstrip(b"+"):
            chunk = gdb.recv(4096)
            if not chunk:
                break
            reply += chunk
    assert rich_guest.run("echo after-gdb") == "after-gdb\n"


@pytest.mark.timeout(120)
def test_two_guests_at_once_then_none_left(guest_image: Callable[[str], GuestImage]) -> None:
    images = [guest_image("6.1"), guest_image("5.10")]
    with ThreadPoolExecutor(2) as pool:
        guests = list(pool.map(lambda im: launch(im, shared_memory=True), images))
    pids = [g.pid for g in guests]
    workdirs = [g.workdir for g in guests]
    shm = [g.shm_path for g in guests]
    try:
        assert len(set(pids)) == 2
        assert guests[0].ssh_port != guests[1].ssh_port
        for g in guests:
            assert g.run("uname -r") == g.image.release + "\n"
            assert g.ssh("uname -r") == g.image.release + "\n"
            assert _pid_running(g.pid, str(g.workdir))
        guests[0].stop()
        assert not _pid_running(pids[0], str(workdirs[0]))
        assert guests[1].run("echo still-here") == "still-here\n"
    finally:
        for g in guests:
            g.stop()
    guests[0].stop()  # idempotent
    assert not guests[0].alive
    for pid, wd, path in zip(pids, workdirs, shm, strict=True):
        assert not _pid_running(pid, str(wd))
        assert not wd.exists()
        assert path is not None and not path.exists()


@pytest.mark.timeout(60)
def test_garbage_collected_guest_is_stopped(guest_image: Callable[[str], GuestImage]) -> None:
    guest = launch(guest_image("5.10"), ssh=False)
    pid, workdir = guest.pid, str(guest.workdir)
    assert guest.ssh_port is None
    assert _pid_running(pid, workdir)
    del guest
    gc.collect()
    assert not _pid_running(pid, workdir)
    assert not Path(workdir).exists()


@pytest.mark.timeout(60)
def test_failed_boot_leaves_no_qemu(guest_image: Callable[[str], GuestImage], tmp_path: Path) -> None:
    workdir = tmp_path / "vm"
    with pytest.raises(GuestError, match="did not boot within"):
        launch(guest_image("6.1"), workdir=workdir, boot_timeout=1.0)
    assert _processes_mentioning(str(workdir)) == []
    assert workdir.exists()  # a caller's workdir is left, with the logs
    assert (workdir / "qemu.log").exists()


@pytest.mark.timeout(120)
def test_boot_panic_is_retried_then_reported(guest_image: Callable[[str], GuestImage], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel that panics before init says ready is booted again (three tries in all), then the
    error names the panic; a boot that works records no retry."""
    from aradia.lab import launcher

    attempts: list[int] = []
    real = launcher._launch_once

    def counted(*args: object, **kwargs: object) -> Guest:
        attempts.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(launcher, "_launch_once", counted)
    workdir = tmp_path / "vm"
    with pytest.raises(GuestError, match=r"panicked while booting: .*Kernel panic - not syncing: VFS"):
        launch(guest_image("6.1"), workdir=workdir, ssh=False, append="rdinit=/nonexistent")
    assert len(attempts) == 3
    assert _processes_mentioning(str(workdir)) == []
    guest = launch(guest_image("6.1"), ssh=False)
    try:
        assert len(attempts) == 4
        assert guest.boot_retries == []
    finally:
        guest.stop()


def test_panic_summary_names_the_oops() -> None:
    """The summary of the panic CI met once (6.12 x86, TCG): the oops's RIP and the panic line."""
    console = ("[    1.539867] RIP: 0010:sched_clock_cpu+0x9/0x1d0\n"
               "[    1.539881] Code: 00 e9 b8 fe ff ff 66\n"
               "[    1.540053] Kernel panic - not syncing: Fatal exception in interrupt\n"
               "[    1.540716] Kernel Offset: 0x25000000 from 0xffffffff81000000\n")
    from aradia.lab.launcher import panic_summary

    assert panic_summary(console) == ("RIP: 0010:sched_clock_cpu+0x9/0x1d0; "
                                      "Kernel panic - not syncing: Fatal exception in interrupt")
    assert panic_summary("[ 1.0] all well\n") == "kernel panic"
