"""The handle a user holds: one object per VM, live (QMP) or a dump.

``attach("qmp:/run/vm1/qmp.sock")`` or ``open_dump("mem.elf")`` give a :class:`VM` with physical and
virtual memory access, pause/resume (live), vCPU registers and the freshness stamp every cache uses.
The guest's architecture (:attr:`VM.arch`) comes from QEMU or the dump's ELF header and decides the
page walk and the register names; raw and LiME dumps do not say it (see :func:`dump_architecture`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from aradia.errors import AradiaError, NotAttached
from aradia.machine.arch import X86, Architecture, Arm64, architecture, from_elf_machine
from aradia.machine.handle import CpuState, cpu_state
from aradia.machine.paging import Translation, Translator
from aradia.machine.qemu import Qemu
from aradia.sources.base import PhysicalMemory, Range

if TYPE_CHECKING:
    from aradia.linux.kernel import Kernel
    from aradia.linux.profile import KernelProfile
    from aradia.progress import Progress

__all__ = ["VM", "CpuState", "arch_from_vmcoreinfo", "attach", "dump_architecture", "open_dump"]

EM_386 = 3  # QEMU's x86 dump of a guest not yet in long mode
ArchSpec = str | Architecture | None
"""An architecture by name (``x86_64``, ``arm64``...), as an object, or None: find out."""


class VM:
    """Guest memory, vCPUs and run control of one VM (a live QEMU or a dump)."""

    def __init__(self, memory: PhysicalMemory, *, machine: Qemu | None = None, spec: str = "",
                 dump_cpus: list[dict[str, int]] | None = None, arch: ArchSpec = None) -> None:
        """``arch`` defaults to QEMU's target (live), or for a dump to :func:`dump_architecture` (its
        ELF machine, else its kernel's VMCOREINFO text, else x86-64), worked out on first use of
        :attr:`arch`. A name (``"arm64"``) fixes the architecture and lets the dump's kernel set the
        VA size; an :class:`Architecture` object is taken as it is."""
        self.memory = memory
        self.machine = machine
        self.spec = spec
        self._dump_cpus = dump_cpus or []
        self._static = (id(self), 0)
        self._arch_name = arch if isinstance(arch, str) else None
        self._arch: Architecture | None = arch if isinstance(arch, Architecture) else None
        if self._arch is None and machine is not None:
            self._arch = machine.arch
            if self._arch_name is not None and architecture(self._arch_name).name != self._arch.name:
                raise AradiaError(f"architecture {self._arch_name} asked for, but QEMU emulates "
                                  f"{self._arch.name}")
        self._translator: Translator | None = None
        self._kernel: Kernel | None = None

    @property
    def arch(self) -> Architecture:
        """The guest's architecture (its page walk and register names)."""
        if self._arch is None:
            self._arch = dump_architecture(self.memory, self._dump_cpus, self._arch_name)
        return self._arch

    @arch.setter
    def arch(self, value: Architecture) -> None:
        self._arch = value
        self._translator = None

    @property
    def translator(self) -> Translator:
        """The cached virtual-to-physical translator (of :attr:`arch`)."""
        if self._translator is None:
            self._translator = Translator(self.memory, self.stamp, arch=self.arch)
        return self._translator

    @translator.setter
    def translator(self, value: Translator) -> None:
        self._translator = value

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
        """Write guest RAM to ``path``: ``elf`` (a core of the guest's architecture with VMCOREINFO and
        every vCPU's registers, as drgn and crash read it; see
        :func:`~aradia.sources.dumpwrite.write_elf`), ``raw`` or ``lime``. A live guest is paused
        meanwhile (``pause``), so the image is one instant."""
        from aradia.linux.identify import find_vmcoreinfo
        from aradia.sources import dumpwrite

        if format not in ("elf", "raw", "lime"):
            raise AradiaError(f"dump format {format!r}: one of elf, raw, lime")
        with self.paused() if pause else contextlib.nullcontext():
            if format == "elf":
                dumpwrite.write_elf(self.memory, path, vmcoreinfo=find_vmcoreinfo(self.memory),
                                    cpu_states=[c.regs for c in self.cpus()], progress=progress,
                                    machine=self.arch.elf_machine)
            elif format == "raw":
                dumpwrite.write_raw(self.memory, path, progress=progress)
            else:
                dumpwrite.write_lime(self.memory, path, progress=progress)

    # --- life cycle --------------------------------------------------------------------------------
    def info(self, *, kernel: bool = True) -> dict[str, Any]:
        """A summary: spec, architecture (``arch``), source kind, run state, RAM ranges, vCPUs (keys
        per architecture: :meth:`~aradia.machine.arch.base.Architecture.vcpu_summary`) and
        (``kernel``) the kernel's banner found in RAM (``kernel`` None and ``kernel_error`` when there
        is none)."""
        out: dict[str, Any] = {
            "spec": self.spec,
            "arch": self.arch.name,
            "memory_path": self.memory.kind,
            "state": self.status(),
            "ram": [{"start": r.start, "end": r.end, "size": r.size} for r in self.ranges()],
            "ram_bytes": self.memory.size,
        }
        if self.machine:
            out["qemu_pid"] = self.machine.pid
            out["qemu_version"] = ".".join(map(str, self.machine.version))
        # each vCPU under its architecture's names (x86-64: rip cr3 cpl la57; arm64: pc sp el pstate
        # ttbr0 ttbr1)
        out["vcpus"] = [{"index": c.index, **self.arch.vcpu_summary(c.regs)} for c in self.cpus()]
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


def attach(spec: str, *, memory: str = "auto", arch: ArchSpec = None) -> VM:
    """Attach to a VM: ``qmp:PATH`` for a live QEMU, otherwise a dump file path.

    ``memory`` picks the live path to guest RAM: ``shared-file``, ``proc-mem``, ``gdb`` or ``auto``.
    ``arch`` (``x86_64``, ``arm64``) is the guest's architecture for a raw or LiME dump, which does
    not record it (see :func:`open_dump`); for a live VM or an ELF core it must agree with theirs.
    """
    if spec.startswith("qmp:"):
        path = spec[4:]
        machine = Qemu(path)
        try:
            mem = machine.memory(memory)
            return VM(mem, machine=machine, spec=spec, arch=arch)
        except BaseException:
            machine.close()
            raise
    return open_dump(spec, arch=arch)


def open_dump(path: str, *, arch: ArchSpec = None) -> VM:
    """Open a dump (raw, ELF core or LiME) as a VM.

    The architecture: an ELF core's ``e_machine`` (``arch``, if given, must agree); for a raw or LiME
    dump ``arch`` if given, else the kernel's VMCOREINFO text found in RAM (see
    :func:`dump_architecture`), else x86-64. A raw image holds guest-physical address ``offset`` at
    file offset ``offset`` (as ``aradia dump --format raw`` writes it): an arm64 ``virt`` guest's RAM
    starts 1 GiB into the file, and the first GiB reads as zeros.
    """
    from aradia.sources.dumpfile import open_dump_memory as open_file

    if not os.path.exists(path):
        raise NotAttached(f"no such dump file or VM spec: {path} (live VMs are qmp:PATH)")
    mem = open_file(path)
    try:
        registers = getattr(mem, "vcpu_registers", None)
        cpus = list(registers or [])
        machine = getattr(mem, "machine", None)
        if isinstance(machine, int) and machine not in (0, EM_386):
            found = from_elf_machine(machine)  # an unsupported machine fails here, not on first use
            wanted = architecture(arch) if isinstance(arch, str) else arch
            if wanted is not None and found.name != wanted.name:
                raise AradiaError(f"{path}: an ELF core of {found.name}, not {wanted.name} as asked")
        return VM(mem, spec=path, dump_cpus=cpus, arch=arch)
    except BaseException:
        mem.close()
        raise


def arch_from_vmcoreinfo(text: str) -> Architecture | None:
    """The architecture a kernel's VMCOREINFO text belongs to, or None when it does not say.

    arm64 kernels write ``NUMBER(kimage_voffset)`` and ``NUMBER(PHYS_OFFSET)`` (x86-64 never does); the
    kernel's VA size is ``64 - NUMBER(TCR_EL1_T1SZ)`` (the size it runs with) or else
    ``NUMBER(VA_BITS)``, and more than 48 bits means the FEAT_LPA2 format (4 KiB pages). x86-64
    kernels name ``SYMBOL(init_top_pgt)``.
    """
    from aradia.linux.arm64_layout import layout_from_vmcoreinfo
    from aradia.linux.identify import parse_vmcoreinfo

    layout = layout_from_vmcoreinfo(text)
    if layout is not None:
        va_bits = layout.va_bits
        t1sz = layout.info.get("NUMBER(TCR_EL1_T1SZ)")
        with contextlib.suppress(ValueError):
            va_bits = 64 - int(t1sz, 0) if t1sz else va_bits
        with contextlib.suppress(AradiaError):
            return Arm64(va_bits, lpa2=va_bits > 48)
        return Arm64()
    if "SYMBOL(init_top_pgt)" in parse_vmcoreinfo(text):
        return X86
    return None


def dump_architecture(memory: PhysicalMemory, cpus: list[dict[str, int]], name: str | None = None,
                      *, max_texts: int = 4) -> Architecture:
    """The architecture of a dump's guest.

    In this order: the ELF core's ``e_machine`` (``memory.machine``; EM_386, which QEMU writes before
    long mode, is x86-64); ``name`` when given (raw and LiME dumps carry no architecture); else the
    first of at most ``max_texts`` VMCOREINFO texts in RAM that names one (:func:`arch_from_vmcoreinfo`:
    Linux guests only, one scan of RAM up to the first text, ~0.2 s per 256 MiB at worst); else x86-64.
    An arm64 walk is then set up for the kernel: from a vCPU's TCR_EL1 when the dump saved it
    (aradia's ELF cores), else from the VA size in the dump's VMCOREINFO note or text in RAM, else
    the default 48-bit walk.
    """
    from aradia.linux.identify import find_vmcoreinfo_texts

    machine = getattr(memory, "machine", None)
    family: Architecture | None = architecture(name) if name else None
    if isinstance(machine, int) and machine != 0:
        family = X86 if machine == EM_386 else from_elf_machine(machine)
    if family is not None and not isinstance(family, Arm64):
        return family
    for regs in cpus:
        if regs.get("tcr_el1"):
            with contextlib.suppress(AradiaError):
                return Arm64().for_registers(regs)
    note = getattr(memory, "vmcoreinfo", None)
    texts: Iterator[str] = (iter([note]) if isinstance(note, str)
                            else (t for _a, t in find_vmcoreinfo_texts(memory, max_hits=max_texts)))
    with contextlib.suppress(AradiaError):
        for text in texts:  # lazily: the scan stops at the first text that names an architecture
            found = arch_from_vmcoreinfo(text)
            if found is not None and (family is None or found.name == family.name):
                return found
    return family or X86
