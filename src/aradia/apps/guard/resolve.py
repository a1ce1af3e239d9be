"""A policy made concrete in one guest: its paths resolved to keys (see :mod:`.objects`)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import drgn

from aradia.apps.guard.objects import FMODE_WRITE, Key, Namespace, NotFound, under
from aradia.apps.guard.policy import Policy, PolicyError
from aradia.linux.bounds import GUEST_ERRORS, Warnings
from aradia.linux.pagecache import read_cached
from aradia.linux.walks import d_path, each_task, open_files

MAX_PASSWD = 1 << 20


@dataclass
class Resolved:
    """What the guard's decisions look up at every hit."""

    policy: Policy
    keys: dict[Key, int] = field(default_factory=dict)  # protected file or directory -> protect rule index
    superblocks: set[int] = field(default_factory=set)  # superblocks holding protected keys
    forbidden: dict[Key, int] = field(default_factory=dict)  # forbidden program -> forbid rule index
    programs: dict[str, Key] = field(default_factory=dict)  # program paths of allow rules, resolved
    users: dict[int, str] = field(default_factory=dict)  # uid -> name from the guest's /etc/passwd
    warnings: list[str] = field(default_factory=list)


def parse_passwd(text: str) -> dict[int, str]:
    """uid -> user name from ``/etc/passwd`` text (malformed lines skipped)."""
    out: dict[int, str] = {}
    for line in text.splitlines():
        parts = line.split(":")
        if len(parts) >= 3 and parts[2].isdigit():
            out.setdefault(int(parts[2]), parts[0])
    return out


def resolve(prog: drgn.Program, policy: Policy) -> Resolved:
    """Resolve ``policy`` in the guest behind ``prog``: a protected path that does not resolve is a
    :class:`~aradia.apps.guard.policy.PolicyError`; a program path that does not only a warning
    (rules naming it then never match by it)."""
    ns = Namespace(prog)
    out = Resolved(policy)
    for i, rule in enumerate(policy.protect):
        try:
            top = ns.resolve(rule.path)
            keys = ns.tree_keys(rule.path) if top.directory else [top.key]
        except NotFound as e:
            raise PolicyError(f"protect {rule.path}: {e}") from None
        for k in keys:
            out.keys.setdefault(k, i)
            out.superblocks.add(k[0])
    for i, forbid in enumerate(policy.forbid):
        try:
            out.forbidden.setdefault(ns.resolve(forbid.exe).key, i)
        except NotFound as e:
            raise PolicyError(f"forbid {forbid.exe}: {e}") from None
    for path in sorted(policy.programs() - {f.exe for f in policy.forbid}):
        try:
            out.programs[path] = ns.resolve(path).key
        except NotFound as e:
            out.warnings.append(f"allow rule program {path}: {e}")
    out.warnings.extend(open_for_writing(prog, out))
    with contextlib.suppress(NotFound, *GUEST_ERRORS):
        _mnt, passwd = ns.lookup("/etc/passwd")
        inode = passwd.d_inode
        text = read_cached(inode, 0, min(int(inode.i_size), MAX_PASSWD)).decode(errors="replace")
        out.users = parse_passwd(text)
    return out


def open_for_writing(prog: drgn.Program, st: Resolved) -> list[str]:
    """A warning for each process that holds a protected file open for writing already: the guard
    decides at open, so writes through a descriptor opened before it started are not seen."""
    out: list[str] = []
    if not st.keys:
        return out
    warnings = Warnings()
    for task in each_task(prog, warnings):
        if int(task.pid) != int(task.tgid):
            continue  # threads share their process's descriptors
        with contextlib.suppress(*GUEST_ERRORS):
            for fd, f in open_files(task):
                if not int(f.f_mode) & FMODE_WRITE or f.f_inode.i_sb.value_() not in st.superblocks:
                    continue
                if under(f.f_path.dentry, st.keys) is not None:
                    path = d_path(f.f_path).decode(errors="replace")
                    out.append(f"pid {int(task.pid)} ({task.comm.string_().decode(errors='replace')}) holds "
                               f"{path} open for writing (fd {fd}) since before the guard: writes through "
                               "it are not seen")
    return out + [f"while looking for open files: {w}" for w in warnings]
