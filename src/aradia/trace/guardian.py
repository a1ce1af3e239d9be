"""The guardian: a child process that owns a VM's GDB stub, so the guest is never left broken.

QEMU keeps breakpoints armed after an abrupt client disconnect and freezes the guest at the next hit.
So the tracer never holds the stub itself: it spawns this guardian, which connects to the stub and
serves the tracer's requests over a private socketpair. When that socket reaches end-of-file — the
tracer detached, raised, was interrupted or was killed with SIGKILL (the kernel closes its end) —
the guardian removes every breakpoint, detaches with ``D;1`` (QEMU resumes the guest) and exits.
The guardian ignores SIGINT so a Ctrl-C in the tracer's terminal does not kill it before the cleanup.

Protocol: one JSON object per line each way. Requests ``{"op": ..., ...}``; replies ``{"ok": value}``
or ``{"error": text, "kind": class name}``. Each request is bounded in time (``wait_stop`` takes a
timeout of at most :data:`MAX_WAIT`), so the guardian notices a vanished tracer within that time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from aradia.errors import AradiaError, Busy, NotAttached, PageFault, ProtocolError

MAX_WAIT = 0.5
MAX_LINE = 16 << 20
START_TIMEOUT = 15.0
_ERRORS: dict[str, type[AradiaError]] = {c.__name__: c for c in (AradiaError, Busy, NotAttached, PageFault,
                                                                 ProtocolError)}


# --- the guardian process -------------------------------------------------------------------------------
def _serve(ctl: socket.socket, address: str, was_running: bool | None) -> None:
    from aradia.proto.gdbrsp import GdbClient

    reader = ctl.makefile("rb")
    try:
        client = GdbClient(address, was_running=was_running)
    except AradiaError as e:
        ctl.sendall(json.dumps({"error": str(e), "kind": type(e).__name__}).encode() + b"\n")
        return
    threads = client.threads()
    client.restore_run_state()  # connecting paused a running guest (QEMU does); let it run on
    ctl.sendall(json.dumps({"ok": {"pid": os.getpid(), "threads": threads}}).encode() + b"\n")
    try:
        while True:
            line = reader.readline(MAX_LINE)
            if not line:
                return  # the tracer is gone: clean up in finally
            try:
                req = json.loads(line)
                if req.get("op") == "detach":
                    ctl.sendall(b'{"ok": null}\n')
                    return
                result: Any = _handle(client, req)
                reply = {"ok": result}
            except AradiaError as e:
                reply = {"error": str(e), "kind": type(e).__name__}
            except (ValueError, KeyError, TypeError) as e:
                reply = {"error": f"bad request: {e}", "kind": "ProtocolError"}
            ctl.sendall(json.dumps(reply).encode() + b"\n")
    except OSError:
        return
    finally:
        with contextlib.suppress(AradiaError, OSError):
            client.detach()  # removes our breakpoints and resumes the guest


def _handle(client: Any, req: dict[str, Any]) -> Any:
    op = req["op"]
    if op == "break":
        client.set_breakpoint(int(req.get("kind", 0)), int(req["addr"]), int(req.get("length", 1)))
        return None
    if op == "unbreak":
        client.remove_breakpoint(int(req.get("kind", 0)), int(req["addr"]), int(req.get("length", 1)))
        return None
    if op == "cont":
        client.cont()
        return None
    if op == "interrupt":
        ev = client.interrupt()
        return None if ev is None else _event(ev)
    if op == "wait":
        ev = client.wait_stop(min(float(req.get("timeout", MAX_WAIT)), MAX_WAIT))
        return None if ev is None else _event(ev)
    if op == "regs":
        return client.registers(req.get("thread"))
    if op == "set_reg":
        client.write_register(str(req["name"]), int(req["value"]), req.get("thread"))
        return None
    if op == "read":
        data = client.read_memory(int(req["addr"]), int(req["size"]), physical=bool(req.get("physical")))
        return data.hex()
    if op == "step":
        return _event(client.step(req.get("thread"), until_pc_changes=True))
    if op == "threads":
        return client.threads()
    if op == "running":
        return bool(client.running)
    raise ProtocolError(f"unknown guardian request {op!r}")


def _event(ev: Any) -> dict[str, Any]:
    return {"kind": ev.kind, "signal": ev.signal, "thread": ev.thread, "info": ev.info,
            "watch": ev.watch_address}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the guardian process: ``python -m aradia.trace.guardian FD ADDRESS [running]``."""
    args = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctl = socket.socket(fileno=int(args[0]))
    was_running = {"1": True, "0": False}.get(args[2]) if len(args) > 2 else None
    try:
        _serve(ctl, args[1], was_running)
    finally:
        ctl.close()
    return 0


# --- the tracer's side -------------------------------------------------------------------------------------
class GuardedStub:
    """A VM's GDB stub reached through a guardian process (see the module docstring).

    Only one thread may use a GuardedStub at a time. ``close()`` (or the end of this process, however
    it ends) makes the guardian remove every breakpoint and let the guest run.
    """

    def __init__(self, address: str, *, was_running: bool | None = None) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        running = {True: "1", False: "0"}.get(was_running, "?")  # type: ignore[call-overload]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aradia.trace.guardian", str(child.fileno()), address, running],
            pass_fds=[child.fileno()], stdin=subprocess.DEVNULL, start_new_session=True)
        child.close()
        self._sock = parent
        self._reader = parent.makefile("rb")
        parent.settimeout(START_TIMEOUT)
        hello = self._reply("connect")
        parent.settimeout(None)
        self.guardian_pid = int(hello["pid"])
        self.threads: list[str] = list(hello["threads"])

    def _reply(self, what: str) -> Any:
        try:
            line = self._reader.readline(MAX_LINE)
        except (OSError, TimeoutError) as e:
            raise NotAttached(f"the GDB guardian did not answer {what}: {e}") from e
        if not line:
            code = self.proc.poll()
            status = f" (status {code})" if code else ""
            raise NotAttached(f"the GDB guardian exited during {what}{status}")
        msg = json.loads(line)
        if "error" in msg:
            raise _ERRORS.get(msg.get("kind", ""), AradiaError)(msg["error"])
        return msg["ok"]

    def call(self, op: str, **kw: Any) -> Any:
        """Send one request to the guardian and return its result."""
        try:
            self._sock.sendall(json.dumps({"op": op, **kw}).encode() + b"\n")
        except OSError as e:
            raise NotAttached(f"the GDB guardian is gone: {e}") from e
        return self._reply(op)

    def set_breakpoint(self, addr: int, kind: int = 0, length: int = 1) -> None:
        """Arm a breakpoint (kind 0/1) or watchpoint (2 write, 3 read, 4 access) at guest-virtual ``addr``."""
        self.call("break", addr=addr, kind=kind, length=length)

    def remove_breakpoint(self, addr: int, kind: int = 0, length: int = 1) -> None:
        """Disarm one breakpoint or watchpoint."""
        self.call("unbreak", addr=addr, kind=kind, length=length)

    def cont(self) -> None:
        """Let the guest run."""
        self.call("cont")

    def wait_stop(self, timeout: float) -> dict[str, Any] | None:
        """The next stop (a dict with kind, signal, thread, info, watch) or None after ``timeout``."""
        end = time.monotonic() + timeout
        while True:
            ev = self.call("wait", timeout=max(0.0, min(MAX_WAIT, end - time.monotonic())))
            if ev is not None or time.monotonic() >= end:
                return ev

    def registers(self, thread: str | None = None) -> dict[str, int]:
        """Registers of one vCPU (thread id as the stub names it)."""
        return {k: int(v) for k, v in self.call("regs", thread=thread).items()}

    def set_register(self, name: str, value: int, thread: str | None = None) -> None:
        """Write one register of one vCPU."""
        self.call("set_reg", name=name, value=value, thread=thread)

    def read_memory(self, addr: int, size: int, *, physical: bool = False) -> bytes:
        """Read guest memory through the stub (virtual in the stopped vCPU's view, or physical)."""
        return bytes.fromhex(self.call("read", addr=addr, size=size, physical=physical))

    def step(self, thread: str | None = None) -> dict[str, Any]:
        """Single-step one vCPU until its PC moves."""
        return dict(self.call("step", thread=thread))

    def interrupt(self) -> dict[str, Any] | None:
        """Stop the guest."""
        return self.call("interrupt")

    def close(self) -> None:
        """Disarm everything and let the guest run; waits for the guardian to finish."""
        with contextlib.suppress(AradiaError, OSError):
            self.call("detach")
        with contextlib.suppress(OSError):
            self._sock.close()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> GuardedStub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    sys.exit(main())
