"""Random 4 KiB guest-physical reads per second on every memory path, against QMP ``xp`` as baseline.

Boots the default guest (RAM in a shared file, GDB stub on), writes ELF/raw/LiME dumps of it, then
times random page reads on each path within the same run and prints the ratios last. ``--arch arm64``
boots the lab's arm64 guest instead (``qemu-system-aarch64 -M virt``, RAM at 1 GiB; its ELF dump is
an AArch64 core). Usage:

    python bench/memory.py [--kernel 6.1] [--arch x86_64|arm64] [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable

from aradia.lab.images import build_guest
from aradia.lab.launcher import launch
from aradia.machine.qemu import Qemu
from aradia.sources import dumpwrite
from aradia.sources.dumpfile import open_dump_memory

PAGE = 4096


def measure(read: Callable[[int], object], pages: list[int], seconds: float) -> tuple[float, int]:
    """Read random pages until ``seconds`` pass; return (reads per second, reads done)."""
    n = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        for addr in pages:
            read(addr)
            n += 1
            if n % 64 == 0 and time.perf_counter() >= deadline:
                return n / (time.perf_counter() - t0), n


def main() -> int:
    """Run the benchmark and print one line per path, ratios last."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", default="6.1")
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--memory", default="256M")
    ap.add_argument("--arch", default="x86_64", choices=["x86_64", "arm64"], help="the guest's architecture")
    args = ap.parse_args()

    image = build_guest(args.kernel, arch=args.arch)
    results: dict[str, float] = {}
    with launch(image, shared_memory=True, gdb=True, memory=args.memory, boot_timeout=180) as guest, \
            tempfile.TemporaryDirectory() as tmp:
        qemu = Qemu(guest.qmp_path)
        ranges = qemu.ram_map()
        ram = ", ".join(f"{r.start:#x}+{r.size >> 20} MiB" for r in ranges)
        print(f"guest: {args.kernel} {qemu.arch.name}, RAM {ram}", flush=True)
        rng = random.Random(1)
        pages = []
        for _ in range(4096):
            r = rng.choice(ranges)
            pages.append(r.start + rng.randrange(r.size // PAGE) * PAGE)

        def xp(addr: int) -> None:
            qemu.qmp.hmp(f"xp /512gx {addr:#x}")

        rate, _ = measure(xp, pages[:512], args.seconds)
        results["qmp-xp"] = rate
        print(f"{'qmp-xp (baseline)':<22} {rate:12,.0f} reads/s {rate * PAGE / 1e6:10.1f} MB/s", flush=True)

        paths = {}
        for kind in ("shared-file", "proc-mem", "gdb"):
            paths[kind] = qemu.memory(kind)
        with qemu.paused():
            for fmt in ("elf", "raw", "lime"):
                out = os.path.join(tmp, f"mem.{fmt}")
                if fmt == "elf":  # a core of the guest's ELF machine (EM_AARCH64 on arm64)
                    dumpwrite.write_elf(paths["shared-file"], out, machine=qemu.arch.elf_machine)
                else:
                    getattr(dumpwrite, f"write_{fmt}")(paths["shared-file"], out)
                paths[f"dump-{fmt}"] = open_dump_memory(out)
        for kind, mem in paths.items():
            rate, _ = measure(lambda a, m=mem: m.read(a, PAGE), pages, args.seconds)
            results[kind] = rate
            print(f"{kind:<22} {rate:12,.0f} reads/s {rate * PAGE / 1e6:10.1f} MB/s", flush=True)
            mem.close()
        qemu.close()

    base = results.pop("qmp-xp")
    best = max(results, key=lambda k: results[k])
    ratios = "  ".join(f"{k}={v / base:,.0f}x" for k, v in results.items())
    print(f"ratio vs qmp-xp: {ratios}")
    print(f"ratio fastest ({best}) vs qmp-xp: {results[best] / base:,.0f}x, "
          f"{results[best] * PAGE / 1e9:.2f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
