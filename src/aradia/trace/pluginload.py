"""Loading aradia's TCG plugin into a QEMU, and finding it there.

A QEMU loads the plugin with ``-plugin DIR/counter-<hash>.so,shm=PATH`` (:func:`plugin_args`), where
``PATH`` is the shared file of :mod:`aradia.trace.pluginshm`. The ``.so`` is built outside the library
(by the test lab, :func:`aradia.lab.plugin_build.build_plugin`, which needs QEMU's plugin header); here
it is only a path given by the caller, and :func:`plugin_capabilities` reads what it was compiled
with from the manifest next to it. Another aradia process finds a running QEMU's shared file with
:func:`plugin_shm_path`. TCG instruments code when it translates it, so after a target change the old
and new addresses must be re-translated: :func:`force_retranslation` writes back the byte already
there through the GDB stub, which makes QEMU drop the translations that hold it.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from aradia.errors import AradiaError
from aradia.machine.qemu import process_cmdline

if TYPE_CHECKING:
    from aradia.machine.qemu import Qemu
    from aradia.proto.gdbrsp import GdbClient

SOURCE = Path(__file__).resolve().parent / "plugin" / "counter.c"
"""The plugin's C source, shipped as package data."""

#: The file names built plugins get (``counter-`` and 12 hex digits of their build's hash).
SO_PATTERN = re.compile(r"counter-[0-9a-f]{12}\.so")


class PluginError(AradiaError):
    """The plugin could not be built or loaded, or its shared file is not what aradia made."""


@dataclass(frozen=True)
class PluginCapabilities:
    """What the header of the installed QEMU offers plugins (and so a plugin built against it)."""

    api_version: int  # QEMU_PLUGIN_VERSION
    insn_inline: bool  # qemu_plugin_register_vcpu_insn_exec_inline (shared counter, no call; QEMU < 9)
    read_register: bool  # qemu_plugin_get_registers + qemu_plugin_read_register (QEMU >= 9)
    read_memory: bool  # qemu_plugin_read_memory_vaddr (QEMU >= 9.2)
    glib: bool = False  # the header includes <glib.h> (QEMU >= 9): built with aradia's stand-in

    @property
    def syscall_args(self) -> bool:
        """Whether a plugin built against this header can capture syscall arguments."""
        return self.read_register and self.read_memory

    def defines(self) -> list[str]:
        """The ``-D`` flags ``counter.c`` is compiled with."""
        flags = []
        if self.insn_inline:
            flags.append("-DARADIA_HAVE_INSN_INLINE")
        if self.read_register:
            flags.append("-DARADIA_HAVE_READ_REGISTER")
        if self.read_memory:
            flags.append("-DARADIA_HAVE_READ_MEMORY")
        return flags


def plugin_capabilities(so: Path) -> PluginCapabilities:
    """The capabilities a built plugin was compiled with (from the manifest next to it)."""
    try:
        data = json.loads(so.with_suffix(".json").read_text())
        return PluginCapabilities(**data["capabilities"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PluginError(f"{so} has no readable build manifest: {exc}") from exc


def plugin_args(shm_path: Path | str, so: Path | str) -> str:
    """The ``-plugin`` value (for ``launch(..., plugins=[...])``) loading the plugin ``so`` (a built
    ``.so``, see :func:`aradia.lab.plugin_build.build_plugin`) on ``shm_path``."""
    for part in (str(so), str(shm_path)):
        if "," in part:
            raise PluginError(f"{part!r}: a path in -plugin cannot contain ','")
    return f"{so},shm={shm_path}"


def plugin_shm_path(pid: int) -> Path | None:
    """The shared file of aradia's plugin in the running QEMU ``pid``, from its command line.

    Looks for ``-plugin DIR/counter-<hash>.so,shm=PATH`` (also ``--plugin``, ``-plugin=…`` and
    ``file=…``); None when that QEMU has no aradia plugin. The path is as QEMU sees it (relative
    to its root); map it with :meth:`~aradia.trace.pluginshm.PluginShm.open`. Raises
    :class:`PluginError` when the process's command line cannot be read (no such process, no rights).
    """
    try:
        argv = process_cmdline(pid)
    except OSError as exc:
        raise PluginError(f"cannot read the command line of process {pid}: {exc}") from exc
    return plugin_shm_from_cmdline(argv)


def plugin_shm_from_cmdline(argv: list[str]) -> Path | None:
    """The shared file of aradia's plugin on a QEMU command line ``argv`` (see :func:`plugin_shm_path`)."""
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("-plugin", "--plugin")]
    values += [a.split("=", 1)[1] for a in argv if a.startswith(("-plugin=", "--plugin="))]
    for value in values:
        parts = value.split(",")
        options = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
        so = parts[0].removeprefix("file=")
        if SO_PATTERN.fullmatch(Path(so).name) and options.get("shm"):
            return Path(options["shm"])
    return None


def force_retranslation(gdb: GdbClient, vaddrs: Iterable[int]) -> list[int]:
    """Make TCG re-translate the code at ``vaddrs`` by writing back each byte already there.

    Uses the GDB stub (virtual addresses through the current vCPU's page tables: give kernel
    addresses, or user addresses while their process is current). Returns the addresses it could
    not reach (unmapped now); the others are re-instrumented at their next execution.
    """
    missed: list[int] = []
    with gdb.halted():
        for va in sorted(set(vaddrs)):
            try:
                byte = gdb.read_memory(va, 1)
                gdb.write_memory(va, byte)
            except AradiaError:
                missed.append(va)
    return missed


RETRANSLATE_ATTEMPTS = 50
"""Stops :func:`retranslate_at` tries at most for addresses the stopped vCPU could not reach."""


def retranslate_at(gdb_address: str, addresses: Iterable[int], *, was_running: bool = True,
                   attempts: int = RETRANSLATE_ATTEMPTS) -> list[int]:
    """Make the QEMU whose GDB stub is at ``gdb_address`` re-translate the code at ``addresses``; the
    addresses it still could not reach.

    The stub reaches memory through the stopped vCPU's page tables. An arm64 kernel with KPTI
    (``CONFIG_UNMAP_KERNEL_AT_EL0``, Debian's) maps none of its text while the vCPU is at EL0, so an
    address missed that way is tried again on a later stop of a running guest (``attempts`` stops at
    most, 20 ms apart: most of them land in the kernel). A paused guest is tried once.
    """
    from aradia.proto.gdbrsp import GdbClient

    missed = sorted(set(addresses))
    for attempt in range(attempts if was_running else 1):
        if not missed:
            break
        if attempt:
            time.sleep(0.02)
        client = GdbClient(gdb_address, was_running=was_running)
        try:
            client.restore_run_state()
            missed = force_retranslation(client, missed)
        finally:
            client.close()
    return missed


def retranslate(qemu: Qemu, addresses: Iterable[int]) -> None:
    """Make ``qemu`` re-translate the code at ``addresses`` (after a target change) through its GDB
    stub (:func:`retranslate_at`); AradiaError naming the addresses it could not reach."""
    missed = retranslate_at(qemu.gdb_address(), addresses, was_running=qemu.status() == "running")
    if missed:
        raise AradiaError(f"could not re-translate {', '.join(hex(a) for a in missed)}")


__all__ = ["SOURCE", "SO_PATTERN", "PluginCapabilities", "PluginError", "force_retranslation", "plugin_args",
           "plugin_capabilities", "plugin_shm_from_cmdline", "plugin_shm_path", "retranslate",
           "retranslate_at"]
