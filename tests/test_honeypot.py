"""The SSH honeypot monitor against a real guest and a scripted attacker (paramiko from the host
through the guest's forwarded port). Truth: the attacker's own record (its socket's port, the passwords
it tried, every byte its client received, the host's HTTP payload) and what the guest prints inside
the session ($SSH_CLIENT, $PPID, sha256sum) or on its console (file, process and module lists)."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest

from aradia.apps.honeypot.cast import read_cast
from aradia.lab import GuestError
from aradia.lab.images import build_guest
from aradia.lab.launcher import Guest, launch
from honeypot_setup import Login, Monitor, http_payload, interactive, login, login_keys, monitoring, run

#: each ssh daemon on its own guest: dropbear on 1 vCPU, Debian's OpenSSH sshd on 2
VARIANTS = {"dropbear-1cpu": ("dropbear", 1), "openssh-2cpu": ("openssh", 2)}
DAEMONS = ("dropbear", "sshd")
TRUTH_RE = re.compile(r"client=(\S+) (\d+) (\d+) daemon=(\d+) up=(\d+)")
#: the session's own view: its $SSH_CLIENT, its shell's parent and that one's parent
TRUTH_LINE = "echo client=$SSH_CLIENT daemon=$PPID up=$(cut -d' ' -f4 /proc/$PPID/stat)"


@pytest.fixture(scope="module", params=list(VARIANTS))
def guest(request: pytest.FixtureRequest) -> Iterator[Guest]:
    """The module's guest, once per variant (ssh daemon, vCPUs)."""
    variant, smp = VARIANTS[request.param]
    try:
        image = build_guest("6.1", variant=variant)
    except GuestError as exc:
        pytest.fail(f"building the 6.1 {variant} guest failed: {exc}", pytrace=False)
    g = launch(image, gdb=True, shared_memory=True, smp=smp)
    try:
        yield g
    finally:
        g.stop()


def programs(s: dict[str, Any]) -> list[tuple[list[str], str]]:
    """(argv, cwd) of every exec in a session but the daemon's own (OpenSSH re-executes itself)."""
    return [(c["argv"], c["cwd"]) for c in s["commands"] if c["comm"] not in DAEMONS]


def session_of(m: Monitor, lg: Login) -> dict[str, Any]:
    """The one session summary whose client port is the attacker socket's port."""
    found = [s for s in m.sessions().values() if s["client_port"] == lg.port]
    assert len(found) == 1, (lg.port, [(s["session"], s["client_port"]) for s in m.sessions().values()])
    return found[0]


def cast_text(m: Monitor, s: dict[str, Any], direction: str) -> str:
    """The text of one direction of a session's asciicast, timing removed."""
    assert s["cast"] is not None, s
    header, events = read_cast(m.out / s["cast"])
    assert header["version"] == 2 and (header["width"], header["height"]) == (80, 24), header
    return "".join(text for _t, d, text in events if d == direction)


@pytest.mark.timeout(900)
def test_passwords_commands_and_transcript(guest: Guest, tmp_path: Path) -> None:
    pw = guest.image.root_password
    typed = ["cd /tmp", "/bin/busybox echo one two", TRUTH_LINE, "ls -d /usr/bin"]
    with monitoring(guest, tmp_path / "out") as m:
        lg = login(guest, ["wrong-1", "wrong-2", "wrong-3", pw])
        authed = time.time()
        got = interactive(lg, typed)
        lg.transport.close()
        closed = time.time()
        lg2 = login(guest, [pw])
        rc, out = run(lg2, "cd /usr && ls -d bin && echo done")
        lg2.transport.close()
        m.wait_ended(2)
    stopped = time.time()
    assert lg.ok and lg2.ok and (rc, out) == (0, "bin\ndone\n"), (rc, out)
    text = got.decode()
    ip, port, server_port, parent, grandparent = TRUTH_RE.search(text).groups()  # type: ignore[union-attr]
    s = session_of(m, lg)
    # the connection: the attacker's socket port, the session's own $SSH_CLIENT and parent process
    assert (s["client"], s["client_port"], s["server_port"]) == (ip, int(port), int(server_port)) == \
        ("10.0.2.2", lg.port, 22), s
    # the shell's parent is the daemon's per-connection process, whose parent is the listening daemon
    assert s["daemon_pid"] == int(parent), (s, parent)
    assert guest.run(f"cat /proc/{grandparent}/comm") in ("dropbear\n", "sshd\n")
    assert lg.started <= s["start"] <= authed and closed <= s["end"] <= stopped, s
    # four attempts, exact passwords and outcomes
    assert [(a["user"], a["password"], a["accepted"], a["forced"]) for a in s["auth"]] == [
        ("root", "wrong-1", False, False), ("root", "wrong-2", False, False), ("root", "wrong-3", False, False),
        ("root", pw, True, False)], s["auth"]
    # commands: every exec with argv and cwd; the typed lines
    execs = programs(s)
    assert (["/bin/busybox", "echo", "one", "two"], "/tmp") in execs, execs
    assert (["ls", "-d", "/usr/bin"], "/tmp") in execs, execs
    assert (["cut", "-d ", "-f4", f"/proc/{parent}/stat"], "/tmp") in execs, execs
    assert execs[0] == (["-bash"], "/root"), execs
    assert [x["line"] for x in s["lines"]] == [*typed, "exit"], s["lines"]
    # the transcript: output exactly what the client received, input exactly what it typed
    assert cast_text(m, s, "o") == text
    assert cast_text(m, s, "i") == "".join(f"{x}\n" for x in [*typed, "exit"])
    # ssh host cmd: the shell's -c and the program it ran, with their cwd
    s2 = session_of(m, lg2)
    execs2 = programs(s2)
    assert execs2[0][0][-2:] == ["-c", "cd /usr && ls -d bin && echo done"], execs2
    assert (["ls", "-d", "bin"], "/usr") in execs2, execs2
    assert [(a["password"], a["accepted"]) for a in s2["auth"]] == [(pw, True)]
    assert s2["lines"] == [] and s2["cast"] is None, s2
    # the event log holds the same, as the service's records
    log = [r for r in m.records if r["args"]["session"] == s["session"]]
    assert [r["args"]["password"] for r in log if r["name"] == "auth"] == ["wrong-1", "wrong-2", "wrong-3", pw]
    assert all(r["kind"] == "honeypot" and r["schema"] == 1 for r in m.records)


SHELL_PID_RE = re.compile(r"shell=(\d+)\r\n")


@pytest.mark.guest
@pytest.mark.timeout(900)
def test_lines_typed_after_ssh_host_cmd(guest: Guest, tmp_path: Path) -> None:
    """``ssh host cmd`` first (the daemon runs ``bash -c cmd``, which exits), then interactive shells
    on the same connection: every line each shell reads is recorded once, in that session, from that
    shell. The first bash the monitor saw has exited by then (its VMAs freed and reused), so the
    readline probe of each later bash is resolved without it."""
    pw = guest.image.root_password
    typed = [[f"/bin/busybox echo typed-{n}-$((40+{n}))", "echo shell=$$", f"cd /tmp && ls -d /usr/bin{n}"]
             for n in (1, 2)]
    with monitoring(guest, tmp_path / "out") as m:
        first = login(guest, [pw])
        rc0, out0 = run(first, "cd /usr && ls -d bin && echo done-0")
        first.transport.close()
        lg = login(guest, [pw])
        rc1, out1 = run(lg, "cd /usr && ls -d bin && echo done-1")
        got1 = interactive(lg, typed[0])
        rc2, out2 = run(lg, "cd /usr && ls -d bin && echo done-2")
        got2 = interactive(lg, typed[1])
        lg.transport.close()
        m.wait_ended(2)
    assert [(rc0, out0), (rc1, out1), (rc2, out2)] == [(0, f"bin\ndone-{n}\n") for n in range(3)]
    # the guest's own word: which bash read each session's lines
    shells = [int(SHELL_PID_RE.findall(got.decode())[-1]) for got in (got1, got2)]
    assert "typed-1-41" in got1.decode() and "typed-2-42" in got2.decode(), (got1, got2)
    s0, s = session_of(m, first), session_of(m, lg)
    assert s0["lines"] == [] and s0["cast"] is None, s0
    assert [(x["line"], x["pid"]) for x in s["lines"]] == [
        *((line, shells[0]) for line in [*typed[0], "exit"]), *((line, shells[1]) for line in [*typed[1], "exit"])
    ], (shells, s["lines"])
    # each interactive bash is one the session executed, after a bash -c of the same session
    execs = [(c["pid"], c["argv"]) for c in s["commands"]]
    logins = [pid for pid, argv in execs if argv == ["-bash"]]
    assert logins == shells, execs
    dashc = [i for i, (_pid, argv) in enumerate(execs) if argv[-2:-1] == ["-c"]]
    assert len(dashc) == 2 and dashc[0] < execs.index((shells[0], ["-bash"])) < dashc[1], execs
    # the event log: each line once, in this session
    lines = [(r["args"]["session"], r["args"]["line"]) for r in m.records if r["name"] == "line"]
    assert lines == [(s["session"], line) for line in [*typed[0], "exit", *typed[1], "exit"]], lines


#: the fingerprint of each key in root's authorized_keys, computed by the guest (hex of its sha256)
KEY_SUMS = "while read -r t b c; do echo \"$t $(echo \"$b\" | base64 -d | sha256sum | cut -c1-64)\"; done " \
    "< /root/.ssh/authorized_keys"


@pytest.mark.guest
@pytest.mark.timeout(900)
def test_public_key_logins(guest: Guest, tmp_path: Path) -> None:
    """A key the daemon accepts is recorded with its fingerprint (the daemon logs it); a key it does
    not know is offered first on the same connection and is not recorded (the daemon does not say)."""
    known, stranger = paramiko.ECDSAKey.generate(), paramiko.ECDSAKey.generate()
    had_dir = guest.run("test -d /root/.ssh && echo yes || echo no").strip() == "yes"
    guest.run(f"mkdir -p /root/.ssh && chmod 700 /root/.ssh && echo '{known.get_name()} {known.get_base64()} "
              "hp-test' > /root/.ssh/authorized_keys && chmod 600 /root/.ssh/authorized_keys")
    try:
        truth = guest.run(KEY_SUMS).split()
        with monitoring(guest, tmp_path / "out") as m:
            t, port, offered = login_keys(guest, [stranger, known])
            ch = t.open_session()
            ch.exec_command("echo key-login")
            out = ch.makefile().read()
            t.close()
            m.wait_ended(1)
    finally:
        guest.run("rm -f /root/.ssh/authorized_keys" if had_dir else "rm -rf /root/.ssh")
    assert offered == 2 and out == b"key-login\n", (offered, out)
    # the guest's own sha256 of the key it holds, as ssh-keygen -l prints it
    assert truth[0] == known.get_name(), truth
    fingerprint = "SHA256:" + base64.b64encode(bytes.fromhex(truth[1])).decode().rstrip("=")
    assert fingerprint == "SHA256:" + base64.b64encode(hashlib.sha256(known.asbytes()).digest()).decode().rstrip("=")
    s = [s for s in m.sessions().values() if s["client_port"] == port]
    assert len(s) == 1, m.sessions()
    keys = [(a["method"], a["user"], a["fingerprint"], a["accepted"], a["forced"]) for a in s[0]["auth"]]
    assert keys == [("publickey", "root", fingerprint, True, False)], s[0]["auth"]
    assert s[0]["auth"][0]["key_type"] == {"dropbear": "ecdsa-sha2-nistp256", "sshd": "ECDSA"}[s[0]["daemon"]]
    log = [(r["args"]["session"], r["args"]["fingerprint"]) for r in m.records if r["name"] == "auth"]
    assert log == [(s[0]["session"], fingerprint)], log


FILES_SCRIPT = """cat > /root/heredoc.txt <<'END'
first line of the heredoc
second line: {marker}
END
sha256sum /root/heredoc.txt
busybox wget -q -O /root/dl.bin http://10.0.2.2:{port}/payload
sha256sum /root/dl.bin
head -c 3000 /dev/urandom > /tmp/gone.bin; sha256sum /tmp/gone.bin; rm /tmp/gone.bin
ls /tmp/gone.bin 2>&1
(busybox nc -l -p 4444 > /tmp/nc.out &)
for i in $(seq 100); do echo hello | busybox nc 127.0.0.1 4444 && break; sleep 0.2; done
sleep 1; cat /tmp/nc.out
"""


@pytest.mark.timeout(900)
def test_files_and_network(guest: Guest, tmp_path: Path) -> None:
    payload = os.urandom(20000)
    marker = secrets.token_hex(8)
    with http_payload(payload) as http_port, monitoring(guest, tmp_path / "out") as m:
        lg = login(guest, [guest.image.root_password])
        rc, out = run(lg, FILES_SCRIPT.format(marker=marker, port=http_port))
        lg.transport.close()
        m.wait_ended(1)
    sums = {line[66:]: line[:64] for line in out.splitlines() if re.fullmatch(r"[0-9a-f]{64}  \S+", line)}
    assert rc == 0 and "No such file" in out and out.endswith("hello\n"), out
    assert sums["/root/dl.bin"] == hashlib.sha256(payload).hexdigest()
    s = session_of(m, lg)
    written = {f["path"]: f for f in s["files"] if f["op"] == "write"}
    for path in ("/root/heredoc.txt", "/root/dl.bin", "/tmp/gone.bin"):
        f = written[path]
        assert f["sha256"] == sums[path], (path, f, sums)
        kept = (m.out / f["kept"]).read_bytes()
        assert hashlib.sha256(kept).hexdigest() == sums[path] and len(kept) == f["size"], path
    assert (m.out / written["/root/heredoc.txt"]["kept"]).read_text() == (
        f"first line of the heredoc\nsecond line: {marker}\n")
    assert written["/tmp/gone.bin"]["size"] == 3000
    deleted = [f for f in s["files"] if f["op"] == "delete"]
    assert [(f["path"], f["sha256"]) for f in deleted] == [("/tmp/gone.bin", sums["/tmp/gone.bin"])], deleted
    net = [(n["syscall"], n["addr"]) for n in s["net"]
           if n["syscall"] != "connect" or (n["addr"] or {}).get("family") == "inet"]
    assert ("connect", {"family": "inet", "address": "10.0.2.2", "port": http_port}) in net, net
    # busybox nc listens on IPv6's any address (IPv4 clients arrive mapped)
    assert ("bind", {"family": "inet6", "address": "::", "port": 4444}) in net, net
    assert ("connect", {"family": "inet", "address": "127.0.0.1", "port": 4444}) in net, net
    accepts = [a for name, a in net if name in ("accept", "accept4")]
    assert len(accepts) == 1 and accepts[0]["family"] == "inet6" and accepts[0]["port"] > 0, net
    assert ipaddress.ip_address(accepts[0]["address"]).ipv4_mapped == ipaddress.ip_address("127.0.0.1"), net


@pytest.mark.timeout(900)
def test_accept_any_password(guest: Guest, tmp_path: Path) -> None:
    random_pw = secrets.token_urlsafe(12)
    with monitoring(guest, tmp_path / "plain") as m:
        refused = login(guest, [random_pw])
        refused.transport.close()
        m.wait_ended(1)
    with monitoring(guest, tmp_path / "other", "--accept-any-password", "admin") as m_other:
        other = login(guest, [random_pw])
        other.transport.close()
        m_other.wait_ended(1)
    with monitoring(guest, tmp_path / "any", "--accept-any-password", "root") as m_any:
        taken = login(guest, [random_pw])
        rc, out = run(taken, "id -u")
        taken.transport.close()
        m_any.wait_ended(1)
    assert not refused.ok and not other.ok
    assert taken.ok and (rc, out) == (0, "0\n")
    for mon, lg, verdict in ((m, refused, (False, False)), (m_other, other, (False, False)),
                             (m_any, taken, (True, True))):
        s = session_of(mon, lg)
        assert [(a["user"], a["password"], a["accepted"], a["forced"]) for a in s["auth"]] == [
            ("root", random_pw, *verdict)], s["auth"]
    assert guest.run("echo still-alive") == "still-alive\n"


@pytest.mark.timeout(900)
def test_two_attackers_at_once(guest: Guest, tmp_path: Path) -> None:
    pw = guest.image.root_password
    results: dict[str, Any] = {}
    typed = {n: [f"/bin/busybox echo marker-{n}", f"cd {d}", f"ls -d /marker-{n}-missing"]
             for n, d in (("a", "/usr"), ("b", "/root"))}

    def attack(name: str) -> None:
        try:
            lg = login(guest, [f"wrong-{name}", pw])
            got = interactive(lg, typed[name])
            lg.transport.close()
            results[name] = (lg, got)
        except Exception as e:  # reported by the test's thread
            results[name] = e

    with monitoring(guest, tmp_path / "out") as m:
        workers = [threading.Thread(target=attack, args=(n,)) for n in "ab"]
        for w in workers:
            w.start()
        for w in workers:
            w.join(400)
        m.wait_ended(2)
    assert len(m.sessions()) == 2
    for name, other in (("a", "b"), ("b", "a")):
        assert not isinstance(results[name], Exception), results[name]
        lg, got = results[name]
        s = session_of(m, lg)
        assert [a["password"] for a in s["auth"]] == [f"wrong-{name}", pw], s["auth"]
        assert [x["line"] for x in s["lines"]] == [*typed[name], "exit"], s["lines"]
        argvs = [c["argv"] for c in s["commands"]]
        assert ["/bin/busybox", "echo", f"marker-{name}"] in argvs, argvs
        assert not any(f"marker-{other}" in " ".join(a) for a in argvs), argvs
        assert cast_text(m, s, "o") == got.decode()
        assert f"marker-{other}" not in cast_text(m, s, "o") + cast_text(m, s, "i")
        # every record of the session comes from one of its own processes
        pids = {s["daemon_pid"], *(c["pid"] for c in s["commands"])}
        mine = [r for r in m.records if r["args"]["session"] == s["session"] and r["name"] in ("exec", "line")]
        assert mine and all(r["tgid"] in pids for r in mine), (pids, mine)


#: The guest's own view of itself, from its console (no ssh session): every file with its size and
#: time (the root filesystem and /tmp, without the console runner's own scripts, which change /tmp's
#: own time), every user process
#: older than this command (pid, ppid, argv) and the loaded modules.
SNAPSHOT = r"""me=$$
find / /tmp -xdev ! -name '.aradia-run-*' -exec ls -ld --full-time {} + 2>/dev/null | grep -v ' /tmp$' | sort -k9
for d in /proc/[0-9]*; do p=${d#/proc/}; [ "$p" -lt "$me" ] || continue
  mapfile -d '' -t a < $d/cmdline 2>/dev/null; [ ${#a[@]} -gt 0 ] || continue
  read -r s < $d/stat; set -- $s; echo "proc $p $4 ${a[*]}"; done | sort -n -k2
cat /proc/modules"""


@pytest.mark.timeout(900)
def test_nothing_changes_in_the_guest(guest: Guest, tmp_path: Path) -> None:
    before = guest.run(SNAPSHOT, timeout=120)
    with monitoring(guest, tmp_path / "out") as m:
        time.sleep(2)
        during = guest.run(SNAPSHOT, timeout=300)
    after = guest.run(SNAPSHOT, timeout=120)
    assert m.records == []
    assert "proc 1 0 " in before and "virtio_net" in before and "/bin/busybox" in before, before[-3000:]
    assert during == before
    assert after == before
    # the snapshot does see a change: one new file
    guest.run("touch /root/honeypot-snapshot-probe")
    try:
        changed = guest.run(SNAPSHOT, timeout=120)
    finally:
        guest.run("rm -f /root/honeypot-snapshot-probe")
    assert changed != before and "/root/honeypot-snapshot-probe" in changed


@pytest.mark.timeout(900)
def test_session_open_before_the_monitor(guest: Guest, tmp_path: Path) -> None:
    """A monitor started (or restarted) during a session adopts it: the connection from the guest's
    sockets, its processes from the process tree; what follows is recorded."""
    lg = login(guest, [guest.image.root_password])
    ch = lg.transport.open_session()
    ch.get_pty(term="vt100", width=80, height=24)
    ch.invoke_shell()
    ch.settimeout(300)
    got = b""
    while b"# " not in got:
        got += ch.recv(65536)
    with monitoring(guest, tmp_path / "out") as m:
        ch.sendall(b"/bin/busybox echo adopted-$((1+1))\n")
        while b"adopted-2\r\n" not in got:
            got += ch.recv(65536)
        ch.sendall(b"/bin/busybox echo adopted-$((1+2))\nexit\n")
        while chunk := ch.recv(65536):
            got += chunk
        lg.transport.close()
        m.wait_ended(1)
    assert b"adopted-3\r\n" in got
    s = session_of(m, lg)
    assert s["adopted"] is True and (s["client"], s["server_port"]) == ("10.0.2.2", 22), s
    assert s["end"] is not None and s["start"] < s["end"], s
    argvs = [a for a, _cwd in programs(s)]
    assert argvs == [["/bin/busybox", "echo", "adopted-2"], ["/bin/busybox", "echo", "adopted-3"]], argvs
    # the line being read when the monitor started is not seen (its readline call began before)
    assert [x["line"] for x in s["lines"]] == ["/bin/busybox echo adopted-$((1+2))", "exit"], s["lines"]
    assert "adopted-3" in cast_text(m, s, "o")
