"""The ``aradia`` command: a thin shell over the library (parse, call, render)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
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

    return attach(args.vm, memory=args.memory, arch=getattr(args, "arch", None))


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
    if "arch" in info:
        print(f"arch       {info['arch']}")
    print(f"kernel     {info['kernel'] or info.get('kernel_error')}")
    for c in info["vcpus"]:
        print(_vcpu_line(c))
    return 0


def _vcpu_line(c: dict[str, Any]) -> str:
    """One ``aradia info`` line for a vCPU, labelled as its architecture names its registers."""
    if "pc" in c:  # arm64
        mode = {0: "user", 1: "kernel", 2: "hypervisor", 3: "firmware"}.get(c["el"], "?")
        return (f"vCPU {c['index']:<4}  PC {c['pc']:#018x}  SP {c['sp']:#018x}  EL{c['el']} ({mode})  "
                f"PSTATE {c['pstate']:#010x}  TTBR0 {c['ttbr0']:#018x}  TTBR1 {c['ttbr1']:#018x}")
    mode = "user" if c["cpl"] == 3 else "kernel"
    paging = "5-level" if c["la57"] else "4-level"
    return f"vCPU {c['index']:<4}  RIP {c['rip']:#018x}  CR3 {c['cr3']:#014x}  {mode}, {paging}"


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
    if getattr(args, "arch", None):
        raise AradiaError("--arch is not offered over --server (the service knows its VMs)")
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


def _local_only(args: argparse.Namespace, what: str) -> None:
    if getattr(args, "server", None):
        raise AradiaError(f"{what} is not offered over --server (it needs the VM's QMP socket here)")


def cmd_files_get(args: argparse.Namespace) -> int:
    """Extract files from the guest's kernel objects (page cache over disk)."""
    from aradia.apps.extract import targets
    from aradia.apps.extract.report import extraction_lines
    from aradia.apps.extract.session import extract_targets

    _local_only(args, "files get")
    if args.path is None and args.pid is None:
        raise AradiaError("files get: name a PATH, or --pid PID with --fd N, --exe or --all-mapped")
    if args.path is not None and (args.pid is not None or args.fd is not None or args.exe or args.all_mapped):
        raise AradiaError("files get: a PATH or --pid, not both")
    if args.pid is not None and sum((args.fd is not None, args.exe, args.all_mapped)) != 1:
        raise AradiaError("files get --pid PID: give exactly one of --fd N, --exe, --all-mapped")
    if args.path is not None:
        resolve = lambda prog, w: [targets.by_path(prog, args.path)]  # noqa: E731
    elif args.fd is not None:
        resolve = lambda prog, w: [targets.by_fd(prog, args.pid, args.fd)]  # noqa: E731
    elif args.exe:
        resolve = lambda prog, w: [targets.by_exe(prog, args.pid)]  # noqa: E731
    else:
        resolve = lambda prog, w: targets.all_mapped(prog, args.pid, w)  # noqa: E731
    with _open(args) as vm:
        _kernel(vm, args)
        results, seconds, warnings = extract_targets(
            vm, resolve, args.output, directory=args.all_mapped, source=args.source, disk_node=args.disk,
            pause=args.pause)
    total = sum(x.info.size for x in results)
    rate = total / seconds / 1e6 if seconds > 0 else 0.0
    if args.json:
        print(json.dumps({"files": [x.as_dict() for x in results], "bytes": total, "seconds": seconds,
                          "mb_per_s": rate, "warnings": warnings}, indent=1))
    else:
        for x in results:
            print("\n".join(extraction_lines(x)))
            for w in x.warnings:
                print(f"aradia: warning: {x.name}: {w}", file=sys.stderr)
        print(f"{len(results)} file(s), {total} bytes in {seconds:.3f} s ({rate:.1f} MB/s)")
    for w in warnings:
        print(f"aradia: warning: {w}", file=sys.stderr)
    return 0


def cmd_files_ls(args: argparse.Namespace) -> int:
    """A directory as the guest's dentry cache holds it."""
    from aradia.apps.extract.report import listing_lines
    from aradia.apps.extract.targets import listing
    from aradia.linux.bounds import Warnings

    _local_only(args, "files ls")
    warnings = Warnings()
    with _open(args) as vm:
        kernel = _kernel(vm, args)
        with vm.paused() if args.pause else contextlib.nullcontext():
            entries = listing(kernel.prog, args.dir, warnings)
    if args.json:
        print(json.dumps({"items": [dataclasses.asdict(e) for e in entries], "warnings": warnings}, indent=1))
    else:
        print("\n".join(listing_lines(entries)))
        for w in warnings:
            print(f"aradia: warning: {w}", file=sys.stderr)
    return 0


def cmd_keys_ssh(args: argparse.Namespace) -> int:
    """Session keys of the guest's live SSH connections, from the daemon's memory."""
    from aradia.apps.ssh.keys import find_keys
    from aradia.apps.ssh.report import key_lines

    _local_only(args, "keys ssh")
    with _open(args) as vm:
        kernel = _kernel(vm, args)
        with vm.paused() if args.pause else contextlib.nullcontext():
            pids = None
            if args.pid is not None:
                procs = {p.pid: p.comm for p in kernel.processes()}
                if args.pid not in procs:
                    raise AradiaError(f"no process {args.pid} in the guest")
                pids = [(args.pid, procs[args.pid])]
            result = find_keys(vm, pids)
    doc = {"keys": [dataclasses.asdict(k) for k in result.keys], "pids": result.pids,
           "scanned": result.scanned, "seconds": result.seconds, "taken": time.time(), "vm": args.vm}
    if args.output:
        Path(args.output).write_text(json.dumps(doc, indent=1) + "\n")
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print("\n".join(key_lines(result)))
    return 0 if result.keys else 1


def cmd_decrypt_ssh(args: argparse.Namespace) -> int:
    """Decrypt the SSH connections of a capture with keys from ``aradia keys ssh``."""
    from aradia.apps.ssh.decrypt import decrypt_capture, load_keys
    from aradia.apps.ssh.report import decrypt_lines

    keys = [k for f in args.keys for k in load_keys(Path(f))]
    result = decrypt_capture(Path(args.capture), keys)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print("\n".join(decrypt_lines(result)))
    conns = result["connections"]
    # a capture with problems (cut short, segments missing) may hide packets: never "all decrypted"
    return 0 if conns and all(c["complete"] for c in conns) and not result["warnings"] else 1


def cmd_capture(args: argparse.Namespace) -> int:
    """Start, stop or list QEMU's own network captures (filter-dump) of a VM."""
    from aradia.machine.capture import captures, start_capture, stop_capture

    _local_only(args, "capture")
    with _open(args) as vm:
        if not vm.live:
            raise AradiaError("a capture needs a live VM (qmp:PATH), not a dump")
        if args.action == "start":
            if not args.output:
                raise AradiaError("capture start needs -o FILE.pcap")
            cap = start_capture(vm.machine, args.output, netdev=args.netdev)
            print(f"capturing netdev {cap.netdev} into {cap.file} ({cap.id}); end it with: "
                  f"aradia capture stop --vm {args.vm}")
        elif args.action == "stop":
            ended = stop_capture(vm.machine, args.id)
            print(f"ended {', '.join(ended)}" if ended else "no capture was running")
        else:
            print("\n".join(captures(vm.machine)) or "no capture running")
    return 0


def cmd_keys_aes(args: argparse.Namespace) -> int:
    """AES key schedules in a process's memory or all guest RAM."""
    from aradia.apps.extract.aes_keys import scan_process, scan_ram

    _local_only(args, "keys aes")
    if args.max_errors < 0:
        raise AradiaError("--max-errors must be 0 or more")
    with _open(args) as vm:
        _kernel(vm, args)
        with vm.paused() if args.pause else contextlib.nullcontext():
            if args.pid is not None:
                result = scan_process(vm, args.pid, max_errors=args.max_errors)
            else:
                result = scan_ram(vm, max_errors=args.max_errors)
    if args.json:
        print(json.dumps({"where": result.where, "keys": [dataclasses.asdict(k) for k in result.keys],
                          "scanned": result.scanned, "seconds": result.seconds, "mb_per_s": result.mb_per_s},
                         indent=1))
        return 0
    rows = [[f"{k.address:#x}", f"AES-{k.bits}", k.key, str(k.bit_errors), k.order] for k in result.keys]
    print(_table(rows, ["ADDRESS", "CIPHER", "KEY", "BIT-ERRORS", "ORDER"]))
    print(f"{len(result.keys)} key(s) in {result.where}: {result.scanned} bytes in {result.seconds:.2f} s "
          f"({result.mb_per_s:.1f} MB/s)")
    return 0


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


def _records(stream: Any, duration: float | None, what: str) -> Iterator[dict[str, Any]]:
    """A live stream's records for ``duration`` seconds (or until Ctrl-C); a loss (this client fell
    behind) is a warning on stderr."""
    for rec in stream.events(duration):
        if "dropped" in rec:
            print(f"aradia: warning: {rec['dropped']} {what} lost (this client fell behind)", file=sys.stderr)
        else:
            yield rec


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
            for rec in _records(stream, args.duration, "events"):
                if args.json:
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

    if args.what not in ("count", "syscalls") and args.path != "auto":
        raise AradiaError("--path applies to trace count and trace syscalls only")
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
        flt = Filter(pids=set(args.pid) if args.pid else None, comms=set(args.comm) if args.comm else None,
                     uids=set(args.uid) if args.uid else None)
        until = "Ctrl-C to stop" if args.duration is None else f"for {args.duration:g} s"
        why = ""
        if args.what == "syscalls" and args.path != "gdb":
            from aradia.trace.plugintrace import plugin_path_problem

            names = [n.strip() for n in args.e.split(",")]
            problem = plugin_path_problem(vm, names, flt)
            if problem is None:
                return _syscalls_in_qemu(vm, names, flt, args, until)
            if args.path == "plugin":
                raise AradiaError(f"--path plugin: {problem}")
            why = f"; no plugin path: {problem}"
        from aradia.trace.migrate_control import MigrationControl

        with Tracer.open(vm) as tracer, MigrationControl(tracer):  # `aradia migrate --vm` asks this owner
            tracer.filter = flt
            _arm(tracer, args)
            via = f" via gdb (every event stops the VM{why})" if args.what == "syscalls" else ""
            print(f"tracing {args.what} on {args.vm}{via}, {until}", file=sys.stderr, flush=True)
            warned: set[str] = set()

            def warn_new() -> bool:  # checked between events, at least four times a second
                for line in tracer.warnings:
                    if line not in warned:
                        warned.add(line)
                        print(f"aradia: warning: {line}", file=sys.stderr, flush=True)
                return False

            warn_new()
            try:
                for ev in tracer.events(duration=args.duration, until=warn_new):
                    _print_event(ev, args)
            except KeyboardInterrupt:
                pass  # closing the tracer disarms everything and lets the guest run
    return 0


def _vm_label(spec: str) -> str:
    """A VM's name for its records when the command runs where the VM is: its socket's or dump's name."""
    return os.path.basename(spec.removeprefix("qmp:")).removesuffix(".sock") or "vm"


def _print_event(ev: Any, args: argparse.Namespace) -> None:
    if args.json:  # the one event record (DESIGN: the CLI, the store and the bus show the same)
        from aradia.service.schema import local_records

        if getattr(args, "records", None) is None:
            args.records = local_records(_vm_label(args.vm))
        print(json.dumps(args.records.record(ev)), flush=True)
    else:
        print(ev.line(), flush=True)


def _syscalls_in_qemu(vm: Any, names: list[str], flt: Any, args: argparse.Namespace, until: str) -> int:
    """``aradia trace syscalls`` on the plugin path: events written inside QEMU, the VM never stops."""
    from aradia.trace.plugintrace import PluginSyscallTrace

    def lost(n: int) -> None:
        print(f"aradia: warning: {n} events lost (the plugin's ring overflowed before aradia read it)",
              file=sys.stderr, flush=True)

    # Ctrl-C ends the loop after a last read of the rings: what the plugin wrote before it is reported
    interrupted = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda _sig, _frame: interrupted.set())
    try:
        with PluginSyscallTrace.open(vm, names, flt) as trace:
            print(f"tracing syscalls on {args.vm} via plugin (inside QEMU, the VM does not stop), {until}",
                  file=sys.stderr, flush=True)
            seen = 0
            for ev in trace.events(duration=args.duration, until=interrupted.is_set, on_loss=lost):
                seen += 1
                _print_event(ev, args)
    finally:
        signal.signal(signal.SIGINT, previous)
    print(f"aradia: plugin path: {seen} events reported, {trace.lost} lost to ring overflow",
          file=sys.stderr, flush=True)
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


def cmd_guard(args: argparse.Namespace) -> int:
    """The insider guard: block or report changes to protected files and runs of forbidden programs."""
    import signal
    import threading

    from aradia.apps.guard.alerts import alert_line
    from aradia.apps.guard.guard import Guard
    from aradia.apps.guard.policy import load_policy
    from aradia.apps.guard.reload import PolicyWatcher
    from aradia.service.schema import local_records as records
    from aradia.trace.tracer import Tracer

    policy = load_policy(args.policy)
    client = _client(args)
    if client is not None:
        with client:
            return _guard_remote(client, args)
    if args.keep:
        raise AradiaError("--keep is for a guard on a service (--server): a local guard lives as long as "
                          "this command")
    with _open(args) as vm:
        if not vm.live:
            raise AradiaError("the guard needs a live VM (qmp:PATH), not a dump")
        _kernel(vm, args)
        maker = records(_vm_label(args.vm))
        shown: set[int] = set()

        def show(ev: Any) -> None:
            if id(ev) not in shown:
                shown.add(id(ev))
                rec = maker.record(ev)
                print(json.dumps(rec) if args.json else alert_line(rec), flush=True)

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
            watcher = PolicyWatcher(guard.reload, args.policy,
                                    lambda text: print(f"guard: {text}", file=sys.stderr, flush=True))
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


def cmd_honeypot(args: argparse.Namespace) -> int:
    """The SSH honeypot monitor (or, ``report DIR``, the report of what it recorded)."""
    from pathlib import Path

    from aradia.apps.honeypot.monitor import Honeypot
    from aradia.apps.honeypot.report import event_line, report
    from aradia.service.schema import local_records as records
    from aradia.trace.tracer import Tracer

    if args.action:
        if len(args.action) != 2 or args.action[0] != "report":
            raise AradiaError("usage: aradia honeypot --vm SPEC [--out DIR] ... | aradia honeypot report DIR")
        print(report(Path(args.action[1])))
        return 0
    if args.server:
        raise AradiaError("aradia honeypot runs where the VM is (--vm qmp:PATH); on a service, start it "
                          'as an app: POST /api/v1/vms/VM/traces {"kind": "honeypot"}')
    out = Path(args.out or time.strftime("honeypot-%Y%m%d-%H%M%S"))
    with _open(args) as vm:
        if not vm.live:
            raise AradiaError("the honeypot monitor needs a live VM (qmp:PATH), not a dump")
        _kernel(vm, args)
        maker = records(_vm_label(args.vm))

        def show(rec: dict[str, Any]) -> None:
            print(json.dumps(rec) if args.json else event_line(rec), flush=True)

        with Tracer.open(vm) as tracer:
            hp = Honeypot(tracer, out, maker, accept_any=args.accept_any_password or (), show=show)
            try:
                hp.start()
                until = "Ctrl-C to stop" if args.duration is None else f"for {args.duration:g} s"
                print(f"honeypot on {args.vm}, recording into {out}, {until}", file=sys.stderr, flush=True)
                for ev in tracer.events(duration=args.duration):
                    hp.handle(ev)
            except KeyboardInterrupt:
                pass  # closing the tracer disarms every probe and lets the guest run
            finally:
                hp.close()
    return 0


def _guard_remote(client: Any, args: argparse.Namespace) -> int:
    """``aradia guard --server …``: the guard as the service's app; its alerts streamed here until the
    end (then it is stopped), or left running on the service with ``--keep``."""
    from aradia.apps.guard.alerts import alert_line
    from aradia.apps.guard.policy import load_policy
    from aradia.apps.guard.reload import PolicyWatcher

    if args.pause:
        raise AradiaError("--pause is not offered over --server (the service owns the VM's run state)")
    policy_path = args.policy
    with open(policy_path) as f:  # (load_policy read and checked it just now)
        spec = {"kind": "guard", "policy": f.read(), "dry_run": args.dry_run}
    mode = " (dry run: nothing is blocked)" if args.dry_run else ""
    if args.keep:
        trace = client.start_trace(args.vm, spec)
        print(json.dumps(trace) if args.json else trace["id"])
        print(f"guarding {args.vm} at {args.server} with {policy_path}{mode} until the trace is stopped "
              f"(DELETE /api/v1/traces/{trace['id']})", file=sys.stderr, flush=True)
        return 0
    with client.live(args.vm, kind=["guard"]) as stream:
        trace = client.start_trace(args.vm, spec)  # after subscribing: no alert is missed

        def update(path: str) -> list[str]:
            with open(path) as f:
                load_policy(path)  # a policy that does not parse is refused here, with its file's name
                client.update_trace(trace["id"], {**spec, "policy": f.read()})
            return []

        watcher = PolicyWatcher(update, policy_path,
                                lambda text: print(f"guard: {text}", file=sys.stderr, flush=True))
        watcher.start()
        until = "Ctrl-C to stop" if args.duration is None else f"for {args.duration:g} s"
        print(f"guarding {args.vm} at {args.server} with {policy_path}{mode} (trace {trace['id']}), {until}",
              file=sys.stderr, flush=True)
        try:
            for rec in _records(stream, args.duration, "alerts"):
                if rec.get("kind") == "guard":
                    print(json.dumps(rec) if args.json else alert_line(rec), flush=True)
        except KeyboardInterrupt:
            pass
        finally:
            watcher.stop()
            client.stop_trace(trace["id"])
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the introspection service for the VMs in a config file."""
    from aradia.apps.served import service_apps
    from aradia.service.config import load_config
    from aradia.service.server import serve

    return serve(load_config(args.config), listen=args.listen, aggregate=args.aggregate, apps=service_apps())


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

    return run_demo(kernel=args.kernel, accel=args.accel, arch=args.arch)


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
    p.add_argument("--arch", choices=["x86_64", "arm64", "aarch64", "amd64"],
                   default=argparse.SUPPRESS if after else None,
                   help="the guest's architecture, for raw and LiME dumps, which do not record it "
                        "(default: from the kernel's VMCOREINFO in the dump, else x86_64); checked "
                        "against a live VM's or an ELF core's")
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
                   help="count, syscalls: auto (default) inside QEMU by aradia's plugin when it can, "
                        "plugin: require it, gdb: breakpoints (the VM stops at every event)")
    return p


def _view_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--json", action="store_true", help="one JSON document")
    p.add_argument("--pause", action="store_true", help="pause the guest for a consistent view")
    return p


TWO_WORD = {("files", "get"), ("files", "ls"), ("keys", "aes"), ("keys", "ssh"), ("decrypt", "ssh")}
"""Commands of two words (registered as ``files-get``...): ``files get|ls`` sit beside ``files PID``."""


class _Parser(argparse.ArgumentParser):
    """The top-level parser: reads ``files get`` as the command ``files-get`` (and so on)."""

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        argv = list(sys.argv[1:] if args is None else args)
        if self.prog == "aradia" and len(argv) >= 2 and (argv[0], argv[1]) in TWO_WORD:
            argv[:2] = [f"{argv[0]}-{argv[1]}"]
        return super().parse_known_args(argv, namespace)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``aradia`` command."""
    p = _Parser(prog="aradia", description="Virtual machine introspection for QEMU guests "
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
    sp = vm_parser("files-get", cmd_files_get, "extract files from the guest's kernel objects: page cache "
                   "(dirty pages too) over the disk read through QEMU; deleted files still open or running")
    sp.prog = "aradia files get"
    sp.add_argument("path", nargs="?", metavar="PATH", help="absolute path as pid 1 sees it")
    sp.add_argument("--pid", type=int, metavar="PID", help="a file of this process (with --fd, --exe or "
                    "--all-mapped)")
    sp.add_argument("--fd", type=int, metavar="N", help="its open descriptor N (deleted files too)")
    sp.add_argument("--exe", action="store_true", help="its executable (also when deleted)")
    sp.add_argument("--all-mapped", action="store_true", help="every file it maps, into directory OUT")
    sp.add_argument("-o", "--output", required=True, metavar="OUT", help="output file (directory with "
                    "--all-mapped)")
    sp.add_argument("--source", choices=["auto", "memory", "disk"], default="auto",
                    help="auto: page cache over disk (default); memory: never the disk; disk: only the disk")
    sp.add_argument("--disk", metavar="NODE", help="QEMU block node holding the file system (default: the "
                    "VM's only disk)")
    sp.add_argument("--pause", action="store_true", help="hold the guest stopped meanwhile (consistent copy)")
    sp.add_argument("--json", action="store_true", help="one JSON document")
    sp = vm_parser("files-ls", cmd_files_ls, "a directory as the guest's dentry cache holds it",
                   _view_options())
    sp.prog = "aradia files ls"
    sp.add_argument("dir", metavar="DIR", help="absolute path of a directory")
    sp = vm_parser("keys-aes", cmd_keys_aes, "AES-128/192/256 key schedules in a process's memory or all "
                   "guest RAM, tolerant of flipped bits")
    sp.prog = "aradia keys aes"
    sp.add_argument("--pid", type=int, metavar="PID", help="only this process's memory (virtual addresses)")
    sp.add_argument("--max-errors", type=int, default=10, metavar="N",
                    help="bits of a schedule that may differ from the true one (default 10, as aeskeyfind)")
    sp.add_argument("--pause", action="store_true", help="hold the guest stopped meanwhile")
    sp.add_argument("--json", action="store_true", help="one JSON document")
    sp = vm_parser("keys-ssh", cmd_keys_ssh, "session keys of live SSH connections (OpenSSH, dropbear) from "
                   "the daemon's memory, without debug symbols")
    sp.prog = "aradia keys ssh"
    sp.add_argument("--pid", type=int, metavar="PID", help="only this process (default: every sshd/dropbear)")
    sp.add_argument("-o", "--output", metavar="KEYS.json", help="also write the keys there (for decrypt ssh)")
    sp.add_argument("--pause", action="store_true", help="hold the guest stopped meanwhile")
    sp.add_argument("--json", action="store_true", help="one JSON document")
    sp = sub.add_parser("decrypt-ssh", help="decrypt captured SSH connections with keys from keys ssh",
                        description="decrypt the SSH connections of a pcap capture (aradia capture) with "
                        "keys from aradia keys ssh: messages, exec commands, passwords, each channel's data")
    sp.prog = "aradia decrypt ssh"
    sp.set_defaults(func=cmd_decrypt_ssh)
    sp.add_argument("capture", metavar="CAPTURE.pcap")
    sp.add_argument("--keys", action="append", required=True, metavar="KEYS.json",
                    help="keys file written by aradia keys ssh (repeatable)")
    sp.add_argument("--json", action="store_true", help="one JSON document")
    sp = vm_parser("capture", cmd_capture, "QEMU's own capture of a VM's network traffic into a pcap file "
                   "(filter-dump): start, stop, ls")
    sp.add_argument("action", choices=["start", "stop", "ls"])
    sp.add_argument("-o", "--output", metavar="FILE.pcap", help="the pcap file (start; written by QEMU)")
    sp.add_argument("--netdev", metavar="ID", help="which netdev (default: the VM's only one)")
    sp.add_argument("--id", metavar="ID", help="the capture to stop (default: every one aradia started)")
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
    sp.add_argument("--keep", action="store_true", help="with --server: leave the guard running on the "
                    "service (armed again when the service restarts) and print its trace id")

    sp = vm_parser("honeypot", cmd_honeypot, "SSH honeypot monitor: every ssh session's passwords, commands, "
                   "terminal, files and connections, recorded from outside the guest; `honeypot report DIR` "
                   "prints what a run recorded")
    sp.add_argument("action", nargs="*", metavar="report DIR", help="print the report of a recorded DIR")
    sp.add_argument("--out", metavar="DIR", help="output directory (default: ./honeypot-DATE-TIME)")
    sp.add_argument("--accept-any-password", nargs="+", metavar="USER",
                    help="the daemon's password check succeeds for USER whatever the password")
    sp.add_argument("--json", action="store_true", help="events as records, one JSON object per line")
    sp.add_argument("--duration", type=float, metavar="S", help="stop after S seconds (default: Ctrl-C)")
    sp.set_defaults(needs_vm=lambda a: not a.action)

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
    sp.add_argument("--arch", default="x86_64", choices=["x86_64", "arm64"],
                    help="the guest's architecture (arm64: qemu-system-aarch64 -M virt)")
    sp.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run one command; an AradiaError is one line on stderr and exit status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    needs_vm = getattr(args, "needs_vm", None)
    if getattr(args, "vm", "") is None and (needs_vm is None or needs_vm(args)):  # checked once parsed
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
