"""The ``aradia`` command on real guests and dumps: output, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from aradia.lab.launcher import Guest
from aradia.vm import attach
from cli_runner import DRGN, assert_one_line_error, cli_argv, run_cli
from guest_truth import proc_fds, proc_maps, proc_modules, proc_mounts, proc_tcp

GiB = 1 << 30


@pytest.fixture(scope="module")
def big(launch_guest: Callable[..., Guest]) -> Guest:
    """A 4 GiB guest: RAM above the 4 GiB split, in a shared file."""
    return launch_guest("6.1", memory="4G", shared_memory=True, smp=2)


@dataclass
class Witness:
    """Processes the test starts in the big guest: their /proc is the ground truth of the views."""

    bash: int  # holds /etc/passwd (fd 5) and /tmp/aradia-cli.txt (fd 6) open
    nc: int  # listens on TCP port WITNESS_PORT


WITNESS_PORT = 7790


@pytest.fixture(scope="module")
def witness(big: Guest) -> Witness:
    out = big.run(
        "bash -c 'echo -n aradia-cli > /proc/$$/comm; exec 5</etc/passwd 6>>/tmp/aradia-cli.txt;"
        " while :; do sleep 1000; done' witness >/dev/null 2>&1 & w=$!;"
        f" sleep 100000 | nc -l -p {WITNESS_PORT} >/dev/null 2>&1 & n=$!;"
        f" for i in $(seq 200); do [ \"$(cat /proc/$w/comm)\" = aradia-cli ] && cat /proc/net/tcp* | grep -q ':{WITNESS_PORT:04X} '"
        " && break; sleep 0.05; done; echo $w $n")
    bash, nc = (int(x) for x in out.split()[-2:])
    assert big.run(f"cat /proc/{nc}/comm").strip() == "nc"
    return Witness(bash, nc)


@pytest.fixture(scope="module")
def elf_dump(big: Guest, witness: Witness, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "big.elf"
    r = run_cli("dump", "--vm", f"qmp:{big.qmp_path}", "-o", str(out), timeout=300)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "paused" in r.stdout
    return out


@pytest.mark.timeout(180)
def test_info_json_live_and_dump(big: Guest, elf_dump: Path) -> None:
    truth = big.run("cat /proc/version").strip()
    for spec in (f"qmp:{big.qmp_path}", str(elf_dump)):
        r = run_cli("info", "--vm", spec, "--json")
        assert r.returncode == 0, r.stderr
        info = json.loads(r.stdout)
        assert info["kernel"] == truth
        assert info["ram"][-1]["start"] == 4 * GiB and info["ram"][-1]["size"] == 1 * GiB
        assert sum(x["size"] for x in info["ram"]) == 4 * GiB
        assert [c["index"] for c in info["vcpus"]] == [0, 1]
        assert all(c["cr3"] for c in info["vcpus"])
    r = run_cli("info", "--vm", f"qmp:{big.qmp_path}")
    assert r.returncode == 0 and truth in r.stdout and "running" in r.stdout


@pytest.mark.timeout(180)
def test_reads_above_the_4g_split(big: Guest) -> None:
    hold = big.start_memhold(seed=0xB16B00B5, size=8 << 20)
    try:
        high = [(i, p) for i, p in enumerate(hold.pages) if p >= 4 * GiB]
        assert high, "the guest put no page of an 8 MiB region above 4 GiB"
        i, paddr = high[len(high) // 2]
        for path in ("shared-file", "proc-mem", "gdb"):
            r = run_cli("read", "--vm", f"qmp:{big.qmp_path}", "--memory", path, "--phys", hex(paddr),
                        "--size", "4096", "--format", "raw", text=False)
            assert r.returncode == 0, r.stderr
            assert r.stdout == hold.expected(i * 4096, 4096), path
    finally:
        hold.stop()


@pytest.mark.timeout(120)
def test_drgn_identifies_kernel_in_our_elf_dump(big: Guest, elf_dump: Path) -> None:
    release = big.run("uname -r").strip()
    r = subprocess.run([DRGN, "-q", "-c", str(elf_dump), "--no-default-symbols", "-e",
                        "print(prog.flags); print(prog['UTS_RELEASE'].string_().decode())"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "IS_LINUX_KERNEL" in r.stdout
    assert release in r.stdout


@pytest.mark.timeout(120)
def test_read_hex_and_virtual(big: Guest) -> None:
    r = run_cli("read", "--vm", f"qmp:{big.qmp_path}", "--phys", "0x1000", "--size", "32")
    assert r.returncode == 0 and r.stdout.startswith("0000000000001000  ")
    # The kernel's own text through vCPU 0's page tables: the first bytes at RIP equal the physical read.
    info = json.loads(run_cli("info", "--vm", f"qmp:{big.qmp_path}", "--json").stdout)
    cpu = next(c for c in info["vcpus"] if c["cpl"] == 0)
    page = cpu["rip"] & ~0xFFF
    with attach(f"qmp:{big.qmp_path}") as vm:
        paddr = vm.translate(page, cr3=cpu["cr3"]).paddr

    def raw(*args: str) -> bytes:
        r = run_cli("read", "--vm", f"qmp:{big.qmp_path}", *args, "--size", "4096", "--format", "raw",
                    timeout=60, text=False)
        assert r.returncode == 0, r.stderr
        return r.stdout

    code = raw("--virt", hex(page), "--cr3", hex(cpu["cr3"]))
    assert len(code) == 4096 and code == raw("--phys", hex(paddr)) and code != bytes(4096)


# --- bad input: one line, exit status 2, never a traceback or a hang -----------------------------------
@pytest.mark.timeout(60)
def test_missing_socket(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("info", "--vm", f"qmp:{tmp_path}/none.sock"), "no QMP socket")


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
    assert_one_line_error(run_cli("info", "--vm", f"qmp:{path}"), "not a QMP socket")
    assert time.monotonic() - t0 < 20
    srv.close()


@pytest.mark.timeout(60)
def test_busy_vm_gets_clear_error_quickly(big: Guest) -> None:
    from aradia.machine.qemu import Qemu

    holder = Qemu(big.qmp_path)
    try:
        t0 = time.monotonic()
        assert_one_line_error(run_cli("info", "--vm", f"qmp:{big.qmp_path}"), "another client holds it")
        assert time.monotonic() - t0 < 15
    finally:
        holder.close()


@pytest.mark.timeout(60)
def test_address_outside_ram(big: Guest) -> None:
    r = run_cli("read", "--vm", f"qmp:{big.qmp_path}", "--phys", "0xc0000000", "--size", "16")
    assert_one_line_error(r, "0xc0000000", "not RAM")
    assert_one_line_error(run_cli("read", "--vm", f"qmp:{big.qmp_path}", "--virt", "0x1234000",
                                 "--cr3", "0x0", "--size", "16"))


@pytest.mark.timeout(120)
def test_truncated_elf(elf_dump: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.elf"
    with open(elf_dump, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(64 << 20))
    assert_one_line_error(run_cli("info", "--vm", str(cut)), "truncated")
    tiny = tmp_path / "tiny.elf"
    with open(elf_dump, "rb") as f:
        tiny.write_bytes(f.read(40))
    assert_one_line_error(run_cli("info", "--vm", str(tiny)))


@pytest.mark.timeout(120)
def test_corrupt_lime_header(big: Guest, tmp_path: Path) -> None:
    out = tmp_path / "g.lime"
    r = run_cli("dump", "--vm", f"qmp:{big.qmp_path}", "--format", "lime", "-o", str(out), timeout=300)
    assert r.returncode == 0, r.stderr
    with open(out, "r+b") as f:
        f.seek(8)
        f.write((0xFFFFFFFFFFFF0000).to_bytes(8, "little"))  # start address after the end address
    assert_one_line_error(run_cli("info", "--vm", str(out)), "LiME")
    with open(out, "r+b") as f:
        f.write(b"XXXX")  # bad magic: it is no longer LiME; read as raw it must still not crash
    # Without the magic nothing says LiME: the file is a raw image like any other (the guest's RAM, with
    # the LiME range headers in it), read as such, the kernel's banner found in it.
    r2 = run_cli("info", "--vm", str(out), "--json")
    assert r2.returncode == 0 and r2.stderr == "", r2.stderr
    info = json.loads(r2.stdout)
    size = out.stat().st_size
    assert (info["memory_path"], info["state"], info["vcpus"]) == ("raw", "dump", [])
    assert info["ram"] == [{"start": 0, "end": size, "size": size}]
    assert info["kernel"] == big.run("cat /proc/version").strip()
    os.unlink(out)


@pytest.mark.timeout(180)
def test_qemu_exit_while_attached(launch_guest: Callable[..., Guest], tmp_path: Path) -> None:
    g = launch_guest("6.1", memory="4G")
    out = tmp_path / "x.elf"
    p = subprocess.Popen(cli_argv("dump", "--vm", f"qmp:{g.qmp_path}", "--memory", "proc-mem", "--no-pause",
                                  "-o", str(out)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
def test_semantic_commands(big: Guest, witness: Witness, elf_dump: Path, target: str) -> None:
    """Every view, as a table and as JSON, against the guest's own /proc (the witness processes and
    init hold still between the dump and the reads of /proc)."""
    spec = f"qmp:{big.qmp_path}" if target == "live" else str(elf_dump)
    w, nc = str(witness.bash), str(witness.nc)
    docs, tables = {}, {}
    for cmd in (["ps"], ["ps", "--threads"], ["lsmod"], ["maps", "1"], ["maps", w], ["files", "1"], ["files", w],
                ["files", nc], ["net"], ["mounts"], ["dmesg"]):
        r = run_cli(*cmd, "--vm", spec, "--json")
        assert r.returncode == 0 and r.stderr == "", (cmd, r.stderr)
        doc = json.loads(r.stdout)
        assert doc["items"] and doc["warnings"] == [], cmd
        docs[" ".join(cmd)] = doc["items"]
        table = run_cli(*cmd, "--vm", spec)
        assert table.returncode == 0 and table.stderr == "" and len(table.stdout.splitlines()) >= 2, cmd
        tables[" ".join(cmd)] = table.stdout.splitlines()
    init = next(p for p in docs["ps"] if p["pid"] == 1)
    assert init["comm"] == big.run("cat /proc/1/comm").strip() and init["exe"]
    assert len(docs["ps --threads"]) >= len(docs["ps"])
    assert {m["name"] for m in docs["lsmod"]} == {name for name, _, _ in proc_modules(big)}
    assert docs["dmesg"][0]["text"].startswith("Linux version ")

    # maps: line for line what /proc/PID/maps says (the table prints them the same way, without dev)
    for pid in (1, witness.bash):
        truth = proc_maps(big, pid)
        got = [(m["start"], m["end"], m["perms"], m["offset"], m["inode"], m["path"]) for m in docs[f"maps {pid}"]]
        assert got == truth, pid
        assert tables[f"maps {pid}"] == [f"{lo:08x}-{hi:08x} {perms} {off:08x} {inode:<8} {path}".rstrip()
                                         for lo, hi, perms, off, inode, path in truth], pid
    assert any(m["path"] == "/bin/bash" and "x" in m["perms"] for m in docs[f"maps {w}"])

    # files: every fd with the path /proc/PID/fd links to and the flags fdinfo shows (nc waits in
    # accept(), its next descriptor reserved but not open)
    for pid in (1, witness.bash, witness.nc):
        truth_fds = proc_fds(big, pid)
        assert {f["fd"]: (f["path"], f["flags"]) for f in docs[f"files {pid}"]} == truth_fds, pid
        assert [line.split()[0] for line in tables[f"files {pid}"][1:]] == [str(fd) for fd in sorted(truth_fds)]
    files = {f["fd"]: f["path"] for f in docs[f"files {w}"]}
    assert files[5] == "/etc/passwd" and files[6] == "/tmp/aradia-cli.txt"

    # net: the socket the witness nc listens on, with its pid and fd, as the guest's /proc shows them
    tcp = proc_tcp(big)
    ((inode,),) = {(i,) for la, lp, _ra, _rp, st, i in tcp if lp == WITNESS_PORT and st == "LISTEN"}
    nc_fds = {fd for fd, (path, _) in proc_fds(big, witness.nc).items() if path == f"socket:[{inode}]"}
    listening = [s for s in docs["net"] if s["proto"] == "tcp" and s["local_port"] == WITNESS_PORT]
    assert [(s["state"], s["pid"], s["fd"], s["inode"]) for s in listening] == [
        ("LISTEN", witness.nc, fd, inode) for fd in nc_fds], (listening, nc_fds)
    held = {(s["local_address"], s["local_port"], s["remote_address"], s["remote_port"], s["state"], s["inode"])
            for s in docs["net"] if s["proto"] == "tcp" and s["state"] in ("ESTABLISHED", "LISTEN")}
    assert held <= tcp and any(s["state"] == "LISTEN" and s["local_port"] == 22 for s in docs["net"])
    assert any(f":{WITNESS_PORT} " in line and "LISTEN" in line and f" {witness.nc} " in f" {line} "
               for line in tables["net"])

    # mounts: /proc/mounts, in order
    mounts = proc_mounts(big)
    assert [(m["source"], m["target"], m["fstype"], "ro" if m["readonly"] else "rw") for m in docs["mounts"]] == mounts
    assert [line.split() for line in tables["mounts"][1:]] == [list(m) for m in mounts]
    assert any(m[1] == "/proc" and m[2] == "proc" for m in mounts)

    assert_one_line_error(run_cli("maps", "999999", "--vm", spec), "no process 999999")


@pytest.mark.timeout(120)
def test_shell_has_vm_and_prog(elf_dump: Path) -> None:
    script = "print('tasks', len(list(for_each_task(prog))))\nprint('ram', vm.memory.size)\n"
    r = run_cli("shell", "--vm", str(elf_dump), input=script)
    assert r.returncode == 0, r.stderr
    assert "tasks " in r.stdout and int(r.stdout.split("tasks ")[1].split()[0]) > 20
    assert f"ram {4 * GiB}" in r.stdout


@pytest.mark.timeout(120)
def test_btf_from_the_kernel_file(big: Guest, elf_dump: Path) -> None:
    with_file = run_cli("ps", "--vm", str(elf_dump), "--btf", str(big.image.vmlinuz), "--json")
    from_ram = run_cli("ps", "--vm", str(elf_dump), "--json")
    assert with_file.returncode == 0 and from_ram.returncode == 0, with_file.stderr
    assert json.loads(with_file.stdout) == json.loads(from_ram.stdout)
    bad = run_cli("ps", "--vm", str(elf_dump), "--btf", str(elf_dump))
    assert_one_line_error(bad)
