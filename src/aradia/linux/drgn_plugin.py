"""A drgn plugin: ``drgn -c DUMP`` on a kernel dump with no debug info gets types and symbols from the
dump's own RAM.

drgn calls :func:`drgn_prog_set` (aradia's ``drgn.plugins`` entry point) once a program's target is
set. For a Linux kernel *core dump* -- an aradia dump, QEMU's ``dump-guest-memory``, a kdump ELF --
it finds the kernel profile in the dump (:func:`~aradia.linux.profile.find_profile`: kallsyms, BTF,
and on arm64 the data symbols recovered from RAM) and registers them as drgn's *last* finders, so
DWARF debug info, when drgn finds some, still wins. drgn reads the memory itself (its core-dump
segments and its own page-table walk from VMCOREINFO). Live kernels (``/proc/kcore``) and user-space
programs are left alone; ``ARADIA_DRGN_PLUGIN=0`` turns the plugin off. A dump aradia cannot read
is logged as a warning on drgn's ``drgn.plugins`` logger and drgn goes on without it.
"""

from __future__ import annotations

import logging
import os

import drgn

from aradia.errors import AradiaError
from aradia.linux.profile import find_profile
from aradia.linux.program import add_finders
from aradia.vm import open_dump

log = logging.getLogger("drgn.plugins")


def drgn_prog_set(prog: drgn.Program) -> None:
    """drgn's plugin hook: give a kernel core dump aradia's kallsyms, BTF and typed globals."""
    if os.environ.get("ARADIA_DRGN_PLUGIN", "1") == "0":
        return
    if not prog.flags & drgn.ProgramFlags.IS_LINUX_KERNEL or prog.flags & drgn.ProgramFlags.IS_LIVE:
        return
    path = prog.core_dump_path
    if not path:
        return
    try:
        vm = open_dump(path)
        profile = find_profile(vm)
    except (AradiaError, OSError) as e:
        log.warning("aradia: no kernel profile in %s: %s", path, e)
        return
    types, finders = add_finders(prog, profile)
    prog.cache["aradia"] = {"profile": profile, "finders": finders, "types": types, "vm": vm}


__all__ = ["drgn_prog_set"]
