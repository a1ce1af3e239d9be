"""AES key schedules in a VM: all guest RAM, or one process's memory (its virtual address space).

RAM is read in large chunks (overlapping by one schedule, so none straddling a chunk is missed);
a process's memory page by page through its own page tables (pages not present are skipped), in
runs of virtually contiguous pages so a schedule across a page boundary is still whole.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import drgn

from aradia.apps.extract.aes_scan import DEFAULT_MAX_ERRORS, MAX_SCHEDULE, AesKey, scan
from aradia.errors import AradiaError
from aradia.linux.kernel import LinuxVM
from aradia.linux.maps import maps, user_root

CHUNK = 64 << 20
PAGE = 4096
MAX_PROCESS_BYTES = 8 << 30  # virtual bytes walked in one process


@dataclass
class AesScan:
    """What a scan found, how many bytes it read and how long it took."""

    keys: list[AesKey]
    scanned: int
    seconds: float
    where: str

    @property
    def mb_per_s(self) -> float:
        """Scan throughput in MB/s (10^6 bytes)."""
        return self.scanned / self.seconds / 1e6 if self.seconds > 0 else 0.0


def _ram_chunks(vm: LinuxVM) -> Iterator[tuple[int, bytes]]:
    for r in vm.memory.ranges():
        pos = r.start
        while pos < r.end:
            n = min(CHUNK + MAX_SCHEDULE, r.end - pos)
            yield pos, vm.memory.read(pos, n)
            pos += CHUNK


def scan_ram(vm: LinuxVM, *, max_errors: int = DEFAULT_MAX_ERRORS) -> AesScan:
    """Every AES schedule in the guest's RAM; addresses are guest-physical."""
    started = time.perf_counter()
    keys: dict[tuple[int, int], AesKey] = {}
    scanned = 0
    for base, data in _ram_chunks(vm):
        scanned += min(len(data), CHUNK)
        for k in scan(data, base, max_errors=max_errors):
            keys[(k.address, k.bits)] = k  # the overlap may find one twice
    return AesScan(sorted(keys.values(), key=lambda k: k.address), scanned, time.perf_counter() - started,
                   "guest RAM (physical addresses)")


def process_runs(vm: LinuxVM, prog: drgn.Program, pid: int) -> Iterator[tuple[int, bytearray]]:
    """(virtual address, bytes) of each run of present pages of process ``pid`` (one page-table walk
    per VMA; virtually contiguous pages joined, wherever they lie physically)."""
    root = user_root(prog, pid)
    la57 = vm.kernel_root()[1]
    walked = 0
    run_start, run = 0, bytearray()
    for m in maps(prog, pid):
        walked += m.end - m.start
        if walked > MAX_PROCESS_BYTES:
            raise AradiaError(f"process {pid} maps more than {MAX_PROCESS_BYTES >> 30} GiB")
        for pm in vm.translator.mappings(root, la57, m.start, m.end):
            if run and run_start + len(run) != pm.vaddr:
                yield run_start, run
                run = bytearray()
            if not run:
                run_start = pm.vaddr
            run += vm.memory.read(pm.paddr, pm.size)
            if len(run) >= CHUNK:  # keep runs bounded; a schedule across the cut is in the next run's
                yield run_start, run  # overlap
                tail = run[-MAX_SCHEDULE:]
                run_start, run = run_start + len(run) - len(tail), bytearray(tail)
    if run:
        yield run_start, run


def scan_process(vm: LinuxVM, pid: int, *, max_errors: int = DEFAULT_MAX_ERRORS) -> AesScan:
    """Every AES schedule in process ``pid``'s memory; addresses are its virtual addresses."""
    prog = vm.load_kernel().prog
    started = time.perf_counter()
    keys: dict[tuple[int, int], AesKey] = {}
    scanned = 0
    for base, data in process_runs(vm, prog, pid):
        scanned += len(data)
        for k in scan(data, base, max_errors=max_errors):
            keys[(k.address, k.bits)] = k  # a run's overlap with the next may find one twice
    return AesScan(sorted(keys.values(), key=lambda k: k.address), scanned, time.perf_counter() - started,
                   f"process {pid} (virtual addresses)")


__all__ = ["AesScan", "process_runs", "scan_process", "scan_ram"]
