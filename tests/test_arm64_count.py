"""``aradia trace count`` on an arm64 guest (qemu-system-aarch64 with aradia's TCG plugin loaded): the
plugin path and the stop path both count exactly the calls the guest program says it made.

``/tmp/a64loop N 156`` makes exactly N ``getsid`` syscalls and nothing else in the guest calls
``getsid``; the plugin is the one built for the host's QEMU (the same source serves every target).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from aradia.lab.images import GuestImage
from aradia.lab.launcher import Guest, launch
from aradia.lab.plugin_build import build_plugin
from aradia.trace.pluginshm import PluginShm
from cli_runner import cli_argv
from guest_programs import A64_QUIET_NR, A64_QUIET_SYMBOL, build_a64loop, install_program


@pytest.fixture(scope="module")
def plugin_guest(guest_image: Callable[..., GuestImage], tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[Guest]:
    so = build_plugin()
    with PluginShm(max_vcpus=4) as shm:
        guest = launch(guest_image("6.1", "arm64"), smp=2, plugins=[shm.plugin_arg(so)], gdb=True,
                       memory="256M", boot_timeout=180)
        try:
            install_program(guest, "a64loop", build_a64loop(tmp_path_factory.mktemp("a64"),
                                                            guest.image.guest_arch.gcc))
            yield guest
        finally:
            guest.stop()


def _count(guest: Guest, n: int, path: str, duration: float) -> tuple[dict[str, object], str]:
    """``aradia trace count`` while the guest makes ``n`` getsid calls, ended with Ctrl-C: its result
    and what it said."""
    proc = subprocess.Popen(cli_argv("trace", "--vm", f"qmp:{guest.qmp_path}", "--json", "--duration",
                                     str(duration), "count", A64_QUIET_SYMBOL, "--path", path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stderr is not None
        said = proc.stderr.readline()
        assert said.startswith("counting"), said + proc.stderr.read()
        started = time.monotonic()
        out = guest.run(f"/tmp/a64loop {n} {A64_QUIET_NR}", timeout=duration)
        assert re.fullmatch(rf"calls {n} ns \d+\n", out), out
        assert time.monotonic() - started < duration, "the loop outlasted the count"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    return json.loads(stdout.strip().splitlines()[-1]), said + stderr


@pytest.mark.timeout(240)
def test_plugin_count_is_exact_on_arm64(plugin_guest: Guest) -> None:
    result, said = _count(plugin_guest, 100_000, "auto", duration=60)
    assert "via plugin" in said and result["path"] == "plugin", said
    assert result["count"] == 100_000 and result["symbol"] == A64_QUIET_SYMBOL, result
    result, _ = _count(plugin_guest, 5000, "plugin", duration=40)  # the slot was freed: from zero again
    assert result["count"] == 5000, result


@pytest.mark.timeout(240)
def test_stop_path_count_is_exact_on_arm64(plugin_guest: Guest) -> None:
    result, said = _count(plugin_guest, 300, "gdb", duration=90)
    assert result["path"] == "gdb", said
    assert result["count"] == 300, result
