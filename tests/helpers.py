"""Helpers several test modules share: in-memory RAM and running the CLI.

(The guest's own /proc is read in ``guest_truth.py``; tracing while a guest acts is in ``tracing.py``;
guest programs built on the host in ``guest_programs.py``; bare QEMUs without a kernel in
``bare_qemu.py``.)
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from aradia.sources.base import PhysicalMemory, Segment


# --- RAM in bytearrays ----------------------------------------------------------------------------------
class BytesMemory(PhysicalMemory):
    """RAM held in bytearrays, ``{gpa: bytearray}`` (or one bytearray at guest-physical 0); writable.

    ``reads`` counts the reads that reached the bytes (cache tests use it).
    """

    kind = "bytes"
    writable = True

    def __init__(self, chunks: dict[int, bytearray] | bytearray) -> None:
        self.bufs = {0: chunks} if isinstance(chunks, bytearray) else chunks
        self.reads = 0
        super().__init__(Segment(gpa, len(b), gpa) for gpa, b in self.bufs.items())

    @property
    def buf(self) -> bytearray:
        """The bytes at guest-physical 0 (the one buffer of a single-range memory)."""
        return self.bufs[0]

    def _read_backing(self, seg: Segment, offset: int, size: int) -> bytes:
        self.reads += 1
        return bytes(self.bufs[seg.backing][offset : offset + size])

    def _write_backing(self, seg: Segment, offset: int, data: bytes) -> None:
        self.bufs[seg.backing][offset : offset + len(data)] = data


# --- the command line, as a user runs it ------------------------------------------------------------------
def cli_argv(*args: str) -> list[str]:
    """The argv that runs ``aradia ARGS`` with this interpreter."""
    return [sys.executable, "-m", "aradia.cli", *args]


def run_cli(*args: str, timeout: float = 120, text: bool = True, input: str | None = None,
            ) -> subprocess.CompletedProcess[Any]:
    """Run ``aradia ARGS`` as a separate process (stdin /dev/null unless ``input``); its result."""
    return subprocess.run(cli_argv(*args), capture_output=True, text=text, timeout=timeout, input=input,
                          stdin=subprocess.DEVNULL if input is None else None)


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
