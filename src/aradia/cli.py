"""The ``aradia`` command: a thin shell over the library (parse, call, render)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
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
    from aradia.linux.identify import KernelNotFound, find_banner

    with _open(args) as vm:
        info = vm.info()
        try:
            info["kernel"] = find_banner(vm.memory)
        except KernelNotFound as e:
            info["kernel"] = None
            info["kernel_error"] = str(e)
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
    with _open(args) as vm:
        if args.phys is not None:
            addr = args.phys
            data = vm.read(addr, args.size)
        else:
            addr = args.virt
            data = vm.read_virt(addr, args.size, cr3=args.cr3)
    if args.format == "raw":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        print(hexdump(data, addr))
    return 0


class Progress:
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
    from aradia.linux.identify import find_vmcoreinfo
    from aradia.sources import dumpwrite

    progress = Progress(f"dump {os.path.basename(args.output)}")
    with _open(args) as vm:
        t0 = time.monotonic()
        pause = vm.live and not args.no_pause
        if pause:
            vm.pause()
        try:
            if args.format == "elf":
                cpus = [c.regs for c in vm.cpus()]
                dumpwrite.write_elf(vm.memory, args.output, vmcoreinfo=find_vmcoreinfo(vm.memory),
                                    cpu_states=cpus, progress=progress)
            elif args.format == "raw":
                dumpwrite.write_raw(vm.memory, args.output, progress=progress)
            else:
                dumpwrite.write_lime(vm.memory, args.output, progress=progress)
        finally:
            if pause:
                vm.resume()
        took = time.monotonic() - t0
    size = os.path.getsize(args.output)
    print(f"wrote {args.output}: {args.format}, {size / (1 << 20):.1f} MiB in {took:.2f}s"
          + (" (guest paused meanwhile)" if pause else ""))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Boot the default guest and show what aradia sees."""
    from aradia.demo import run_demo

    return run_demo(kernel=args.kernel, accel=args.accel)


# --- parser ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``aradia`` command."""
    p = argparse.ArgumentParser(prog="aradia", description="Virtual machine introspection for QEMU guests "
                                "and memory dumps.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def vm_parser(name: str, func: Callable[[argparse.Namespace], int],
                  help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--vm", required=True, metavar="SPEC", help="qmp:PATH of a live QEMU, or a dump file")
        sp.add_argument("--memory", default="auto", choices=["auto", "shared-file", "proc-mem", "gdb"],
                        help="path to live guest RAM (default: fastest available)")
        sp.set_defaults(func=func)
        return sp

    sp = vm_parser("info", cmd_info, "kernel banner, RAM ranges, vCPUs and run state")
    sp.add_argument("--json", action="store_true", help="one JSON document")

    sp = vm_parser("read", cmd_read, "read guest memory")
    where = sp.add_mutually_exclusive_group(required=True)
    where.add_argument("--phys", type=_int, metavar="ADDR", help="guest-physical address")
    where.add_argument("--virt", type=_int, metavar="ADDR", help="guest-virtual address")
    sp.add_argument("--cr3", type=_int, metavar="X", help="page-table root for --virt (default: vCPU 0's)")
    sp.add_argument("--size", type=_int, required=True, metavar="N")
    sp.add_argument("--format", choices=["hex", "raw"], default="hex")

    sp = vm_parser("dump", cmd_dump, "write guest RAM to a dump file")
    sp.add_argument("-o", "--output", required=True, metavar="FILE")
    sp.add_argument("--format", choices=["elf", "raw", "lime"], default="elf")
    sp.add_argument("--no-pause", action="store_true", help="do not pause the guest (the image may be torn)")

    sp = sub.add_parser("demo", help="boot a scratch guest and show what aradia sees")
    sp.add_argument("--kernel", default="6.1", choices=["5.10", "6.1", "6.12"])
    sp.add_argument("--accel", default=os.environ.get("ARADIA_ACCEL", "tcg"), help="tcg (default) or kvm")
    sp.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run one command; an AradiaError is one line on stderr and exit status 2."""
    args = build_parser().parse_args(argv)
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
