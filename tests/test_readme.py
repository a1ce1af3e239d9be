"""Every command line of README.md, run as written (placeholders filled in) against a real guest.

The command lines are read from README.md's ```sh blocks. :data:`COMMANDS` maps each one to the
substitutions of its placeholders (``qmp:/run/vm1/qmp.sock`` -> the test guest's QMP socket, ``PID``
-> a process the test started, ...) and to its check, which runs the filled-in line with bash (an
``aradia`` of this source tree first on ``PATH``) and compares the output with ground truth taken
inside the guest. A README line without an entry, or an entry whose line left the README, fails
:func:`test_every_readme_command_has_a_test`; each line is its own test case.

(Longer than this project's ~500 lines per file on purpose: one check per README line, next to the
table that names them, so a README change and its test are read together.)
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import secrets
import shlex
import string
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from elftools.elf.elffile import ELFFile

from aradia.cli import build_parser
from aradia.lab.launcher import Guest
from aradia.service.config import parse_config
from cli_checks import (
    check_dmesg,
    check_files,
    check_lsmod,
    check_maps,
    check_mounts,
    check_net,
    check_ps,
)
from cli_runner import Cli, event_lines, run_cli
from guard_setup import attempt, set_scene, write_policy
from guest_truth import proc_details, sample_stat
from guest_workload import (
    ACTORS,
    Ticker,
    Workload,
    actor_events,
    release_actors,
    release_opener,
    ssh_typed,
    start_actors,
    start_opener,
)
from honeypot_setup import Login
from honeypot_setup import login as hp_login
from honeypot_setup import run as hp_run

README = Path(__file__).resolve().parent.parent / "README.md"
GUEST_SERIES = "6.1"
GUEST_OPTIONS = {"smp": 2, "gdb": True, "shared_memory": True}
MiB = 1 << 20


def readme_commands() -> list[str]:
    """The command lines of README.md's ```sh blocks, without their comments."""
    out, lang = [], None
    for raw in README.read_text().splitlines():
        if raw.startswith("```"):
            lang = raw[3:].strip() if lang is None else None
        elif lang == "sh" and raw.strip():
            out.append(re.sub(r"\s+#.*$", "", raw).strip())
    return out


class Env:
    """The module's guest with the workload, the command runner and the values placeholders take."""

    def __init__(self, guest: Guest, tmp: Path) -> None:
        self.guest = guest
        self.tmp = tmp
        self.cli = Cli(tmp)
        self.work = Workload.start(guest, tmp)
        self.values: dict[str, Any] = {"qmp": guest.qmp_path}
        self._dumps: dict[str, Any] | None = None

    def fill(self, line: str, subs: dict[str, str], **values: Any) -> str:
        """``line`` with each placeholder in ``subs`` replaced (each must be in the line)."""
        return fill(line, subs, {**self.values, **values})

    def dumps(self) -> dict[str, Any]:
        """Run the README's two ``dump`` lines once (with the ticker watching the guest's clock):
        line -> (result, lag growth in seconds). ``info`` and ``read`` of the dumps use them."""
        if self._dumps is None:
            self._dumps = {}
            ticker = Ticker(self.guest, seconds=600)
            try:
                for line in (DUMP_ELF, DUMP_LIME):
                    cmd = self.fill(line, COMMANDS[line].variants[0])
                    result, _, growth = ticker.watch(lambda cmd=cmd: self.cli.run(cmd))
                    self._dumps[line] = (result, growth)
            finally:
                ticker.close()
        return self._dumps


PLACEHOLDER = re.compile(r"[\[\]]|\b(?:SPEC|PATH|PID|NAME)\b|\s[NU](?:\s|$)|/run/vm1|0x7ffd12345678|\b1234\b")


def fill(line: str, subs: dict[str, str], values: dict[str, Any]) -> str:
    out = skeleton = line
    for key, template in subs.items():
        assert key in out, f"{key!r} is not in the README line {line!r}: README and test table differ"
        out = out.replace(key, string.Formatter().vformat(template, (), values))
        skeleton = skeleton.replace(key, "<filled>")
    # only what the README wrote may be a placeholder: a value filled in may be anything (a guest pid
    # that happens to be 1234 once failed this check)
    assert not PLACEHOLDER.search(skeleton), f"a placeholder is left in {out!r}"
    return out


@pytest.fixture(scope="module")
def env(guest: Guest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(guest, tmp_path_factory.mktemp("readme"))
    yield e
    e.work.stop()


# --- the checks, one per README line ---------------------------------------------------------------
def info_live(env: Env, line: str, subs: dict[str, str]) -> None:
    out = env.cli.ok(env.fill(line, subs)).splitlines()
    g = env.guest
    assert f"kernel     {g.run('cat /proc/version').strip()}" in out, out
    assert "state      running" in out
    assert any(x.startswith(f"QEMU       pid {g.pid}, version ") for x in out), out
    assert f"memory     shared-file, {g.memory_size // MiB} MiB" in out, out
    sizes = [float(x.split()[-2]) for x in out if x.startswith("  RAM ")]
    assert sum(sizes) == g.memory_size / MiB
    assert len([x for x in out if x.startswith("vCPU ")]) == int(g.run("nproc").strip()) == 2


def info_dump(env: Env, line: str, subs: dict[str, str]) -> None:
    env.dumps()
    info = json.loads(env.cli.ok(env.fill(line, subs)))
    assert info["kernel"] == env.guest.run("cat /proc/version").strip()
    assert sum(r["size"] for r in info["ram"]) == env.guest.memory_size
    assert [c["index"] for c in info["vcpus"]] == [0, 1] and all(c["cr3"] for c in info["vcpus"])


def read_phys(env: Env, line: str, subs: dict[str, str]) -> None:
    hold = env.work.hold
    i = len(hold.pages) // 2
    out = env.cli.ok(env.fill(line, subs, paddr=hex(hold.pages[i] + 0x40)))
    data = b""
    for n, row in enumerate(out.splitlines()):
        addr, hexpart = row[:16], row[18:18 + 48]
        assert int(addr, 16) == hold.pages[i] + 0x40 + 16 * n, row
        data += bytes.fromhex(hexpart.replace("  ", " "))
    assert data == hold.expected(i * 4096 + 0x40, 64)


def kcore_page(guest: Guest, vaddr: int) -> bytes:
    """4 KiB at kernel virtual ``vaddr`` as the guest reads it from /proc/kcore."""
    head = bytes.fromhex(guest.run("dd if=/proc/kcore bs=4096 count=4 2>/dev/null | od -An -v -tx1 | tr -d ' \\n'"))
    phnum, phoff = struct.unpack_from("<H", head, 56)[0], struct.unpack_from("<Q", head, 32)[0]
    for i in range(phnum):
        p_type, _, p_offset, p_vaddr, _, p_filesz = struct.unpack_from("<IIQQQQ", head, phoff + 56 * i)
        if p_type == 1 and p_vaddr <= vaddr < p_vaddr + p_filesz:
            off = p_offset + vaddr - p_vaddr
            page, inner = divmod(off, 4096)
            data = bytes.fromhex(guest.run(f"dd if=/proc/kcore bs=4096 skip={page} count=2 2>/dev/null"
                                           " | od -An -v -tx1 | tr -d ' \\n'"))
            return data[inner:inner + 4096]
    raise AssertionError(f"{vaddr:#x} is in no PT_LOAD of /proc/kcore")


def read_virt_lime(env: Env, line: str, subs: dict[str, str]) -> None:
    env.dumps()
    g = env.guest
    syms = dict(reversed(x.split(" ", 2)[::2]) for x in g.run("grep -wE '_text|init_top_pgt' /proc/kallsyms").splitlines())
    text, pgt = int(syms["_text"], 16), int(syms["init_top_pgt"], 16)
    code_phys = int(g.run("grep 'Kernel code' /proc/iomem").split("-")[0], 16)
    cr3 = code_phys + (pgt - text)  # the kernel's own page-table root, from the guest's iomem and kallsyms
    (env.tmp / "page.bin").unlink(missing_ok=True)
    env.cli.ok(env.fill(line, subs, text=hex(text), cr3=hex(cr3)))
    page = (env.tmp / "page.bin").read_bytes()
    assert len(page) == 4096 and page == kcore_page(g, text)


DUMP_ELF = "aradia dump --vm qmp:/run/vm1/qmp.sock -o mem.elf"
DUMP_LIME = "aradia dump --vm qmp:/run/vm1/qmp.sock -o mem.lime --format lime --no-pause"
WROTE = re.compile(r"^wrote (\S+): (\w+), ([\d.]+) MiB in ([\d.]+)s( \(guest paused meanwhile\))?$")


def _memhold_pages_in(env: Env, read: Callable[[int], bytes]) -> None:
    hold = env.work.hold
    for i, paddr in enumerate(hold.pages):
        assert read(paddr) == hold.expected(i * 4096, 4096), hex(paddr)


def dump_elf(env: Env, line: str, subs: dict[str, str]) -> None:
    result, growth = env.dumps()[line]
    assert result.returncode == 0, result.stderr
    m = WROTE.match(result.stdout.strip())
    assert m and m[1] == "mem.elf" and m[2] == "elf" and m[5], result.stdout
    # paused meanwhile: the guest's clock fell behind the host's by about the time the dump took
    assert growth >= 0.5 * float(m[4]) and growth > 0.02, (growth, m[4])
    release = env.guest.run("uname -r").strip()
    with open(env.tmp / "mem.elf", "rb") as f:
        elf = ELFFile(f)
        assert elf["e_type"] == "ET_CORE"
        notes = [n for seg in elf.iter_segments() if seg["p_type"] == "PT_NOTE" for n in seg.iter_notes()]
        vmci = [n for n in notes if n["n_name"] == "VMCOREINFO"]
        assert len(vmci) == 1 and f"OSRELEASE={release}\n" in _note_text(vmci[0])
        loads = [(s["p_paddr"], s["p_filesz"], s["p_offset"]) for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        assert sum(size for _, size, _ in loads) == env.guest.memory_size

        def read(paddr: int) -> bytes:
            start, _, off = next(x for x in loads if x[0] <= paddr < x[0] + x[1])
            f.seek(off + paddr - start)
            return f.read(4096)

        _memhold_pages_in(env, read)


def _note_text(note: Any) -> str:
    desc = note["n_desc"]
    return desc if isinstance(desc, str) else bytes(desc).decode(errors="replace")


def dump_lime(env: Env, line: str, subs: dict[str, str]) -> None:
    result, growth = env.dumps()[line]
    assert result.returncode == 0, result.stderr
    m = WROTE.match(result.stdout.strip())
    assert m and m[1] == "mem.lime" and m[2] == "lime" and not m[5], result.stdout
    assert growth < 0.02, f"the guest was paused for {growth:.3f}s although --no-pause"
    data = (env.tmp / "mem.lime").read_bytes()
    ranges, off = [], 0
    while off < len(data):  # LiME: 32-byte header (magic, version, start, end inclusive), then the bytes
        magic, version, start, end, _ = struct.unpack_from("<IIQQQ", data, off)
        assert (magic, version) == (0x4C694D45, 1), off
        ranges.append((start, end + 1, off + 32))
        off += 32 + end + 1 - start
    assert off == len(data) and sum(e - s for s, e, _ in ranges) == env.guest.memory_size

    def read(paddr: int) -> bytes:
        start, _, at = next(r for r in ranges if r[0] <= paddr < r[1])
        return data[at + paddr - start:at + paddr - start + 4096]

    _memhold_pages_in(env, read)


def demo(env: Env, line: str, subs: dict[str, str]) -> None:
    out = env.cli.ok(env.fill(line, subs), timeout=900)
    text = out.splitlines()
    arch = "arm64" if "--arch arm64" in line else "x86_64"
    assert "test guest (cached after the first run)" in text[1] and f" {arch} " in text[1], out
    assert any(x.startswith("  vCPU 0: " + ("PC" if arch == "arm64" else "RIP")) for x in text), out
    assert sum("matches the guest's /proc/version" in x for x in text) == 2, out
    assert "DIFFERS" not in out and "  banner in the dump matches" in text
    assert any("(nothing left armed)" in x for x in text) and text[-1] == "guest stopped; nothing was left running"
    assert "  the ssh client saw: logged-in-as-root" in text
    password = env.guest.image.root_password
    assert any("uprobe libcrypt.so.1:crypt(" in x and f"phrase={password!r}" in x for x in text), out


def ps(env: Env, line: str, subs: dict[str, str]) -> None:
    cmd = env.fill(line, subs)
    truth, out = sample_stat(env.guest, lambda: env.cli.ok(cmd), threads="--threads" in cmd)
    rows = check_ps(out, truth, proc_details(env.guest, truth.stable))
    tids = {int(x) for x in env.guest.run(f"ls /proc/{env.work.threads}/task").split()}
    assert len(tids) == 4
    if "--threads" in cmd:
        assert tids <= rows.keys()
    else:
        assert rows.keys() & tids == {env.work.threads}
    assert rows[env.work.worker]["COMM"] == "aradia-w1"
    assert rows[env.work.worker]["CMDLINE"].endswith(" w1 alpha")
    assert rows[11]["COMM"] == "rcu_tasks_kthread"  # longer than task->comm: /proc shows it all


def lsmod(env: Env, line: str, subs: dict[str, str]) -> None:
    check_lsmod(env.cli.ok(env.fill(line, subs)), env.guest)


def maps(env: Env, line: str, subs: dict[str, str]) -> None:
    check_maps(env.cli.ok(env.fill(line, subs, pid=env.work.worker)), env.guest, env.work.worker)


def files(env: Env, line: str, subs: dict[str, str]) -> None:
    got = check_files(env.cli.ok(env.fill(line, subs, pid=env.work.worker)), env.guest, env.work.worker)
    assert got[5] == ("/etc/passwd", 0o100000, 7) and got[6][0] == "/tmp/aradia-out.txt" and got[6][1] & 0o2000


def net(env: Env, line: str, subs: dict[str, str]) -> None:
    check_net(env.cli.ok(env.fill(line, subs)), env.guest, env.work.listener)


def mounts(env: Env, line: str, subs: dict[str, str]) -> None:
    check_mounts(env.cli.ok(env.fill(line, subs)), env.guest)


def dmesg(env: Env, line: str, subs: dict[str, str]) -> None:
    check_dmesg(env.cli.ok(env.fill(line, subs)), env.guest)


SHELL_SCRIPT = """\
print("release", prog["init_uts_ns"].name.release.string_().decode())
print("pids", *sorted(t.pid.value_() for t in for_each_task(prog)))
print("ram", sum(r.size for r in vm.memory.ranges()))
"""


def shell(env: Env, line: str, subs: dict[str, str]) -> None:
    cmd = env.fill(line, subs)
    truth, out = sample_stat(env.guest, lambda: env.cli.ok(cmd, stdin=SHELL_SCRIPT))
    lines = [re.sub(r"^(?:(?:>>>|\.\.\.) )+", "", x).split() for x in out.splitlines()]  # after the prompts
    got = {x[0]: x[1:] for x in lines if x}
    assert got["release"] == [env.guest.run("uname -r").strip()]
    assert truth.stable <= {int(p) for p in got["pids"]}
    assert got["ram"] == [str(env.guest.memory_size)]


# --- trace -------------------------------------------------------------------------------------------
def trace_syscalls(env: Env, line: str, subs: dict[str, str]) -> None:
    pids = start_actors(env.guest, ACTORS)
    cmd = env.fill(line, subs, pid=pids["a"], comm="aradia-act", uid=4321)
    result, _ = env.cli.live(cmd, lambda: release_actors(env.guest, pids))
    assert result.returncode == 0, result.stderr
    ports = {name: 7100 + i for i, name in enumerate(ACTORS)}
    if "--json" in cmd:  # all three filters: only actor a (b: other uid, decoy: other comm, d: other pid)
        events = [json.loads(x) for x in result.stdout.splitlines()]
        got = [(e["name"], {k: e["args"][k] for k in want}) for e, (_, want) in
               zip(events, actor_events("a", ports["a"]), strict=False)]
        assert got == actor_events("a", ports["a"]) and len(events) == 3, events
        assert {(e["kind"], e["pid"], e["tgid"], e["uid"], e["comm"]) for e in events} == {
            ("syscall", pids["a"], pids["a"], 4321, "aradia-act")}
    else:  # no filter: every actor's three calls, with its pid, uid and comm
        lines = event_lines(result.stdout)
        for name, uid in ACTORS.items():
            mine = [x for x in lines if x.tgid == pids[name]]
            comm = "aradia-decoy" if name.startswith("decoy") else "aradia-act"
            assert [(x.name, x.uid, x.comm, x.pid) for x in mine] == [(n, uid, comm, pids[name]) for n, _ in
                                                                       actor_events(name, ports[name])], mine
            assert f"path='/tmp/aradia-open-{name}'" in mine[0].args and f"'port': {ports[name]}" in mine[1].args
            assert f"argv=['/bin/true', '{name}']" in mine[2].args


def _args(text: str) -> dict[str, Any]:
    """An event line's ``k=v, ...`` (values are Python literals)."""
    call = ast.parse(f"f({text})", mode="eval").body
    assert isinstance(call, ast.Call)
    return {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg}


OPEN_PATHS = ["/etc/hostname", "/etc/passwd", "/nonexistent-aradia"]


def probe(env: Env, line: str, subs: dict[str, str]) -> None:
    pid, out = start_opener(env.guest, f"probe-{len(subs)}", OPEN_PATHS)
    result, calls = env.cli.live(env.fill(line, subs), lambda: release_opener(env.guest, pid, out))
    assert result.returncode == 0, result.stderr
    assert [c[0] for c in calls] == OPEN_PATHS and int(calls[2][3]) == -2, calls
    mine = [x for x in event_lines(result.stdout) if x.tgid == pid]
    if "--ret" in subs.get(" [--ret]", ""):
        assert [x.kind for x in mine] == ["kretprobe"] * 3, mine
        assert [_args(x.args)["ret"] for x in mine] == [int(c[3]) & (1 << 64) - 1 for c in calls]
    else:
        assert [x.kind for x in mine] == ["kprobe"] * 3, mine
        # dfd (an int: the upper half of rdi is not part of it) AT_FDCWD, and the path's address
        assert [(_args(x.args)["rdi"] & 0xFFFFFFFF, _args(x.args)["rsi"]) for x in mine] == [
            (-100 & 0xFFFFFFFF, int(c[2], 16)) for c in calls]
    assert all(x.name == "do_sys_openat2" and x.comm == "opener" for x in mine)


def uprobe_crypt(env: Env, line: str, subs: dict[str, str]) -> None:
    g = env.guest
    root_hash = next(x.split(":")[1] for x in g.ssh("cat /etc/shadow").splitlines() if x.startswith("root:"))
    result, out = env.cli.live(env.fill(line, subs), lambda: g.ssh("echo session=$PPID", password=True))
    assert result.returncode == 0, result.stderr
    session = int(out.split("session=")[1].split()[0])
    lines = event_lines(result.stdout)
    assert [(x.kind, x.name, x.comm, x.tgid) for x in lines] == [("uprobe", "libcrypt.so.1:crypt", "dropbear", session)]
    assert _args(lines[0].args) == {"phrase": g.image.root_password, "setting": root_hash}


TYPED = ["echo typed-$((6*7))", "uname -r", "echo shell=$$"]


def uprobe_readline(env: Env, line: str, subs: dict[str, str]) -> None:
    result, out = env.cli.live(env.fill(line, subs), lambda: ssh_typed(env.guest, TYPED))
    assert result.returncode == 0, result.stderr
    assert "typed-42" in out, out
    shell_pid = int(out.split("shell=")[-1].split()[0])
    mine = [x for x in event_lines(result.stdout) if x.tgid == shell_pid]
    assert [(x.kind, x.name, x.comm) for x in mine] == [("uretprobe", "bash:readline", "bash")] * (len(TYPED) + 1)
    assert [_args(x.args)["ret"] for x in mine] == [*TYPED, "exit"]


def procs(env: Env, line: str, subs: dict[str, str]) -> None:
    script = "; ".join(f"/bin/sh -c 'echo child=$$ code={code}; exit {code}' arg-{code}" for code in (0, 3, 7))
    result, text = env.cli.live(env.fill(line, subs), lambda: env.guest.run(script, check=False))
    assert result.returncode == 0, result.stderr
    children = {int(p): int(c) for p, c in re.findall(r"child=(\d+) code=(\d+)", text)}
    assert len(children) == 3, text
    lines = [(x, _args(x.args)) for x in event_lines(result.stdout)]
    for pid, code in children.items():
        mine = [(x.kind, a) for x, a in lines if a.get("pid") == pid]
        assert [k for k, _ in mine] == ["fork", "exec", "exit"], mine
        assert mine[1][1]["argv"] == ["/bin/sh", "-c", f"echo child=$$ code={code}; exit {code}", f"arg-{code}"]
        assert mine[2][1]["status"] == code and mine[2][1]["signal"] == 0


def watch(env: Env, line: str, subs: dict[str, str]) -> None:
    hold = env.work.hold
    offset = 8192 + 40
    value = bytes(range(0xA0, 0xA8))
    before = hold.dump(offset, 8)
    cmd = env.fill(line, subs, addr=hex(hold.vaddr + offset), pid=hold.pid)
    result, _ = env.cli.live(cmd, lambda: hold.poke(offset, value))
    assert result.returncode == 0, result.stderr
    lines = event_lines(result.stdout)
    # memhold writes byte by byte: after the k-th store the range holds k new bytes and the old rest
    assert [_args(x.args)["value"] for x in lines] == [value[:k + 1] + before[k + 1:] for k in range(8)], lines
    assert {(x.kind, x.tgid, _args(x.args)["address"]) for x in lines} == {("watch", hold.pid, hold.vaddr + offset)}
    assert hold.dump(offset, 8) == value


def count(env: Env, line: str, subs: dict[str, str]) -> None:
    g = env.guest
    mark = len(g.console_text())

    def act() -> None:
        g.send_console(b"/tmp/loop 120; dd if=/dev/zero of=/dev/null bs=1 count=300 2>/dev/null;"
                       b" echo count-$((40+2))\n")
        deadline = time.monotonic() + 60
        while not re.search(r"count-42\r?\n", g.console_text()[mark:]) and time.monotonic() < deadline:
            time.sleep(0.1)

    result, _ = env.cli.live(env.fill(line, subs), act, ready="counting", interrupt=False)
    assert result.returncode == 0, result.stderr
    console = g.console_text()[mark:]
    assert "calls 120 " in console and re.search(r"count-42\r?\n", console), console[-2000:]
    assert "via gdb (every call stops the VM)" in result.stderr.splitlines()[0]
    counts = {f[1]: int(f[0]) for f in (x.split() for x in result.stdout.splitlines())}
    assert counts.keys() == {"__x64_sys_getppid", "vfs_read"}
    # exact: nothing else in this guest calls getppid (the console's shell does not; a new bash would)
    assert counts["__x64_sys_getppid"] == 120, counts
    # dd's 300 one-byte reads, and whatever else reads meanwhile (the console's shell, the loader)
    assert counts["vfs_read"] >= 300, counts


def token_new(env: Env, line: str, subs: dict[str, str]) -> None:
    out = env.cli.ok(line)
    token = out.splitlines()[0].removeprefix("token: ")
    digest = hashlib.sha256(token.encode()).hexdigest()
    assert token.startswith("aradia_") and token not in out.split("\n", 1)[1]
    cfg = parse_config(out.split("\n", 1)[1] + '[store]\npath = "e.db"\n', base_dir="/tmp")
    assert [(t.name, t.token_sha256) for t in cfg.tenants] == [("alice", digest)]


def guard(env: Env, line: str, subs: dict[str, str]) -> None:
    """One protected write over ssh under the guard: blocked (or not, with --dry-run), one alert."""
    set_scene(env.guest)
    write_policy(env.tmp / "guard.toml", "block")
    result, (client, rc, out) = env.cli.live(env.fill(line, subs), lambda: attempt(env.guest, "echo x >> /srv/app/config"),
                                             ready="guarding")
    assert result.returncode == 0, result.stderr
    dry = "--dry-run" in line
    assert (rc, "Operation not permitted" in out) == ((0, False) if dry else (1, True)), (rc, out)
    ip, port = client.split()
    if "--json" in line:
        [rec] = [json.loads(x) for x in result.stdout.splitlines()]
        assert (rec["kind"], rec["name"], rec["args"]["action"]) == ("guard", "write", "blocked"), rec
        assert (rec["args"]["session"]["client"], rec["args"]["session"]["client_port"]) == (ip, int(port))
    else:
        [text] = result.stdout.splitlines()
        action = "WOULD-BLOCK" if dry else "BLOCKED"
        assert f"Z {action} write /srv/app/config (dev " in text, text
        assert f"session root (uid 0) from {ip}:{port} " in text, text
    content = env.guest.run("cat /srv/app/config")
    assert content == "listen=8080\nsecret=s3cr3t\n" + ("x\n" if dry else ""), content


HONEYPOT = "aradia honeypot --vm qmp:/run/vm1/qmp.sock --out hp"


def honeypot(env: Env, line: str, subs: dict[str, str]) -> tuple[Login, list[str]]:
    """One ssh login (a random password with --accept-any-password) running one command under the
    monitor; the login and the monitor's output lines."""
    forced = "--accept-any-password" in line
    pw = secrets.token_urlsafe(10) if forced else env.guest.image.root_password

    def act() -> tuple[Login, tuple[int, str]]:
        lg = hp_login(env.guest, [pw])
        done = hp_run(lg, "echo readme-$((40+2))") if lg.ok else (-1, "")
        lg.transport.close()
        return lg, done

    result, (lg, done) = env.cli.live(env.fill(line, subs), act, ready="honeypot on", settle=5)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert lg.ok and done == (0, "readme-42\n"), done
    lines = result.stdout.splitlines()
    if "--json" in line:
        recs = [json.loads(x) for x in lines]
        [start] = [r for r in recs if r["name"] == "session.start"]
        assert (start["args"]["client_port"], start["args"]["server_port"]) == (lg.port, 22), start
        [auth] = [r["args"] for r in recs if r["name"] == "auth"]
        assert (auth["user"], auth["password"], auth["accepted"], auth["forced"]) == ("root", pw, True, forced)
    else:
        assert any(x.endswith(f" connection from 10.0.2.2:{lg.port} to port 22 (dropbear)") for x in lines), lines
        assert any(x.endswith(f" password {pw!r} for root: accepted") for x in lines), lines
    return lg, lines


def honeypot_report(env: Env, line: str, subs: dict[str, str]) -> None:
    """The report of a run of the README's first honeypot line."""
    lg, _ = honeypot(env, HONEYPOT, QMP)
    out = env.cli.ok(line)
    blocks = [b for b in out.split("\n\n") if f"from 10.0.2.2:{lg.port} to port 22 (dropbear pid " in b]
    assert len(blocks) == 1, out
    assert f"password {env.guest.image.root_password!r} for root: accepted" in blocks[0], blocks[0]
    assert "-c 'echo readme-$((40+2))'" in blocks[0], blocks[0]


SERVICE = "run by tests/test_service.py with generated configs, a real nats-server and real guests"

# --- the table -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """How to run one README line: its check, and one placeholder substitution per run."""

    check: Callable[[Env, str, dict[str, str]], None] | None
    variants: tuple[dict[str, str], ...] = ({},)
    exempt: str = ""  # why the line is not run (then check is None)


QMP = {"qmp:/run/vm1/qmp.sock": "qmp:{qmp}"}
EXTRACT = ("run in their own forms by tests/test_extract_files.py (a guest with an ext4 disk: cached, evicted, "
           "unsynced, deleted files) and tests/test_extract_keys.py (a 768 MiB guest with a key program)")
SSH_DECRYPT = ("run in their own forms by tests/test_ssh_decrypt.py (dropbear and OpenSSH guests, the host's "
               "ssh client on one connection per cipher, its record compared byte for byte)")
SPEC = {"SPEC": "qmp:{qmp}"}
TRACE = {"qmp:PATH": "qmp:{qmp}"}

COMMANDS: dict[str, Case] = {
    "bash scripts/dev.sh demo": Case(None, exempt="set-up: installs packages with apt and builds the guests"),
    "bash scripts/dev.sh test": Case(None, exempt="the test command: it runs this suite"),
    "aradia info --vm qmp:/run/vm1/qmp.sock": Case(info_live, (QMP,)),
    "aradia info --vm mem.elf --json": Case(info_dump),
    "aradia read --vm qmp:/run/vm1/qmp.sock --phys 0x1000 --size 64": Case(read_phys, ({**QMP, "0x1000": "{paddr}"},)),
    "aradia read --vm mem.lime --virt 0xffffffff81000000 --cr3 0x260a000 --size 4096 --format raw > page.bin":
        Case(read_virt_lime, ({"0xffffffff81000000": "{text}", "0x260a000": "{cr3}"},)),
    DUMP_ELF: Case(dump_elf, (QMP,)),
    DUMP_LIME: Case(dump_lime, (QMP,)),
    "aradia demo": Case(demo),
    "aradia demo --arch arm64": Case(demo),
    "aradia ps     --vm SPEC [--threads]": Case(ps, ({**SPEC, " [--threads]": ""}, {**SPEC, "[--threads]": "--threads"})),
    "aradia lsmod  --vm SPEC": Case(lsmod, (SPEC,)),
    "aradia maps   --vm SPEC PID": Case(maps, ({**SPEC, "PID": "{pid}"},)),
    "aradia files  --vm SPEC PID": Case(files, ({**SPEC, "PID": "{pid}"},)),
    "aradia net    --vm SPEC": Case(net, (SPEC,)),
    "aradia mounts --vm SPEC": Case(mounts, (SPEC,)),
    "aradia dmesg  --vm SPEC": Case(dmesg, (SPEC,)),
    "aradia shell  --vm SPEC": Case(shell, (SPEC,)),
    "aradia trace --vm qmp:PATH syscalls -e execve,openat,connect [--pid N] [--comm NAME] [--uid U] [--json]":
        Case(trace_syscalls, ({**TRACE, "[--pid N]": "--pid {pid}", "[--comm NAME]": "--comm {comm}",
                               "[--uid U]": "--uid {uid}", "[--json]": "--json"},
                              {**TRACE, " [--pid N] [--comm NAME] [--uid U] [--json]": ""})),
    "aradia trace --vm qmp:PATH probe do_sys_openat2 [--ret]":
        Case(probe, ({**TRACE, " [--ret]": ""}, {**TRACE, " [--ret]": " --ret"})),
    "aradia trace --vm qmp:PATH uprobe --process dropbear libcrypt.so.1:crypt": Case(uprobe_crypt, (TRACE,)),
    "aradia trace --vm qmp:PATH uprobe bash:readline --ret": Case(uprobe_readline, (TRACE,)),
    "aradia trace --vm qmp:PATH procs": Case(procs, (TRACE,)),
    "aradia trace --vm qmp:PATH watch 0x7ffd12345678 8 --in-pid 1234":
        Case(watch, ({**TRACE, "0x7ffd12345678": "{addr}", "1234": "{pid}"},)),
    "aradia trace --vm qmp:PATH --duration 10 count __x64_sys_getppid vfs_read": Case(count, (TRACE,)),
    "aradia token new --tenant alice": Case(token_new),
    "aradia guard --vm qmp:/run/vm1/qmp.sock --policy guard.toml": Case(guard, (QMP,)),
    "aradia guard --vm qmp:/run/vm1/qmp.sock --policy guard.toml --json": Case(guard, (QMP,)),
    "aradia guard --vm qmp:/run/vm1/qmp.sock --policy guard.toml --dry-run": Case(guard, (QMP,)),
    HONEYPOT: Case(honeypot, (QMP,)),
    "aradia honeypot --vm qmp:/run/vm1/qmp.sock --out hp --accept-any-password root --json": Case(honeypot, (QMP,)),
    "aradia honeypot report hp": Case(honeypot_report),
    **{line: Case(None, (QMP,), exempt=EXTRACT) for line in (
        "aradia files ls  --vm qmp:/run/vm1/qmp.sock /mnt/data",
        "aradia files get --vm qmp:/run/vm1/qmp.sock /mnt/data/report.pdf -o report.pdf",
        "aradia files get --vm qmp:/run/vm1/qmp.sock --pid 4242 --fd 3 -o held.bin",
        "aradia files get --vm qmp:/run/vm1/qmp.sock --pid 4242 --exe -o dropper",
        "aradia files get --vm qmp:/run/vm1/qmp.sock --pid 4242 --all-mapped -o libs/",
        "aradia files get --vm qmp:/run/vm1/qmp.sock /mnt/data/x --source disk -o x.old",
        "aradia keys aes --vm qmp:/run/vm1/qmp.sock --pid 4242")},
    "aradia keys aes --vm mem.elf --json": Case(None, exempt=EXTRACT),
    **{line: Case(None, (QMP,), exempt=SSH_DECRYPT) for line in (
        "aradia capture start --vm qmp:/run/vm1/qmp.sock -o /var/tmp/vm1.pcap",
        "aradia keys ssh --vm qmp:/run/vm1/qmp.sock -o keys.json",
        "aradia capture stop --vm qmp:/run/vm1/qmp.sock")},
    "aradia decrypt ssh /var/tmp/vm1.pcap --keys keys.json": Case(None, exempt=SSH_DECRYPT),
    "aradia serve --config /etc/aradia/serve.toml": Case(None, exempt=SERVICE + " (the fleet fixture)"),
    'aradia guard --server https://hv1:8765 --token "$T" --vm web1 --policy guard.toml --keep': Case(
        None, exempt="run by tests/test_guard_service.py against a real service and guest"),
    'aradia guard --server https://hv1:8765 --token "$T" --vm web1 --policy guard.toml': Case(
        None, exempt="run by tests/test_guard_service.py against a real service and guest"),
    "aradia serve --config fleet.toml --aggregate": Case(None, exempt=SERVICE + " (the aggregate)"),
    'aradia ps --server https://hv1:8765 --token "$T" --vm web1': Case(None, exempt=SERVICE
                                                                      + " (test_cli_over_server)"),
    'aradia trace --server https://hv1:8765 --token "$T" --vm web1 syscalls -e execve':
        Case(None, exempt=SERVICE + " (test_cli_over_server)"),
}


@pytest.mark.timeout(30)
def test_every_readme_command_has_a_test() -> None:
    lines = readme_commands()
    assert len(lines) == len(set(lines)) and len(lines) > 20
    assert set(lines) == set(COMMANDS), {"README only": set(lines) - set(COMMANDS),
                                         "table only": set(COMMANDS) - set(lines)}
    for line, case in COMMANDS.items():
        assert (case.check is None) == bool(case.exempt), line


class _Any(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return "7"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("line", [x for x in readme_commands() if x.startswith("aradia ")])
def test_readme_command_parses(line: str) -> None:
    """Each filled-in line is accepted by the parser, options after ``trace ... WHAT`` included."""
    parser = build_parser()
    for subs in COMMANDS[line].variants:
        argv = shlex.split(fill(line, subs, _Any(qmp="/q.sock")).split(" > ")[0])[1:]
        args = parser.parse_args(argv)
        if args.command in ("demo", "token", "serve") or (args.command == "honeypot" and args.action):
            continue
        if args.command == "decrypt-ssh":  # a capture file, no VM
            assert (args.capture, args.keys) == ("/var/tmp/vm1.pcap", ["keys.json"])
            continue
        if "--server" in argv:
            assert (args.server, args.token, args.vm) == ("https://hv1:8765", "$T", "web1")
            continue
        assert args.vm in ("qmp:/q.sock", "mem.elf", "mem.lime")
        if "--json" in argv:
            assert args.json is True
        for opt, attr in (("--pid", "pid"), ("--uid", "uid")):
            if opt in argv:  # trace filters repeat (a list); files and keys take one process
                assert getattr(args, attr) in ([7], 7, 4242)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("line", [x for x in readme_commands() if not (x in COMMANDS and COMMANDS[x].exempt)])
def test_readme_command(line: str, env: Env) -> None:
    assert line in COMMANDS, f"no test for this README command line: add it to COMMANDS: {line}"
    case = COMMANDS[line]
    assert case.check is not None
    for subs in case.variants:
        case.check(env, line, subs)


@pytest.mark.timeout(120)
def test_trace_options_after_the_subcommand_mean_what_they_mean_before() -> None:
    parser = build_parser()
    common = ["--vm", "qmp:/q", "--duration", "3", "--json", "--pid", "5", "--comm", "sh", "--uid", "0"]
    before = vars(parser.parse_args(["trace", *common, "syscalls", "-e", "openat"]))
    after = vars(parser.parse_args(["trace", "syscalls", "-e", "openat", *common]))
    assert before == after and before["pid"] == [5] and before["json"] is True and before["duration"] == 3.0
    mixed = vars(parser.parse_args(["trace", "--vm", "qmp:/q", "--pid", "5", "count", "x", "--path", "gdb"]))
    assert mixed["pid"] == [5] and mixed["path"] == "gdb" and mixed["vm"] == "qmp:/q"  # not reset by WHAT
    with pytest.raises(SystemExit):
        parser.parse_args(["trace", "syscalls", "--bogus"])


@pytest.mark.timeout(120)
def test_missing_vm_and_misplaced_path_are_one_line_errors() -> None:
    for argv, needle in ((["trace", "syscalls"], "--vm SPEC is required"),
                         (["ps"], "--vm SPEC is required"),
                         (["trace", "--vm", "qmp:/nonexistent", "--path", "gdb", "procs"], "--path applies to")):
        r = run_cli(*argv, timeout=60)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert needle in r.stderr.strip().splitlines()[-1], r.stderr

