"""The insider guard: decision hooks on the kernel's LSM entry points that block (or report) changes
to protected files and executions of forbidden programs, decided on the objects the kernel resolved.

Each hook's decision runs with the vCPU stopped at the function's entry (see
:mod:`aradia.trace.hooks`): it finds the dentries the operation touches, tests them against the
protected keys (:func:`~aradia.apps.guard.objects.under`: the object itself or any parent), matches
the acting process against the rule's allow list, and returns EPERM for ``block`` (the system call
fails in the guest, the file untouched), nothing for ``alert`` or ``--dry-run``. Every protected
operation by a process not allowed is one ``guard`` event, with the process, its ancestry and its
login session; a process's later operations under the same rule are decided alike but not reported
again (one alert per attempt: ``sed -i`` creates, writes, chmods and renames).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import drgn

from aradia.apps.guard.objects import FMODE_WRITE, Key, inode_key, under, user_dev
from aradia.apps.guard.policy import Allow, Policy, load_policy
from aradia.apps.guard.resolve import Resolved, resolve
from aradia.apps.guard.session import actor, parents, task_exe
from aradia.linux.bounds import GUEST_ERRORS
from aradia.linux.walks import d_path
from aradia.trace.events import Event
from aradia.trace.hooks import HookContext
from aradia.trace.probes import Probe
from aradia.trace.tracer import Tracer

EPERM = 1
O_TRUNC = 0o1000
MAX_REPORTED = 4096  # (process, rule) pairs remembered for one-alert-per-attempt

# hook -> (operation, which arguments are what): "file" a struct file *, "path" a struct path *,
# "dentry" a struct dentry *, "dir" a struct path * of the directory the next "dentry" goes into,
# "-" an argument the decision does not read
HOOKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "security_file_open": ("write", ("file",)),
    "security_path_truncate": ("truncate", ("path",)),
    "security_path_unlink": ("unlink", ("dir", "dentry")),
    "security_path_rmdir": ("rmdir", ("dir", "dentry")),
    "security_path_rename": ("rename", ("dir", "dentry", "dir", "dentry")),
    "security_path_link": ("link", ("dentry", "dir", "dentry")),
    "security_path_chmod": ("chmod", ("path",)),
    "security_path_chown": ("chown", ("path",)),
    "security_path_mknod": ("create", ("dir", "new")),
    "security_path_mkdir": ("mkdir", ("dir", "new")),
    "security_path_symlink": ("symlink", ("dir", "new")),
}
#: hooks on an inode operation, by the name of the parameter holding its dentry (its place differs
#: between kernels: 5.10's ``security_inode_setattr(dentry, attr)``, 6.x's ``(idmap, dentry, attr)``,
#: so it is taken from the function's BTF prototype)
INODE_HOOKS: dict[str, str] = {
    "security_inode_setattr": "setattr",  # times (touch), and mode/owner/size after the path hooks
    "security_inode_setxattr": "setxattr",
    "security_inode_removexattr": "removexattr",
}
EXEC_HOOK = "security_bprm_check"


class Guard:
    """The guard on one live VM's tracer: :meth:`start` arms it; events come from the tracer's loop."""

    def __init__(self, tracer: Tracer, policy: Policy, *, dry_run: bool = False,
                 pause: Callable[[Event], None] | None = None) -> None:
        self.tracer = tracer
        self.policy = policy
        self.dry_run = dry_run
        self.pause = pause
        self.state: Resolved | None = None
        self.hits = 0
        self.decide_seconds = 0.0
        self._reported: OrderedDict[tuple[int, int, str, int], None] = OrderedDict()
        self._reload_lock = threading.Lock()
        self._probes: list[Probe] = []

    # --- set-up ------------------------------------------------------------------------------------
    def start(self) -> list[str]:
        """Resolve the policy in the guest and arm every hook; the warnings of the resolution."""
        with self.tracer.held():
            self.state = resolve(self.tracer.vm.linux.prog, self.policy)
        try:
            for symbol, (op, kinds) in (*HOOKS.items(), *self._inode_hooks()):
                self._probes.append(self.tracer.add_hook(symbol, self._file_decision(op, kinds)))
            self._probes.append(self.tracer.add_hook(EXEC_HOOK, self._exec_decision))
        except BaseException:
            self.stop()  # a hook that cannot be armed (one is there already): none stays armed
            raise
        return list(self.state.warnings)

    def _inode_hooks(self) -> list[tuple[str, tuple[str, tuple[str, ...]]]]:
        """:data:`INODE_HOOKS` with their arguments' kinds from the kernel's BTF (the ``dentry``
        parameter a "dentry", the others skipped); a hook the BTF does not describe is left out, with
        a warning."""
        btf = self.tracer.vm.linux.profile.btf
        out = []
        for symbol, op in INODE_HOOKS.items():
            params = btf.function_params(symbol) if btf is not None else None
            if not params or "dentry" not in params:
                assert self.state is not None
                self.state.warnings.append(f"{symbol} is not in this kernel's BTF: {op} is not guarded")
                continue
            out.append((symbol, (op, tuple("dentry" if p == "dentry" else "-" for p in params))))
        return out

    def stop(self) -> None:
        """Disarm every hook (the tracer and its other probes go on)."""
        probes, self._probes = self._probes, []
        for probe in probes:
            self.tracer.remove(probe)

    def reload(self, policy: Policy | str) -> list[str]:
        """Take a new policy (or re-read the file) without disarming: resolved with the event loop held
        out, then swapped in at once. A policy that fails keeps the old one (the error is raised)."""
        new = load_policy(policy) if isinstance(policy, str) else policy
        with self._reload_lock, self.tracer.held():
            state = resolve(self.tracer.vm.linux.prog, new)
            self.policy, self.state = new, state
            self._reported.clear()
        return list(state.warnings)

    # --- decisions ---------------------------------------------------------------------------------
    def _file_decision(self, op: str, kinds: tuple[str, ...]) -> Callable[[HookContext], int | None]:
        def decide(ctx: HookContext) -> int | None:
            started = time.perf_counter()
            try:
                return self._decide_file(ctx, op, kinds)
            except GUEST_ERRORS:
                return None  # unreadable guest data: let it run (the guard never breaks the guest)
            finally:
                self.hits += 1
                self.decide_seconds += time.perf_counter() - started
        return decide

    def _decide_file(self, ctx: HookContext, op: str, kinds: tuple[str, ...]) -> int | None:
        st = self.state
        assert st is not None
        if not st.keys:
            return None
        targets = self._targets(ctx, kinds, st)
        if targets is None:
            return None
        for dentry, mnt, role in sorted(targets, key=lambda t: t[2] != "obj"):
            if role == "new" or dentry.d_sb.value_() not in st.superblocks:
                continue
            found = under(dentry, st.keys)
            if found is None:
                continue
            rule_index, key = found
            rule = st.policy.protect[rule_index]
            if ctx.task is not None and self._allowed(rule.allow, ctx.task, st):
                return None
            if role == "dir":  # a name made, or moved, into a protected directory: name it
                made = [t for t in targets if t[2] == "new" and t[0].d_parent.value_() == dentry.value_()]
                if made:
                    dentry, mnt = made[0][0], made[0][1]
            return self._verdict(ctx, "protect", rule_index, rule.path, rule.action, op, (dentry, mnt), key)
        return None

    @staticmethod
    def _targets(ctx: HookContext, kinds: tuple[str, ...],
                 st: Resolved) -> list[tuple[drgn.Object, drgn.Object | None, str]] | None:
        """The dentries a hook's arguments name, each with its vfsmount and role ("obj" an existing
        file, "dir" the directory a name is made in or moved from/to, "new" a name not made yet);
        None for a file opened without write (the hot path: decided in one read)."""
        prog = ctx.prog
        paths = {i: ctx.obj(i, "struct path *") for i, k in enumerate(kinds) if k in ("path", "dir")}
        mnt = next((p.mnt.read_() for p in paths.values()), None)
        out: list[tuple[drgn.Object, drgn.Object | None, str]] = []
        for i, kind in enumerate(kinds):
            if kind == "-":
                continue
            if kind == "file":
                f = ctx.obj(i, "struct file *")
                if not int(f.f_mode) & FMODE_WRITE or f.f_inode.i_sb.value_() not in st.superblocks:
                    return None
                out.append((f.f_path.dentry.read_(), f.f_path.mnt.read_(), "obj"))
            elif kind in ("path", "dir"):
                role = "obj" if kind == "path" else "dir"
                out.append((paths[i].dentry.read_(), paths[i].mnt.read_(), role))
            else:
                d = drgn.Object(prog, "struct dentry *", value=ctx.arg(i))
                out.append((d, mnt, "obj" if kind == "dentry" and d.d_inode else "new"))
        return out

    def _exec_decision(self, ctx: HookContext) -> int | None:
        started = time.perf_counter()
        try:
            st = self.state
            assert st is not None
            if not st.forbidden:
                return None
            bprm = ctx.obj(0, "struct linux_binprm *")
            key = inode_key(bprm.file.f_inode)
            rule_index = st.forbidden.get(key)
            if rule_index is None:
                return None
            rule = st.policy.forbid[rule_index]
            if ctx.task is not None and self._allowed(rule.allow, ctx.task, st, itself=True):
                return None
            obj = (bprm.file.f_path.dentry.read_(), bprm.file.f_path.mnt.read_())
            return self._verdict(ctx, "forbid", rule_index, rule.exe, rule.action, "exec", obj, key)
        except GUEST_ERRORS:
            return None
        finally:
            self.hits += 1
            self.decide_seconds += time.perf_counter() - started

    def _allowed(self, rules: tuple[Allow, ...], task: drgn.Object, st: Resolved, *,
                 itself: bool = False) -> bool:
        """Whether ``task`` matches one of ``rules`` (``itself``: the task counts among the parents,
        as for an exec, which the process's own old image asks for)."""
        if not rules:
            return False
        chain: list[drgn.Object] | None = None
        for rule in rules:
            ok = True
            if rule.comm is not None:
                ok = task.comm.string_().decode(errors="replace") == rule.comm
            if ok and rule.uid is not None:
                ok = int(task.real_cred.uid.val) == rule.uid
            if ok and rule.exe is not None:
                ok = _exe_key(task) == st.programs.get(rule.exe, (-1, -1))
            if ok and (rule.parent_comm is not None or rule.parent_exe is not None):
                if chain is None:
                    chain = ([task] if itself else []) + parents(task)
                ok = any(_matches_parent(rule, p, st) for p in chain)
            if ok:
                return True
        return False

    def _verdict(self, ctx: HookContext, kind: str, rule_index: int, rule_what: str, action: str, op: str,
                 obj: tuple[drgn.Object, drgn.Object | None], key: Key) -> int | None:
        """Report (once per process and rule) and return the errno, if the rule blocks."""
        block = action == "block"
        taken = "would-block" if block and self.dry_run else "blocked" if block else "alerted"
        task = ctx.task
        ident = (int(task.tgid), int(task.start_time), kind, rule_index) if task is not None else None
        if ident is None or ident not in self._reported:
            if ident is not None:
                self._reported[ident] = None
                while len(self._reported) > MAX_REPORTED:
                    self._reported.popitem(last=False)
            ev = ctx.emit("guard", op, self._alert_args(ctx, kind, rule_what, taken, obj, key))
            if self.pause is not None:
                self.pause(ev)
        return EPERM if taken == "blocked" else None

    def _alert_args(self, ctx: HookContext, kind: str, rule_what: str, taken: str,
                    obj: tuple[drgn.Object, drgn.Object | None], key: Key) -> dict[str, Any]:
        dentry, mnt = obj
        path = None
        with contextlib.suppress(*GUEST_ERRORS):
            path = (d_path(mnt, dentry) if mnt is not None else _dentry_path(dentry)).decode(errors="replace")
        inode = dentry.d_inode
        args: dict[str, Any] = {"action": taken, "rule": f"{kind} {rule_what}",
                                "object": {"path": path, "ino": int(inode.i_ino) if inode else None,
                                           "dev": user_dev(int(dentry.d_sb.s_dev))}}
        if ctx.task is not None:
            st = self.state
            with contextlib.suppress(*GUEST_ERRORS):
                args.update(actor(ctx.task, st.users if st else {}).as_dict())
        return args


def _matches_parent(rule: Allow, p: drgn.Object, st: Resolved) -> bool:
    """Whether process ``p`` is the ancestor ``rule`` names (its ``parent_comm`` and ``parent_exe``)."""
    if rule.parent_comm is not None and p.comm.string_().decode(errors="replace") != rule.parent_comm:
        return False
    return rule.parent_exe is None or _exe_key(p) == st.programs.get(rule.parent_exe, (-1, -1))


def _exe_key(task: drgn.Object) -> Key | None:
    f = task_exe(task)
    return None if f is None else inode_key(f.f_inode)


def _dentry_path(dentry: drgn.Object) -> bytes:
    """A dentry's path within its filesystem (no mount to cross): for objects hooks give without one."""
    parts = []
    d = dentry
    for _ in range(256):
        parent = d.d_parent
        if parent.value_() == d.value_():
            break
        n = int(d.d_name.len)
        parts.append(d.prog_.read(d.d_name.name.value_(), min(n, 255)))
        d = parent
    return b"/" + b"/".join(reversed(parts))
