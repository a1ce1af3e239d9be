"""``aradia files get|ls`` against a real guest with an ext4 virtio disk (image variant ``disk``).

Ground truth is the guest's own ``sha256sum``, ``ls -i``, ``/proc/meminfo`` and ``mincore``
(``pcache resident``); the disk is made on the host with ``mke2fs -d`` and read by aradia through
QEMU's own NBD export.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from aradia.lab.disk import disk_args, make_ext4
from aradia.lab.images import build_guest
from aradia.lab.launcher import Guest, launch
from cli_runner import assert_one_line_error, run_cli
from guest_programs import build_pcache, install_program

pytestmark = [pytest.mark.guest, pytest.mark.timeout(900)]

PAGE = 4096
HALF_PAGES = 256 + 1  # half.bin: 1 MiB and 5 bytes
EVICT_RUN = 4  # pages evicted, then kept, alternately


@pytest.fixture(scope="module", params=["6.1", "6.12", "5.10"])
def g(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    """A guest of the ``disk`` variant (each kernel series) with /dev/vda (ext4, made on the host) mounted on /mnt/d,
    periodic writeback off (so unsynced writes stay dirty), and ``/tmp/pcache`` installed."""
    tmp = tmp_path_factory.mktemp("extract")
    rng = random.Random(14)
    files = {"data/full.bin": rng.randbytes(300 * 1024 + 123),
             "data/half.bin": rng.randbytes(HALF_PAGES * PAGE - PAGE + 5),
             "data/dirty.bin": rng.randbytes(16 * PAGE)}
    disk = make_ext4(tmp / "disk.img", files)
    with launch(build_guest(request.param, variant="disk"), shared_memory=True,
                extra_args=disk_args([disk])) as guest:
        install_program(guest, "pcache", build_pcache(tmp))
        guest.run("mkdir -p /mnt/d && mount -t ext4 /dev/vda /mnt/d && "
                  "echo 0 > /proc/sys/vm/dirty_writeback_centisecs && "
                  "echo 360000 > /proc/sys/vm/dirty_expire_centisecs")
        yield guest


def guest_sha(g: Guest, path: str) -> str:
    """The guest's own sha256sum of ``path``."""
    return g.run(f"sha256sum {path}").split()[0]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def get(g: Guest, out: Path, *args: str) -> dict:
    """``aradia files get --vm qmp:... ARGS -o OUT --json``: its one file's document."""
    r = run_cli("files", "get", "--vm", f"qmp:{g.qmp_path}", *args, "-o", str(out), "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    doc = json.loads(r.stdout)
    assert len(doc["files"]) == 1
    return doc["files"][0]


def page_sources(doc: dict) -> str:
    """One letter per page: c cache, d dirty, k disk, h hole, m missing."""
    letter = {"cache": "c", "cache-dirty": "d", "disk": "k", "hole": "h", "missing": "m"}
    out = ""
    for e in doc["extents"]:
        out += letter[e["source"]] * (-(-e["end"] // PAGE) - e["start"] // PAGE)
    return out


def residency(g: Guest, path: str) -> str:
    m = re.search(r"resident (\d+) of (\d+) ([01]*)", g.run(f"/tmp/pcache resident {path}"))
    assert m, "pcache printed no residency"
    return m.group(3)


def cached_kb(g: Guest) -> int:
    return int(re.search(r"^Cached:\s+(\d+) kB", g.run("cat /proc/meminfo"), re.M).group(1))


def test_tmpfs_file_with_holes(g: Guest, tmp_path: Path) -> None:
    g.run("dd if=/dev/urandom of=/tmp/sparse.bin bs=4096 count=3 seek=10 2>/dev/null && "
          "head -c 5000 /dev/urandom >> /tmp/sparse.bin")
    truth = guest_sha(g, "/tmp/sparse.bin")
    doc = get(g, tmp_path / "sparse.bin", "/tmp/sparse.bin")
    assert sha(tmp_path / "sparse.bin") == truth == doc["sha256"]
    assert doc["fstype"] == "tmpfs" and doc["complete"] is True
    # 10 pages never written: holes (zeros, as the guest reads them); 3 + 2 pages written
    assert doc["bytes"] == {"hole": 10 * PAGE, "cache": 3 * PAGE + 5000}
    assert page_sources(doc) == "h" * 10 + "c" * 5


def test_ext4_fully_cached(g: Guest, tmp_path: Path) -> None:
    truth = guest_sha(g, "/mnt/d/data/full.bin")  # reads every page into the page cache
    assert set(residency(g, "/mnt/d/data/full.bin")) == {"1"}
    doc = get(g, tmp_path / "full.bin", "/mnt/d/data/full.bin", "--source", "memory")
    assert sha(tmp_path / "full.bin") == truth == doc["sha256"]
    assert doc["fstype"] == "ext4" and doc["complete"] is True
    assert doc["bytes"] == {"cache": 300 * 1024 + 123}


def test_ext4_half_evicted_cache_over_disk_and_cache_unchanged(g: Guest, tmp_path: Path) -> None:
    path = "/mnt/d/data/half.bin"
    truth = guest_sha(g, path)
    g.run(f"/tmp/pcache evict {path} {EVICT_RUN}")
    before = residency(g, path)
    assert len(before) == HALF_PAGES
    assert before.count("0") >= HALF_PAGES // 2 - EVICT_RUN and before.count("1") >= HALF_PAGES // 2 - EVICT_RUN
    cached_before = cached_kb(g)
    doc = get(g, tmp_path / "half.bin", path)
    assert sha(tmp_path / "half.bin") == truth == doc["sha256"]
    assert doc["complete"] is True
    # page by page: what mincore says is resident came from the cache, the rest from the disk
    assert page_sources(doc) == before.replace("1", "c").replace("0", "k")
    # without the disk, the evicted pages are reported missing, exactly those
    mem = get(g, tmp_path / "half-mem.bin", path, "--source", "memory")
    assert mem["complete"] is False
    assert page_sources(mem) == before.replace("1", "c").replace("0", "m")
    assert sha(tmp_path / "half-mem.bin") != truth
    # the guest's page cache is as it was: same pages of the file resident, same Cached total
    assert residency(g, path) == before
    # Cached moves by a few pages between any two guest commands (each Guest.run writes and removes
    # its script in /tmp, a tmpfs counted in Cached): 64 kB of slack, far below the 512 kB that
    # reading the evicted half back into the cache would add.
    evicted_kb = before.count("0") * PAGE // 1024
    assert evicted_kb >= 480
    assert abs(cached_kb(g) - cached_before) <= 64


def test_unsynced_write_new_from_cache_old_from_disk(g: Guest, tmp_path: Path) -> None:
    path = "/mnt/d/data/dirty.bin"
    old = guest_sha(g, path)
    g.run(f"dd if=/dev/urandom of={path} bs=4096 count=16 conv=notrunc 2>/dev/null")
    new = guest_sha(g, path)
    assert new != old
    assert "Dirty:" in g.run("grep Dirty: /proc/meminfo")
    doc = get(g, tmp_path / "new.bin", path)
    assert sha(tmp_path / "new.bin") == new == doc["sha256"]
    assert doc["bytes"] == {"cache-dirty": 16 * PAGE}
    disk = get(g, tmp_path / "old.bin", path, "--source", "disk")
    assert sha(tmp_path / "old.bin") == old == disk["sha256"]
    assert disk["bytes"] == {"disk": 16 * PAGE}


def test_deleted_file_still_open(g: Guest, tmp_path: Path) -> None:
    g.run("head -c 150001 /dev/urandom > /mnt/d/gone.bin")
    truth = guest_sha(g, "/mnt/d/gone.bin")
    out = g.run("(/tmp/pcache hold /mnt/d/gone.bin > /tmp/hold.out &) ; sleep 0.5; cat /tmp/hold.out")
    pid, fd = map(int, re.search(r"held (\d+) fd (\d+)", out).groups())
    g.run("rm /mnt/d/gone.bin")
    assert "(deleted)" in g.run(f"readlink /proc/{pid}/fd/{fd}")
    doc = get(g, tmp_path / "gone.bin", "--pid", str(pid), "--fd", str(fd))
    assert sha(tmp_path / "gone.bin") == truth == doc["sha256"]
    assert doc["deleted"] is True and doc["name"] == "/mnt/d/gone.bin (deleted)"
    assert doc["complete"] is True
    # the path itself is gone
    r = run_cli("files", "get", "--vm", f"qmp:{g.qmp_path}", "/mnt/d/gone.bin", "-o", str(tmp_path / "x"))
    assert_one_line_error(r, "gone.bin", "not found")


def test_deleted_running_executable(g: Guest, tmp_path: Path) -> None:
    g.run("cp /tmp/pcache /mnt/d/runner")
    truth = guest_sha(g, "/mnt/d/runner")
    out = g.run("(/mnt/d/runner sleep > /tmp/run.out &) ; sleep 0.5; cat /tmp/run.out")
    pid = int(re.search(r"sleeping (\d+)", out).group(1))
    g.run("rm /mnt/d/runner")
    assert guest_sha(g, f"/proc/{pid}/exe") == truth
    doc = get(g, tmp_path / "runner", "--pid", str(pid), "--exe")
    assert sha(tmp_path / "runner") == truth == doc["sha256"]
    assert doc["deleted"] is True and doc["name"] == "/mnt/d/runner (deleted)"


def test_all_mapped(g: Guest, tmp_path: Path) -> None:
    pid = int(g.run("cat /run/dropbear.pid").strip())
    paths = sorted({line.split()[5] for line in g.run(f"cat /proc/{pid}/maps").splitlines()
                    if len(line.split()) >= 6 and line.split()[5].startswith("/")})
    truth = {p: guest_sha(g, p) for p in paths}
    r = run_cli("files", "get", "--vm", f"qmp:{g.qmp_path}", "--pid", str(pid), "--all-mapped",
                "-o", str(tmp_path / "mapped"), timeout=300)
    assert r.returncode == 0, r.stderr
    assert re.search(rf"^{len(paths)} file\(s\), \d+ bytes in [\d.]+ s \([\d.]+ MB/s\)$", r.stdout, re.M), r.stdout
    got = {p.name: sha(p) for p in (tmp_path / "mapped").iterdir()}
    assert got == {p.strip("/").replace("/", "_"): s for p, s in truth.items()}


def test_ls(g: Guest) -> None:
    g.run("ls /mnt/d/data > /dev/null")
    truth = {}
    for line in g.run("ls -ln /mnt/d/data").splitlines()[1:]:
        f = line.split()
        truth[f[-1]] = int(f[4])
    inodes = {line.split()[1]: int(line.split()[0]) for line in g.run("ls -i1 /mnt/d/data").splitlines()}
    r = run_cli("files", "ls", "--vm", f"qmp:{g.qmp_path}", "/mnt/d/data", "--json")
    assert r.returncode == 0, r.stderr
    items = json.loads(r.stdout)["items"]
    assert {i["name"]: i["size"] for i in items} == truth
    assert {i["name"]: i["ino"] for i in items} == inodes
    assert len(truth) == 3


def test_bad_input(g: Guest, tmp_path: Path) -> None:
    vm = f"qmp:{g.qmp_path}"
    assert_one_line_error(run_cli("files", "get", "--vm", vm, "/mnt/d/data", "-o", str(tmp_path / "x")),
                          "not a regular file")
    assert_one_line_error(run_cli("files", "get", "--vm", vm, "--pid", "999999", "--exe", "-o", str(tmp_path / "x")),
                          "no process 999999")
    assert_one_line_error(run_cli("files", "get", "--vm", vm, "--pid", "1", "--fd", "77", "-o", str(tmp_path / "x")),
                          "no open file descriptor 77")
    assert_one_line_error(run_cli("files", "get", "--vm", vm, "--pid", "1", "-o", str(tmp_path / "x")),
                          "exactly one of")
    assert_one_line_error(run_cli("files", "ls", "--vm", vm, "/nonexistent"), "not found")
    with contextlib.suppress(FileNotFoundError):
        (tmp_path / "x").unlink()


def test_absurd_inode_size_is_a_one_line_error(g: Guest, tmp_path: Path) -> None:
    """Guest data is untrusted: an inode whose i_size says 4 EiB (written by the test into guest
    memory) is refused with one line, and the same file with its size restored extracts."""
    from aradia.apps.extract.targets import by_path
    from aradia.vm import attach

    g.run("head -c 10000 /dev/urandom > /tmp/victim.bin")
    truth = guest_sha(g, "/tmp/victim.bin")

    def set_size(value: int | None) -> int:
        with attach(f"qmp:{g.qmp_path}") as vm:
            inode = by_path(vm.load_kernel().prog, "/tmp/victim.bin").inode
            addr = inode.i_size.address_
            old = int.from_bytes(vm.read_virt(addr, 8), "little")
            if value is not None:
                vm.write_virt(addr, value.to_bytes(8, "little"))
            return old

    original = set_size(1 << 62)
    assert original == 10000
    try:
        r = run_cli("files", "get", "--vm", f"qmp:{g.qmp_path}", "/tmp/victim.bin", "-o", str(tmp_path / "v"))
        assert_one_line_error(r, "/tmp/victim.bin", "size 4611686018427387904 is out of range")
    finally:
        assert set_size(original) == 1 << 62
    assert get(g, tmp_path / "v", "/tmp/victim.bin")["sha256"] == truth
