"""``memhold``, a helper program of the test guests: a pattern-filled, mlocked region in a process.

:meth:`aradia.lab.guest.Guest.start_memhold` starts it; the tests then know, byte for byte, what a
guest process holds at a known virtual address (and on which physical pages), and can make the
process change it (:meth:`MemHold.poke`) or spin on a vCPU (:meth:`MemHold.spinning`).
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from aradia.lab import GuestError


class GuestShell(Protocol):
    """What :class:`MemHold` needs of a guest: :meth:`aradia.lab.guest.Guest.run`."""

    def run(self, cmd: str, timeout: float = 30, check: bool = True) -> str:
        """Run ``cmd`` with bash in the guest and return its output."""
        ...


def memhold_pattern(seed: int, offset: int, length: int) -> bytes:
    """The bytes ``memhold SEED`` fills its region with, for ``region[offset:offset+length]``."""
    first, last = offset // 8, (offset + length + 7) // 8
    words = (((seed ^ (i * 0x9E3779B97F4A7C15)) & 0xFFFFFFFFFFFFFFFF) for i in range(first, last))
    blob = b"".join(struct.pack("<Q", w) for w in words)
    return blob[offset - first * 8: offset - first * 8 + length]


@dataclass
class MemHold:
    """A ``memhold`` process in a guest: where its pattern-filled, mlocked region lives."""

    guest: GuestShell
    pid: int
    vaddr: int
    size: int
    seed: int
    pages: list[int]  # guest-physical address of each 4 KiB page (0 if pagemap hid it)
    fifo: str
    out: str

    @classmethod
    def parse(cls, guest: GuestShell, text: str, fifo: str, out: str) -> MemHold:
        """Parse memhold's start-up report."""
        fields: dict[str, str] = {}
        pages: list[int] = []
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 4 and parts[0] == "page":
                pages.append(int(parts[3], 16))
            elif len(parts) == 2:
                fields[parts[0]] = parts[1]
        if "ready" not in text.split() or not {"pid", "vaddr", "size", "seed"} <= fields.keys():
            raise GuestError(f"memhold did not start:\n{text[-2000:]}")
        return cls(guest, int(fields["pid"]), int(fields["vaddr"], 16), int(fields["size"]),
                   int(fields["seed"]), pages, fifo, out)

    def command(self, line: str, timeout: float = 30) -> list[str]:
        """Send one command line; returns the answer lines before ``ok`` (raises on ``err``)."""
        script = (f"before=$(wc -c < {self.out}); echo '{line}' > {self.fifo};"
                  f" for i in $(seq 2000); do tail -c +$((before+1)) {self.out} | grep -qE '^(ok|err)'"
                  f" && break; sleep 0.02; done; tail -c +$((before+1)) {self.out}")
        lines = self.guest.run(script, timeout=timeout).splitlines()
        if not lines or lines[-1] != "ok":
            raise GuestError(f"memhold {line.split()[0]!r} failed: {lines[-3:]}")
        return lines[:-1]

    def dump(self, offset: int, length: int) -> bytes:
        """What the guest process currently sees at ``region[offset:offset+length]``."""
        (line,) = self.command(f"dump {offset} {length}")
        return bytes.fromhex(line.removeprefix("data "))

    def poke(self, offset: int, data: bytes) -> None:
        """Let the guest process write ``data`` at ``offset``."""
        self.command(f"poke {offset} {data.hex()}")

    def check(self) -> tuple[int, int]:
        """(number of 8-byte words differing from the pattern, offset of the first or -1)."""
        (line,) = self.command("check")
        _, count, first = line.split()
        return int(count), int(first)

    def expected(self, offset: int = 0, length: int | None = None) -> bytes:
        """The original pattern for ``region[offset:offset+length]``."""
        return memhold_pattern(self.seed, offset, self.size - offset if length is None else length)

    @contextlib.contextmanager
    def spinning(self, seconds: int, timeout: float = 60) -> Iterator[None]:
        """Keep the process busy-looping in user mode (on a vCPU) for the block, at most ``seconds``.

        Lets a test catch the process on a vCPU and take its page-table root from the registers.
        """
        before = int(self.guest.run(f"wc -c < {self.out}").strip() or 0)
        self.guest.run(f"echo 'spin {seconds}' > {self.fifo}")
        try:
            yield
        finally:
            self.guest.run(f"for i in $(seq {int(timeout * 20)}); do tail -c +{before + 1} {self.out}"
                           f" | grep -q '^ok' && break; sleep 0.05; done", timeout=timeout + 5)

    def stop(self) -> None:
        """Ask memhold to exit."""
        self.guest.run(f"echo quit > {self.fifo}; sleep 0.1; rm -f {self.fifo}", check=False)


__all__ = ["GuestShell", "MemHold", "memhold_pattern"]
