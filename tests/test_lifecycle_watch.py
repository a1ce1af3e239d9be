"""Process lifecycle events, watchpoints and the event APIs against what the guest itself reports.

A guest script starts known children that print their own pids and exit with known statuses; the
trace must hold each one's fork, exec (program and argv) and exit (status). A guest process writes
and reads known bytes of its own memory; a watchpoint on them reports exactly those accesses. The
async iterator delivers events while probes are added and removed as the guest runs.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

import pytest

from aradia.lab.launcher import Guest
from aradia.trace.events import Event
from aradia.trace.tracer import Tracer
from aradia.vm import attach
from tracing import trace_while

GUEST_SERIES = "6.1"
GUEST_OPTIONS = {"smp": 2}


@pytest.mark.timeout(300)
def test_fork_exec_exit_of_known_children(guest: Guest) -> None:
    script = "; ".join(f"/bin/sh -c 'echo child=$$ code={code}; exit {code}' arg-{code}" for code in (0, 3, 7))

    def arm(tracer: Tracer) -> None:
        tracer.add_lifecycle()

    events, text = trace_while(guest, arm, lambda: guest.run(script, check=False))
    children = {int(p): int(c) for p, c in re.findall(r"child=(\d+) code=(\d+)", text)}
    assert len(children) == 3, text
    for pid, code in children.items():
        mine = [e for e in events if e.args.get("pid") == pid]
        kinds = [e.kind for e in mine]
        assert kinds == ["fork", "exec", "exit"], [e.line() for e in mine]
        fork, exe, ext = mine
        assert fork.args["tgid"] == pid and not fork.args["thread"]
        assert exe.args["exe"] == "/bin/busybox" or exe.args["exe"].endswith("/sh"), exe.args
        assert exe.args["argv"] == ["/bin/sh", "-c", f"echo child=$$ code={code}; exit {code}", f"arg-{code}"]
        assert exe.args["comm"] == "sh"
        assert ext.args["status"] == code and ext.args["signal"] == 0
        assert fork.time <= exe.time <= ext.time


@pytest.mark.timeout(300)
def test_watchpoint_sees_exactly_the_process_own_writes_and_reads(guest: Guest) -> None:
    hold = guest.start_memhold(seed=77, size=1 << 16)
    try:
        offset = 4096 + 24
        values = [bytes([0x10 + i, 0x20 + i, 0x30 + i, 0x40 + i]) for i in range(3)]

        def arm(tracer: Tracer) -> None:
            tracer.add_watch(hold.vaddr + offset, 4, "w", pid=hold.pid)

        def writes() -> str:
            for v in values:
                hold.poke(offset, v)
            return ""

        before = hold.dump(offset, 4)
        events, _ = trace_while(guest, arm, writes)
        hits = [e for e in events if e.kind == "watch"]
        # memhold writes byte by byte, in address order: each poke is four writes, and after the k-th
        # the watched bytes are the new value's first k bytes and the old value's rest
        expected, old = [], before
        for v in values:
            expected += [v[:k + 1] + old[k + 1:] for k in range(4)]
            old = v
        assert [e.args["value"] for e in hits] == expected, [e.line() for e in events]
        assert {(e.tgid, e.args["address"], e.args["access"]) for e in hits} == {
            (hold.pid, hold.vaddr + offset, "w")}
        assert len({e.args["rip"] for e in hits}) == 1  # one store instruction of memhold's loop
        assert hold.dump(offset, 4) == values[-1]  # and the guest saw its own writes

        def arm_read(tracer: Tracer) -> None:
            tracer.add_watch(hold.vaddr + offset + 1, 2, "r", pid=hold.pid)

        events, _ = trace_while(guest, arm_read, lambda: hold.dump(offset, 4).hex())
        reads = [(e.tgid, e.args["address"], e.args["access"]) for e in events if e.kind == "watch"]
        # dump reads byte by byte: bytes 1 and 2 of the four are watched
        assert reads == [(hold.pid, hold.vaddr + offset + 1, "r")] * 2, [e.line() for e in events]
    finally:
        hold.stop()


@pytest.mark.timeout(300)
def test_async_stream_with_probes_added_and_removed_while_running(guest: Guest) -> None:
    async def scenario() -> list[tuple[str, object]]:
        seen: list[tuple[str, object]] = []
        with attach(f"qmp:{guest.qmp_path}") as vm, Tracer.open(vm) as tracer:
            execve = tracer.add_syscall("execve")
            stream = tracer.stream(duration=150)

            async def until(pred: Callable[[Event], bool], command: str) -> None:
                job = asyncio.create_task(asyncio.to_thread(guest.run, command, 60))
                async for ev in stream:
                    seen.append((ev.name, ev.args.get("argv") or ev.args.get("path")))
                    if pred(ev):
                        break
                await job

            await until(lambda e: e.name == "execve" and "phase-a" in (e.args["argv"] or []),
                        "/bin/true phase-a")
            openat = await asyncio.to_thread(tracer.add_syscall, "openat")  # while the guest runs
            await until(lambda e: e.name == "openat" and e.args["path"] == "/etc/passwd",
                        "/bin/cat /etc/passwd > /dev/null")
            await asyncio.to_thread(tracer.remove, execve)
            await until(lambda e: e.name == "openat" and e.args["path"] == "/etc/shells",
                        "/bin/true phase-c; /bin/cat /etc/shells > /dev/null")
            await asyncio.to_thread(tracer.remove, openat)
            await stream.aclose()
        return seen

    seen = asyncio.run(scenario())
    names = [n for n, _ in seen]
    a = seen.index(("execve", ["/bin/true", "phase-a"]))
    first_open = names.index("openat")
    assert a < first_open  # openat only after it was added
    assert ("execve", ["/bin/cat", "/etc/passwd"]) in seen[a:]  # execve still armed then
    assert ("openat", "/etc/passwd") in seen
    tail = seen[seen.index(("openat", "/etc/passwd")) + 1:]
    assert not any(n == "execve" and "phase-c" in (v or []) for n, v in tail), tail  # removed
    assert ("openat", "/etc/shells") in tail
