"""The ``aradia`` command on real guests and dumps: output, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from aradia.lab.launcher import Guest
from aradia.vm import attach

GiB = 1 << 30


def aradia(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user would (a separate process)."""
    return subprocess.run([sys.executable, "-m", "aradia.cli", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def assert_one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aradia: error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def big(launch_guest: Callable[..., Guest]) -> Guest:
    """A 4 GiB guest: RAM above the 4 GiB split, in a shared file."""
    return launch_guest("6.1", memory="4G", shared_memory=True, smp=2)


@pytest.fixture(scope="module")
def elf_dump(big: Guest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "big.elf"
    r = aradia("dump", "--vm", f"qmp:{big.qmp_path}", "-o", str(out), timeout=300)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "paused" in r.stdout
    return out


@pytest.mark.timeout(180)
def test_info_json_live_and_dump(big: Guest, elf_dump: Path) -> None:
    truth = big.run("cat /proc/version").strip()
    for spec in (f"qmp:{big.qmp_path}", str(elf_dump)):
        r = aradia("info", "--vm", spec, "--json")
        assert r.returncode == 0, r.stderr
        info = json.loads(r.stdout)
        assert info["kernel"] == truth
        assert info["ram"][-1]["start"] == 4 * GiB and info["ram"][-1]["size"] == 1 * GiB
        assert sum(x["size"] for x in info["ram"]) == 4 * GiB
        assert [c["index"] for c in info["vcpus"]] == [0, 1]
        assert all(c["cr3"] for c in info["vcpus"])
    r = aradia("info", "--vm", f"qmp:{big.qmp_path}")
    assert r.returncode == 0 and truth in r.stdout and "running" in r.stdout


@pytest.mark.timeout(180)
def test_reads_above_the_4g_split(big: Guest) -> None:
    hold = big.start_memhold(seed=0xB16B00B5, size=8 << 20)
    try:
        high = [(i, p) for i, p in enumerate(hold.pages) if p >= 4 * GiB]
        assert high, "the guest put no page of an 8 MiB region above 4 GiB"
        i, paddr = high[len(high) // 2]
        for path in ("shared-file", "proc-mem", "gdb"):
            r = subprocess.run([sys.executable, "-m", "aradia.cli", "read", "--vm", f"qmp:{big.qmp_path}",
                                "--memory", path, "--phys", hex(paddr), "--size", "4096", "--format", "raw"],
                               capture_output=True, timeout=120)
            assert r.returncode == 0, r.stderr
            assert r.stdout == hold.expected(i * 4096, 4096), path
    finally:
        hold.stop()


@pytest.mark.timeout(120)
def test_drgn_identifies_kernel_in_our_elf_dump(big: Guest, elf_dump: Path) -> None:
    release = big.run("uname -r").strip()
    drgn = Path(sys.executable).with_name("drgn")
    r = subprocess.run([str(drgn), "-q", "-c", str(elf_dump), "--no-default-symbols", "-e",
                        "print(prog.flags); print(prog['UTS_RELEASE'].string_().decode())"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "IS_LINUX_KERNEL" in r.stdout
    assert release in r.stdout


@pytest.mark.timeout(120)
def test_read_hex_and_virtual(big: Guest) -> None:
    r = aradia("read", "--vm", f"qmp:{big.qmp_path}", "--phys", "0x1000", "--size", "32")
    assert r.returncode == 0 and r.stdout.startswith("0000000000001000  ")
    # The kernel's own text through vCPU 0's page tables: the first bytes at RIP equal the physical read.
    info = json.loads(aradia("info", "--vm", f"qmp:{big.qmp_path}", "--json").stdout)
    cpu = next(c for c in info["vcpus"] if c["cpl"] == 0)
    page = cpu["rip"] & ~0xFFF
    with attach(f"qmp:{big.qmp_path}") as vm:
        paddr = vm.translate(page, cr3=cpu["cr3"]).paddr

    def raw(*args: str) -> bytes:
        r = subprocess.run([sys.executable, "-m", "aradia.cli", "read", "--vm", f"qmp:{big.qmp_path}",
                            *args, "--size", "4096", "--format", "raw"], capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout

    code = raw("--virt", hex(page), "--cr3", hex(cpu["cr3"]))
    assert len(code) == 4096 and code == raw("--phys", hex(paddr)) and code != bytes(4096)


# --- bad input: one line, exit status 2, never a traceback or a hang -----------------------------------
@pytest.mark.timeout(60)
def test_missing_socket(tmp_path: Path) -> None:
    assert_one_line_error(aradia("info", "--vm", f"qmp:{tmp_path}/none.sock"), "no QMP socket")


@pytest.mark.timeout(60)
def test_socket_that_is_not_qmp(tmp_path: Path) -> None:
    path = str(tmp_path / "fake.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(4)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.sendall(b"220 smtp ready\r\n")

    threading.Thread(target=serve, daemon=True).start()
    t0 = time.monotonic()
    assert_one_line_error(aradia("info", "--vm", f"qmp:{path}"), "not a QMP socket")
    assert time.monotonic() - t0 < 20
    srv.close()


@pytest.mark.timeout(60)
def test_busy_vm_gets_clear_error_quickly(big: Guest) -> None:
    from aradia.machine.qemu import Qemu

    holder = Qemu(big.qmp_path)
    try:
        t0 = time.monotonic()
        assert_one_line_error(aradia("info", "--vm", f"qmp:{big.qmp_path}"), "another client holds it")
        assert time.monotonic() - t0 < 15
    finally:
        holder.close()


@pytest.mark.timeout(60)
def test_address_outside_ram(big: Guest) -> None:
    r = aradia("read", "--vm", f"qmp:{big.qmp_path}", "--phys", "0xc0000000", "--size", "16")
    assert_one_line_error(r, "0xc0000000", "not RAM")
    assert_one_line_error(aradia("read", "--vm", f"qmp:{big.qmp_path}", "--virt", "0x1234000",
                                 "--cr3", "0x0", "--size", "16"))


@pytest.mark.timeout(120)
def test_truncated_elf(elf_dump: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.elf"
    with open(elf_dump, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(64 << 20))
    assert_one_line_error(aradia("info", "--vm", str(cut)), "truncated")
    tiny = tmp_path / "tiny.elf"
    with open(elf_dump, "rb") as f:
        tiny.write_bytes(f.read(40))
    assert_one_line_error(aradia("info", "--vm", str(tiny)))


@pytest.mark.timeout(120)
def test_corrupt_lime_header(big: Guest, tmp_path: Path) -> None:
    out = tmp_path / "g.lime"
    r = aradia("dump", "--vm", f"qmp:{big.qmp_path}", "--format", "lime", "-o", str(out), timeout=300)
    assert r.returncode == 0, r.stderr
    with open(out, "r+b") as f:
        f.seek(8)
        f.write((0xFFFFFFFFFFFF0000).to_bytes(8, "little"))  # start address after the end address
    assert_one_line_error(aradia("info", "--vm", str(out)), "LiME")
    with open(out, "r+b") as f:
        f.write(b"XXXX")  # bad magic: it is no longer LiME; read as raw it must still not crash
    r2 = aradia("info", "--vm", str(out), "--json")
    assert r2.returncode in (0, 2) and "Traceback" not in r2.stderr
    os.unlink(out)


@pytest.mark.timeout(180)
def test_qemu_exit_while_attached(launch_guest: Callable[..., Guest], tmp_path: Path) -> None:
    g = launch_guest("6.1", memory="4G")
    out = tmp_path / "x.elf"
    p = subprocess.Popen([sys.executable, "-m", "aradia.cli", "dump", "--vm", f"qmp:{g.qmp_path}",
                          "--memory", "proc-mem", "--no-pause", "-o", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(tmp_path.iterdir()) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # the writer's temporary file appears once the copy has started
    os.kill(g.pid, 9)
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == 2 and "Traceback" not in stderr, stderr
    assert stderr.strip().startswith("aradia: error: ") and "QEMU" in stderr
    assert not out.exists(), "a half-written dump was left under the final name"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("target", ["live", "dump"])
def test_semantic_commands(big: Guest, elf_dump: Path, target: str) -> None:
    spec = f"qmp:{big.qmp_path}" if target == "live" else str(elf_dump)
    docs = {}
    for cmd in (["ps"], ["ps", "--threads"], ["lsmod"], ["maps", "1"], ["files", "1"], ["net"], ["mounts"],
                ["dmesg"]):
        r = aradia(*cmd, "--vm", spec, "--json")
        assert r.returncode == 0, (cmd, r.stderr)
        doc = json.loads(r.stdout)
        assert doc["items"] and doc["warnings"] == [], cmd
        docs[" ".join(cmd)] = doc["items"]
        table = aradia(*cmd, "--vm", spec)
        assert table.returncode == 0 and len(table.stdout.splitlines()) >= 2, cmd
    init = next(p for p in docs["ps"] if p["pid"] == 1)
    assert init["comm"] == big.run("cat /proc/1/comm").strip() and init["exe"]
    assert len(docs["ps --threads"]) >= len(docs["ps"])
    assert {m["name"] for m in docs["lsmod"]} == {line.split()[0] for line in big.run("cat /proc/modules").splitlines()}
    assert any(s["state"] == "LISTEN" and s["local_port"] == 22 for s in docs["net"])
    assert docs["dmesg"][0]["text"].startswith("Linux version ")
    assert any(m["target"] == "/proc" for m in docs["mounts"])
    r = aradia("maps", "999999", "--vm", spec)
    assert_one_line_error(r, "no process 999999")


@pytest.mark.timeout(120)
def test_shell_has_vm_and_prog(elf_dump: Path) -> None:
    script = "print('tasks', len(list(for_each_task(prog))))\nprint('ram', vm.memory.size)\n"
    r = subprocess.run([sys.executable, "-m", "aradia.cli", "shell", "--vm", str(elf_dump)], input=script,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "tasks " in r.stdout and int(r.stdout.split("tasks ")[1].split()[0]) > 20
    assert f"ram {4 * GiB}" in r.stdout


@pytest.mark.timeout(120)
def test_btf_from_the_kernel_file(big: Guest, elf_dump: Path) -> None:
    with_file = aradia("ps", "--vm", str(elf_dump), "--btf", str(big.image.vmlinuz), "--json")
    from_ram = aradia("ps", "--vm", str(elf_dump), "--json")
    assert with_file.returncode == 0 and from_ram.returncode == 0, with_file.stderr
    assert json.loads(with_file.stdout) == json.loads(from_ram.stdout)
    bad = aradia("ps", "--vm", str(elf_dump), "--btf", str(elf_dump))
    assert_one_line_error(bad)
