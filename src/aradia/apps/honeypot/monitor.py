"""The SSH honeypot monitor on one live VM's tracer: sessions of the guest's ssh daemon (dropbear or
OpenSSH's sshd), each with its connection, authentication attempts (passwords, public keys), commands,
typed lines, terminal, files and network activity, recorded from outside the guest.

What is armed (:meth:`Honeypot.start`), all through the guarded GDB stub:

* the kernel's process-event connector hooks (fork, exec, exit): sessions begin at the listening
  daemon's fork (the per-connection process; its socket gives the client's address and the server
  port), grow by fork, record each exec (argv, program, cwd) and end at the root's exit;
* ``pty_write``: every byte a pseudo-terminal passes on, both ways (the asciicast);
* ``filp_close``, ``security_path_unlink``, ``security_path_rename``: files, their contents read from
  the page cache when the last descriptor closes (or when unlinked);
* ``libcrypt.so.1:crypt`` (entry and return, and the ``--accept-any-password`` decision),
  ``libc.so.6:getpwnam`` (the user being checked), ``libc.so.6:__syslog_chk`` (the daemon's log lines
  that name a public key's fingerprint), ``bash:readline`` (typed lines), each armed only in
  the processes that need it (a session's daemon, its bash) rather than following every mmap;
* the ``connect``, ``bind``, ``accept``, ``accept4`` syscalls.

Events are attributed in the order the tracer yields them (:meth:`Honeypot.handle`), each written to
the output directory as one record of the service's schema (kind ``honeypot``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import drgn

from aradia.apps.honeypot.adopt import open_sessions
from aradia.apps.honeypot.auth import CRYPT, GETPWNAM, PasswordCheck
from aradia.apps.honeypot.hits import KERNEL_HOOKS, SSH_DAEMONS, Hits
from aradia.apps.honeypot.output import OutputDir
from aradia.apps.honeypot.pubkey import SYSLOG, SYSLOG_ARGS, pubkey_attempt
from aradia.apps.honeypot.sessions import Session, SessionTable
from aradia.linux.bounds import GUEST_ERRORS
from aradia.service.schema import Records, wall_time
from aradia.trace.events import Event
from aradia.trace.probes import Probe
from aradia.trace.tracer import Tracer
from aradia.trace.uprobes import UserTarget

READLINE = "bash:readline"
NET_SYSCALLS = ("connect", "bind", "accept", "accept4")


class Honeypot:
    """The monitor: :meth:`start` arms it, :meth:`handle` takes each event of ``tracer.events()``,
    :meth:`close` writes the summaries of sessions still open."""

    def __init__(self, tracer: Tracer, out: Path, records: Records, *, accept_any: Iterable[str] = (),
                 show: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.tracer = tracer
        self.out = OutputDir(out, records)
        self.accept_any = frozenset(accept_any)
        self.show = show
        self.table = SessionTable()
        self.user_targets: dict[str, list[UserTarget]] = {}
        self.probes: list[Probe] = []
        self.check: PasswordCheck | None = None

    def start(self) -> None:
        """Arm every probe (the guest runs on meanwhile, between the arming stops). The user-space
        probes are armed only in the processes that need them, when they appear: the password check
        in a session's daemon (at its forks), readline in a session's bash (at its exec)."""
        check = self.check = PasswordCheck(self._user_of, self.accept_any)
        add = self.tracer.add_uprobe
        self.user_targets = {
            "daemon": [add(GETPWNAM, follow=False),
                       add(CRYPT, ret=True, keep_args=True, decide=check.decide, follow=False),
                       add(SYSLOG, args=SYSLOG_ARGS, follow=False)],
            "shell": [add(READLINE, ret=True, follow=False)],
        }
        hits = Hits(lambda tgid: tgid in self.table.by_tgid, self._arm)
        for symbol, what in KERNEL_HOOKS.items():
            self.probes.append(self.tracer.add_hook(symbol, hits.decision(what)))
        for name in NET_SYSCALLS:
            self.probes.append(self.tracer.add_syscall(name))
        self._adopt()

    def stop(self) -> None:
        """Disarm every probe of the monitor (the tracer and other probes go on); :meth:`close` after."""
        for targets in self.user_targets.values():
            for target in targets:
                self.tracer.remove_uprobe(target)
        for probe in self.probes:
            self.tracer.remove(probe)
        self.user_targets, self.probes = {}, []

    def _adopt(self) -> None:
        """Take the sessions open now (their start is the monitor's: ``adopted``)."""
        with self.tracer.held():
            found = open_sessions(self.tracer.vm.linux.prog)
        now = time.monotonic()
        for f in found:
            s = self.table.open(int(f.root.tgid), f.daemon, wall_time(now), now, f.conn)
            s.adopted = True
            for tgid, task in f.members.items():
                self.table.by_tgid[tgid] = s
                with contextlib.suppress(*GUEST_ERRORS):
                    comm = task.comm.string_().decode(errors="replace")
                    if comm in SSH_DAEMONS or comm == "bash":
                        self._arm("daemon" if comm in SSH_DAEMONS else "shell", task)
            root = int(f.root.tgid)
            start = {"daemon": s.daemon, "daemon_pid": s.daemon_pid, "client": s.client,
                     "client_port": s.client_port, "server": s.server, "server_port": s.server_port,
                     "adopted": True}
            ev = Event(now, -1, "honeypot", "session.start", root, root, f.daemon)
            self._log(ev, s, "session.start", start)
            self.out.summary(s)

    def _arm(self, what: str, task: drgn.Object) -> None:
        """Arm the user-space probes of ``what`` in ``task``'s address space (at a hit: no extra stop)."""
        mm = task.mm.read_()
        if mm:
            for target in self.user_targets[what]:
                self.tracer.arm_uprobe_in(target, mm)

    def _user_of(self, tgid: int) -> str | None:
        s = self.table.of(tgid)
        return None if s is None else s.user or ""

    # --- events --------------------------------------------------------------------------------------
    def handle(self, ev: Event) -> None:
        """Attribute one tracer event to its session and record it."""
        if ev.kind == "honeypot":
            getattr(self, f"_on_{ev.name}")(ev)
        elif ev.kind == "uprobe" and ev.name == GETPWNAM:
            s = self.table.of(ev.tgid)
            if s is not None and ev.tgid == s.daemon_pid and ev.args.get("name"):
                s.user = ev.args["name"]
        elif ev.kind == "uretprobe" and ev.name == CRYPT:
            self._on_crypt(ev)
        elif ev.kind == "uprobe" and ev.name == SYSLOG:
            self._on_log(ev)
        elif ev.kind == "uretprobe" and ev.name == READLINE:
            s = self.table.of(ev.tgid)
            if s is not None and ev.args.get("ret") is not None:
                line = {"time": wall_time(ev.time), "pid": ev.tgid, "line": ev.args["ret"]}
                s.lines.append(line)
                self._log(ev, s, "line", line)
        elif ev.kind == "syscall" and ev.name in NET_SYSCALLS:
            s = self.table.of(ev.tgid)
            if s is not None:
                net = {"time": wall_time(ev.time), "pid": ev.tgid, "syscall": ev.name,
                       "fd": ev.args.get("fd"), "addr": ev.args.get("addr"), "error": ev.args.get("error")}
                s.net.append(net)
                self._log(ev, s, "net", net)

    def _log(self, ev: Event, s: Session, name: str, args: dict[str, Any]) -> None:
        rec = self.out.log(Event(ev.time, ev.vcpu, "honeypot", name, ev.pid, ev.tgid, ev.comm, ev.uid,
                                 {"session": s.sid, **args}))
        if self.show is not None:
            self.show(rec)

    def _on_fork(self, ev: Event) -> None:
        a = ev.args
        if "connection" in a:
            s = self.table.open(a["child"], a["parent_comm"], wall_time(ev.time), ev.time, a["connection"])
            self._log(ev, s, "session.start", {"daemon": s.daemon, "daemon_pid": s.daemon_pid,
                                               "client": s.client, "client_port": s.client_port,
                                               "server": s.server, "server_port": s.server_port})
            self.out.summary(s)
        else:
            self.table.join(a["child"], a["parent"])

    def _on_exec(self, ev: Event) -> None:
        s = self.table.of(ev.args["pid"])
        if s is not None:
            cmd = {"time": wall_time(ev.time), **ev.args}
            s.commands.append(cmd)
            self._log(ev, s, "exec", cmd)

    def _on_exit(self, ev: Event) -> None:
        pid = ev.args["pid"]
        s = self.table.leave(pid)
        if s is not None and s.daemon_pid == pid:
            s.end = wall_time(ev.time)
            self._log(ev, s, "session.end", {"daemon_pid": pid, "start": s.start, "end": s.end,
                                             "attempts": len(s.auth), "commands": len(s.commands)})
            self.out.summary(s)

    def _on_tty(self, ev: Event) -> None:
        a = ev.args
        s = self.table.pts(a["pts"], a["writer"])
        if s is not None:
            self.out.cast(s).add(ev.time, a["dir"], a["data"], a["cols"], a["rows"])

    def _on_file(self, ev: Event) -> None:
        s = self.table.of(ev.tgid)
        if s is None:
            return
        a = dict(ev.args)
        content = a.pop("content", None)
        if content is not None and a.get("sha256"):
            a["kept"] = self.out.keep(a["sha256"], content)
        f = {"time": wall_time(ev.time), "pid": ev.tgid, **a}
        s.files.append(f)
        self._log(ev, s, "file", f)

    def _on_auth(self, ev: Event) -> None:
        s = self.table.of(ev.tgid)
        if s is not None:
            attempt = {"time": wall_time(ev.time), **ev.args}
            s.auth.append(attempt)
            self._log(ev, s, "auth", attempt)

    def _on_crypt(self, ev: Event) -> None:
        s = self.table.of(ev.tgid)
        entry = ev.args.get("args") or {}
        if s is None:
            return
        ret, setting = ev.args.get("ret"), entry.get("setting")
        attempt = {"time": wall_time(ev.time), "method": "password", "user": s.user,
                   "password": entry.get("phrase"),
                   "accepted": ret is not None and setting is not None and ret == setting, "forced": False}
        s.auth.append(attempt)
        self._log(ev, s, "auth", attempt)

    def _on_log(self, ev: Event) -> None:
        """A line the session's daemon logged: a public-key attempt when it names one."""
        s = self.table.of(ev.tgid)
        key = pubkey_attempt(ev.args.get("format"), ev.args.get("message"))
        if s is not None and key is not None:
            attempt = {"time": wall_time(ev.time), "method": "publickey", **key, "forced": False}
            s.auth.append(attempt)
            self._log(ev, s, "auth", attempt)

    def close(self) -> list[Session]:
        """Write the summaries of sessions still open (their end unknown); the sessions seen."""
        for s in self.table.open_sessions():
            self.out.summary(s)
        self.out.close()
        return list(self.table.sessions.values())
