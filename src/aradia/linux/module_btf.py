"""BTF of loaded kernel modules, from guest RAM: split BTF on top of the kernel's.

Since 5.11 (``CONFIG_DEBUG_INFO_BTF_MODULES``) the kernel parses each module's ``.BTF`` section at
load time into a ``struct btf`` -- a copy of the section (``data``, ``data_size``), the module's
``name``, ``base_btf`` pointing at the kernel's own and ``start_id`` / ``start_str_off`` where its
type ids and strings continue the kernel's -- and keeps it in ``btf_idr`` (what
``/sys/kernel/btf/<module>`` shows). ``struct module``'s ``btf_data`` is no source: it points into
the module's load image, freed once the module is live (6.x clears the pointer). The copy is
byte-identical to the module file's ``.BTF``.
"""

from __future__ import annotations

from dataclasses import dataclass

import drgn

from aradia.linux.bounds import GUEST_ERRORS, Warnings, cstring
from aradia.linux.btf import Btf, BtfError
from aradia.linux.walks import xa_entries

MAX_MODULE_BTF = 64 << 20
MODULE_NAME_LEN = 56


@dataclass
class ModuleBtf:
    """One module's BTF: its name, the split :class:`Btf` (``base`` is the kernel's) and where the
    kernel's ``struct btf`` for it is."""

    name: str
    btf: Btf
    address: int


def module_btfs(prog: drgn.Program, base: Btf, warnings: Warnings | None = None) -> list[ModuleBtf]:
    """The BTF of every loaded module, in load order; ``base`` is the kernel's BTF (the profile's).

    Empty before 5.11 or without module BTF. A ``struct btf`` that does not continue ``base`` (ids
    and strings), is implausibly large or unreadable is skipped with a warning.
    """
    warnings = Warnings() if warnings is None else warnings
    try:
        idr = prog["btf_idr"]
        btf_type = prog.type("struct btf")
    except LookupError:
        return []
    if not btf_type.has_member("base_btf"):
        return []  # before split BTF (5.11): only the kernel's own
    out = []
    ptr = prog.pointer_type(btf_type)
    for nr, entry in xa_entries(idr.idr_rt.address_of_(), "BTF objects", warnings):
        b = drgn.Object(prog, ptr, entry)
        try:
            if not b.base_btf or not b.kernel_btf:
                continue  # the kernel's own BTF, or BTF a BPF program loaded
            name = cstring(b.name, MODULE_NAME_LEN)
            what = f"BTF of module {name} (id {nr})"
            size = int(b.data_size)
            if not 0 < size <= MAX_MODULE_BTF:
                warnings.add(f"{what}: implausible size {size}; skipped")
                continue
            start_id, start_str = int(b.start_id), int(b.start_str_off)
            if start_id != base.count + 1 or start_str != len(base.strings):
                warnings.add(f"{what}: continues at type {start_id}, string {start_str}, not after the "
                             f"kernel's {base.count} types and {len(base.strings)} bytes; skipped")
                continue
            out.append(ModuleBtf(name, Btf(prog.read(b.data.value_(), size), base=base), entry))
        except (BtfError, *GUEST_ERRORS) as e:
            warnings.add(f"BTF object at {entry:#x} (id {nr}): skipped ({e})")
    return out
