"""The ``aradia`` command: a thin shell over the library (parse, call, render)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
import types
from collections.abc import Callable, Sequence
from typing import Any

from aradia.errors import AradiaError

EXIT_ERROR = 2


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _open(args: argparse.Namespace) -> Any:
    from aradia.vm import attach

    return attach(args.vm, memory=args.memory)


def hexdump(data: bytes, base: int = 0) -> str:
    """``hexdump -C``-style lines for ``data`` starting at address ``base``."""
    lines = []
    for off in range(0, len(data), 16):
        row = data[off : off + 16]
        hexpart = " ".join(f"{b:02x}" for b in row[:8]) + "  " + " ".join(f"{b:02x}" for b in row[8:])
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
        lines.append(f"{base + off:016x}  {hexpart:<48}  |{text}|")
    return "\n".join(lines)


# --- commands --------------------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    """Kernel banner, RAM ranges, vCPUs and run state."""
    client = _client(args)
    if client is not None:
        with client:
            info = client.info(args.vm)
    else:
        with _open(args) as vm:
            info = vm.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"VM         {info['spec']}")
    if "qemu_pid" in info:
        print(f"QEMU       pid {info['qemu_pid']}, version {info['qemu_version']}")
    print(f"state      {info['state']}")
    print(f"memory     {info['memory_path']}, {info['ram_bytes'] / (1 << 20):.0f} MiB")
    for r in info["ram"]:
        print(f"  RAM      {r['start']:#014x}-{r['end'] - 1:#014x}  {r['size'] / (1 << 20):9.1f} MiB")
    print(f"kernel     {info['kernel'] or info.get('kernel_error')}")
    for c in info["vcpus"]:
        mode = "user" if c["cpl"] == 3 else "kernel"
        paging = "5-level" if c["la57"] else "4-level"
        print(f"vCPU {c['index']:<4}  RIP {c['rip']:#018x}  CR3 {c['cr3']:#014x}  {mode}, {paging}")
    return 0


def cmd_read(args: argparse.Namespace) -> int:
    """Read guest memory by physical or virtual address."""
    if args.size < 0 or args.size > 1 << 30:
        raise AradiaError(f"--size {args.size} out of range (0..1 GiB)")
    if args.in_pid is not None and args.virt is None:
        raise AradiaError("--in-pid goes with --virt")
    client = _client(args)
    addr = args.phys if args.phys is not None else args.virt
    if client is not None:
        if args.cr3 is not None:
            raise AradiaError("--cr3 is not offered over --server (use --in-pid for a process's memory)")
        with client:
            data = client.memory(args.vm, args.size, phys=args.phys, virt=args.virt, pid=args.in_pid)
    else:
        with _open(args) as vm:
            if args.in_pid is not None:
                data = _kernel(vm, args).read_user(args.in_pid, args.virt, args.size)
            elif args.phys is not None:
                data = vm.read(addr, args.size)
            else:
                data = vm.read_virt(addr, args.size, cr3=args.cr3)
    if args.format == "raw":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        print(hexdump(data, addr))
    return 0


class ByteProgressBar:
    """A one-line progress bar on stderr when it is a terminal; silent otherwise."""

    def __init__(self, label: str, *, stream: Any = None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = time.monotonic()
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        """Report ``done`` of ``total`` bytes."""
        now = time.monotonic()
        if not self.tty or (now - self._last < 0.1 and done < total):
            return
        self._last = now
        frac = done / total if total else 1.0
        bar = "#" * int(frac * 30)
        rate = done / max(now - self.start, 1e-6) / (1 << 20)
        self.stream.write(f"\r{self.label} [{bar:<30}] {frac * 100:5.1f}% {done >> 20}/{total >> 20} MiB "
                          f"{rate:.0f} MiB/s")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def cmd_dump(args: argparse.Namespace) -> int:
    """Write guest RAM to a dump file (ELF core with VMCOREINFO, raw or LiME)."""
    progress = ByteProgressBar(f"dump {os.path.basename(args.output)}")
    client = _client(args)
    t0 = time.monotonic()
    if client is not None:
        with client:
            client.dump(args.vm, args.output, format=args.format, pause=not args.no_pause)
        pause = not args.no_pause
    else:
        with _open(args) as vm:
            pause = vm.live and not args.no_pause
            vm.dump(args.output, format=args.format, pause=pause, progress=progress)
    took = time.monotonic() - t0
    size = os.path.getsize(args.output)
    print(f"wrote {args.output}: {args.format}, {size / (1 << 20):.1f} MiB in {took:.2f}s"
          + (" (guest paused meanwhile)" if pause else ""))
    return 0


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def _kernel(vm: Any, args: argparse.Namespace | None = None) -> Any:
    tty = sys.stderr.isatty()

    def progress(msg: str) -> None:
        if tty:
            sys.stderr.write(f"\r\033[Karadia: {msg}")
            sys.stderr.flush()

    kernel = vm.load_kernel(progress, btf_source=getattr(args, "btf", None))
    if tty:
        sys.stderr.write("\r\033[K")
    return kernel


def _client(args: argparse.Namespace) -> Any:
    """The remote service's client when ``--server`` is given, else None."""
    if not getattr(args, "server", None):
        return None
    from aradia.client import Client

    token = args.token or os.environ.get("ARADIA_TOKEN")
    if not token:
        raise AradiaError("--server needs a token: --token T or ARADIA_TOKEN in the environment")
    return Client(args.server, token, verify=args.cacert or True)


def _view(args: argparse.Namespace, name: str, render: Callable[[list[Any]], str],
          pid: int | None = None) -> int:
    """Run one view (locally, or on ``--server``), print a table or one JSON document (with warnings)."""
    client = _client(args)
    if client is not None:
        if getattr(args, "pause", False):
            raise AradiaError("--pause is not offered over --server (the service owns the VM's run state)")
        with client:
            doc = client.view(args.vm, name, pid)
    else:
        with _open(args) as vm:
            kernel = _kernel(vm, args)
            with vm.paused() if getattr(args, "pause", False) else contextlib.nullcontext():
                doc = kernel.view(name, pid)
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print(render([types.SimpleNamespace(**item) for item in doc["items"]]))
        for w in doc["warnings"]:
            print(f"aradia: warning: {w}", file=sys.stderr)
    return 0


def cmd_ps(args: argparse.Namespace) -> int:
    """Processes (or threads) of the guest."""
    def render(rows: list[Any]) -> str:
        # COMM as /proc/PID/stat shows it: a kernel thread's full name, a kworker's current work
        return _table([[str(p.pid), str(p.ppid), str(p.uid), p.state, f"{p.start_time:.2f}", p.name,
                        " ".join(p.cmdline) if p.cmdline else f"[{p.name}]"] for p in rows],
                      ["PID", "PPID", "UID", "S", "START", "COMM", "CMDLINE"])
    return _view(args, "threads" if args.threads else "processes", render)


def cmd_lsmod(args: argparse.Namespace) -> int:
    """Loaded kernel modules."""
    return _view(args, "modules",
                 lambda rows: _table([[m.name, str(m.size), f"{m.base:#x}"] for m in rows],
                                     ["MODULE", "SIZE", "BASE"]))


def cmd_maps(args: argparse.Namespace) -> int:
    """Memory maps of one process."""
    return _view(args, "maps",
                 lambda rows: "\n".join(f"{m.start:08x}-{m.end:08x} {m.perms} {m.offset:08x} {m.inode:<8} "
                                        f"{m.path}".rstrip() for m in rows), pid=args.pid)


def cmd_files(args: argparse.Namespace) -> int:
    """Open files of one process."""
    return _view(args, "files",
                 lambda rows: _table([[str(f.fd), f"0{f.flags:o}", str(f.pos), f.path] for f in rows],
                                     ["FD", "FLAGS", "POS", "PATH"]), pid=args.pid)


def cmd_net(args: argparse.Namespace) -> int:
    """Sockets and their owners."""
    def addr(a: str, p: int) -> str:
        return f"[{a}]:{p}" if ":" in a else (f"{a}:{p}" if a or p else "")
    return _view(args, "sockets",
                 lambda rows: _table([[s.family, s.proto, addr(s.local_address, s.local_port),
                                       addr(s.remote_address, s.remote_port), s.state, str(s.pid), str(s.fd)]
                                      for s in rows],
                                     ["FAMILY", "PROTO", "LOCAL", "REMOTE", "STATE", "PID", "FD"]))


def cmd_mounts(args: argparse.Namespace) -> int:
    """Mounted filesystems."""
    return _view(args, "mounts",
                 lambda rows: _table([[m.source, m.target, m.fstype, "ro" if m.readonly else "rw"]
                                      for m in rows], ["SOURCE", "TARGET", "TYPE", "MODE"]))


def cmd_dmesg(args: argparse.Namespace) -> int:
    """The kernel log."""
    def stamp(seconds: float) -> str:  # as the kernel and dmesg print it: microseconds, truncated
        sec, usec = divmod(round(seconds * 1e9) // 1000, 1_000_000)
        return f"[{sec:5d}.{usec:06d}]"

    # like dmesg: every line of a record of several lines carries the record's time
    return _view(args, "dmesg",
                 lambda rows: "\n".join(f"{stamp(r.timestamp)} {line}"
                                        for r in rows for line in r.text.split("\n")))


def cmd_shell(args: argparse.Namespace) -> int:
    """An interactive Python shell with ``vm`` and ``prog`` (drgn) ready."""
    import code

    with _open(args) as vm:
        kernel = _kernel(vm, args)
        ns = {"vm": vm, "prog": kernel.prog, "kernel": kernel, "linux": kernel}
        try:
            import drgn.helpers.linux as helpers

            for name in helpers.__all__:
                ns[name] = getattr(helpers, name)
        except (ImportError, AttributeError):
            pass
        banner = (f"aradia shell on {args.vm}: vm (aradia VM), prog (drgn Program), "
                  f"drgn's Linux helpers imported. Kernel {kernel.profile.release}.")
        code.interact(banner=banner, local=ns, exitmsg="")
    return 0


def _arm(tracer: Any, args: argparse.Namespace) -> None:
    """Arm what ``aradia trace WHAT`` asks for."""
    if args.what == "syscalls":
        for name in args.e.split(","):
            tracer.add_syscall(name.strip())
    elif args.what == "probe":
        for sym in args.symbols:
            tracer.add_kprobe(sym, ret=args.ret)
    elif args.what == "uprobe":
        for spec in args.specs:
            tracer.add_uprobe(spec, process=args.process, pid=args.target_pid, ret=args.ret, args=args.args)
    elif args.what == "procs":
        tracer.add_lifecycle(tuple(k.strip() for k in args.e.split(",")))
    elif args.what == "watch":
        tracer.add_watch(args.address, args.length, args.access, pid=args.target_pid)


def _count(vm: Any, args: argparse.Namespace) -> int:
    """``aradia trace count``: calls per function, inside the hypervisor when the QEMU allows it."""
    from aradia.trace.counting import CallCounter

    fast = {"auto": None, "plugin": True, "gdb": False}[args.path]
    with CallCounter.open(vm, args.symbols, fast=fast) as counter:
        print(f"counting {', '.join(args.symbols)} via {counter.path}"
              f"{' (every call stops the VM)' if counter.path == 'gdb' else ''}; "
              f"{'Ctrl-C to stop' if args.duration is None else f'{args.duration:g} s'}",
              file=sys.stderr, flush=True)
        counts = counter.run(args.duration)
    for c in counts:
        if args.json:
            print(json.dumps({"symbol": c.symbol, "address": c.address, "count": c.count,
                              "path": counter.path}))
        else:
            print(f"{c.count:>12}  {c.symbol}")
    return 0


def trace_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The service's probe spec for ``aradia trace … WHAT`` (see :mod:`aradia.service.tracespec`)."""
    spec: dict[str, Any]
    if args.what == "syscalls":
        spec = {"kind": "syscalls", "syscalls": [n.strip() for n in args.e.split(",")]}
    elif args.what == "probe":
        spec = {"kind": "probe", "symbols": args.symbols, "ret": args.ret}
    elif args.what == "uprobe":
        spec = {"kind": "uprobe", "specs": args.specs, "process": args.process, "in_pid": args.target_pid,
                "ret": args.ret, "args": args.args}
    elif args.what == "procs":
        spec = {"kind": "procs", "events": [k.strip() for k in args.e.split(",")]}
    elif args.what == "watch":
        spec = {"kind": "watch", "address": args.address, "length": args.length, "access": args.access,
                "in_pid": args.target_pid}
    else:
        spec = {"kind": "count", "symbols": args.symbols}
    spec.update(pid=args.pid, comm=args.comm, uid=args.uid)
    return {k: v for k, v in spec.items() if v is not None}


def _trace_remote(client: Any, args: argparse.Namespace) -> int:
    """``aradia trace --server …``: a trace on the service, its events streamed here, stopped at the end."""
    from aradia.trace.events import Event

    spec = trace_spec(args)
    if args.what == "count":
        trace = client.start_trace(args.vm, spec)
        try:
            print(f"counting {', '.join(args.symbols)} on {args.server}; "
                  f"{'Ctrl-C to stop' if args.duration is None else f'{args.duration:g} s'}",
                  file=sys.stderr, flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                time.sleep(args.duration if args.duration is not None else 1e9)
        finally:
            trace = client.stop_trace(trace["id"])
        for sym in args.symbols:
            n = trace.get("counts", {}).get(sym, 0)
            if args.json:
                print(json.dumps({"symbol": sym, "count": n, "path": "service"}))
            else:
                print(f"{n:>12}  {sym}")
        return 0
    from aradia.service.tracespec import event_keys, parse_spec

    keys = event_keys(parse_spec(spec))  # what the trace's events are: the live stream's filter
    with client.live(args.vm, kind=sorted({k for k, _ in keys}), name=sorted({n for _, n in keys}),
                     pid=args.pid, comm=args.comm, uid=args.uid) as stream:
        trace = client.start_trace(args.vm, spec)  # after subscribing: no event is missed
        until = "Ctrl-C to stop" if args.duration is None else f"for {args.duration:g} s"
        print(f"tracing {args.what} on {args.vm} at {args.server} (trace {trace['id']}), {until}",
              file=sys.stderr, flush=True)
        try:
            for rec in stream.events(args.duration):
                if "dropped" in rec:
                    print(f"aradia: warning: {rec['dropped']} events lost (this client fell behind)",
                          file=sys.stderr)
                elif args.json:
                    print(json.dumps(rec), flush=True)
                else:
                    keys = ("vcpu", "kind", "name", "pid", "tgid", "comm", "uid", "args")
                    fields = {k: rec[k] for k in keys}
                    print(Event(rec["time"], **fields).line(), flush=True)
        except KeyboardInterrupt:
            pass
        finally:
            client.stop_trace(trace["id"])
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    """Live probes: syscalls, kernel or user functions, process lifecycle, watchpoints, call counts."""
    from aradia.trace.tracer import Filter, Tracer

    if args.what != "count" and args.path != "auto":
        raise AradiaError("--path applies to trace count only")
    client = _client(args)
    if client is not None:
        with client:
            return _trace_remote(client, args)
    with _open(args) as vm:
        if not vm.live:
            raise AradiaError("tracing needs a live VM (qmp:PATH), not a dump")
        _kernel(vm, args)
        if args.what == "count":
            return _count(vm, args)
        from aradia.trace.migrate_control import MigrationControl

        with Tracer.open(vm) as tracer, MigrationControl(tracer):  # `aradia migrate --vm` asks this owner
            tracer.filter = Filter(pids=set(args.pid) if args.pid else None,
                                   comms=set(args.comm) if args.comm else None,
                                   uids=set(args.uid) if args.uid else None)
            _arm(tracer, args)
            until = "Ctrl-C to stop" if args.duration is None else f"for {args.duration:g} s"
            print(f"tracing {args.what} on {args.vm}, {until}", file=sys.stderr, flush=True)
            try:
                for ev in tracer.events(duration=args.duration):
                    if args.json:
                        print(json.dumps(dataclasses.asdict(ev), default=_jsonable), flush=True)
                    else:
                        print(ev.line(), flush=True)
            except KeyboardInterrupt:
                pass  # closing the tracer disarms everything and lets the guest run
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    """Live-migrate a VM to a QEMU started with ``-incoming``; a running ``aradia trace`` of it goes on."""
    from aradia.trace.migrate_control import request_migration
    from aradia.trace.migration import migrate
    from aradia.trace.tracer import Tracer

    if not args.vm.startswith("qmp:") or not args.to.startswith("qmp:"):
        raise AradiaError("migrate needs live VMs: --vm qmp:PATH --to qmp:PATH")
    result = request_migration(args.vm, args.to, args.uri, args.timeout)  # the owner, if one traces it
    if result is None:
        with _open(args) as vm:
            _kernel(vm, args)
            with Tracer.open(vm) as tracer:
                result = migrate(tracer, args.to, args.uri, timeout=args.timeout,
                                 destination_timeout=min(args.timeout, 30.0)).as_dict()
    if args.json:
        print(json.dumps(result))
    else:
        print(f"migrated {args.vm} -> {args.to} over {args.uri}: {result['total']:.3f} s, guest paused "
              f"{result['paused'] * 1000:.1f} ms (QEMU downtime {result['qemu_downtime_ms']} ms), "
              f"{result['events_during']} events while copying, stopped by {result['stopped_by']}")
    return 0


def _jsonable(v: object) -> object:
    if isinstance(v, bytes):
        return v.decode("latin-1")
    raise TypeError(f"{type(v).__name__} is not JSON serialisable")


def cmd_guard(args: argparse.Namespace) -> int:
    """The insider guard: block or report changes to protected files and runs of forbidden programs."""
    import signal
    import threading

    from aradia.apps.guard.alerts import alert_line, records
    from aradia.apps.guard.guard import Guard
    from aradia.apps.guard.policy import load_policy
    from aradia.apps.guard.reload import PolicyWatcher
    from aradia.trace.tracer import Tracer

    policy = load_policy(args.policy)
    with _open(args) as vm:
        if not vm.live:
            raise AradiaError("the guard needs a live VM (qmp:PATH), not a dump")
        _kernel(vm, args)
        maker = records(os.path.basename(args.vm.removeprefix("qmp:")).removesuffix(".sock") or "vm")
        shown: set[int] = set()

        def show(ev: Any) -> None:
            if id(ev) not in shown:
                shown.add(id(ev))
                print(json.dumps(maker.record(ev)) if args.json else alert_line(ev), flush=True)

        resume = threading.Event()

        def pause(ev: Any) -> None:
            show(ev)
            print(f"guard: VM paused at the hit; kill -USR1 {os.getpid()} lets it run", file=sys.stderr,
                  flush=True)
            resume.wait()
            resume.clear()

        if args.pause:
            signal.signal(signal.SIGUSR1, lambda *_: resume.set())
        with Tracer.open(vm) as tracer:
            guard = Guard(tracer, policy, dry_run=args.dry_run, pause=pause if args.pause else None)
            for w in guard.start():
                print(f"aradia: warning: {w}", file=sys.stderr)
            watcher = PolicyWatcher(guard, args.policy, lambda text: print(f"guard: {text}", file=sys.stderr,
                                                                         flush=True))
            watcher.start()
            until = "Ctrl-C to stop" if args.duration is None else f"for {args.duration:g} s"
            mode = " (dry run: nothing is blocked)" if args.dry_run else ""
            print(f"guarding {args.vm} with {args.policy}{mode}, {until}", file=sys.stderr, flush=True)
            try:
                for ev in tracer.events(duration=args.duration):
                    if ev.kind == "guard":
                        show(ev)
                    shown.discard(id(ev))
            except KeyboardInterrupt:
                pass  # closing the tracer disarms every hook and lets the guest run
            finally:
                watcher.stop()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the introspection service for the VMs in a config file."""
    from aradia.service.config import load_config
    from aradia.service.server import serve

    return serve(load_config(args.config), listen=args.listen, aggregate=args.aggregate)


def cmd_token(args: argparse.Namespace) -> int:
    """Print a fresh token (give it to its holder) and the config lines that hold only its SHA-256."""
    from aradia.service.policy import new_token, token_config_line

    token, digest = new_token()
    print(f"token: {token}")
    print("# paste into the service's config (it keeps only the SHA-256):", file=sys.stderr)
    print(token_config_line(digest, None if args.operator else args.tenant))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Boot the default guest and show what aradia sees."""
    from aradia.lab.demo import run_demo

    return run_demo(kernel=args.kernel, accel=args.accel)


# --- parser ----------------------------------------------------------------------------------------
def _vm_options(*, after: bool = False) -> argparse.ArgumentParser:
    """``--vm``, ``--memory``, ``--btf``: on every command that looks at a VM.

    ``after=True`` is the copy a nested parser (``trace ... WHAT``) takes so they may also follow
    ``WHAT``: its defaults are suppressed, so a value given before ``WHAT`` is not overwritten.
    """
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--vm", metavar="SPEC", default=argparse.SUPPRESS if after else None,
                   help="qmp:PATH of a live QEMU, or a dump file (required)")
    p.add_argument("--memory", choices=["auto", "shared-file", "proc-mem", "gdb"],
                   default=argparse.SUPPRESS if after else "auto",
                   help="path to live guest RAM (default: fastest available)")
    p.add_argument("--btf", metavar="FILE", default=argparse.SUPPRESS if after else None,
                   help="take kernel types from this vmlinuz/vmlinux (same build) instead of RAM")
    p.add_argument("--server", metavar="URL", default=argparse.SUPPRESS if after else None,
                   help="ask a remote `aradia serve` (then --vm is the VM's name there)")
    p.add_argument("--token", metavar="T", default=argparse.SUPPRESS if after else None,
                   help="the service token (default: $ARADIA_TOKEN)")
    p.add_argument("--cacert", metavar="FILE", default=argparse.SUPPRESS if after else None,
                   help="CA certificate that signed the service's TLS certificate")
    return p


def _trace_options(*, after: bool = False) -> argparse.ArgumentParser:
    """The options every ``aradia trace WHAT`` shares, before or after ``WHAT`` (see :func:`_vm_options`)."""
    def default(value: object) -> object:
        return argparse.SUPPRESS if after else value

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--duration", type=float, metavar="S", default=default(None),
                   help="stop after S seconds (default: Ctrl-C)")
    p.add_argument("--json", action="store_true", default=default(False), help="one JSON object per event")
    p.add_argument("--pid", type=int, action="append", default=default(None),
                   help="only this process (repeatable)")
    p.add_argument("--comm", action="append", default=default(None),
                   help="only tasks with this name (repeatable)")
    p.add_argument("--uid", type=int, action="append", default=default(None),
                   help="only this user (repeatable)")
    p.add_argument("--path", choices=["auto", "plugin", "gdb"], default=default("auto"),
                   help="count: auto (default) the plugin when loaded, plugin: require it, gdb: breakpoints")
    return p


def _view_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--json", action="store_true", help="one JSON document")
    p.add_argument("--pause", action="store_true", help="pause the guest for a consistent view")
    return p


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``aradia`` command."""
    p = argparse.ArgumentParser(prog="aradia", description="Virtual machine introspection for QEMU guests "
                                "and memory dumps.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def vm_parser(name: str, func: Callable[[argparse.Namespace], int], help_: str,
                  *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_, parents=[_vm_options(), *parents])
        sp.set_defaults(func=func)
        return sp

    sp = vm_parser("info", cmd_info, "kernel banner, RAM ranges, vCPUs and run state")
    sp.add_argument("--json", action="store_true", help="one JSON document")

    sp = vm_parser("read", cmd_read, "read guest memory")
    where = sp.add_mutually_exclusive_group(required=True)
    where.add_argument("--phys", type=_int, metavar="ADDR", help="guest-physical address")
    where.add_argument("--virt", type=_int, metavar="ADDR", help="guest-virtual address")
    sp.add_argument("--cr3", type=_int, metavar="X", help="page-table root for --virt (default: vCPU 0's)")
    sp.add_argument("--in-pid", type=int, metavar="PID", help="--virt is an address in this process")
    sp.add_argument("--size", type=_int, required=True, metavar="N")
    sp.add_argument("--format", choices=["hex", "raw"], default="hex")

    for name, func, help_ in (("ps", cmd_ps, "processes of the guest"),
                              ("lsmod", cmd_lsmod, "loaded kernel modules"),
                              ("net", cmd_net, "sockets and the processes holding them"),
                              ("mounts", cmd_mounts, "mounted filesystems"),
                              ("dmesg", cmd_dmesg, "the kernel log")):
        sp = vm_parser(name, func, help_, _view_options())
        if name == "ps":
            sp.add_argument("--threads", action="store_true", help="every thread, not only processes")
    for name, func, help_ in (("maps", cmd_maps, "memory maps of a process"),
                              ("files", cmd_files, "open files of a process")):
        sp = vm_parser(name, func, help_, _view_options())
        sp.add_argument("pid", type=int, metavar="PID")
    vm_parser("shell", cmd_shell, "interactive Python shell with vm and prog (drgn) ready")

    sp = vm_parser("trace", cmd_trace, "live probes through the GDB stub (the guest is never left broken)",
                   _trace_options())
    what = sp.add_subparsers(dest="what", required=True, metavar="WHAT")

    def what_parser(name: str, help_: str) -> argparse.ArgumentParser:
        return what.add_parser(name, help=help_, description=help_,
                               parents=[_vm_options(after=True), _trace_options(after=True)])

    sc = what_parser("syscalls", "syscalls with decoded arguments")
    sc.add_argument("-e", default="execve,openat,connect", metavar="LIST",
                    help="comma-separated syscall names (default: execve,openat,connect)")
    pr = what_parser("probe", "kernel functions: entry with argument registers, or --ret")
    pr.add_argument("symbols", nargs="+", metavar="SYMBOL")
    pr.add_argument("--ret", action="store_true", help="report returns with the return value")
    up = what_parser("uprobe", "user-space functions LIB:SYMBOL (e.g. libcrypt.so.1:crypt)")
    up.add_argument("specs", nargs="+", metavar="LIB:SYMBOL")
    up.add_argument("--process", metavar="NAME", help="only in processes with this name (comm or executable)")
    up.add_argument("--in-pid", dest="target_pid", type=int, metavar="PID", help="only in this process")
    up.add_argument("--ret", action="store_true", help="report returns with the return value")
    up.add_argument("--args", metavar="SIG",
                    help="argument types, e.g. 'str,int' or 'path:str->int' (default: built in for "
                         "well-known functions, else raw registers)")
    co = what_parser("count", "calls of kernel functions, counted inside QEMU when it has aradia's plugin "
                     "(no VM stop), else through breakpoints")
    co.add_argument("symbols", nargs="+", metavar="SYMBOL")
    pc = what_parser("procs", "process lifecycle: fork, exec (program and argv), exit (status)")
    pc.add_argument("-e", default="fork,exec,exit", metavar="LIST", help="comma-separated (default: all)")
    wa = what_parser("watch", "a watchpoint on a guest-virtual range")
    wa.add_argument("address", type=_int, metavar="ADDR")
    wa.add_argument("length", type=_int, metavar="LEN")
    wa.add_argument("--access", choices=["w", "r", "rw"], default="w", help="writes (default), reads or both")
    wa.add_argument("--in-pid", dest="target_pid", type=int, metavar="PID",
                    help="a user address: only accesses by this process")

    sp = vm_parser("guard", cmd_guard, "block (or report) changes to protected files and runs of forbidden "
                   "programs, decided outside the guest at the kernel's security hooks")
    sp.add_argument("--policy", required=True, metavar="FILE", help="the policy (TOML; reloaded on SIGHUP or "
                    "when the file changes)")
    sp.add_argument("--dry-run", action="store_true", help="block nothing: report what would be blocked")
    sp.add_argument("--json", action="store_true", help="alerts as event records, one JSON object per line")
    sp.add_argument("--pause", action="store_true", help="hold the VM stopped at each alert until SIGUSR1")
    sp.add_argument("--duration", type=float, metavar="S", help="stop after S seconds (default: Ctrl-C)")

    sp = vm_parser("migrate", cmd_migrate, "live-migrate a VM to a QEMU started with -incoming (and -S); "
                   "a running `aradia trace` of it traces on across the switch")
    sp.add_argument("--to", required=True, metavar="qmp:PATH", help="the destination QEMU's QMP socket")
    sp.add_argument("--uri", required=True, metavar="URI", help="the migration channel (unix:PATH, tcp:H:P)")
    sp.add_argument("--timeout", type=float, default=120.0, metavar="S",
                    help="give up after S seconds (the source runs on)")
    sp.add_argument("--json", action="store_true", help="the result as one JSON document")

    sp = vm_parser("dump", cmd_dump, "write guest RAM to a dump file")
    sp.add_argument("-o", "--output", required=True, metavar="FILE")
    sp.add_argument("--format", choices=["elf", "raw", "lime"], default="elf")
    sp.add_argument("--no-pause", action="store_true", help="do not pause the guest (the image may be torn)")

    sp = sub.add_parser("serve", help="serve the VMs of a config file over HTTP (and NATS)",
                        description="One process per host owns the QMP and GDB-stub connections of the "
                        "VMs named in the config and serves them to tenants: views, memory, traces, "
                        "live and stored events (see README, 'The service').")
    sp.add_argument("--config", required=True, metavar="FILE", help="the service's TOML config")
    sp.add_argument("--listen", metavar="HOST:PORT", help="override [service] listen")
    sp.add_argument("--aggregate", action="store_true",
                    help="own no VM: serve, read-only, the events every host publishes to [nats]")
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("token", help="make a service token")
    tsub = sp.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    tn = tsub.add_parser("new", help="print a fresh token and the config lines with its SHA-256")
    who = tn.add_mutually_exclusive_group(required=True)
    who.add_argument("--tenant", metavar="NAME", help="for tenant NAME")
    who.add_argument("--operator", action="store_true", help="for the operator")
    tn.set_defaults(func=cmd_token)

    sp = sub.add_parser("demo", help="boot a scratch guest and show what aradia sees")
    sp.add_argument("--kernel", default="6.1", choices=["5.10", "6.1", "6.12"])
    sp.add_argument("--accel", default=os.environ.get("ARADIA_ACCEL", "tcg"), help="tcg (default) or kvm")
    sp.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run one command; an AradiaError is one line on stderr and exit status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "vm", "") is None:  # accepted anywhere on the line, so checked once it is parsed
        parser.error(f"{args.command}: --vm SPEC is required")
    try:
        return int(args.func(args) or 0)
    except AradiaError as e:
        print(f"aradia: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("aradia: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
