"""Control of one running QEMU through its QMP socket: state, pause/resume epochs, vCPUs, RAM map.

Freshness rule (used by every cache above this layer): :meth:`Qemu.stamp` returns a token that stays
equal only while the guest is paused and has not run since; it returns ``None`` while the guest runs.
Pause and resume go through this object (it is the one QMP client QEMU allows) and every STOP/RESUME
event (also those caused by a GDB stub client) bumps the epoch, so a cache keyed by the stamp can never
serve data from before the guest last ran.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from aradia.errors import AradiaError, NotAttached, ProtocolError
from aradia.machine.arch import Architecture, from_qemu_target
from aradia.machine.stubaddress import free_port, gdb_address_from_chardevs, gdb_address_from_cmdline
from aradia.proto.gdbrsp import GdbClient
from aradia.proto.mtree import FlatRange, ram_ranges
from aradia.proto.qmp import QMPClient, QMPCommandError, QMPEvent
from aradia.sources.base import PhysicalMemory, Segment
from aradia.sources.gdbstub import GdbMemory
from aradia.sources.procmem import ProcMemory
from aradia.sources.sharedfile import SharedFileMemory

#: The QEMU to run (test lab, plugin builder); ``$ARADIA_QEMU`` points at another build or a wrapper.
QEMU_BINARY = os.environ.get("ARADIA_QEMU", "qemu-system-x86_64")

_GPA2HVA = re.compile(r"is\s+(0x[0-9a-fA-F]+)")


def process_cmdline(pid: int) -> list[str]:
    """The command line of process ``pid`` as its ``argv`` (from ``/proc/PID/cmdline``).

    Arguments are decoded with ``surrogateescape`` (a path in them round-trips to the same bytes);
    empty arguments are kept. Raises :class:`OSError` when the process is gone or not readable.
    """
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        raw = f.read()
    return [a.decode(errors="surrogateescape") for a in raw.removesuffix(b"\0").split(b"\0")] if raw else []


@dataclass(frozen=True)
class VCpu:
    """One virtual CPU as QEMU lists it."""

    index: int
    thread_id: int
    qom_path: str
    arch: str


@dataclass(frozen=True)
class RamBackend:
    """A memory backend QEMU uses for guest RAM (``query-memdev``)."""

    id: str
    size: int
    share: bool
    mem_path: str | None


class Qemu:
    """One QEMU, reached through its QMP socket (the only QMP client QEMU allows at a time)."""

    def __init__(self, qmp_path: str | os.PathLike[str], *, greeting_timeout: float = 3.0) -> None:
        self.qmp = QMPClient(qmp_path, greeting_timeout=greeting_timeout)
        self.path = self.qmp.path
        self.pid = self.qmp.pid
        self._state_lock = threading.Lock()
        self.epoch = 0
        self._running = True
        self.shutdown_seen = False
        self._arch: Architecture | None = None
        self.qmp.on_event(self._on_event)
        self._refresh_state()

    @property
    def arch(self) -> Architecture:
        """The guest's architecture, from QMP ``query-target``, set up for the running kernel where
        that matters (arm64: VA size and descriptor format from vCPU 0's TCR_EL1, read through the
        GDB stub; if the stub cannot be asked, the default 48-bit walk, which :meth:`aradia.vm.VM.
        kernel_root` checks against TCR_EL1 later). Asked once: a guest rebooting into another kernel
        needs a new attach."""
        if self._arch is None:
            arch = from_qemu_target(str(self.qmp.execute("query-target").get("arch", "")))
            if arch.system_registers:
                with contextlib.suppress(AradiaError):
                    arch = arch.for_registers(self.gdb_registers(arch.system_registers).get(0, {}))
            self._arch = arch
        return self._arch

    @property
    def version(self) -> tuple[int, int, int]:
        """QEMU's version from the QMP greeting."""
        return self.qmp.version

    # --- run state and epochs ----------------------------------------------------------------
    def _on_event(self, ev: QMPEvent) -> None:
        with self._state_lock:
            if ev.name == "STOP":
                self._running = False
                self.epoch += 1
            elif ev.name == "RESUME":
                self._running = True
                self.epoch += 1
            elif ev.name in ("SHUTDOWN", "RESET"):
                self.shutdown_seen = ev.name == "SHUTDOWN"
                self.epoch += 1

    def _refresh_state(self) -> str:
        st = self.qmp.execute("query-status")
        status = str(st.get("status", "unknown"))
        with self._state_lock:
            running = status == "running"
            if running != self._running:
                self.epoch += 1
            self._running = running
        return status

    def status(self) -> str:
        """QEMU's run state (``running``, ``paused``, ``debug``, ``shutdown``, ...)."""
        return self._refresh_state()

    @property
    def running(self) -> bool:
        """Whether the guest's vCPUs run (as last seen through QMP)."""
        return self._running

    def stamp(self) -> tuple[int, int] | None:
        """Freshness token: equal while the guest stays paused in one epoch, ``None`` while it runs."""
        with self._state_lock:
            return None if self._running else (id(self), self.epoch)

    def pause(self) -> None:
        """Stop all vCPUs (QMP ``stop`` returns once they are stopped)."""
        self.qmp.execute("stop")
        with self._state_lock:
            if self._running:
                self._running = False
                self.epoch += 1

    def resume(self) -> None:
        """Let the vCPUs run again. Caches keyed by the old stamp are invalid from this moment."""
        with self._state_lock:
            # Mark running before QEMU resumes so no reader can take a stamp that outlives the pause.
            self._running = True
            self.epoch += 1
        self.qmp.execute("cont")

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Pause for the block (a consistent point-in-time view); resume after it if it was running."""
        was_running = self._refresh_state() == "running"
        if was_running:
            self.pause()
        try:
            yield
        finally:
            if was_running and self.qmp.alive:
                self.resume()

    # --- vCPUs ---------------------------------------------------------------------------------
    def vcpus(self) -> list[VCpu]:
        """The guest's vCPUs."""
        out = []
        for c in self.qmp.execute("query-cpus-fast"):
            out.append(VCpu(int(c["cpu-index"]), int(c.get("thread-id", 0)), str(c.get("qom-path", "")),
                            str(c.get("target", c.get("arch", "")))))
        return out

    def registers(self) -> dict[int, dict[str, int]]:
        """Registers of every vCPU as HMP ``info registers`` shows them (x86-64: general purpose, rip,
        rflags, cr0-cr4, efer, segment bases; arm64: x0-x30, sp, pc, cpsr)."""
        text = self.qmp.hmp("info registers -a")
        regs = self.arch.parse_info_registers(text)
        if not regs:
            raise ProtocolError(f"cannot parse QEMU's 'info registers' output: {text[:120]!r}")
        return regs

    def gdb_registers(self, names: Sequence[str]) -> dict[int, dict[str, int]]:
        """Registers ``names`` (GDB stub names, e.g. arm64 ``ttbr1_el1``) of every vCPU, by vCPU index.

        For registers HMP does not show (arm64 system registers). Opens a short-lived GDB stub client
        (starting a stub if QEMU has none): QEMU pauses the VM while it is connected, and closing it
        leaves the VM in the run state it had. The stub serves one client: while another holds it,
        this raises :class:`~aradia.errors.Busy`.
        """
        client = GdbClient(self.gdb_address(), was_running=self.status() == "running")
        try:
            out: dict[int, dict[str, int]] = {}
            for index, thread in enumerate(client.threads()):
                out[index] = {n: client.read_register(n, thread) for n in names}
            return out
        finally:
            client.close()

    # --- RAM map -------------------------------------------------------------------------------
    def ram_backends(self) -> list[RamBackend]:
        """The memory backends that hold guest RAM, with their file paths where shared."""
        out = []
        for m in self.qmp.execute("query-memdev"):
            mid = m.get("id")
            if not mid:
                continue
            path = None
            with contextlib.suppress(QMPCommandError):
                path = self.qmp.execute("qom-get", {"path": f"/objects/{mid}", "property": "mem-path"})
            out.append(RamBackend(str(mid), int(m.get("size", 0)), bool(m.get("share")),
                                  str(path) if path else None))
        return out

    def ram_map(self) -> list[FlatRange]:
        """Guest-physical RAM ranges with their backing region and offset (``info mtree -f``)."""
        backends = {b.id for b in self.ram_backends()} or {"pc.ram"}
        return ram_ranges(self.qmp.hmp("info mtree -f"), backends)

    def gpa2hva(self, gpa: int) -> int:
        """Host virtual address in QEMU of guest-physical ``gpa``."""
        text = self.qmp.hmp(f"gpa2hva {gpa:#x}")
        m = _GPA2HVA.search(text)
        if not m:
            raise ProtocolError(f"gpa2hva {gpa:#x}: {text.strip()}")
        return int(m[1], 16)

    def memory(self, path: str = "auto") -> PhysicalMemory:
        """Open guest RAM through ``path``: ``shared-file``, ``proc-mem``, ``gdb`` or ``auto``.

        ``auto`` prefers the shared RAM file (an mmap), then ``/proc/<pid>/mem``, then the GDB stub
        (which also works when QEMU runs on another host).
        """
        ranges = self.ram_map()
        errors: list[str] = []
        order = ["shared-file", "proc-mem", "gdb"] if path == "auto" else [path]
        opener = {"shared-file": self._shared_file_memory, "proc-mem": self._proc_memory,
                  "gdb": self._gdb_memory}
        for p in order:
            if p not in opener:
                raise AradiaError(f"unknown memory path {p!r} (shared-file, proc-mem, gdb, auto)")
            try:
                mem = opener[p](ranges)
            except NotAttached as e:
                errors.append(f"{p}: {e}")
                continue
            try:
                self._verify(mem, ranges)
            except AradiaError as e:
                mem.close()
                errors.append(f"{p}: {e}")
                continue
            return mem
        raise NotAttached("no way to read guest RAM: " + "; ".join(errors))

    def _verify(self, mem: PhysicalMemory, ranges: list[FlatRange], tries: int = 3) -> None:
        """Check a path against QEMU's own view (HMP ``xp``) of a few bytes of RAM.

        The QMP socket may be a forwarder (socat, ssh): then its peer pid, and a RAM file of the same
        name, are not QEMU's, and reading them would return another process's bytes.
        """
        addr = ranges[0].start
        for _ in range(tries):  # a running guest may change the bytes between the two reads
            text = self.qmp.hmp(f"xp /2gx {addr:#x}")
            try:
                words = [int(w, 16) for w in text.split(":", 1)[1].split()[:2]]
            except (IndexError, ValueError) as e:
                raise ProtocolError(f"cannot parse QEMU's xp output {text.strip()[:80]!r}") from e
            want = b"".join(w.to_bytes(8, "little") for w in words)
            if mem.read(addr, 16) == want:
                return
        raise NotAttached(f"{mem.kind} memory does not match what QEMU reads at {addr:#x}: "
                          "the QMP socket's peer is not this QEMU (a forwarder?)")

    def _shared_file_memory(self, ranges: list[FlatRange]) -> PhysicalMemory:
        backends = {b.id: b for b in self.ram_backends()}
        files = {b.mem_path for b in backends.values() if b.share and b.mem_path}
        regions = {r.region for r in ranges}
        if len(regions) != 1 or len(files) != 1:
            raise NotAttached("guest RAM is not one shared memory-backend-file")
        path = files.pop()
        if not os.path.isfile(path):
            raise NotAttached(f"guest RAM file {path} is not a file on this host")
        return SharedFileMemory(path, [Segment(r.start, r.size, r.offset) for r in ranges],
                                gone=self.qmp.closed.is_set)

    def _proc_memory(self, ranges: list[FlatRange]) -> PhysicalMemory:
        if not self.pid or not os.path.exists(f"/proc/{self.pid}/mem"):
            raise NotAttached("QEMU is not a process on this host")
        return ProcMemory(self.pid, [Segment(r.start, r.size, self.gpa2hva(r.start)) for r in ranges])

    def _gdb_memory(self, ranges: list[FlatRange]) -> PhysicalMemory:
        # QEMU >= 8.1 sends no stop reply on connect, so the client cannot tell by itself whether the
        # VM ran; QMP can.
        client = GdbClient(self.gdb_address(), was_running=self.status() == "running")
        try:
            return GdbMemory(client, [Segment(r.start, r.size, r.start) for r in ranges], own_client=True)
        except BaseException:
            client.close()
            raise

    def cmdline(self) -> list[str]:
        """QEMU's command line (from ``/proc``; empty when QEMU is not a readable process here)."""
        if not self.pid:
            return []
        try:
            return process_cmdline(self.pid)
        except OSError:
            return []

    def gdb_address(self, start: bool = True) -> str:
        """The GDB stub address: from QEMU's command line, a stub started earlier, or a new one.

        A stub QEMU already runs is never replaced: ``gdbserver`` would close it under its client
        (and QEMU refuses a second one). With ``start=False`` a missing stub is :class:`NotAttached`.
        """
        addr = gdb_address_from_cmdline(self.cmdline()) if self.pid else None
        addr = addr or gdb_address_from_chardevs(self.qmp.execute("query-chardev"))
        if addr:
            return addr
        if not start:
            raise NotAttached("QEMU has no GDB stub")
        port = free_port()
        out = self.qmp.hmp(f"gdbserver tcp:127.0.0.1:{port}")
        if "error" in out.lower() or "could not" in out.lower():
            raise NotAttached(f"QEMU could not start a GDB stub: {out.strip()}")
        return f"127.0.0.1:{port}"

    # --- other ---------------------------------------------------------------------------------
    def dump_guest_memory(self, path: str, *, paging: bool = False, detach: bool = False) -> None:
        """Ask QEMU itself to write an ELF dump to ``path`` (on QEMU's host)."""
        self.qmp.execute("dump-guest-memory", {"paging": paging, "protocol": f"file:{path}",
                                               "detach": detach}, timeout=600)

    def close(self) -> None:
        """Drop the QMP connection; the guest keeps running."""
        self.qmp.close()

    def check_alive(self) -> None:
        """Raise :class:`NotAttached` if QEMU is gone."""
        if not self.qmp.alive or (self.pid and not os.path.exists(f"/proc/{self.pid}")):
            raise NotAttached(f"QEMU behind {self.path} has exited")
