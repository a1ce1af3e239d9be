"""User-space probes against what really happens in the guest: an ssh password login and typed commands.

``libcrypt.so.1:crypt`` in dropbear sees the password the client typed (checked against the image's
root password) and the hash from the guest's own ``/etc/shadow``; ``bash:readline``'s return value is
each command line typed into an interactive shell over ssh. Both processes start after the probes
are armed (dropbear re-executes itself per connection), so the mmap hook that arms new address
spaces is exercised too. The ELF reader is checked against binutils' ``readelf`` on the guest's files.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from aradia.cache import cache_dir
from aradia.errors import GuestDataCorrupt
from aradia.lab.launcher import Guest
from aradia.linux.elfsyms import DynamicSymbols
from aradia.trace.tracer import Tracer
from cli_runner import cli_argv
from guest_programs import install_cli_programs
from guest_workload import ssh_typed
from tracing import trace_while
from waiting import wait_until

GUEST_SERIES = "6.1"
GUEST_OPTIONS = {"smp": 2}


@pytest.mark.timeout(300)
def test_crypt_sees_the_password_of_an_ssh_login(guest: Guest) -> None:
    shadow = guest.ssh("cat /etc/shadow")
    root_hash = next(line.split(":")[1] for line in shadow.splitlines() if line.startswith("root:"))

    def arm(tracer: Tracer) -> None:
        tracer.add_uprobe("libcrypt.so.1:crypt", process="dropbear")
        tracer.add_uprobe("libc.so.6:getpwnam", process="dropbear")

    events, out = trace_while(guest, arm, lambda: guest.ssh("echo session=$PPID", password=True))
    session = int(str(out).split("session=")[1].split()[0])  # dropbear's process for this login
    crypts = [e for e in events if e.name == "libcrypt.so.1:crypt"]
    assert len(crypts) == 1, [e.line() for e in events]
    ev = crypts[0]
    assert ev.kind == "uprobe" and ev.comm == "dropbear" and ev.tgid == session
    assert ev.args == {"phrase": guest.image.root_password, "setting": root_hash}
    users = [e.args["name"] for e in events if e.name == "libc.so.6:getpwnam" and e.tgid == session
             and e.time < ev.time]
    assert users and set(users) == {"root"}, [e.line() for e in events]


@pytest.mark.timeout(300)
def test_readline_return_is_each_typed_command_line(guest: Guest) -> None:
    commands = ["echo typed-$((6*7))", "uname -r", "echo shell=$$"]

    def arm(tracer: Tracer) -> None:
        tracer.add_uprobe("bash:readline", ret=True)

    events, out = trace_while(guest, arm, lambda: ssh_typed(guest, commands))
    text = str(out)
    assert "typed-42" in text, text
    shell = int(text.split("shell=")[-1].split()[0])  # the interactive bash, as it reports itself
    lines = [e.args["ret"] for e in events if e.kind == "uretprobe" and e.tgid == shell]
    assert lines == [*commands, "exit"], [e.line() for e in events]
    assert all(e.comm == "bash" for e in events if e.tgid == shell)


# --- the ELF reader ---------------------------------------------------------------------------------
def _guest_files() -> list[Path]:
    root = next((cache_dir("userland")).glob("*/root"), None)
    if root is None:
        pytest.fail("no guest userland in the cache (the guest fixture builds it)")
    return [root / "bin/bash", *sorted((root / "lib/x86_64-linux-gnu").glob("lib*.so*"))]


@pytest.mark.timeout(120)
def test_dynamic_symbols_match_readelf(guest: Guest) -> None:
    if shutil.which("readelf") is None:
        pytest.fail("readelf (binutils) is missing: scripts/dev.sh installs gcc, which brings it")
    checked = 0
    for path in _guest_files():
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        syms = DynamicSymbols(lambda off, n, data=data: data[off:off + n])
        out = subprocess.run(["readelf", "--dyn-syms", "-W", str(path)], capture_output=True, text=True,
                             check=True).stdout
        want = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 8 and parts[0].rstrip(":").isdigit() and parts[6] != "UND":
                name, hidden = parts[7].split("@")[0], "@" in parts[7] and "@@" not in parts[7]
                if not hidden:  # the default version of each name
                    want[name] = int(parts[1], 16)
        got = {s.name: s.value for s in syms.symbols() if s.defined and not s.hidden}
        assert {k: got.get(k) for k in want} == want, path
        for name, value in list(want.items())[:: max(1, len(want) // 50)]:  # hash-table lookups
            sym = syms.lookup(name)
            assert sym is not None and sym.value == value, (path, name)
        assert syms.lookup("aradia_no_such_symbol") is None
        checked += 1
    assert checked >= 5


@pytest.mark.timeout(60)
def test_corrupt_elf_is_an_error_not_a_hang() -> None:
    path = _guest_files()[0]
    data = bytearray(path.read_bytes())
    with pytest.raises(GuestDataCorrupt):
        DynamicSymbols(lambda off, n: bytes(data[:4]) + b"\0" * 60 if off == 0 else b"")
    bad = bytearray(data)
    bad[56:58] = (0xFFFF).to_bytes(2, "little")  # e_phnum absurd
    with pytest.raises(GuestDataCorrupt):
        DynamicSymbols(lambda off, n: bytes(bad[off:off + n]))
    # a SysV hash chain that cycles (1 -> 2 -> 1): a lookup must stop with an error, not loop
    elf = _tiny_elf(chain=[0, 2, 1])
    syms = DynamicSymbols(lambda off, n: elf[off:off + n])
    with pytest.raises(GuestDataCorrupt):
        syms.lookup("not-there")
    fine = _tiny_elf(chain=[0, 2, 0])
    good = DynamicSymbols(lambda off, n: fine[off:off + n])
    assert good.lookup("b") is not None and good.lookup("b").value == 0x1234  # type: ignore[union-attr]


def _tiny_elf(chain: list[int]) -> bytes:
    """A minimal ELF64 with two dynamic symbols (``a``, ``b``) found through a SysV hash table."""
    import struct

    strtab = b"\0a\0b\0"
    syms = bytes(24) + struct.pack("<IBBHQQ", 1, 0x12, 0, 1, 0x1000, 8) + struct.pack("<IBBHQQ", 3, 0x12, 0, 1,
                                                                                     0x1234, 8)
    hashtab = struct.pack("<II", 1, len(chain)) + struct.pack("<I", 1) + struct.pack(f"<{len(chain)}I", *chain)
    base = 64 + 2 * 56
    off_str, off_sym = base, base + 8
    off_hash = off_sym + len(syms)
    off_dyn = off_hash + len(hashtab)
    dyn = b"".join(struct.pack("<qQ", t, v) for t, v in ((4, off_hash), (5, off_str), (6, off_sym), (10, len(strtab)),
                                                         (11, 24), (0, 0)))
    size = off_dyn + len(dyn)
    ehdr = b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 64, 0, 0, 64, 56, 2,
                                                              64, 0, 0)
    phdrs = (struct.pack("<IIQQQQQQ", 1, 5, 0, 0, 0, size, size, 0x1000)
             + struct.pack("<IIQQQQQQ", 2, 6, off_dyn, off_dyn, off_dyn, len(dyn), len(dyn), 8))
    return ehdr + phdrs + strtab.ljust(8, b"\0") + syms + hashtab + dyn


@pytest.mark.timeout(180)
def test_cli_uprobe_json_until_ctrl_c(guest: Guest) -> None:
    proc = subprocess.Popen(cli_argv("trace", "--vm", f"qmp:{guest.qmp_path}", "--json",
                                     "uprobe", "--process", "dropbear", "libcrypt.so.1:crypt"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stderr is not None
        ready = proc.stderr.readline()  # printed once the probe is armed
        assert ready.startswith("tracing uprobe"), ready + proc.stderr.read()
        out = guest.ssh("echo cli-login-ok", password=True)
        assert "cli-login-ok" in out
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr
    lines = [json.loads(x) for x in stdout.splitlines()]
    assert [(x["kind"], x["comm"], x["args"]["phrase"]) for x in lines] == [
        ("uprobe", "dropbear", guest.image.root_password)], (lines, stderr)
    assert guest.run("echo still-running").strip() == "still-running"


# --- a library that is mapped but cannot be read ----------------------------------------------------
FAKE_LIB = "/tmp/libfake.so.1"
CRYPT_LIB = "/lib/x86_64-linux-gnu/libcrypt.so.1"


def _start_mapfile(guest: Guest) -> int:
    """Start ``multi mapfile`` on the fake and the real library in the guest; its pid once it mapped both."""
    guest.run(f"printf 'not an ELF file\\n' > {FAKE_LIB} && rm -f /tmp/mapfile.out")
    guest.run(f"/tmp/multi mapfile {FAKE_LIB} {CRYPT_LIB} > /tmp/mapfile.out 2>&1 &")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        out = guest.run("cat /tmp/mapfile.out")
        if out.startswith("ready "):
            return int(out.split()[1])
        time.sleep(0.2)
    raise AssertionError(f"mapfile did not start: {out!r}")


@pytest.fixture(scope="module")
def with_multi(guest: Guest, tmp_path_factory: pytest.TempPathFactory) -> Guest:
    """The module's guest with the multi-call test program as ``/tmp/multi``."""
    install_cli_programs(guest, tmp_path_factory.mktemp("programs"))
    return guest


@pytest.mark.timeout(180)
def test_unreadable_library_is_reported_not_silently_skipped(with_multi: Guest) -> None:
    """A process maps a file named like the probed library that has no symbols (not an ELF file)
    and the real libcrypt: the tracer arms crypt there and says, once, why it armed nothing in the
    fake one."""
    guest = with_multi
    seen: dict[str, object] = {}

    def arm(tracer: Tracer) -> None:
        seen["tracer"] = tracer
        seen["fake"] = tracer.add_uprobe("libfake.so.1:foo")
        seen["crypt"] = tracer.add_uprobe("libcrypt.so.1:crypt", process="multi")

    def act() -> None:
        pid = _start_mapfile(guest)
        tracer = seen["tracer"]
        assert isinstance(tracer, Tracer)
        seen["pid"], seen["warnings"] = pid, list(tracer.warnings)
        seen["armed"] = {a: set(mms) for a, mms in seen["crypt"].addresses.items()}  # type: ignore[attr-defined]
        seen["fake_armed"] = dict(seen["fake"].addresses)  # type: ignore[attr-defined]

    try:
        trace_while(guest, arm, act)
    finally:
        guest.run("pkill -f 'multi mapfile'", check=False)
    assert seen["fake_armed"] == {}
    assert len(seen["armed"]) == 1, seen["armed"]  # type: ignore[arg-type]
    warnings = seen["warnings"]
    assert isinstance(warnings, list) and len(warnings) == 1, warnings
    assert warnings[0].startswith(f"{FAKE_LIB}: symbols unreadable, user-space probes on it not armed there: "
                                  "no dynamic symbols"), warnings


@pytest.mark.timeout(180)
def test_cli_warns_of_an_unreadable_library(with_multi: Guest) -> None:
    guest = with_multi
    proc = subprocess.Popen(cli_argv("trace", "--vm", f"qmp:{guest.qmp_path}", "uprobe",
                                     "libfake.so.1:foo", "libcrypt.so.1:crypt"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        ready = proc.stderr.readline()
        assert ready.startswith("tracing uprobe"), ready + proc.stderr.read()
        reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)  # type: ignore[arg-type]
        reader.start()
        _start_mapfile(guest)
        # printed within a quarter second of the mapping; 30 s leaves room for a loaded host
        wait_until(lambda: lines, 30, "a warning from aradia trace", step=0.1)
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        reader.join(10)
    finally:
        proc.kill()
        guest.run("pkill -f 'multi mapfile'", check=False)
    assert lines[0].startswith(f"aradia: warning: {FAKE_LIB}: symbols unreadable"), lines
    assert proc.returncode == 0 and len(lines) == 1, lines
