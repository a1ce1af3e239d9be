"""``aradia trace count``: the fast path is chosen by itself when QEMU has the plugin, and both paths count
exactly the calls a guest program says it made.

``/tmp/loop N 124`` makes exactly N ``getsid`` syscalls, and nothing else in the guest calls ``getsid``
(``getppid``, the loop's default, is also called by every bash that starts, e.g. the one that runs the
loop): the count must equal N.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from aradia.lab.images import GuestImage
from aradia.lab.launcher import Guest, launch
from aradia.lab.plugin_build import build_plugin
from aradia.trace.pluginshm import PluginShm
from cli_runner import cli_argv
from guest_programs import QUIET_NR, QUIET_SYMBOL, build_loop, install_program

SYMBOL = QUIET_SYMBOL


def _install_loop(guest: Guest, tmp: Path) -> None:
    install_program(guest, "loop", build_loop(tmp))


def _count_cli(guest: Guest, n: int, path: str, duration: float) -> tuple[dict[str, object], str]:
    """Run ``aradia trace count`` while the guest makes ``n`` calls, then stop it with Ctrl-C (SIGINT):
    the counts it prints then, and its stderr."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cli_argv("trace", "--vm", f"qmp:{guest.qmp_path}", "--json",
                                     "--duration", str(duration), "count", SYMBOL, "--path", path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()  # printed once counting has begun
        assert line.startswith("counting"), line + proc.stderr.read()
        started = time.monotonic()
        out = guest.run(f"/tmp/loop {n} {QUIET_NR}", timeout=duration)
        assert f"calls {n} " in out, out
        assert time.monotonic() - started < duration, "the loop outlasted the count: raise the duration"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    return json.loads(stdout.strip().splitlines()[-1]), line + stderr


@pytest.fixture(scope="module")
def plugin_guest(guest_image: Callable[[str], GuestImage], tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[Guest]:
    so = build_plugin()
    with PluginShm(max_vcpus=4) as shm:
        guest = launch(guest_image("6.1"), smp=2, plugins=[shm.plugin_arg(so)])
        try:
            _install_loop(guest, tmp_path_factory.mktemp("loop"))
            yield guest
        finally:
            guest.stop()


@pytest.mark.timeout(240)
def test_count_takes_the_plugin_by_itself_and_is_exact(plugin_guest: Guest) -> None:
    n = 100_000
    result, said = _count_cli(plugin_guest, n, "auto", duration=40)
    assert "via plugin" in said and result["path"] == "plugin"
    assert result["count"] == n and result["symbol"] == SYMBOL, result
    # the slot was freed on exit: a second count starts from zero and is exact again
    result, _ = _count_cli(plugin_guest, 5000, "plugin", duration=30)
    assert result["count"] == 5000, result


@pytest.mark.timeout(300)
def test_count_without_the_plugin_uses_breakpoints_and_is_exact(guest: Guest,
                                                                 tmp_path_factory: pytest.TempPathFactory) -> None:
    _install_loop(guest, tmp_path_factory.mktemp("loop"))
    n = 300
    result, said = _count_cli(guest, n, "auto", duration=90)
    assert "via gdb" in said and result["path"] == "gdb"
    assert result["count"] == n and result["symbol"] == SYMBOL, result
    # and the guest runs normally afterwards: nothing armed
    out = guest.run("/tmp/loop 20000", timeout=60)
    assert re.search(r"calls 20000 ns \d+", out), out
