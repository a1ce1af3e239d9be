"""The TCG plugin fast path on a real 6.1 guest (2 vCPUs): exact counts, the hit log, run-time
retargeting, and the guest's own syscall-loop rate with and without the counter.

Ground truth is a tiny freestanding program built here and copied into the guest: ``loop N`` makes
exactly N ``getppid`` syscalls and prints how long that took by the guest's own clock. Other
``getppid`` callers (the bash that ``Guest.run`` starts) are measured with ``loop 0``.
"""

from __future__ import annotations

import base64
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from aradia.errors import GuestError
from aradia.machine.images import GuestImage
from aradia.machine.launcher import Guest, launch
from aradia.proto.gdbrsp import GdbClient
from aradia.trace.plugin import (
    MAX_TARGETS,
    HitBatch,
    PluginError,
    PluginShm,
    build_plugin,
    force_retranslation,
    header_capabilities,
    plugin_capabilities,
)
from aradia.vm import VM, attach
from guest_programs import build_loop

SYMBOL = "__x64_sys_getppid"
N = 200_000
RATE_N = 50_000
RATE_ROUNDS = 16
SMP = 2

@dataclass
class Rig:
    """A booted guest with the plugin loaded, attached over QMP, its GDB stub held, ``/tmp/loop`` in."""

    guest: Guest
    shm: PluginShm
    vm: VM
    gdb: GdbClient
    target: int

    def loop(self, n: int, procs: int = 1) -> list[int]:
        """Run ``procs`` concurrent ``loop n``; the guest-measured ns of each."""
        cmd = " & ".join([f"/tmp/loop {n}"] * procs) + "; wait"
        out = self.guest.run(cmd, timeout=120)
        times = [int(m.group(1)) for m in re.finditer(rf"calls {n} ns (\d+)", out)]
        assert len(times) == procs, out
        return times

    def retarget(self, vaddr: int | None, **kwargs: bool) -> None:
        """Point slot 0 at ``vaddr`` and force re-translation of what changed."""
        changed = self.shm.set_target(0, vaddr, **kwargs)
        assert force_retranslation(self.gdb, changed) == []


@pytest.fixture(scope="module")
def rig(guest_image: Callable[[str], GuestImage], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """The module's guest; everything it started is stopped afterwards."""
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to build the plugin", pytrace=False)
    loop = build_loop(tmp_path_factory.mktemp("loop"))
    image = guest_image("6.1")
    so = build_plugin()
    # rings big enough for a whole test's hits: a drain thread starved by a loaded host loses none
    with PluginShm(max_vcpus=4, ring_entries=1 << 18) as shm:
        guest = launch(image, smp=SMP, plugins=[shm.plugin_arg(so)], gdb=True, shared_memory=True)
        try:
            vm = attach(f"qmp:{guest.qmp_path}")
            try:
                target = vm.linux.profile.symbol(SYMBOL)
                assert target is not None
                guest.run(f"echo {base64.b64encode(loop).decode()} | base64 -d > /tmp/loop; chmod +x /tmp/loop")
                gdb = GdbClient(f"127.0.0.1:{guest.gdb_port}", was_running=True)
                gdb.restore_run_state()
                try:
                    yield Rig(guest, shm, vm, gdb, target)
                finally:
                    gdb.close()
            finally:
                vm.close()
        finally:
            guest.stop()


def test_header_capabilities() -> None:
    """API version and optional calls are read from the header text, never assumed."""
    caps = header_capabilities("#define QEMU_PLUGIN_VERSION 4\n"
                               "bool qemu_plugin_read_register(struct qemu_plugin_register *h, GByteArray *b);\n")
    assert (caps.api_version, caps.insn_inline, caps.read_register, caps.read_memory) == (4, False, True, False)
    with pytest.raises(PluginError):
        header_capabilities("int x;\n")


@pytest.mark.timeout(600)
def test_build_is_cached() -> None:
    """The plugin builds for the installed QEMU; a second build is only a lookup."""
    so = build_plugin()
    caps = plugin_capabilities(so)
    assert so.exists() and caps.api_version >= 1
    started = time.monotonic()
    assert build_plugin() == so
    assert time.monotonic() - started < 0.5


def test_shm_rejects_bad_input() -> None:
    """Slots, addresses and modes are checked before anything reaches the shared file."""
    with PluginShm(max_vcpus=2, ring_entries=16) as shm:
        with pytest.raises(PluginError):
            shm.set_target(MAX_TARGETS, 0x1000)
        with pytest.raises(PluginError):
            shm.set_target(0, 1 << 64)
        with pytest.raises(PluginError):
            shm.set_target(0, 0x1000, inline=True)  # inline cannot log
        assert shm.set_target(0, 0x1000) == [0x1000]
        assert shm.set_target(0, 0x1000) == []
        assert shm.set_target(0, 0x2000) == [0x1000, 0x2000]
        assert shm.set_targets([0x3000]) == [0x2000, 0x3000]
        assert len(shm.drain()) == 0 and shm.count(0) == 0 and not shm.loaded
    with pytest.raises(PluginError):
        PluginShm(ring_entries=1000)


@pytest.mark.timeout(60)
def test_plugin_refuses_a_foreign_file(guest_image: Callable[[str], GuestImage], tmp_path: Path) -> None:
    """A shared file aradia did not lay out stops QEMU at start with the plugin's message."""
    bogus = tmp_path / "bogus"
    bogus.write_bytes(b"\0" * 8192)
    with pytest.raises(GuestError, match="not an aradia plugin file"):
        launch(guest_image("6.1"), plugins=[f"{build_plugin()},shm={bogus}"], ssh=False, boot_timeout=20)


@pytest.mark.timeout(120)
def test_count_is_exact(rig: Rig) -> None:
    """The count of the syscall entry equals the calls the guest made (plus measured background)."""
    assert rig.shm.loaded and rig.shm.status().smp_vcpus == SMP
    rig.retarget(rig.target, log=False)
    c0 = rig.shm.count(0)
    rig.loop(0)
    background = rig.shm.count(0) - c0
    c1 = rig.shm.count(0)
    rig.loop(N)
    counted = rig.shm.count(0) - c1 - background
    print(f"\nfast-path count {counted} for {N} calls (background {background} per run)")
    assert abs(counted - N) <= N * 0.005
    assert rig.shm.status().stale_hits == 0


@pytest.mark.timeout(120)
def test_log_two_vcpus(rig: Rig) -> None:
    """Two loops at once: every hit is logged once with its vCPU, address and host time."""
    rig.retarget(rig.target, log=True)
    rig.shm.drain()
    lost0 = rig.shm.lost
    batches: list[HitBatch] = []
    stop = threading.Event()

    def drain() -> None:
        while not stop.wait(0.005):
            batches.append(rig.shm.drain())

    c0 = rig.shm.count(0)
    before = time.monotonic_ns()
    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    try:
        rig.loop(N // 2, procs=2)
    finally:
        stop.set()
        thread.join(10)
    batches.append(rig.shm.drain())
    after = time.monotonic_ns()
    hits = [h for b in batches for h in b]
    counts = rig.shm.counts(0)
    total = rig.shm.count(0) - c0
    per_vcpu = [sum(1 for h in hits if h.vcpu == v) for v in range(SMP)]
    print(f"\nlogged {len(hits)} hits, counted {total}, per vCPU {per_vcpu}, lost {rig.shm.lost - lost0}")
    assert len(hits) + rig.shm.lost - lost0 == total
    assert rig.shm.lost == lost0
    assert abs(total - N) <= N * 0.005 + 20
    assert all(h.target == 0 and h.vaddr == rig.target and h.vcpu < SMP for h in hits)
    assert all(before <= h.time_ns <= after for h in hits)
    for v in range(SMP):
        times = [h.time_ns for h in hits if h.vcpu == v]
        assert times == sorted(times)
    assert sum(counts) >= total


@pytest.mark.timeout(120)
def test_retarget_at_run_time(rig: Rig) -> None:
    """Clearing the target stops counting at once: the old translations really were dropped."""
    rig.retarget(rig.target, log=False)
    rig.loop(1000)
    assert rig.shm.count(0) >= 1000
    status = rig.shm.status()
    rig.retarget(None)
    rig.loop(10_000)
    after = rig.shm.status()
    assert rig.shm.count(0) == 0
    assert after.stale_hits == status.stale_hits  # no stale translation ran
    rig.retarget(rig.target, log=False)
    rig.loop(1000)
    assert 1000 <= rig.shm.count(0) <= 1000 + 50


@pytest.mark.timeout(180)
def test_loop_rate_with_counter(rig: Rig) -> None:
    """The guest's own loop rate with the counter on stays >= 90 % of the rate without it.

    Other work shares the host's cores and only ever slows a run down, so short runs alternate
    between the modes and each mode keeps its best.
    """
    modes: dict[str, dict[str, bool] | None] = {"untargeted": None, "callback": {"log": False},
                                               "callback+log": {"log": True}}
    if rig.shm.status().insn_inline:
        modes["inline"] = {"log": False, "inline": True}
    rates: dict[str, list[float]] = {name: [] for name in modes}
    for _round in range(RATE_ROUNDS):
        for name, options in modes.items():
            rig.retarget(None if options is None else rig.target, **(options or {}))
            (ns,) = rig.loop(RATE_N)
            rates[name].append(RATE_N / ns * 1e9)
            rig.shm.drain()
    rig.retarget(None)
    best = {name: max(r) for name, r in rates.items()}
    base = best["untargeted"]
    print(f"\nguest getppid loop rate, best (median) of {RATE_ROUNDS} runs of {RATE_N}: " + ", ".join(
        f"{name} {best[name] / 1e3:.0f} k/s ({sorted(r)[len(r) // 2] / 1e3:.0f}) = {best[name] / base:.1%}"
        for name, r in rates.items()))
    # the counter is the fast path the issue measures; logging's cost is reported, not gated
    assert best["callback"] >= 0.9 * base
