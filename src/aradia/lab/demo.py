"""``aradia demo``: boot a scratch guest and show, step by step, what aradia sees from outside it."""

from __future__ import annotations

import os
import tempfile
import time

from aradia.lab.images import build_guest
from aradia.lab.launcher import launch
from aradia.linux.identify import find_banner, find_vmcoreinfo, parse_vmcoreinfo
from aradia.vm import attach, open_dump


def _step(title: str) -> None:
    print(f"\n== {title}", flush=True)


#: VMCOREINFO lines worth showing, per architecture: what places the kernel
VMCOREINFO_KEYS = {
    "x86_64": ("OSRELEASE", "KERNELOFFSET", "NUMBER(phys_base)", "SYMBOL(init_top_pgt)",
               "NUMBER(pgtable_l5_enabled)"),
    "arm64": ("OSRELEASE", "KERNELOFFSET", "NUMBER(kimage_voffset)", "NUMBER(PHYS_OFFSET)",
              "NUMBER(VA_BITS)", "SYMBOL(swapper_pg_dir)"),
}


def run_demo(kernel: str = "6.1", accel: str = "tcg", arch: str = "x86_64") -> int:
    """Boot the ``kernel`` guest of ``arch`` (``x86_64`` or ``arm64``), attach by its QMP socket only,
    and show memory, vCPUs, Linux, a live trace, a user-space probe and a dump."""
    _step(f"building the Debian {kernel} {arch} test guest (cached after the first run)")
    t0 = time.monotonic()
    image = build_guest(kernel, arch=arch)
    print(f"kernel {image.release}  ({time.monotonic() - t0:.1f}s)")

    _step(f"booting it under {image.guest_arch.qemu} (-accel {accel}, RAM in a shared file)")
    t0 = time.monotonic()
    with launch(image, accel=accel, smp=2, shared_memory=True, boot_timeout=180) as guest:
        print(f"QEMU pid {guest.pid}, QMP socket {guest.qmp_path}  (booted in {time.monotonic() - t0:.1f}s)")
        truth = guest.run("cat /proc/version").strip()

        _step(f"attach qmp:{guest.qmp_path} — nothing installed in the guest")
        for path in ("shared-file", "proc-mem"):
            with attach(f"qmp:{guest.qmp_path}", memory=path) as vm:
                t0 = time.monotonic()
                banner = find_banner(vm.memory)
                took = time.monotonic() - t0
                same = "matches" if banner == truth else "DIFFERS from"
                print(f"{path:<12} banner found in RAM in {took * 1000:.0f} ms, "
                      f"{same} the guest's /proc/version")
        vm = attach(f"qmp:{guest.qmp_path}")
        try:
            info = vm.info(kernel=False)  # the banner was found above, per memory path
            print(f"QEMU {info['qemu_version']}, state {info['state']}, memory path {info['memory_path']}")
            for r in info["ram"]:
                print(f"  RAM {r['start']:#012x}-{r['end'] - 1:#012x}  {r['size'] >> 20} MiB")
            print(f"kernel: {truth}")

            _step("VMCOREINFO found in guest RAM (no fw_cfg device needed)")
            vmci = parse_vmcoreinfo(find_vmcoreinfo(vm.memory) or "")
            for key in VMCOREINFO_KEYS[vm.arch.name]:
                if key in vmci:
                    print(f"  {key} = {vmci[key]}")

            pc = vm.arch.pc.upper()
            _step(f"vCPUs: registers, and the code at {pc} through the guest's own page tables")
            with vm.paused():
                for c in vm.cpus():
                    user = c.cpl == (0 if vm.arch.name == "arm64" else 3)
                    # arm64 splits the address space: user code through TTBR0, the kernel's through TTBR1
                    root = c.regs.get("ttbr0_el1", c.cr3) if user and vm.arch.name == "arm64" else c.cr3
                    tr = vm.translate(c.pc, cr3=root, la57=c.la57)
                    code = vm.read_virt(c.pc, 8, cr3=root, la57=c.la57)
                    print(f"  vCPU {c.index}: {pc} {c.pc:#x} ({'user' if user else 'kernel'}) -> phys "
                          f"{tr.paddr:#x} [{tr.page_size >> 10} KiB page], bytes {code.hex(' ')}")

            _step("pause / resume")
            t0 = time.perf_counter()
            for _ in range(20):
                vm.pause()
                vm.resume()
            print(f"  20 pause/resume cycles: {(time.perf_counter() - t0) / 20 * 1000:.2f} ms each; "
                  f"state now {vm.status()}")

            _step("Linux from guest RAM alone: kallsyms, KASLR and BTF types into drgn")
            t0 = time.monotonic()
            linux = vm.load_kernel()
            prof = linux.profile
            paging = (f"{getattr(vm.arch, 'va_bits', 48)}-bit VA" if vm.arch.name == "arm64"
                      else f"{'5' if prof.la57 else '4'}-level paging")
            print(f"  profile in {time.monotonic() - t0:.2f}s: {len(prof.symbols)} symbols, "
                  f"KASLR slide {prof.kaslr_offset:#x}, {paging}")
            procs = linux.processes()
            print(f"  {len(procs)} processes; a few of them:")
            for p in [p for p in procs if not p.kernel_thread][:5]:
                print(f"    {p.pid:>5} {p.comm:<12} {' '.join(p.cmdline)[:60]}")
            socks = [s for s in linux.sockets() if s.state == "LISTEN"]
            listening = ", ".join(f"{s.local_address}:{s.local_port} (pid {s.pid})" for s in socks)
            print(f"  listening: {listening}")

            _step("a short live trace: execve and openat while the guest runs a command")
            from aradia.trace.tracer import Tracer

            with Tracer.open(vm) as tracer:
                tracer.add_syscall("execve")
                tracer.add_syscall("openat")
                mark = len(guest.console_text())
                # The console echoes what is typed: wait for the computed "demo-2", not the command.
                guest.send_console(b"cat /etc/hostname; echo demo-$((1+1))\n")

                def done() -> bool:
                    return any(f"demo-2{end}" in guest.console_text()[mark:] for end in "\r\n")

                for ev in tracer.events(duration=30, until=done):
                    print("  " + ev.line()[:150])
            print(f"  guest state after the trace: {vm.status()} (nothing left armed)")

            _step("a user-space probe: libcrypt.so.1:crypt in dropbear during an ssh password login")
            import threading

            with Tracer.open(vm) as tracer:
                tracer.add_uprobe("libcrypt.so.1:crypt", process="dropbear")
                login: dict[str, str] = {}
                worker = threading.Thread(target=lambda: login.update(
                    out=guest.ssh("echo logged-in-as-$(id -un)", password=True, check=False)))
                worker.start()
                for ev in tracer.events(duration=60, until=lambda: not worker.is_alive()):
                    print("  " + ev.line()[:150])
                worker.join()
                for line in tracer.warnings:
                    print(f"  warning: {line}")
            print(f"  the ssh client saw: {login.get('out', '').strip()}")

            _step("a consistent ELF dump with VMCOREINFO, opened again like any VM")
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "guest.elf")
                t0 = time.monotonic()
                vm.dump(out)  # the guest paused meanwhile
                print(f"  wrote {os.path.getsize(out) >> 20} MiB in {time.monotonic() - t0:.2f}s")
                with open_dump(out) as dump:
                    same = "matches" if find_banner(dump.memory) == truth else "DIFFERS"
                    print(f"  banner in the dump {same}")
        finally:
            vm.close()
    print("\nguest stopped; nothing was left running")
    return 0
