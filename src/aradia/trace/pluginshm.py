"""The shared file between aradia and its TCG plugin in a QEMU: targets, counters, hit log.

:class:`PluginShm` is the file the plugin maps (``-plugin counter.so,shm=PATH``, see
:func:`aradia.trace.pluginload.plugin_args`): up to :data:`MAX_TARGETS` target addresses that aradia
changes at run time, per-vCPU hit counters and a ring of logged hits (vCPU, target, address, host
``CLOCK_MONOTONIC`` ns) per vCPU. Where the QEMU offers register and memory reads (QEMU >= 9.2), a
target on a syscall entry ``__x64_sys_NAME`` also logs the syscall's six arguments, read by the plugin
from the ``struct pt_regs`` the entry receives (see :class:`ArgCapture`). After a target change, make
TCG re-translate the addresses it returns (:func:`aradia.trace.pluginload.force_retranslation`).
Another aradia process maps a running QEMU's file with :meth:`PluginShm.open` (find it with
:func:`aradia.trace.pluginload.plugin_shm_path`).

This file stays one module past 500 lines because it is one binary format: the layout constants,
the check of a file another process made, and the reader and writer must change together, and in
step with ``plugin/counter.c``.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import secrets
import struct
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aradia.trace.pluginload import PluginError, plugin_args
from aradia.trace.syscalls import SYSCALL_ARG_REGS

MAX_TARGETS = 64
"""Target slots in the shared file (fixed by the plugin's layout)."""

NARGS = 6
"""Syscall arguments a hit carries (x86-64: di, si, dx, r10, r8, r9 of ``struct pt_regs``)."""

DATA_MAX = 64
"""Bytes the plugin copies at most from behind one pointer argument (:attr:`ArgCapture.data_len`)."""

_MAGIC = 0x31474C5044415241  # "ARADPLG1"
_LAYOUT = 4
_HEADER_SIZE = 4096
_HIT_SIZE = 32
_ARGREC_SIZE = 128
_ARGS_SPAN_MAX = 256  # the plugin reads the six slots of pt_regs in one span of at most this
_TF_ACTIVE, _TF_LOG, _TF_INLINE, _TF_ARGS, _TF_DATA = 1, 2, 4, 8, 16
_TF_EVENT, _TF_ARGV, _TF_SWITCH = 32, 64, 128
_CAP_INSN_INLINE, _CAP_READ_REGISTER, _CAP_READ_MEMORY, _CAP_SYSCALL_ARGS, _CAP_TASK = 1, 2, 4, 8, 16
_HIT_ARGS = 1
_AR_ARGS, _AR_DATA = 1, 2

# header (see counter.c): creation fields, plugin-written fields, aradia-written fields, more
# plugin-written fields, targets, argument specs
_H_CREATE = struct.Struct("<QIIIIII QQQQ")
_H_PLUGIN = struct.Struct("<IIII QQ QQQQ")
_H_PLUGIN_OFF = 64
_H_TARGETS_VERSION = 128
_H_ARADIA = struct.Struct("<QQ")  # args_off, bases_off
_H_ARADIA_OFF = 136
_H_ARG_FAULTS = 192
_H_TARGETS = 256
_TARGET = struct.Struct("<QQII Q")
_H_ARGSPECS = _H_TARGETS + MAX_TARGETS * _TARGET.size
_ARGSPEC = struct.Struct("<6HBBBB")
_H_EVCONF = 3328  # struct evconf (counter.c): the event rings, the task's layout, the filter
_EVCONF_RING = struct.Struct("<QII")  # events_off, event_entries, event_size
_EVCONF_TASK = struct.Struct("<Q5H6x")  # current_off; pid, tgid, comm, real_cred offsets; cred's uid
_EVCONF_FILTER = struct.Struct("<4I8i8I128s")  # npids, nuids, ncomms, cache_task; pids; uids; comms
_H_EVSTATS = 3584  # filtered, event_faults (plugin-written)
EVENT_SIZE = 1024
"""Bytes of one syscall event record (see :mod:`aradia.trace.pluginevents`)."""
FILTER_MAX = 8
"""Pids, uids or comms an event filter in the plugin holds at most (each)."""
_ARGREC_HEAD = struct.Struct("<6QQII")  # args, seq, status, data_len; then DATA_MAX bytes
_RING_HEAD_SIZE = 64


@dataclass(frozen=True)
class ArgCapture:
    """How the plugin captures a syscall's arguments at a ``__x64_sys_NAME`` target.

    The entry's only argument (``rdi``) points at the ``struct pt_regs`` of the syscall; at every
    hit the plugin reads the six argument slots at ``offsets`` (of di, si, dx, r10, r8, r9, in this
    order; :meth:`syscall` takes them from the kernel's BTF, the plugin knows no struct layout) and,
    if ``data_arg`` is set, the first ``data_len`` bytes at the address in that argument (a path, a
    buffer). Only a plugin whose QEMU offers register and memory reads (QEMU >= 9.2,
    :attr:`PluginShm.syscall_args`) does this; elsewhere the target is a plain logged hit.
    """

    offsets: tuple[int, ...]
    data_arg: int | None = None  # index 0..5 into the arguments
    data_len: int = DATA_MAX  # 1..DATA_MAX; 0 (events only): the NUL-terminated string there
    argv_arg: int | None = None  # events only: the argument holding a NULL-terminated argv

    def __post_init__(self) -> None:
        if len(self.offsets) != NARGS or not all(0 <= o <= 0xFFF8 for o in self.offsets):
            raise PluginError(f"argument offsets {self.offsets}: need {NARGS} offsets in 0..0xfff8")
        if max(self.offsets) - min(self.offsets) + 8 > _ARGS_SPAN_MAX:
            raise PluginError(f"argument offsets {self.offsets} span more than {_ARGS_SPAN_MAX} bytes")
        if self.data_arg is not None and not 0 <= self.data_arg < NARGS:
            raise PluginError(f"data_arg {self.data_arg} is not an argument index 0..{NARGS - 1}")
        if not 0 <= self.data_len <= DATA_MAX:  # 0: a NUL-terminated string (syscall events only)
            raise PluginError(f"data_len {self.data_len} is out of range 0..{DATA_MAX}")
        if self.argv_arg is not None and not 0 <= self.argv_arg < NARGS:
            raise PluginError(f"argv_arg {self.argv_arg} is not an argument index 0..{NARGS - 1}")

    @classmethod
    def syscall(cls, prog: Any, *, data_arg: int | None = None, data_len: int = DATA_MAX,
                argv_arg: int | None = None) -> ArgCapture:
        """The capture for the running kernel: where its ``struct pt_regs`` keeps the six arguments.

        ``prog`` is the kernel's drgn program (``vm.linux.prog``, types from BTF).
        """
        import drgn

        try:
            regs = prog.type("struct pt_regs")
            offsets = tuple(drgn.offsetof(regs, name) for name in SYSCALL_ARG_REGS)
        except (LookupError, ValueError) as exc:
            raise PluginError(f"the kernel's struct pt_regs lacks the argument registers: {exc}") from exc
        return cls(offsets, data_arg, data_len, argv_arg)

    def _spec(self) -> tuple[int, ...]:
        """The slot's argspec words as the plugin reads them."""
        argv = 0 if self.argv_arg is None else self.argv_arg
        if self.data_arg is None:
            return (*self.offsets, 0, 0, argv, 0)
        return (*self.offsets, self.data_arg, self.data_len, argv, 0)


@dataclass(frozen=True, slots=True)
class Hit:
    """One logged execution of a target.

    ``args`` are the six syscall arguments of an :class:`ArgCapture` target (None: not asked for,
    not available on this QEMU, or the plugin could not read them). ``data`` are the bytes at
    ``args[data_arg]`` (None: not asked for or unreadable; shorter than asked when the page after
    the address is not mapped).
    """

    vcpu: int
    target: int  # slot index
    vaddr: int
    time_ns: int  # host CLOCK_MONOTONIC (time.monotonic_ns())
    args: tuple[int, ...] | None = None
    data: bytes | None = None


@dataclass
class HitBatch:
    """Logged hits in columns (index i of each list is one hit); iterating yields :class:`Hit`."""

    vcpu: list[int]
    target: list[int]
    vaddr: list[int]
    time_ns: list[int]
    args: list[tuple[int, ...] | None]
    data: list[bytes | None]

    def __len__(self) -> int:
        return len(self.time_ns)

    def __iter__(self) -> Iterator[Hit]:
        return map(Hit, self.vcpu, self.target, self.vaddr, self.time_ns, self.args, self.data)

    def _columns(self) -> tuple[list[Any], ...]:
        return self.vcpu, self.target, self.vaddr, self.time_ns, self.args, self.data


@dataclass(frozen=True)
class PluginStatus:
    """What the plugin reports about itself (zeros until QEMU has loaded it)."""

    pid: int
    plugin_api: int
    qemu_api: int
    smp_vcpus: int
    insn_inline: bool
    read_register: bool
    read_memory: bool
    translations: int
    instrumented: int
    stale_hits: int
    bad_vcpu: int
    syscall_args: bool = False  # the plugin captures syscall arguments (a vCPU found its rdi)
    arg_faults: int = 0  # argument or data reads that failed
    task: bool = False  # syscall events carry their task (a vCPU found gs_base)
    filtered: int = 0  # event hits the plugin's filter dropped
    event_faults: int = 0  # event hits whose task could not be read


@dataclass(frozen=True)
class _Layout:
    """Where everything lives in a shared file of these parameters (the plugin checks the same)."""

    max_vcpus: int
    ring_entries: int
    args_entries: int
    counters_off: int  # max_vcpus x MAX_TARGETS u64, plugin-written
    inline_off: int  # MAX_TARGETS u64 on their own cache lines, written by inline code (QEMU < 9)
    bases_off: int  # MAX_TARGETS x (max_vcpus + 1) u64: aradia's counts at each slot's last change
    ring_off: int  # max_vcpus hit rings
    ring_block: int
    args_off: int  # max_vcpus args rings
    args_block: int
    events_off: int  # max_vcpus event rings
    event_entries: int
    events_block: int
    size: int

    @classmethod
    def of(cls, max_vcpus: int, ring_entries: int, args_entries: int, event_entries: int) -> _Layout:
        """The layout for these parameters; PluginError if one is out of range."""
        if not 1 <= max_vcpus <= 1024:
            raise PluginError(f"max_vcpus {max_vcpus} is out of range 1..1024")
        for name, n in (("ring_entries", ring_entries), ("args_entries", args_entries),
                        ("event_entries", event_entries)):
            if n < 2 or n & (n - 1) or n > 1 << 24:
                raise PluginError(f"{name} {n} is not a power of two in 2..2**24")
        counters_off = _HEADER_SIZE
        inline_off = counters_off + max_vcpus * MAX_TARGETS * 8
        bases_off = inline_off + MAX_TARGETS * 64
        ring_off = (bases_off + MAX_TARGETS * (max_vcpus + 1) * 8 + 63) // 64 * 64
        ring_block = _RING_HEAD_SIZE + ring_entries * _HIT_SIZE
        args_off = ring_off + max_vcpus * ring_block
        args_block = _RING_HEAD_SIZE + args_entries * _ARGREC_SIZE
        events_off = args_off + max_vcpus * args_block
        events_block = _RING_HEAD_SIZE + event_entries * EVENT_SIZE
        end = events_off + max_vcpus * events_block
        size = (end + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
        return cls(max_vcpus, ring_entries, args_entries, counters_off, inline_off, bases_off, ring_off,
                   ring_block, args_off, args_block, events_off, event_entries, events_block, size)


class PluginShm:
    """The shared file between aradia and one QEMU's plugin: targets, counters, hit log.

    The VM's owner creates it (``PluginShm()``) before launching QEMU and passes :meth:`plugin_arg`
    (or :func:`~aradia.trace.pluginload.plugin_args`) to ``launch(plugins=...)``; another aradia
    process maps the same file with :meth:`open` (find it with
    :func:`~aradia.trace.pluginload.plugin_shm_path`). The file is the single truth about
    targets and count bases, so every mapping reports the same counts; target changes are
    serialised by a lock on the file. Each mapping drains the hit log on its own (reading does not
    consume): an opened mapping sees the hits logged after it was opened.
    """

    def __init__(self, path: Path | str | None = None, *, max_vcpus: int = 16,
                 ring_entries: int = 1 << 16, args_entries: int = 1 << 12,
                 event_entries: int = 1 << 9) -> None:
        """Create the file (``path``, default a new name in ``/dev/shm``), laid out for up to
        ``max_vcpus`` vCPUs with hit rings of ``ring_entries``, args rings of ``args_entries`` and
        syscall event rings of ``event_entries`` records per vCPU (powers of two; a hit is 32 bytes,
        an args record 128, an event :data:`EVENT_SIZE`)."""
        layout = _Layout.of(max_vcpus, ring_entries, args_entries, event_entries)
        path = Path(path) if path is not None else Path(
            f"/dev/shm/aradia-plugin-{os.getpid()}-{secrets.token_hex(4)}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, layout.size)
            mapping = mmap.mmap(fd, layout.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        _H_CREATE.pack_into(mapping, 0, _MAGIC, _LAYOUT, _HEADER_SIZE, MAX_TARGETS, max_vcpus,
                            ring_entries, args_entries, layout.counters_off, layout.inline_off,
                            layout.ring_off, layout.size)
        _H_ARADIA.pack_into(mapping, _H_ARADIA_OFF, layout.args_off, layout.bases_off)
        _EVCONF_RING.pack_into(mapping, _H_EVCONF, layout.events_off, event_entries, EVENT_SIZE)
        self._setup(path, fd, mapping, layout, owner=True)

    @classmethod
    def open(cls, path: Path | str) -> PluginShm:
        """Map an existing file that an aradia process created (typically for a running QEMU).

        The header must carry aradia's magic and this layout, and every offset and the size must be
        what those parameters give: anything else raises :class:`PluginError` and maps nothing.
        :meth:`close` leaves the file in place (its creator removes it).
        """
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise PluginError(f"cannot open plugin file {path}: {exc}") from exc
        try:
            layout = _read_layout(fd, path)
            mapping = mmap.mmap(fd, layout.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self = cls.__new__(cls)
        self._setup(path, fd, mapping, layout, owner=False)
        return self

    def _setup(self, path: Path, fd: int, mapping: mmap.mmap, layout: _Layout, *, owner: bool) -> None:
        self.path = path
        self.owner = owner
        self.max_vcpus = layout.max_vcpus
        self.ring_entries = layout.ring_entries
        self.args_entries = layout.args_entries
        self.event_entries = layout.event_entries
        self.size = layout.size
        self._layout = layout
        self._fd = fd
        self._map = mapping
        self._mv = memoryview(mapping)
        self._lock = threading.Lock()
        # an opened mapping starts reading at the rings' current heads
        self._tails = [0 if owner else self._ring_head(v) for v in range(layout.max_vcpus)]
        self._lost = 0
        self._lost_args = 0
        self._event_tails = [0 if owner else self._event_head(v) for v in range(layout.max_vcpus)]
        self._lost_events = 0

    # -- life cycle ---------------------------------------------------------------------------------
    def plugin_arg(self, so: Path | str) -> str:
        """The ``-plugin`` value loading the built plugin ``so`` on this file."""
        return plugin_args(self.path, so)

    def close(self) -> None:
        """Unmap; the creator also removes the file (QEMU keeps its own mapping until it exits)."""
        with contextlib.suppress(Exception):
            self._mv.release()
        with contextlib.suppress(Exception):
            self._map.close()
        fd, self._fd = self._fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.owner:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> PluginShm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def status(self) -> PluginStatus:
        """The plugin's self-report (pid 0: not loaded yet)."""
        api, qapi, smp, caps, pid, _loaded, trans, instr, stale, bad = _H_PLUGIN.unpack_from(
            self._map, _H_PLUGIN_OFF)
        (faults,) = struct.unpack_from("<Q", self._map, _H_ARG_FAULTS)
        filtered, event_faults = struct.unpack_from("<QQ", self._map, _H_EVSTATS)
        return PluginStatus(pid, api, qapi, smp, bool(caps & _CAP_INSN_INLINE),
                            bool(caps & _CAP_READ_REGISTER), bool(caps & _CAP_READ_MEMORY),
                            trans, instr, stale, bad, bool(caps & _CAP_SYSCALL_ARGS), faults,
                            bool(caps & _CAP_TASK), filtered, event_faults)

    @property
    def loaded(self) -> bool:
        """Whether a QEMU has loaded the plugin on this file."""
        return self.status().pid != 0

    @property
    def syscall_args(self) -> bool:
        """Whether the loaded plugin captures :class:`ArgCapture` arguments (False until QEMU loaded
        it, and always on a QEMU without register and memory reads for plugins, i.e. before 9.2)."""
        return self.status().syscall_args

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """This object's lock and the file's: target changes from several processes are serialised."""
        with self._lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    # -- targets ------------------------------------------------------------------------------------
    def _slot(self, index: int) -> tuple[int, int, tuple[int, ...] | None] | None:
        """Slot ``index`` as the file has it: (address, flags, argspec or None), None if empty."""
        vaddr, _gen, flags, _p0, _p1 = _TARGET.unpack_from(self._map, _H_TARGETS + index * _TARGET.size)
        if not flags & _TF_ACTIVE:
            return None
        if not flags & _TF_ARGS:
            return vaddr, flags, None
        return vaddr, flags, _ARGSPEC.unpack_from(self._map, _H_ARGSPECS + index * _ARGSPEC.size)

    def targets(self) -> list[int | None]:
        """The address in each slot (None: empty)."""
        return [t[0] if t else None for t in map(self._slot, range(MAX_TARGETS))]

    def set_target(self, index: int, vaddr: int | None, *, log: bool = True, inline: bool = False,
                   args: ArgCapture | None = None, event: bool = False, switch: bool = False) -> list[int]:
        """Point slot ``index`` at guest-virtual ``vaddr`` (None clears it); its count restarts at 0.

        ``log`` appends every hit to the ring; ``inline`` counts with a counter add compiled into
        the translated code instead of a call (no log, no per-vCPU split; only where the QEMU has
        it, see :attr:`PluginStatus.insn_inline`). ``args`` (with ``log``) makes every hit of a
        syscall entry carry the syscall's arguments where the plugin can read them
        (:attr:`syscall_args`); elsewhere the target still counts and logs, with ``Hit.args`` None.
        ``event`` (with ``args``) makes every hit a syscall event record instead (task, the plugin's
        event filter, the string at ``args.data_arg``, the argv at ``args.argv_arg``: see
        :mod:`aradia.trace.plugintrace`), read with :meth:`drain_events`. ``switch`` (no log) marks a
        place where a vCPU's task, or its comm, pid or credentials, may change (the context switch,
        ``__set_task_comm``, ``commit_creds``): the plugin then forgets what it knew of the task.
        Returns the addresses whose translations must be redone
        (:func:`~aradia.trace.pluginload.force_retranslation`) before the change is fully in effect.
        """
        if not 0 <= index < MAX_TARGETS:
            raise PluginError(f"target slot {index} is out of range 0..{MAX_TARGETS - 1}")
        if vaddr is not None and not 0 <= vaddr < 1 << 64:
            raise PluginError(f"target address {vaddr:#x} is not a 64-bit address")
        if inline and log:
            raise PluginError("an inline counter cannot log hits: pass log=False")
        if args is not None and not log:
            raise PluginError("captured arguments go into the hit log: pass log=True")
        if event and args is None:
            raise PluginError("a syscall event needs its argument capture: pass args=")
        if inline and self.loaded and not self.status().insn_inline:
            raise PluginError("this QEMU's plugin API has no shared inline counter")
        if switch and (log or inline or args is not None):
            raise PluginError("a switch target only counts: pass log=False and no args")
        flags = _TF_ACTIVE | (_TF_LOG if log else 0) | (_TF_INLINE if inline else 0)
        flags |= _TF_SWITCH if switch else 0
        if args is not None:
            flags |= _TF_ARGS | (_TF_DATA if args.data_arg is not None else 0)
            if event:
                flags |= _TF_EVENT | (_TF_ARGV if args.argv_arg is not None else 0)
        spec = args._spec() if args is not None else None
        with self._locked():
            old = self._slot(index)
            new = None if vaddr is None else (vaddr, flags, spec)
            if old == new:
                return []
            off = _H_TARGETS + index * _TARGET.size
            # deactivate, then change address, generation and argspec, then activate: a translation
            # racing this sees the slot off or a mismatched generation, both harmless
            struct.pack_into("<I", self._map, off + 16, 0)
            gen = struct.unpack_from("<Q", self._map, off + 8)[0] + 1
            struct.pack_into("<QQ", self._map, off, vaddr or 0, gen)
            _ARGSPEC.pack_into(self._map, _H_ARGSPECS + index * _ARGSPEC.size, *(spec or (0,) * 10))
            bases = [*self._vcpu_counts(index), self._inline_raw(index)]
            struct.pack_into(f"<{len(bases)}Q", self._map, self._base_off(index), *bases)
            if new is not None:
                struct.pack_into("<I", self._map, off + 16, flags)
            version = struct.unpack_from("<Q", self._map, _H_TARGETS_VERSION)[0]
            struct.pack_into("<Q", self._map, _H_TARGETS_VERSION, version + 1)
        return sorted({t[0] for t in (old, new) if t is not None})

    def set_targets(self, vaddrs: Sequence[int], *, log: bool = True, inline: bool = False,
                    args: ArgCapture | None = None) -> list[int]:
        """Slots 0.. get ``vaddrs`` in order, the rest are cleared; returns addresses to re-translate."""
        if len(vaddrs) > MAX_TARGETS:
            raise PluginError(f"{len(vaddrs)} targets: at most {MAX_TARGETS}")
        changed: set[int] = set()
        for i in range(MAX_TARGETS):
            changed.update(self.set_target(i, vaddrs[i] if i < len(vaddrs) else None, log=log, inline=inline,
                                           args=args))
        return sorted(changed)

    # -- counters -----------------------------------------------------------------------------------
    def _base_off(self, index: int) -> int:
        return self._layout.bases_off + index * (self.max_vcpus + 1) * 8

    def _vcpu_counts(self, index: int) -> list[int]:
        first = self._layout.counters_off + index * 8
        stride = MAX_TARGETS * 8
        return [struct.unpack_from("<Q", self._map, first + v * stride)[0] for v in range(self.max_vcpus)]

    def _inline_raw(self, index: int) -> int:
        return int(struct.unpack_from("<Q", self._map, self._layout.inline_off + index * 64)[0])

    def counts(self, index: int) -> list[int]:
        """Per-vCPU hits of slot ``index`` since its target was set (callback counting)."""
        if not 0 <= index < MAX_TARGETS:
            raise PluginError(f"target slot {index} is out of range 0..{MAX_TARGETS - 1}")
        bases = struct.unpack_from(f"<{self.max_vcpus}Q", self._map, self._base_off(index))
        return [max(0, n - b) for n, b in zip(self._vcpu_counts(index), bases, strict=True)]

    def count(self, index: int) -> int:
        """Hits of slot ``index`` since its target was set (callback or inline counter)."""
        target = self._slot(index) if 0 <= index < MAX_TARGETS else None
        # a plugin without inline counters serves an inline target with the callback instead
        if target is not None and target[1] & _TF_INLINE and self.status().insn_inline:
            (base,) = struct.unpack_from("<Q", self._map, self._base_off(index) + self.max_vcpus * 8)
            return self._inline_raw(index) - base
        return sum(self.counts(index))

    # -- the hit log --------------------------------------------------------------------------------
    @property
    def lost(self) -> int:
        """Logged hits overwritten before this mapping's :meth:`drain` read them."""
        return self._lost

    @property
    def lost_args(self) -> int:
        """Hits read whose argument record was overwritten first (their ``args`` are None)."""
        return self._lost_args

    def _ring_head(self, vcpu: int) -> int:
        block = self._layout.ring_off + vcpu * self._layout.ring_block
        return int(struct.unpack_from("<Q", self._map, block)[0])

    def drain(self) -> HitBatch:
        """The hits logged since the last drain, in host-time order.

        Each vCPU logs into a ring of its own; hits a ring overwrote before they were read are
        counted in :attr:`lost`. The batch is columnar: reading 100 000 hits takes milliseconds,
        :class:`Hit` objects are only made on iteration.
        """
        batch = HitBatch([], [], [], [], [], [])
        with self._lock:
            with_args = [self._drain_vcpu(vcpu, batch) for vcpu in range(self.max_vcpus)]
        if len(set(batch.vcpu)) > 1:
            order = sorted(range(len(batch)), key=batch.time_ns.__getitem__)
            columns = batch._columns() if any(with_args) else batch._columns()[:4]
            batch = HitBatch(*([col[i] for i in order] for col in columns),
                             *(() if any(with_args) else ([None] * len(order), [None] * len(order))))
        return batch

    def _copy(self, start: int, entry: int, entries: int, first: int, end: int) -> list[memoryview]:
        """Copies of entries ``first``..``end`` (positions) of a ring at ``start`` with ``entries``
        slots: at most two runs, up to the ring's end, then from its start."""
        out = []
        pos = first
        while pos < end:
            slot = pos % entries
            n = min(end - pos, entries - slot)
            at = start + _RING_HEAD_SIZE + slot * entry
            out.append(memoryview(bytes(self._mv[at:at + n * entry])))
            pos += n
        return out

    def _drain_vcpu(self, vcpu: int, batch: HitBatch) -> bool:
        """Append the vCPU's new hits to ``batch``; whether one of them carries arguments."""
        block = self._layout.ring_off + vcpu * self._layout.ring_block
        head = self._ring_head(vcpu)
        tail = self._tails[vcpu]
        if head == tail:
            return False
        if head < tail or head - tail > 1 << 62:
            raise PluginError(f"vCPU {vcpu}'s ring head went backwards ({head} < {tail})")
        # the entry at head - ring_entries shares its slot with the one the vCPU writes next
        keep = self.ring_entries - 1
        if head - tail > keep:
            self._lost += head - tail - keep
            tail = head - keep
        runs = self._copy(block, _HIT_SIZE, self.ring_entries, tail, head)
        # entries the vCPU may have overwritten (or be writing) while we copied them are lost, not read
        skip = min(max(0, self._ring_head(vcpu) - keep - tail), head - tail)
        self._tails[vcpu] = head
        words: list[int] = []
        for run in runs:
            words += run.cast("Q").tolist()
        if skip:
            self._lost += skip
            del words[:skip * 4]
        n = len(words) // 4
        packed = words[2::4]
        batch.time_ns += words[0::4]
        batch.vaddr += words[1::4]
        batch.target += (x & 0xFFFFFFFF for x in packed)
        batch.vcpu += [vcpu] * n
        args: list[tuple[int, ...] | None] = [None] * n
        data: list[bytes | None] = [None] * n
        flagged = []
        if n and max(packed) >> 32:  # hit flags in the upper half: rare, so look only when there are some
            flagged = [i for i, x in enumerate(packed) if (x >> 32) & _HIT_ARGS]
        if flagged:
            seqs = words[3::4]
            for i, (a, d) in zip(flagged, self._read_args(vcpu, [seqs[i] for i in flagged]), strict=True):
                args[i], data[i] = a, d
        batch.args += args
        batch.data += data
        return bool(flagged)

    def _read_args(self, vcpu: int, seqs: list[int]) -> list[tuple[tuple[int, ...] | None, bytes | None]]:
        """The argument records at positions ``seqs`` (ascending) of the vCPU's args ring."""
        block = self._layout.args_off + vcpu * self._layout.args_block
        keep = self.args_entries - 1
        head = int(struct.unpack_from("<Q", self._map, block)[0])
        first = max(seqs[0], head - keep)
        end = max(first, seqs[-1] + 1)
        raw = b"".join(self._copy(block, _ARGREC_SIZE, self.args_entries, first, end))
        valid = max(first, int(struct.unpack_from("<Q", self._map, block)[0]) - keep)
        out: list[tuple[tuple[int, ...] | None, bytes | None]] = []
        for seq in seqs:
            if not valid <= seq < end:
                self._lost_args += 1
                out.append((None, None))
                continue
            at = (seq - first) * _ARGREC_SIZE
            *values, rec_seq, status, dlen = _ARGREC_HEAD.unpack_from(raw, at)
            if rec_seq != seq:
                self._lost_args += 1
                out.append((None, None))
                continue
            out.append((tuple(values) if status & _AR_ARGS else None,
                        raw[at + _ARGREC_HEAD.size:at + _ARGREC_HEAD.size + min(dlen, DATA_MAX)]
                        if status & _AR_DATA else None))
        return out

    # -- syscall events -----------------------------------------------------------------------------
    def set_event_task(self, current_off: int, pid: int, tgid: int, comm: int, real_cred: int,
                       cred_uid: int) -> None:
        """Where the plugin finds an event's task: the per-CPU offset of the current task pointer
        (from ``gs_base``) and the byte offsets of ``task_struct``'s pid, tgid, comm and real_cred
        and of ``cred``'s uid (aradia takes them from the kernel's BTF)."""
        for name, off in (("pid", pid), ("tgid", tgid), ("comm", comm), ("real_cred", real_cred),
                          ("uid", cred_uid)):
            if not 0 <= off <= 0xFFF0:
                raise PluginError(f"task offset {name}={off} is out of range 0..0xfff0")
        if not 0 < current_off < 1 << 64:
            raise PluginError(f"per-CPU offset {current_off:#x} of the current task is not valid")
        with self._locked():
            _EVCONF_TASK.pack_into(self._map, _H_EVCONF + _EVCONF_RING.size, current_off, pid, tgid, comm,
                                   real_cred, cred_uid)

    def set_event_filter(self, pids: Sequence[int] = (), uids: Sequence[int] = (),
                         comms: Sequence[str] = (), *, cache_task: bool = False) -> None:
        """The plugin's event filter: keep an event when its task's pid or tgid is in ``pids``, its
        uid in ``uids`` and its comm in ``comms`` (an empty list: any). Set it before activating
        event targets: the plugin reads it at every hit. At most :data:`FILTER_MAX` of each.
        ``cache_task`` lets each vCPU keep its task's identity and verdict until a ``switch``
        target runs on it: set it only while switch targets on every such place are active."""
        raw_comms = [c.encode() for c in comms]
        for name, seq in (("pids", pids), ("uids", uids), ("comms", raw_comms)):
            if len(seq) > FILTER_MAX:
                raise PluginError(f"{len(seq)} {name} in the plugin's event filter: at most {FILTER_MAX}")
        if any(len(c) > 15 or b"\0" in c for c in raw_comms):
            raise PluginError(f"a comm is at most 15 bytes with no NUL: {list(comms)}")
        if any(not -(1 << 31) <= p < 1 << 31 for p in pids) or any(not 0 <= u < 1 << 32 for u in uids):
            raise PluginError(f"pids or uids out of range: {list(pids)} {list(uids)}")
        packed = b"".join(c.ljust(16, b"\0") for c in raw_comms).ljust(128, b"\0")
        with self._locked():
            _EVCONF_FILTER.pack_into(self._map, _H_EVCONF + _EVCONF_RING.size + _EVCONF_TASK.size,
                                     len(pids), len(uids), len(raw_comms), int(cache_task),
                                     *[*pids, *[0] * (FILTER_MAX - len(pids))],
                                     *[*uids, *[0] * (FILTER_MAX - len(uids))], packed)
            # what a vCPU remembers of its task was judged by the old filter
            version = struct.unpack_from("<Q", self._map, _H_TARGETS_VERSION)[0]
            struct.pack_into("<Q", self._map, _H_TARGETS_VERSION, version + 1)

    def event_slots(self) -> list[int]:
        """The slots that make syscall event records (another trace's, if this mapping set none)."""
        return [i for i, t in enumerate(map(self._slot, range(MAX_TARGETS))) if t and t[1] & _TF_EVENT]

    @property
    def lost_events(self) -> int:
        """Syscall events the plugin wrote that a ring overwrote before this mapping read them."""
        return self._lost_events

    def _event_head(self, vcpu: int) -> int:
        block = self._layout.events_off + vcpu * self._layout.events_block
        return int(struct.unpack_from("<Q", self._map, block)[0])

    def drain_events(self) -> list[tuple[int, bytes]]:
        """The syscall event records written since the last call, as (vCPU, record bytes), in the
        order each vCPU wrote them (vCPUs one after another). Records a ring overwrote first are
        counted in :attr:`lost_events`: written = read + lost, exactly."""
        out: list[tuple[int, bytes]] = []
        keep = self.event_entries - 1
        with self._lock:
            for vcpu in range(self.max_vcpus):
                block = self._layout.events_off + vcpu * self._layout.events_block
                head, tail = self._event_head(vcpu), self._event_tails[vcpu]
                if head == tail:
                    continue
                if head < tail:
                    raise PluginError(f"vCPU {vcpu}'s event ring head went backwards ({head} < {tail})")
                if head - tail > keep:
                    self._lost_events += head - tail - keep
                    tail = head - keep
                runs = self._copy(block, EVENT_SIZE, self.event_entries, tail, head)
                # records the vCPU overwrote while we copied them are lost, not read
                skip = min(max(0, self._event_head(vcpu) - keep - tail), head - tail)
                self._event_tails[vcpu] = head
                self._lost_events += skip
                raw = b"".join(bytes(r) for r in runs)
                out += [(vcpu, raw[i * EVENT_SIZE:(i + 1) * EVENT_SIZE]) for i in range(skip, head - tail)]
        return out


def _read_layout(fd: int, path: Path) -> _Layout:
    """The layout an existing file declares, checked against what its parameters give."""
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, _H_TARGETS, 0)
    except OSError as exc:
        raise PluginError(f"cannot read plugin file {path}: {exc}") from exc
    if len(head) < _H_TARGETS or size < _HEADER_SIZE:
        raise PluginError(f"{path} is too small for an aradia plugin file ({size} bytes)")
    (magic, layout_version, header_size, max_targets, max_vcpus, ring_entries, args_entries, counters_off,
     inline_off, ring_off, file_size) = _H_CREATE.unpack_from(head, 0)
    if magic != _MAGIC:
        raise PluginError(f"{path} is not an aradia plugin file (magic {magic:#018x})")
    if layout_version != _LAYOUT or header_size != _HEADER_SIZE or max_targets != MAX_TARGETS:
        raise PluginError(f"{path} has plugin layout {layout_version} ({header_size}-byte header, "
                          f"{max_targets} targets); this aradia reads layout {_LAYOUT}")
    args_off, bases_off = _H_ARADIA.unpack_from(head, _H_ARADIA_OFF)
    try:
        events_off, event_entries, event_size = _EVCONF_RING.unpack_from(os.pread(fd, _EVCONF_RING.size,
                                                                                  _H_EVCONF))
    except (OSError, struct.error) as exc:
        raise PluginError(f"cannot read plugin file {path}: {exc}") from exc
    if event_size != EVENT_SIZE:
        raise PluginError(f"{path}: event records of {event_size} bytes; this aradia reads {EVENT_SIZE}")
    try:
        want = _Layout.of(max_vcpus, ring_entries, args_entries, event_entries)
    except PluginError as exc:
        raise PluginError(f"{path}: {exc}") from exc
    found = (counters_off, inline_off, ring_off, args_off, bases_off, events_off, file_size, size)
    expect = (want.counters_off, want.inline_off, want.ring_off, want.args_off, want.bases_off,
              want.events_off, want.size, want.size)
    if found != expect:
        raise PluginError(f"{path}: offsets and size {found} are not the layout's {expect}")
    return want


__all__ = ["DATA_MAX", "EVENT_SIZE", "FILTER_MAX", "MAX_TARGETS", "NARGS", "ArgCapture", "Hit", "HitBatch",
           "PluginShm", "PluginStatus"]
