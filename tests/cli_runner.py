"""Running the ``aradia`` command of this checkout as a user runs it, and reading what it prints.

One way to run it: :func:`cli_argv` is ``aradia ARGS`` as ``pip install`` makes the command of
``[project.scripts] aradia = "aradia.cli:main"``, run by this interpreter with ``PYTHONPATH`` set to the
source tree these tests import (so a checkout's tests run that checkout's code, and so do the processes
aradia starts itself, e.g. the guardian). :func:`run_cli` runs it once and returns its result;
:class:`Cli` puts the same command on ``PATH`` as ``aradia`` and runs command lines with bash in a
scratch directory, redirections included, as the README writes them. :func:`table` and
:func:`event_lines` parse its text output.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aradia

SRC = Path(aradia.__file__).resolve().parent.parent
MAIN = "import sys; from aradia.cli import main; sys.exit(main())"
#: ``drgn`` of the environment these tests run in (where aradia's drgn plugin is installed), never one
#: found on ``PATH`` or under some checkout
DRGN = str(Path(sys.executable).with_name("drgn"))


# --- one command line -----------------------------------------------------------------------------------
def cli_argv(*args: str) -> list[str]:
    """The argv that runs ``aradia ARGS`` of this source tree with this interpreter."""
    return ["env", f"PYTHONPATH={SRC}", sys.executable, "-c", MAIN, *args]


def run_cli(*args: str, timeout: float = 120, text: bool = True, input: str | None = None,
            env_token: str | None = None) -> subprocess.CompletedProcess[Any]:
    """Run ``aradia ARGS`` as a separate process (stdin /dev/null unless ``input``; ``ARADIA_TOKEN``
    set to ``env_token`` if given); its result."""
    env = {**os.environ, "ARADIA_TOKEN": env_token} if env_token is not None else None
    return subprocess.run(cli_argv(*args), capture_output=True, text=text, timeout=timeout, input=input,
                          stdin=subprocess.DEVNULL if input is None else None, env=env)


def assert_one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit status 2, nothing on stdout, and one ``aradia: error: ...`` line holding every needle."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aradia: error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert r.stdout == "", r.stdout
    return lines[0]


# --- command lines with bash, ``aradia`` on PATH ----------------------------------------------------------
class Cli:
    """Runs command lines with the ``aradia`` of this source tree (:func:`cli_argv`) first on ``PATH``,
    in ``cwd``."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        bindir = cwd / "bin"
        bindir.mkdir(exist_ok=True)
        exe = bindir / "aradia"
        exe.write_text(f"#!/bin/sh\nexec {shlex.join(cli_argv())} \"$@\"\n")
        exe.chmod(0o755)
        self.env = {**os.environ, "PATH": f"{bindir}:{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1"}

    def run(self, line: str, *, timeout: float = 240, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``line`` with bash; its exit status and output."""
        return subprocess.run(["bash", "-c", line], cwd=self.cwd, env=self.env, capture_output=True, text=True,
                              timeout=timeout, input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL)

    def ok(self, line: str, **kwargs: Any) -> str:
        """Run ``line``; it must exit 0 with no traceback; its stdout."""
        r = self.run(line, **kwargs)
        assert r.returncode == 0 and "Traceback" not in r.stderr, (line, r.returncode, r.stderr[-3000:])
        return r.stdout

    def live(self, line: str, action: Callable[[], Any], *, ready: str = "tracing", timeout: float = 240,
             interrupt: bool = True, settle: float = 1.5) -> tuple[subprocess.CompletedProcess[str], Any]:
        """Start ``line`` (a trace), wait until its first stderr line says ``ready`` (probes armed),
        run ``action()``, then (``interrupt``) wait until its output has been quiet for ``settle``
        seconds (an event of the action's last moment may still be on its way) and Ctrl-C it, or
        let it end by itself; (result, what ``action`` returned)."""
        proc = subprocess.Popen(["bash", "-c", f"exec {line}"], cwd=self.cwd, env=self.env, text=True,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        chunks: list[str] = []
        errors: list[str] = []
        last = [time.monotonic()]

        def read_out() -> None:
            assert proc.stdout is not None
            for text in proc.stdout:
                chunks.append(text)
                last[0] = time.monotonic()

        def read_err() -> None:
            assert proc.stderr is not None
            errors.extend(proc.stderr)

        threads = [threading.Thread(target=read_out, daemon=True), threading.Thread(target=read_err, daemon=True)]
        try:
            assert proc.stderr is not None
            first = proc.stderr.readline()
            for t in threads:
                t.start()
            if not first.startswith(ready):
                proc.kill()
                proc.wait(30)
                for t in threads:
                    t.join(30)
                raise AssertionError(f"{line}: not ready: {first}{''.join(errors)}{''.join(chunks)}")
            value = action()
            if interrupt:
                last[0] = time.monotonic()
                deadline = time.monotonic() + 60
                while time.monotonic() - last[0] < settle and time.monotonic() < deadline:
                    time.sleep(0.05)
                proc.send_signal(signal.SIGINT)
            proc.wait(timeout=timeout)
            for t in threads:
                t.join(30)
        finally:
            proc.kill()
        return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(chunks), first + "".join(errors)), value


# --- what it prints -------------------------------------------------------------------------------------
def table(text: str) -> list[dict[str, str]]:
    """Rows of an aradia table (a header, columns padded to the widest cell) as header -> cell."""
    lines = text.rstrip("\n").splitlines()
    assert lines, "no output"
    header = lines[0]
    names = header.split()
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    rows = []
    for line in lines[1:]:
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        rows.append(dict(zip(names, cells, strict=True)))
    return rows


EVENT = re.compile(r"^(?P<time>\d+\.\d+) cpu(?P<vcpu>\d+) (?P<comm>.*)\[(?P<tgid>\d+)/(?P<pid>\d+)\] "
                   r"uid=(?P<uid>-?\d+) (?P<kind>\w+) (?P<name>\S+?)\((?P<args>.*)\)$")


@dataclass
class Line:
    """One event line of ``aradia trace`` (``Event.line()``)."""

    comm: str
    tgid: int
    pid: int
    uid: int
    kind: str
    name: str
    args: str


def event_lines(text: str) -> list[Line]:
    """Parse every line of a trace's text output; a line that is not an event fails."""
    out = []
    for line in text.splitlines():
        m = EVENT.match(line)
        assert m, f"not an event line: {line!r}"
        out.append(Line(m["comm"], int(m["tgid"]), int(m["pid"]), int(m["uid"]), m["kind"], m["name"], m["args"]))
    return out


def interrupt(p: subprocess.Popen[Any], timeout: float = 60) -> None:
    """End a CLI process as Ctrl-C does (SIGINT) unless it ended; ``kill -9`` if it has not ended
    within ``timeout`` s."""
    if p.poll() is None:
        p.send_signal(signal.SIGINT)
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
