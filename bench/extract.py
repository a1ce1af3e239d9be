"""Forensic extraction speed: the AES schedule scan and file extraction, each against a baseline
measured in the same run; ratios last.

* **AES scan** (host only): ``--mib`` MiB of random data (numpy, seeded) with one AES-128, -192 and
  -256 schedule planted; aradia's numpy scanner (``aradia.apps.extract.aes_scan.scan``) against a
  plain byte-wise Python scan (every byte offset, every key size, the expansion's relations checked
  word by word until one breaks; timed on the first 256 KiB, MB/s extrapolated) and against Debian's
  ``aeskeyfind`` (C; on the same bytes as a file) when it is installed. Each must find the 3 keys.
* **files** (one guest, image variant ``disk``, 6.1, TCG): a ``--file-mib`` MiB file on the guest's
  ext4 disk (made on the host with ``mke2fs -d``), read once in the guest so it is in the page cache;
  aradia extracts it (library, attached once: page cache only, then with every other 64 KiB evicted so
  half comes through QEMU's NBD export) against ``ssh guest cat FILE`` (dropbear, the guest's own
  read). All three copies are checked against the guest's own sha256sum.

    python bench/extract.py [--mib 256] [--file-mib 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from aradia.apps.extract.aes_expand import expand, g, schedule_bytes, schedule_words
from aradia.apps.extract.aes_scan import scan
from aradia.apps.extract.disk import DiskFiles
from aradia.apps.extract.files import Extraction, extract_inode
from aradia.apps.extract.ranges import totals
from aradia.apps.extract.targets import by_path
from aradia.lab.disk import disk_args, make_ext4
from aradia.lab.images import build_guest
from aradia.lab.launcher import launch
from aradia.vm import attach

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from guest_programs import build_pcache, install_program  # the tests' guest program: one definition


def planted_buffer(mib: int) -> tuple[bytes, set[str]]:
    """``mib`` MiB of seeded random bytes with three clean schedules; the keys."""
    buf = bytearray(np.random.default_rng(14).bytes(mib << 20))
    rng = random.Random(14)
    keys = set()
    for i, n in enumerate((16, 24, 32)):
        key = rng.randbytes(n)
        at = (len(buf) // 4) * (i + 1) + i
        buf[at:at + 4 * schedule_words(n // 4)] = schedule_bytes(expand(key))
        keys.add(key.hex())
    return bytes(buf), keys


def bytewise_scan(buf: bytes) -> list[str]:
    """The plain scanner: at each byte offset and key size, check w[j] == w[j-nk] ^ g(w[j-1], j) in
    order and stop at the first relation that breaks (exact schedules only)."""
    found = []
    for i in range(len(buf) - 4 * schedule_words(4) + 1):
        for nk in (4, 6, 8):
            total = schedule_words(nk)
            if i + 4 * total > len(buf):
                continue
            w = [int.from_bytes(buf[i + 4 * k:i + 4 * k + 4], "little") for k in range(nk)]
            for j in range(nk, total):
                x = int.from_bytes(buf[i + 4 * j:i + 4 * j + 4], "little")
                if x != w[j - nk] ^ g(w[j - 1], j, nk):
                    break
                w.append(x)
            else:
                found.append(b"".join(v.to_bytes(4, "little") for v in w[:nk]).hex())
    return found


def bench_aes(mib: int, rounds: int) -> dict[str, float]:
    buf, keys = planted_buffer(mib)
    best = min(_timed(lambda: scan(buf)) for _ in range(rounds))
    got = {k.key for k in scan(buf)}
    assert got == keys, f"aradia found {got}, planted {keys}"
    rates = {"aradia": len(buf) / best / 1e6}
    print(f"aes scan aradia (numpy)     {rates['aradia']:8.1f} MB/s  ({mib} MiB in {best:.2f} s, 3/3 keys)")
    sample = buf[:256 << 10]
    t = _timed(lambda: bytewise_scan(sample))
    rates["bytewise"] = len(sample) / t / 1e6
    print(f"aes scan byte-wise Python   {rates['bytewise']:8.3f} MB/s  (256 KiB in {t:.2f} s)")
    assert set(bytewise_scan(schedule_bytes(expand(bytes(range(16)))))) == {bytes(range(16)).hex()}
    if shutil.which("aeskeyfind"):
        with tempfile.NamedTemporaryFile(suffix=".mem") as fh:
            fh.write(buf)
            fh.flush()
            times, out = [], ""
            for _ in range(rounds):
                t0 = time.perf_counter()
                out = subprocess.run(["aeskeyfind", "-q", fh.name], capture_output=True, text=True,
                                     check=True, timeout=3600).stdout
                times.append(time.perf_counter() - t0)
            found = {line.strip() for line in out.splitlines() if line.strip()}
            rates["aeskeyfind"] = len(buf) / min(times) / 1e6
            print(f"aes scan aeskeyfind (C)     {rates['aeskeyfind']:8.1f} MB/s  ({min(times):.2f} s, "
                  f"{len(found & keys)}/3 keys)")
    else:
        print("aes scan aeskeyfind         not installed (apt-get install aeskeyfind)")
    return rates


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_files(file_mib: int, rounds: int) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="aradia-bench-extract-"))
    try:
        data = random.Random(1).randbytes(file_mib << 20)
        truth_host = hashlib.sha256(data).hexdigest()
        disk = make_ext4(tmp / "disk.img", {"big.bin": data}, size_mib=file_mib * 2 + 32)
        with launch(build_guest("6.1", variant="disk"), shared_memory=True, memory="512M",
                    extra_args=disk_args([disk])) as guest:
            install_program(guest, "pcache", build_pcache(tmp))
            guest.run("mkdir -p /mnt/d && mount /dev/vda /mnt/d")
            truth = guest.run("sha256sum /mnt/d/big.bin", timeout=300).split()[0]
            assert truth == truth_host
            rates: dict[str, float] = {}
            ssh_times = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                got = subprocess.run([*guest.ssh_argv(), "cat /mnt/d/big.bin"], capture_output=True,
                                     check=True, timeout=1200).stdout
                ssh_times.append(time.perf_counter() - t0)
                assert hashlib.sha256(got).hexdigest() == truth
            rates["ssh"] = len(data) / min(ssh_times) / 1e6
            vm = attach(f"qmp:{guest.qmp_path}")
            try:
                prog = vm.load_kernel().prog
                for label, evict in (("cache", False), ("cache+disk", True)):
                    if evict:
                        guest.run("/tmp/pcache evict /mnt/d/big.bin 16 > /dev/null")
                    times = []
                    for _ in range(rounds):
                        with DiskFiles(vm.machine) as df:
                            out = io.BytesIO()
                            t0 = time.perf_counter()
                            x = extract_inode(vm.memory.read, by_path(prog, "/mnt/d/big.bin").inode, out,
                                              disk=df)
                            times.append(time.perf_counter() - t0)
                        assert x.sha256 == truth and x.complete
                    rates[label] = len(data) / min(times) / 1e6
                    print(f"file {file_mib} MiB aradia ({label:<10}) {rates[label]:8.1f} MB/s  "
                          f"({min(times):.2f} s; bytes by source {_by_source(x)})")
            finally:
                vm.close()
            print(f"file {file_mib} MiB ssh cat (dropbear)  {rates['ssh']:8.1f} MB/s  "
                  f"({min(ssh_times):.2f} s)")
            return rates
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _by_source(x: Extraction) -> str:
    return ", ".join(f"{k} {v / (1 << 20):.1f} MiB" for k, v in totals(x.extents).items())


def main() -> int:
    """Run both sections and print the ratios last."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=256, help="random data for the AES scan (MiB)")
    ap.add_argument("--file-mib", type=int, default=32, help="size of the extracted file (MiB)")
    ap.add_argument("--rounds", type=int, default=3, help="runs per measurement (the best is kept)")
    args = ap.parse_args()
    aes = bench_aes(args.mib, args.rounds)
    files = bench_files(args.file_mib, args.rounds)
    print("ratios:")
    print(f"  aes scan aradia / byte-wise Python       {aes['aradia'] / aes['bytewise']:10.0f}x")
    if "aeskeyfind" in aes:
        print(f"  aes scan aradia / aeskeyfind             {aes['aradia'] / aes['aeskeyfind']:10.2f}x")
    print(f"  file extraction (cache) / ssh cat        {files['cache'] / files['ssh']:10.2f}x")
    print(f"  file extraction (cache+disk) / ssh cat   {files['cache+disk'] / files['ssh']:10.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
