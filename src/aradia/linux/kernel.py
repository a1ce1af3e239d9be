"""The Linux kernel of one VM: its profile (found in RAM), a drgn Program over it, and the views.

``vm.linux`` (also ``vm.kernel``) is a :class:`Kernel`; every view returns plain dataclasses and
leaves what it had to skip in :attr:`Kernel.warnings`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Protocol

import drgn

from aradia.errors import AradiaError
from aradia.linux import dmesg as _dmesg
from aradia.linux import files as _files
from aradia.linux import maps as _maps
from aradia.linux import modules as _modules
from aradia.linux import mounts as _mounts
from aradia.linux import net as _net
from aradia.linux import processes as _processes
from aradia.linux.bounds import Warnings
from aradia.linux.profile import KernelProfile, find_profile
from aradia.linux.program import make_program
from aradia.machine.handle import VMHandle
from aradia.progress import Progress

#: The views by name (as the service's API names them) and whether they take a pid.
VIEWS: dict[str, bool] = {"processes": False, "threads": False, "modules": False, "maps": True,
                          "files": True, "sockets": False, "mounts": False, "dmesg": False}


class Kernel:
    """The guest kernel seen through guest memory alone: no debug package, no agent."""

    def __init__(self, vm: VMHandle, progress: Progress | None = None, *,
                 btf_source: str | os.PathLike[str] | None = None,
                 profile: KernelProfile | None = None) -> None:
        self.vm = vm
        #: ``profile`` given: the same kernel known from elsewhere (a live migration's source), not searched
        self.profile: KernelProfile = profile or find_profile(vm, progress, btf_source=btf_source)
        self.prog: drgn.Program = make_program(vm, self.profile, progress=progress)
        #: What the last view skipped (corrupt or unreadable guest data).
        self.warnings = Warnings()

    def _fresh(self) -> Warnings:
        self.warnings = Warnings()
        return self.warnings

    def processes(self, *, threads: bool = False) -> list[_processes.Process]:
        """Processes (or every thread), like ``ps``."""
        return _processes.processes(self.prog, threads=threads, warnings=self._fresh())

    def modules(self) -> list[_modules.Module]:
        """Loaded kernel modules, like ``lsmod``."""
        return _modules.modules(self.prog, warnings=self._fresh())

    def maps(self, pid: int) -> list[_maps.Mapping]:
        """Memory maps of process ``pid``, like ``/proc/<pid>/maps``."""
        return _maps.maps(self.prog, pid, warnings=self._fresh())

    def files(self, pid: int) -> list[_files.OpenFile]:
        """Open files of process ``pid``, like ``/proc/<pid>/fd``."""
        return _files.files(self.prog, pid, warnings=self._fresh())

    def sockets(self) -> list[_net.Socket]:
        """Sockets held open by processes, with their owners."""
        return _net.sockets(self.prog, warnings=self._fresh())

    def mounts(self) -> list[_mounts.Mount]:
        """Mounts of the initial mount namespace, like ``/proc/mounts``."""
        return _mounts.mounts(self.prog, warnings=self._fresh())

    def dmesg(self) -> list[_dmesg.LogRecord]:
        """The kernel log, like ``dmesg``."""
        return _dmesg.dmesg(self.prog, warnings=self._fresh())

    def view(self, name: str, pid: int | None = None) -> dict[str, Any]:
        """One view as ``aradia VIEW --json`` prints it: ``{"items": [...], "warnings": [...]}``.

        ``name`` is a key of :data:`VIEWS` (``threads`` is ``processes`` with every thread); ``maps``
        and ``files`` need ``pid``.
        """
        if name not in VIEWS:
            raise AradiaError(f"no view {name!r} (one of {', '.join(VIEWS)})")
        if VIEWS[name] and pid is None:
            raise AradiaError(f"view {name} needs a pid")
        rows: list[Any]
        if name in ("processes", "threads"):
            rows = self.processes(threads=name == "threads")
        elif name == "maps":
            rows = self.maps(int(pid))  # type: ignore[arg-type]
        elif name == "files":
            rows = self.files(int(pid))  # type: ignore[arg-type]
        else:
            rows = getattr(self, name)()
        return {"items": [dataclasses.asdict(r) for r in rows], "warnings": list(self.warnings)}

    def write_user(self, pid: int, address: int, data: bytes) -> None:
        """Write ``data`` into process ``pid``'s memory at user virtual ``address`` (through its own page
        tables; an address that is not mapped, or not present now, is a clear error, never a fault-in)."""
        if len(data) > _maps.MAX_USER_READ:
            raise AradiaError(f"write size {len(data)} out of range (0..{_maps.MAX_USER_READ})")
        self.vm.write_virt(address, data, cr3=_maps.user_root(self.prog, pid))

    def read_user(self, pid: int, address: int, size: int) -> bytes:
        """Read process ``pid``'s memory at user virtual ``address``."""
        return _maps.read_user(self.prog, pid, address, size)


class LinuxVM(VMHandle, Protocol):
    """A VM handle with its Linux kernel (what the trace layer takes; :class:`aradia.vm.VM` is one)."""

    @property
    def linux(self) -> Kernel:
        """The guest's kernel (loaded on first use)."""
        ...

    def load_kernel(self, progress: Progress | None = None, *,
                    btf_source: str | None = None) -> Kernel:
        """Find the kernel profile in RAM and build the drgn Program (cached per VM)."""
        ...
