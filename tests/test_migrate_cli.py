"""``aradia migrate`` and a running ``aradia trace`` that goes on across the migration (the trace process
owns the VM; ``aradia migrate --vm`` asks it through its control socket)."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import IO, Any

import pytest

from cli_runner import cli_argv, run_cli
from migration_env import MARK, BootGuest, guest_pair, marks_in_guest, qmp_status, start_command_loop


def _argv1(record: dict[str, Any]) -> str:
    """argv[1] of an exec record, or ''."""
    argv = (record.get("args") or {}).get("argv") or []
    return str(argv[1]) if len(argv) > 1 else ""


class Lines:
    """The JSON lines a process prints, read in a thread."""

    def __init__(self, out: IO[str]) -> None:
        self.records: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._read, args=(out,), daemon=True)
        self._thread.start()

    def _read(self, out: IO[str]) -> None:
        for line in out:
            self.records.append(json.loads(line))

    def wait_for(self, argv1: str, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(_argv1(r) == argv1 for r in list(self.records)):
                return
            time.sleep(0.05)
        raise AssertionError(f"the trace printed no exec of {argv1} within {timeout} s")


@pytest.mark.timeout(900)
def test_cli_trace_goes_on_across_aradia_migrate(boot_guest: BootGuest, tmp_path: Path) -> None:
    """``aradia trace … syscalls -e execve --json`` while ``aradia migrate`` moves the VM: each of the 200
    numbered commands printed once, in order, with one ``migrated`` record; bad input is one line, exit 2."""
    tag = "cli"
    with guest_pair(boot_guest, 1) as pair:
        src, dst = pair.source, pair.destination
        bad = run_cli("migrate", "--vm", f"qmp:{src.qmp_path}", "--to", f"qmp:{tmp_path}/none.sock",
                      "--uri", pair.uri, "--timeout", "2")
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
        assert "did not come up within 2 s" in bad.stderr and "Traceback" not in bad.stderr
        assert qmp_status(src.qmp_path) == "running"  # untouched
        trace = subprocess.Popen(cli_argv("trace", "--vm", f"qmp:{src.qmp_path}", "--json", "syscalls", "-e",
                                          "execve"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert trace.stdout is not None and trace.stderr is not None
        try:
            lines = Lines(trace.stdout)
            armed = trace.stderr.readline()  # "tracing syscalls on …" once every probe is armed
            assert armed.startswith("tracing syscalls on"), armed
            out = start_command_loop(src, tag)
            lines.wait_for(f"{MARK}{tag}-20", 240)
            mig = run_cli("migrate", "--vm", f"qmp:{src.qmp_path}", "--to", f"qmp:{dst.qmp_path}",
                          "--uri", pair.uri, "--json", timeout=300)
            assert mig.returncode == 0, mig.stderr
            result = json.loads(mig.stdout)
            assert result["status"] == "completed" and result["destination"] == f"qmp:{dst.qmp_path}"
            assert marks_in_guest(dst, out) == list(range(200))
            lines.wait_for(f"{MARK}{tag}-199", 120)
            assert qmp_status(src.qmp_path) == "postmigrate"
            trace.send_signal(signal.SIGINT)
            trace.wait(timeout=60)
            err = trace.stderr.read()
            assert trace.returncode == 0 and "Traceback" not in err, err
        finally:
            if trace.poll() is None:
                trace.kill()
                trace.wait()
        assert qmp_status(dst.qmp_path) == "running"  # the trace's end let the guest run on
    prefix = f"{MARK}{tag}-"
    numbers = [int(_argv1(r)[len(prefix):]) for r in lines.records
               if r["kind"] == "syscall" and _argv1(r).startswith(prefix)]
    assert numbers == list(range(200))
    markers = [r for r in lines.records if r["kind"] == "migrated"]
    assert len(markers) == 1 and markers[0]["args"]["to"].endswith(str(dst.qmp_path))
