"""Decision hooks (``Tracer.add_hook``): a kernel function made to return an errno at once.

A hook on ``security_file_open`` denies opens of one inode: the guest's own ``cat`` of that file fails
with "Operation not permitted", a file beside it reads as before, and each denial is one event.
"""

from __future__ import annotations

import pytest

from aradia.lab.launcher import Guest
from aradia.trace.hooks import HookContext
from aradia.trace.tracer import Tracer
from tracing import trace_while

GUEST_SERIES = "6.1"
GUEST_OPTIONS = {"gdb": True, "shared_memory": True, "smp": 2}
EPERM = 1


@pytest.mark.timeout(240)
def test_hook_denies_one_inode(guest: Guest) -> None:
    guest.run("echo secret > /tmp/deny-me; echo fine > /tmp/ok-file")
    dev, ino = map(int, guest.run("stat -c '%d %i' /tmp/deny-me").split())  # st_dev: major 0, minor < 256
    seen: list[int] = []

    def decide(ctx: HookContext) -> int | None:
        inode = ctx.obj(0, "struct file *").f_inode
        got = int(inode.i_ino)
        seen.append(got)
        if (int(inode.i_sb.s_dev), got) == (dev, ino):
            ctx.emit("hooktest", "deny", {"ino": got})
            return EPERM
        return None

    def arm(tracer: Tracer) -> None:
        tracer.add_hook("security_file_open", decide)

    script = ("cat /tmp/deny-me; echo rc=$?; cat /tmp/ok-file; echo rc=$?; cat /tmp/deny-me; echo rc=$?")
    events, out = trace_while(guest, arm, lambda: guest.run(script, check=False), limit=180)
    assert out == ("cat: can't open '/tmp/deny-me': Operation not permitted\nrc=1\nfine\nrc=0\n"
                   "cat: can't open '/tmp/deny-me': Operation not permitted\nrc=1\n"), out
    denials = [e for e in events if e.kind == "hooktest"]
    assert [(e.comm, e.args) for e in denials] == [("cat", {"ino": ino})] * 2
    assert len(seen) > 2
    # unhooked, the same file reads again: nothing left armed
    assert guest.run("cat /tmp/deny-me") == "secret\n"
