"""The handle a user holds: one object per VM, live (QMP) or a dump.

``attach("qmp:/run/vm1/qmp.sock")`` or ``open_dump("mem.elf")`` give a :class:`VM` with physical and
virtual memory access, pause/resume (live), vCPU registers and the freshness stamp every cache uses.
The guest's architecture (:attr:`VM.arch`) comes from QEMU or the dump's ELF header and decides the
page walk and the register names.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from aradia.errors import AradiaError, NotAttached
from aradia.machine.arch import X86, Architecture, from_elf_machine
from aradia.machine.handle import CpuState, cpu_state
from aradia.machine.paging import Translation, Translator
from aradia.machine.qemu import Qemu
from aradia.sources.base import PhysicalMemory, Range

if TYPE_CHECKING:
    from aradia.linux.kernel import Kernel
    from aradia.linux.profile import KernelProfile
    from aradia.progress import Progress

__all__ = ["VM", "CpuState", "attach", "open_dump"]

class VM:
    """Guest memory, vCPUs and run control of one VM (a live QEMU or a dump)."""

    def __init__(self, memory: PhysicalMemory, *, machine: Qemu | None = None, spec: str = "",
                 dump_cpus: list[dict[str, int]] | None = None, arch: Architecture | None = None) -> None:
        """``arch`` defaults to QEMU's target (live), the dump's ELF machine, or x86-64 (raw, LiME)."""
        self.memory = memory
        self.machine = machine
        self.spec = spec
        self._dump_cpus = dump_cpus or []
        self._static = (id(self), 0)
        if arch is None:
            machine_number = getattr(memory, "machine", None)
            arch = (machine.arch if machine is not None
                    else from_elf_machine(machine_number) if isinstance(machine_number, int)
                    and machine_number not in (0, 3)  # EM_386: QEMU's x86 dump before long mode
                    else X86)
        self.arch = arch
        self.translator = Translator(memory, self.stamp, arch=arch)
        self._kernel: Kernel | None = None

    # --- the Linux layer (loaded on first use) ---------------------------------------------------
    def load_kernel(self, progress: Progress | None = None, *, btf_source: str | None = None,
                    profile: KernelProfile | None = None) -> Kernel:
        """Find the kernel profile in RAM and build the drgn Program (cached per VM and build ID).

        ``btf_source`` takes the BTF types from a vmlinuz/vmlinux file of the same build instead of RAM;
        ``profile`` is a profile already known for this very kernel (a live migration's source).
        """
        if self._kernel is None:
            from aradia.linux.kernel import Kernel

            self._kernel = Kernel(self, progress, btf_source=btf_source, profile=profile)
        return self._kernel

    @property
    def linux(self) -> Kernel:
        """The guest's Linux kernel: views (``processes()``, ``maps(pid)``...) and ``prog`` (drgn)."""
        return self.load_kernel()

    @property
    def kernel(self) -> Kernel:
        """Same object as :attr:`linux`; ``vm.kernel.prog`` is the drgn Program."""
        return self.load_kernel()

    # --- identity and state ----------------------------------------------------------------------
    @property
    def live(self) -> bool:
        """True for a running QEMU, False for a dump."""
        return self.machine is not None

    def status(self) -> str:
        """``running``, ``paused`` (and QEMU's other run states) for a live VM; ``dump`` for a dump."""
        return self.machine.status() if self.machine else "dump"

    def stamp(self) -> object | None:
        """Freshness token (see :meth:`aradia.machine.qemu.Qemu.stamp`); constant for a dump."""
        return self.machine.stamp() if self.machine else self._static

    def pause(self) -> None:
        """Stop the guest's vCPUs."""
        self._need_live("pause").pause()

    def resume(self) -> None:
        """Let the guest run again."""
        self._need_live("resume").resume()

    @contextlib.contextmanager
    def paused(self) -> Iterator[VM]:
        """A consistent point-in-time view: pause for the block (no-op on a dump)."""
        if self.machine is None:
            yield self
            return
        with self.machine.paused():
            yield self

    def _need_live(self, what: str) -> Qemu:
        if self.machine is None:
            raise AradiaError(f"cannot {what} a dump")
        return self.machine

    # --- physical memory -------------------------------------------------------------------------
    def read(self, paddr: int, size: int) -> bytes:
        """Read guest-physical memory."""
        return self.memory.read(paddr, size)

    def write(self, paddr: int, data: bytes) -> None:
        """Write guest-physical memory."""
        self.memory.write(paddr, data)

    def ranges(self) -> list[Range]:
        """Guest-physical RAM ranges."""
        return self.memory.ranges()

    # --- vCPUs -------------------------------------------------------------------------------------
    def cpus(self) -> list[CpuState]:
        """Register state of every vCPU (live: now; dump: as saved in the dump).

        Live arm64 guests also get the system registers translation needs (TTBR0/1_EL1, TCR_EL1)
        through QEMU's GDB stub (see :meth:`aradia.machine.qemu.Qemu.gdb_registers`).
        """
        if self.machine is not None:
            regs = self.machine.registers()
            if self.arch.system_registers:
                for i, extra in self.machine.gdb_registers(self.arch.system_registers).items():
                    regs.setdefault(i, {}).update(extra)
            return [cpu_state(i, r, self.arch) for i, r in sorted(regs.items())]
        return [cpu_state(i, r, self.arch) for i, r in enumerate(self._dump_cpus)]

    def cpu(self, index: int = 0) -> CpuState:
        """One vCPU's state."""
        for c in self.cpus():
            if c.index == index:
                return c
        raise AradiaError(f"no vCPU {index}")

    def kernel_root(self) -> tuple[int, bool]:
        """A page-table root that maps the kernel (CR3 of vCPU 0; arm64: TTBR1_EL1) and whether it is
        5-level (always False on arm64, whose VA size :attr:`arch` carries, checked against TCR_EL1)."""
        for c in self.cpus():
            if c.cr3:
                check_tcr = getattr(self.arch, "check_tcr", None)
                if check_tcr is not None and "tcr_el1" in c.regs:
                    check_tcr(c.regs["tcr_el1"])
                return c.cr3, c.la57
        raise AradiaError("no vCPU has paging enabled (its page-table root is 0): the guest has not "
                          "booted a 64-bit kernel")

    # --- virtual memory ----------------------------------------------------------------------------
    def _root(self, cr3: int | None, la57: bool | None) -> tuple[int, bool]:
        if cr3 is None:
            return self.kernel_root()
        if la57 is None:
            la57 = any(c.la57 for c in self.cpus())
        return cr3, la57

    def translate(self, vaddr: int, cr3: int | None = None, la57: bool | None = None) -> Translation:
        """Translate a guest-virtual address; ``cr3`` is the page-table root (a CR3 value; on arm64 a
        TTBR value: TTBR1 for kernel addresses, a task's TTBR0 for its user addresses). Default root:
        :meth:`kernel_root`."""
        root, l5 = self._root(cr3, la57)
        return self.translator.translate(root, vaddr, la57=l5)

    def read_virt(self, vaddr: int, size: int, cr3: int | None = None, la57: bool | None = None) -> bytes:
        """Read guest-virtual memory through the page tables at ``cr3``."""
        root, l5 = self._root(cr3, la57)
        return self.translator.read(root, vaddr, size, la57=l5)

    def write_virt(self, vaddr: int, data: bytes, cr3: int | None = None, la57: bool | None = None) -> None:
        """Write guest-virtual memory through the page tables at ``cr3``."""
        root, l5 = self._root(cr3, la57)
        self.translator.write(root, vaddr, data, la57=l5)

    # --- dumps ---------------------------------------------------------------------------------------
    def dump(self, path: str | os.PathLike[str], *, format: str = "elf", pause: bool = True,
             progress: Callable[[int, int], None] | None = None) -> None:
        """Write guest RAM to ``path``: ``elf`` (a core with VMCOREINFO and every vCPU's registers, as
        drgn and crash read it), ``raw`` or ``lime``. A live guest is paused meanwhile (``pause``), so
        the image is one instant."""
        from aradia.linux.identify import find_vmcoreinfo
        from aradia.sources import dumpwrite

        if format not in ("elf", "raw", "lime"):
            raise AradiaError(f"dump format {format!r}: one of elf, raw, lime")
        with self.paused() if pause else contextlib.nullcontext():
            if format == "elf":
                dumpwrite.write_elf(self.memory, path, vmcoreinfo=find_vmcoreinfo(self.memory),
                                    cpu_states=[c.regs for c in self.cpus()], progress=progress)
            elif format == "raw":
                dumpwrite.write_raw(self.memory, path, progress=progress)
            else:
                dumpwrite.write_lime(self.memory, path, progress=progress)

    # --- life cycle --------------------------------------------------------------------------------
    def info(self, *, kernel: bool = True) -> dict[str, Any]:
        """A summary: spec, source kind, run state, RAM ranges, vCPUs and (``kernel``) the kernel's
        banner found in RAM (``kernel`` None and ``kernel_error`` when there is none)."""
        out: dict[str, Any] = {
            "spec": self.spec,
            "memory_path": self.memory.kind,
            "state": self.status(),
            "ram": [{"start": r.start, "end": r.end, "size": r.size} for r in self.ranges()],
            "ram_bytes": self.memory.size,
        }
        if self.machine:
            out["qemu_pid"] = self.machine.pid
            out["qemu_version"] = ".".join(map(str, self.machine.version))
        out["vcpus"] = [{"index": c.index, "rip": c.rip, "cr3": c.cr3, "cpl": c.cpl, "la57": c.la57}
                        for c in self.cpus()]
        if kernel:
            from aradia.linux.identify import KernelNotFound, find_banner

            try:
                out["kernel"] = find_banner(self.memory)
            except KernelNotFound as e:
                out["kernel"] = None
                out["kernel_error"] = str(e)
        return out

    def close(self) -> None:
        """Release memory mappings and connections (the guest keeps running)."""
        with contextlib.suppress(Exception):
            self.memory.close()
        if self.machine:
            self.machine.close()

    def __enter__(self) -> VM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def attach(spec: str, *, memory: str = "auto") -> VM:
    """Attach to a VM: ``qmp:PATH`` for a live QEMU, otherwise a dump file path.

    ``memory`` picks the live path to guest RAM: ``shared-file``, ``proc-mem``, ``gdb`` or ``auto``.
    """
    if spec.startswith("qmp:"):
        path = spec[4:]
        machine = Qemu(path)
        try:
            mem = machine.memory(memory)
        except BaseException:
            machine.close()
            raise
        return VM(mem, machine=machine, spec=spec)
    return open_dump(spec)


def open_dump(path: str) -> VM:
    """Open a dump (raw, ELF core or LiME) as a VM."""
    from aradia.sources.dumpfile import open_dump_memory as open_file

    if not os.path.exists(path):
        raise NotAttached(f"no such dump file or VM spec: {path} (live VMs are qmp:PATH)")
    mem = open_file(path)
    cpus = list(getattr(mem, "cpu_states", None) or [])
    return VM(mem, spec=path, dump_cpus=cpus)
