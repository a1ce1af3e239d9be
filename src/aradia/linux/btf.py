"""The kernel's BTF type information (``__start_BTF``..``__stop_BTF``), parsed and turned into drgn types.

One module past 500 lines on purpose: the drgn conversion walks the same kind-specific records the
parser decodes (members, enumerators, parameters), so a change to one kind touches both.

BTF layout (``include/uapi/linux/btf.h``): a header (magic ``0xeB9F``, version 1, flags, header
length, then the offset and length of the type and string sections, relative to the header's end),
then types numbered from 1 (0 is ``void``). Each type is a 12-byte ``btf_type`` -- name offset, info
(``vlen`` bits 0-15, kind bits 24-28, ``kind_flag`` bit 31), size-or-type -- followed by data that
depends on the kind: INT one u32 (encoding bits 24-27, bit offset 16-23, bit count 0-7); ARRAY a
``btf_array`` (element type, index type, count); STRUCT/UNION ``vlen`` members (name, type, offset:
bit offset, or ``bitfield_size << 24 | bit_offset`` when ``kind_flag``); ENUM ``vlen`` (name, s32/u32
value); ENUM64 ``vlen`` (name, low, high); FUNC_PROTO ``vlen`` params (name, type); VAR one u32
linkage; DATASEC ``vlen`` (type, offset, size); DECL_TAG one s32 component index.

:class:`Btf` indexes the blob in one pass (id -> offset, names -> ids, enumerators) and parses single
types on demand. :class:`DrgnTypes` converts them lazily into drgn types for one ``drgn.Program``:
structure members are converted only when drgn asks for them, and every conversion is memoised,
so attaching costs one index pass (or loading the cached index), not 95k conversions.

A module's BTF is "split" BTF: its ids continue after vmlinux's, and its strings after vmlinux's
strings; :class:`Btf` takes the vmlinux ``Btf`` as ``base`` for that.
"""

from __future__ import annotations

import hashlib
import marshal
import struct
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aradia.errors import GuestDataCorrupt

BTF_MAGIC = 0xEB9F
MAX_BTF_SIZE = 256 << 20
MAX_TYPES = 1 << 22
MAX_TYPE_CHAIN = 64  # typedef/qualifier/pointer chains longer than this are cycles

# kinds
(UNKN, INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FUNC_PROTO,
 VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64) = range(20)
KIND_NAMES = ("UNKN", "INT", "PTR", "ARRAY", "STRUCT", "UNION", "ENUM", "FWD", "TYPEDEF", "VOLATILE",
              "CONST", "RESTRICT", "FUNC", "FUNC_PROTO", "VAR", "DATASEC", "FLOAT", "DECL_TAG",
              "TYPE_TAG", "ENUM64")
INT_SIGNED, INT_CHAR, INT_BOOL = 1, 2, 4

_HEADER = struct.Struct("<HBBIIIII")
_TYPE = struct.Struct("<III")
_U32 = struct.Struct("<I")
_ARRAY = struct.Struct("<III")
_INDEX_FORMAT = 3  # bump when the cached index layout changes

# Extra bytes after the 12-byte btf_type: (fixed, per vlen item)
_EXTRA: dict[int, tuple[int, int]] = {
    INT: (4, 0), PTR: (0, 0), ARRAY: (12, 0), STRUCT: (0, 12), UNION: (0, 12), ENUM: (0, 8),
    FWD: (0, 0), TYPEDEF: (0, 0), VOLATILE: (0, 0), CONST: (0, 0), RESTRICT: (0, 0), FUNC: (0, 0),
    FUNC_PROTO: (0, 8), VAR: (4, 0), DATASEC: (0, 12), FLOAT: (0, 0), DECL_TAG: (4, 0),
    TYPE_TAG: (0, 0), ENUM64: (0, 12),
}
# Kinds whose name can be looked up (what a C type name or a global can refer to).
_NAMED = frozenset((INT, STRUCT, UNION, ENUM, FWD, TYPEDEF, FUNC, VAR, DATASEC, FLOAT, ENUM64))


class BtfError(GuestDataCorrupt):
    """The BTF blob is malformed."""


@dataclass(frozen=True, slots=True)
class Member:
    """A structure/union member, function parameter, enumerator or DATASEC entry."""

    name: str
    type: int  # type id (0 for enumerators)
    offset: int  # bit offset (members), value (enumerators), byte offset (DATASEC)
    bitfield_size: int = 0
    size: int = 0  # DATASEC entries


@dataclass(frozen=True, slots=True)
class BtfType:
    """One parsed BTF type."""

    id: int
    kind: int
    name: str
    kind_flag: bool
    size: int  # bytes, for INT/STRUCT/UNION/ENUM/ENUM64/DATASEC/FLOAT
    type: int  # referenced type, for PTR/TYPEDEF/qualifiers/FUNC/FUNC_PROTO (return)/VAR/DECL_TAG
    members: tuple[Member, ...] = ()
    # INT: (encoding, bit offset, bits); ARRAY: (element type, index type, count); VAR: (linkage,)
    # DECL_TAG: (component index,)
    extra: tuple[int, ...] = ()

    @property
    def kind_name(self) -> str:
        """``STRUCT``, ``INT``, ..."""
        return KIND_NAMES[self.kind] if self.kind < len(KIND_NAMES) else str(self.kind)


class Btf:
    """An indexed BTF blob: types by id and by name, parsed on demand."""

    def __init__(self, data: bytes, *, base: Btf | None = None, index: dict[str, Any] | None = None) -> None:
        if len(data) > MAX_BTF_SIZE:
            raise BtfError(f"BTF blob of {len(data)} bytes is implausibly large")
        if len(data) < _HEADER.size:
            raise BtfError("BTF blob is shorter than its header")
        magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = _HEADER.unpack_from(data)
        if magic != BTF_MAGIC:
            raise BtfError(f"bad BTF magic {magic:#x}")
        if version != 1 or not _HEADER.size <= hdr_len <= 256:
            raise BtfError(f"unsupported BTF version {version} / header length {hdr_len}")
        if hdr_len + type_off + type_len > len(data) or hdr_len + str_off + str_len > len(data):
            raise BtfError("BTF sections extend past the blob")
        self.data = data
        self.base = base
        self.types_data = memoryview(data)[hdr_len + type_off: hdr_len + type_off + type_len]
        self.strings = data[hdr_len + str_off: hdr_len + str_off + str_len]
        self.first_id = base.count + 1 if base else 1
        self.str_base = len(base.strings) if base else 0
        self.digest = hashlib.blake2b(data, digest_size=16).hexdigest()
        self._by_off: dict[int, Any]  # name string offset -> type id or list of ids
        self._name_offs: dict[str, list[int]] = {}
        self._enumerators: dict[str, tuple[int, int]] | None = None
        self._cache: dict[int, BtfType] = {}
        if index is not None and index.get("digest") == self.digest and index.get("format") == _INDEX_FORMAT:
            self.offsets = array("I")
            self.offsets.frombytes(index["offsets"])
            self.kinds = index["kinds"]
            self._by_off = index["by_off"]
        else:
            self._build_index()
        self.count = self.first_id - 1 + len(self.offsets)

    # --- index -------------------------------------------------------------------------------------
    def _build_index(self) -> None:
        """One pass over the type section: where each type starts, its kind, and which types carry
        each name (keyed by string offset: no string is decoded here)."""
        raw = bytes(self.types_data)
        if len(raw) % 4:
            raise BtfError("BTF type section is not a whole number of words")
        w = array("I")
        w.frombytes(raw)
        n = len(w)
        offsets = array("I")
        kinds = bytearray()
        by_off: dict[int, Any] = {}
        fixed = [0] * 32
        per = [0] * 32
        named = [False] * 32
        valid = [False] * 32
        for k, (f, v) in _EXTRA.items():
            fixed[k], per[k], valid[k] = 3 + f // 4, v // 4, True
        for k in _NAMED:
            named[k] = True
        add_off, add_kind = offsets.append, kinds.append
        i = 0
        tid = self.first_id
        while i < n:
            if i + 3 > n:
                raise BtfError(f"BTF type {tid} is cut off")
            info = w[i + 1]
            kind = (info >> 24) & 0x1F
            if not valid[kind]:
                raise BtfError(f"BTF type {tid} has unknown kind {kind}")
            add_off(i)
            add_kind(kind)
            if named[kind]:
                name_off = w[i]
                if name_off:
                    prev = by_off.get(name_off)
                    if prev is None:
                        by_off[name_off] = tid
                    elif isinstance(prev, int):
                        by_off[name_off] = [prev, tid]
                    else:
                        prev.append(tid)
            i += fixed[kind] + per[kind] * (info & 0xFFFF)
            tid += 1
        if i != n:
            raise BtfError("BTF type section does not end on a type boundary")
        if len(offsets) > MAX_TYPES:
            raise BtfError(f"more than {MAX_TYPES} BTF types")
        self.offsets = offsets
        self.kinds = bytes(kinds)
        self._by_off = by_off

    def index_data(self) -> dict[str, Any]:
        """The index, for a cache (:func:`marshal`-able); pass it back as ``index=``."""
        return {"format": _INDEX_FORMAT, "digest": self.digest, "offsets": self.offsets.tobytes(),
                "kinds": bytes(self.kinds), "by_off": self._by_off}

    def dump_index(self) -> bytes:
        """The index serialised."""
        return marshal.dumps(self.index_data())

    @staticmethod
    def load_index(raw: bytes) -> dict[str, Any] | None:
        """Parse what :meth:`dump_index` wrote (None if unreadable)."""
        try:
            d = marshal.loads(raw)
        except (ValueError, EOFError, TypeError):
            return None
        return d if isinstance(d, dict) else None

    # --- access ------------------------------------------------------------------------------------
    def _str(self, off: int) -> str:
        if off < self.str_base:
            assert self.base is not None
            return self.base._str(off)
        off -= self.str_base
        if off >= len(self.strings):
            raise BtfError(f"BTF string offset {off:#x} is outside the string section")
        end = self.strings.find(b"\0", off)
        if end < 0:
            raise BtfError(f"BTF string at {off:#x} is not terminated")
        return self.strings[off:end].decode("utf-8", "replace")

    def kind(self, tid: int) -> int:
        """The kind of type ``tid`` (0 for void)."""
        if tid == 0:
            return UNKN
        if tid < self.first_id:
            assert self.base is not None
            return self.base.kind(tid)
        i = tid - self.first_id
        if i >= len(self.kinds):
            raise BtfError(f"BTF type id {tid} is out of range (last is {self.count})")
        return self.kinds[i]

    def type(self, tid: int) -> BtfType:
        """Type ``tid`` parsed (memoised)."""
        if tid < self.first_id:
            if self.base is None or tid <= 0:
                raise BtfError(f"BTF type id {tid} is not a type")
            return self.base.type(tid)
        t = self._cache.get(tid)
        if t is None:
            t = self._parse(tid)
            self._cache[tid] = t
        return t

    def _parse(self, tid: int) -> BtfType:
        i = tid - self.first_id
        if i >= len(self.offsets):
            raise BtfError(f"BTF type id {tid} is out of range (last is {self.count})")
        d = self.types_data
        pos = 4 * self.offsets[i]
        name_off, info, st = _TYPE.unpack_from(d, pos)
        kind = (info >> 24) & 0x1F
        vlen = info & 0xFFFF
        kflag = bool(info >> 31)
        name = self._str(name_off) if name_off else ""
        p = pos + 12
        if kind == INT:
            v = _U32.unpack_from(d, p)[0]
            return BtfType(tid, kind, name, kflag, st, 0, (), ((v >> 24) & 0xF, (v >> 16) & 0xFF, v & 0xFF))
        if kind == ARRAY:
            return BtfType(tid, kind, name, kflag, 0, 0, (), _ARRAY.unpack_from(d, p))
        if kind in (STRUCT, UNION):
            members = []
            for k in range(vlen):
                m_name, m_type, m_off = _TYPE.unpack_from(d, p + 12 * k)
                if kflag:
                    members.append(Member(self._str(m_name) if m_name else "", m_type, m_off & 0xFFFFFF,
                                          m_off >> 24))
                else:
                    members.append(Member(self._str(m_name) if m_name else "", m_type, m_off))
            return BtfType(tid, kind, name, kflag, st, 0, tuple(members))
        if kind == ENUM:
            fmt = "<Ii" if kflag else "<II"
            vals = [struct.unpack_from(fmt, d, p + 8 * k) for k in range(vlen)]
            if not kflag and any(v >= 1 << 31 for _, v in vals) and st == 4:
                # Old BTF (no signedness flag) stores s32: negative values were written as such.
                signed = [v - (1 << 32) if v >= 1 << 31 else v for _, v in vals]
                if any(v < 0 for v in signed):
                    vals = [(n, v) for (n, _), v in zip(vals, signed, strict=True)]
            return BtfType(tid, kind, name, kflag, st, 0,
                           tuple(Member(self._str(n), 0, v) for n, v in vals))
        if kind == ENUM64:
            members = []
            for k in range(vlen):
                n, lo, hi = _TYPE.unpack_from(d, p + 12 * k)
                v = lo | hi << 32
                if kflag and v >= 1 << 63:
                    v -= 1 << 64
                members.append(Member(self._str(n), 0, v))
            return BtfType(tid, kind, name, kflag, st, 0, tuple(members))
        if kind == FUNC_PROTO:
            params = []
            for k in range(vlen):
                n, pt = struct.unpack_from("<II", d, p + 8 * k)
                params.append(Member(self._str(n) if n else "", pt, 0))
            return BtfType(tid, kind, name, kflag, 0, st, tuple(params))
        if kind == VAR:
            return BtfType(tid, kind, name, kflag, 0, st, (), (_U32.unpack_from(d, p)[0],))
        if kind == DATASEC:
            entries = []
            for k in range(vlen):
                vt, off, size = _TYPE.unpack_from(d, p + 12 * k)
                entries.append(Member("", vt, off, 0, size))
            return BtfType(tid, kind, name, kflag, st, 0, tuple(entries))
        if kind == DECL_TAG:
            return BtfType(tid, kind, name, kflag, 0, st, (), (struct.unpack_from("<i", d, p)[0],))
        if kind in (FLOAT,):
            return BtfType(tid, kind, name, kflag, st, 0)
        if kind == FUNC:
            return BtfType(tid, kind, name, kflag, 0, st, (), (vlen,))
        # PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG
        return BtfType(tid, kind, name, kflag, 0, st)

    def ids_by_name(self, name: str) -> list[int]:
        """Ids of named types (structs, typedefs, ints, funcs, vars, ...) called ``name``."""
        offs = self._name_offs.get(name)
        if offs is None:
            offs = self._find_string(name)
            if len(self._name_offs) < 1 << 16:
                self._name_offs[name] = offs
        out: list[int] = []
        for off in offs:
            hit = self._by_off.get(off)
            if hit is not None:
                out.extend([hit] if isinstance(hit, int) else hit)
        return (self.base.ids_by_name(name) + out) if self.base else out

    def _find_string(self, name: str) -> list[int]:
        """String-section offsets (global, i.e. plus ``str_base``) holding exactly ``name``."""
        if not name:
            return []
        needle = b"\0" + name.encode() + b"\0"
        s = self.strings
        out = []
        pos = s.find(needle)
        while pos >= 0 and len(out) < 64:
            out.append(pos + 1 + self.str_base)
            pos = s.find(needle, pos + 1)
        return out

    def find(self, name: str, kinds: tuple[int, ...]) -> list[int]:
        """Ids of types called ``name`` whose kind is in ``kinds``."""
        return [i for i in self.ids_by_name(name) if self.kind(i) in kinds]

    def function_params(self, name: str) -> list[str] | None:
        """The parameter names of function ``name`` in order (from its FUNC's prototype); None when
        the BTF has no such function."""
        for fid in self.find(name, (FUNC,)):
            proto = self.type(self.type(fid).type)
            if proto.kind == FUNC_PROTO:
                return [m.name for m in proto.members]
        return None

    def enumerator(self, name: str) -> tuple[int, int] | None:
        """(enum type id, value) of the enumerator ``name``, or None."""
        if self._enumerators is None:
            self._enumerators = self._build_enumerators()
        hit = self._enumerators.get(name)
        if hit is None and self.base is not None:
            return self.base.enumerator(name)
        return hit

    def _build_enumerators(self) -> dict[str, tuple[int, int]]:
        """Every enumerator name -> (enum type id, value); the first definition wins."""
        w = array("I")
        w.frombytes(bytes(self.types_data))
        by_off: dict[int, tuple[int, int, int]] = {}  # name offset -> (type id, raw value, kind)
        for i, k in enumerate(self.kinds):
            if k != ENUM and k != ENUM64:
                continue
            at = self.offsets[i]
            info = w[at + 1]
            vlen, flag = info & 0xFFFF, info >> 31
            tid = self.first_id + i
            if k == ENUM:
                for j in range(at + 3, at + 3 + 2 * vlen, 2):
                    v = w[j + 1]
                    by_off.setdefault(w[j], (tid, v - (1 << 32) if flag and v >= 1 << 31 else v, k))
            else:
                for j in range(at + 3, at + 3 + 3 * vlen, 3):
                    v = w[j + 1] | w[j + 2] << 32
                    by_off.setdefault(w[j], (tid, v - (1 << 64) if flag and v >= 1 << 63 else v, k))
        out: dict[str, tuple[int, int]] = {}
        for off, (tid, v, k) in by_off.items():
            if k == ENUM and not (w[self.offsets[tid - self.first_id] + 1] >> 31):
                # Unflagged (old) BTF: values are whatever the enum type says; let type() decide.
                v = next((m.offset for m in self.type(tid).members if m.name == self._str(off)), v) \
                    if v >= 1 << 31 else v
            out.setdefault(self._str(off), (tid, v))
        return out

    def __len__(self) -> int:
        return len(self.offsets)

    def names(self) -> list[str]:
        """Every indexed name."""
        return [self._str(off) for off in self._by_off]


def resolve(btf: Btf, tid: int) -> int:
    """Follow typedefs, qualifiers and type tags to the underlying type id (bounded)."""
    for _ in range(MAX_TYPE_CHAIN):
        k = btf.kind(tid)
        if k not in (TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG):
            return tid
        tid = btf.type(tid).type
    raise BtfError(f"BTF type chain from {tid} is a cycle")


# --- drgn conversion ----------------------------------------------------------------------------------

class DrgnTypes:
    """Lazy, memoised conversion of BTF types into drgn types for one ``drgn.Program``.

    Use :meth:`finder` as the program's type finder (``register_type_finder``).
    """

    def __init__(self, prog: Any, btf: Btf) -> None:
        import drgn

        self._drgn = drgn
        self.prog = prog
        self.btf = btf
        self._memo: dict[int, Any] = {}
        self._busy: set[int] = set()
        self._kinds = {
            drgn.TypeKind.STRUCT: (STRUCT, FWD),
            drgn.TypeKind.UNION: (UNION, FWD),
            drgn.TypeKind.ENUM: (ENUM, ENUM64),
            drgn.TypeKind.TYPEDEF: (TYPEDEF,),
            drgn.TypeKind.INT: (INT,),
            drgn.TypeKind.BOOL: (INT,),
            drgn.TypeKind.FLOAT: (FLOAT,),
        }
        self.conversions = 0

    # the drgn type-finder callback
    def finder(self, prog: Any, kinds: Any, name: str, filename: str | None) -> Any:
        """``(prog, kinds, name, filename) -> Type | None`` for ``Program.register_type_finder``."""
        if filename is not None:
            return None
        for kind in kinds:
            want = self._kinds.get(kind)
            if want is None:
                continue
            tid = self.lookup(name, want, kind)
            if tid is not None:
                return self.convert(tid)
        return None

    def lookup(self, name: str, want: tuple[int, ...], kind: Any = None) -> int | None:
        """The best BTF id for ``name`` among kinds ``want`` (complete definitions before FWD)."""
        drgn = self._drgn
        best: int | None = None
        for tid in self.btf.ids_by_name(name):
            k = self.btf.kind(tid)
            if k not in want:
                continue
            if k == FWD:
                is_union = self.btf.type(tid).kind_flag
                if (kind == drgn.TypeKind.UNION) != is_union:
                    continue
                if best is None:
                    best = tid
                continue
            if k == INT:
                is_bool = bool(self.btf.type(tid).extra[0] & INT_BOOL)
                if kind is not None and (kind == drgn.TypeKind.BOOL) != is_bool:
                    continue
            if best is None or self.btf.kind(best) == FWD:
                best = tid
                if k != FWD:
                    break
        return best

    def convert(self, tid: int) -> Any:
        """The drgn type for BTF id ``tid`` (0 is void)."""
        t = self._memo.get(tid)
        if t is not None:
            return t
        if tid in self._busy or len(self._busy) > MAX_TYPE_CHAIN:
            raise BtfError(f"BTF type {tid} refers to itself (corrupt BTF)")
        self._busy.add(tid)
        try:
            t = self._convert(tid)
        finally:
            self._busy.discard(tid)
        self._memo[tid] = t
        self.conversions += 1
        return t

    def _convert(self, tid: int) -> Any:
        drgn = self._drgn
        prog = self.prog
        if tid == 0:
            return prog.void_type()
        b = self.btf.type(tid)
        k = b.kind
        if k == INT:
            enc = b.extra[0]
            if enc & INT_BOOL:
                return prog.bool_type(b.name, b.size)
            return prog.int_type(b.name, b.size, bool(enc & INT_SIGNED))
        if k == PTR:
            return prog.pointer_type(self.convert(b.type), 8)
        if k == ARRAY:
            elem, _index, count = b.extra
            return prog.array_type(self.convert(elem), count if count else None)
        if k in (STRUCT, UNION):
            members = [drgn.TypeMember(self._lazy_member(m), m.name or None, m.offset) for m in b.members]
            make = prog.struct_type if k == STRUCT else prog.union_type
            return make(b.name or None, b.size, members)
        if k in (ENUM, ENUM64):
            if not b.members:
                return prog.enum_type(b.name or None)
            signed = b.kind_flag or any(m.offset < 0 for m in b.members)
            compat = self._int_for(b.size or 4, signed)
            return prog.enum_type(b.name or None, compat,
                                  [drgn.TypeEnumerator(m.name, m.offset) for m in b.members])
        if k == FWD:
            # Resolve forward declarations by name to the one complete definition, when there is one.
            want = (UNION,) if b.kind_flag else (STRUCT,)
            full = [i for i in self.btf.find(b.name, want)]
            if len(full) >= 1:
                return self.convert(full[0])
            return (prog.union_type if b.kind_flag else prog.struct_type)(b.name or None)
        if k == TYPEDEF:
            return prog.typedef_type(b.name, self.convert(b.type))
        if k in (VOLATILE, CONST, RESTRICT):
            inner = self.convert(b.type)
            q = {VOLATILE: drgn.Qualifiers.VOLATILE, CONST: drgn.Qualifiers.CONST,
                 RESTRICT: drgn.Qualifiers.RESTRICT}[k]
            return inner.qualified(inner.qualifiers | q)
        if k == TYPE_TAG:
            return self.convert(b.type)
        if k == FUNC_PROTO:
            params = list(b.members)
            variadic = bool(params) and params[-1].type == 0 and not params[-1].name
            if variadic:
                params.pop()
            return prog.function_type(
                self.convert(b.type),
                [drgn.TypeParameter(self._lazy_type(p.type), p.name or None) for p in params],
                variadic)
        if k in (FUNC, VAR):
            return self.convert(b.type)
        if k == FLOAT:
            return prog.float_type(b.name, b.size)
        raise BtfError(f"BTF type {tid} ({b.kind_name}) is not a C type")

    def _int_for(self, size: int, signed: bool) -> Any:
        names = {1: "char", 2: "short", 4: "int", 8: "long"}
        base = names.get(size, "long")
        name = ("" if signed else "unsigned ") + base
        return self.prog.int_type(name, size, signed)

    def _lazy_type(self, tid: int) -> Callable[[], Any]:
        return lambda: self.convert(tid)

    def _lazy_member(self, m: Member) -> Callable[[], Any]:
        if m.bitfield_size:
            return lambda: self._drgn.Object(self.prog, self.convert(m.type), bit_field_size=m.bitfield_size)
        tid = m.type

        def member() -> Any:
            # Old-style bit fields (no kind_flag): an INT whose bit count is below its size.
            r = resolve(self.btf, tid)
            if self.btf.kind(r) == INT:
                _enc, boff, bits = self.btf.type(r).extra
                if bits and (bits != 8 * self.btf.type(r).size or boff):
                    return self._drgn.Object(self.prog, self.convert(tid), bit_field_size=bits)
            return self.convert(tid)

        return member
