"""One extraction run against a VM: resolve the targets, extract each to its output, time it."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable

import drgn

from aradia.apps.extract.disk import DiskFiles
from aradia.apps.extract.files import Extraction, extract_inode
from aradia.apps.extract.targets import Target, output_name
from aradia.errors import AradiaError
from aradia.linux.bounds import Warnings
from aradia.linux.kernel import LinuxVM


def extract_targets(vm: LinuxVM, resolve: Callable[[drgn.Program, Warnings], list[Target]], output: str, *,
                    directory: bool = False, source: str = "auto", disk_node: str | None = None,
                    pause: bool = False) -> tuple[list[Extraction], float, list[str]]:
    """Extract the files ``resolve(prog, warnings)`` names into ``output`` (a file, or with
    ``directory`` a directory created if missing); returns the extractions, the seconds taken and
    the warnings of the resolution. ``pause`` holds the guest stopped meanwhile (a consistent copy)."""
    kernel = vm.load_kernel()
    warnings = Warnings()
    started = time.perf_counter()
    results = []
    with contextlib.ExitStack() as stack:
        if pause and vm.machine is not None:
            stack.enter_context(vm.paused())
        disk = stack.enter_context(DiskFiles(vm.machine, disk_node))
        targets = resolve(kernel.prog, warnings)
        if directory:
            os.makedirs(output, exist_ok=True)
        used: set[str] = set()
        for t in targets:
            path = output
            if directory:
                base = output_name(t)
                name, n = base, 1
                while name in used:
                    n += 1
                    name = f"{base}.{n}"
                used.add(name)
                path = os.path.join(output, name)
            try:
                with open(path, "wb") as fh:
                    results.append(extract_inode(vm.memory.read, t.inode, fh, name=t.name, disk=disk,
                                                 source=source, output=path))
            except OSError as e:
                raise AradiaError(f"cannot write {path}: {e}") from e
    return results, time.perf_counter() - started, list(warnings)


__all__ = ["extract_targets"]
