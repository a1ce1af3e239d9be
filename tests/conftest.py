"""Shared fixtures: real guests built by aradia (cached on disk) and booted under QEMU.

Fixtures for test modules:

* ``guest_image`` (session): ``guest_image("6.1")`` -> :class:`GuestImage`, built once and cached
  (``guest_image("6.1", "arm64")``: the arm64 guest).
* ``boot_guest`` (session): ``with boot_guest("6.1", **launch_kwargs) as g:`` boots a guest and
  always stops it (``arch="arm64"`` boots the arm64 image); boot times are collected and printed in
  the terminal summary.
* ``launch_guest`` (module): ``launch_guest("6.1", **launch_kwargs)`` -> a booted :class:`Guest`
  that is stopped when the module's tests are done.
* ``guest`` (module): one booted guest per module; a module picks its kernel and options with
  module-level ``GUEST_SERIES = "6.1"``, ``GUEST_ARCH = "arm64"`` (default x86_64) and
  ``GUEST_OPTIONS = {"shared_memory": True, ...}``.

QEMU missing is a failure with a clear message, never a skip: ``scripts/dev.sh`` installs it.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from aradia.lab import GuestError
from aradia.lab.images import GuestImage, build_guest
from aradia.lab.launcher import Guest, launch
from aradia.machine.qemu import QEMU_BINARY

# The tests stop CLI commands with SIGINT, as a user's Ctrl-C. A test run started in the background by a
# shell without job control (`cmd &` in a script) inherits SIGINT *ignored*, and so would every command
# it starts (Python then installs no KeyboardInterrupt handler): the Ctrl-C would do nothing. Handling
# SIGINT here makes the commands' SIGINT the default again (a handler is reset at exec, an ignore is not).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

BOOT_TIMES: list[tuple[str, float]] = []
BOOT_RETRIES: list[tuple[str, str]] = []  # (guest, why a boot was given up and started again)
BUILD_TIMES: list[tuple[str, float]] = []
BootGuest = Callable[..., contextlib.AbstractContextManager[Guest]]


def _require_tools() -> None:
    tools = (QEMU_BINARY, "gcc", "dpkg-deb", "apt-get", "ssh")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"real-guest tests need {', '.join(missing)}: run `bash scripts/dev.sh setup` "
                    "(installs qemu-system-x86, gcc, libc6-dev, openssh-client)", pytrace=False)


@pytest.fixture(scope="session")
def guest_image() -> Callable[..., GuestImage]:
    """Factory ``guest_image(series="6.1", arch="x86_64") -> GuestImage``; each is built at most once."""
    _require_tools()
    built: dict[tuple[str, str], GuestImage] = {}

    def get(series: str = "6.1", arch: str = "x86_64") -> GuestImage:
        if (series, arch) not in built:
            started = time.monotonic()
            try:
                built[series, arch] = build_guest(series, arch=arch)
            except GuestError as exc:
                pytest.fail(f"building the {series} {arch} guest failed: {exc}", pytrace=False)
            BUILD_TIMES.append((_label(series, arch), time.monotonic() - started))
        return built[series, arch]

    return get


@pytest.fixture(scope="session")
def boot_guest(guest_image: Callable[..., GuestImage]) -> BootGuest:
    """``with boot_guest(series="6.1", arch="x86_64", **launch_kwargs) as guest:`` — always stopped
    afterwards."""

    @contextlib.contextmanager
    def boot(series: str = "6.1", arch: str = "x86_64", **kwargs: Any) -> Iterator[Guest]:
        guest = launch(guest_image(series, arch), **kwargs)
        BOOT_TIMES.append((_label(series, arch), guest.boot_seconds))
        BOOT_RETRIES.extend((_label(series, arch), why) for why in guest.boot_retries)
        try:
            yield guest
        finally:
            guest.stop()

    return boot


@pytest.fixture(scope="module")
def launch_guest(boot_guest: BootGuest) -> Iterator[Callable[..., Guest]]:
    """Factory ``launch_guest(series="6.1", **launch_kwargs) -> Guest``, stopped at the module's end."""
    with contextlib.ExitStack() as stack:
        yield lambda series="6.1", **kwargs: stack.enter_context(boot_guest(series, **kwargs))


@pytest.fixture(scope="module")
def guest(request: pytest.FixtureRequest, launch_guest: Callable[..., Guest]) -> Guest:
    """The module's guest: kernel from ``GUEST_SERIES`` and launch options from ``GUEST_OPTIONS``."""
    series = getattr(request.module, "GUEST_SERIES", "6.1")
    options = dict(getattr(request.module, "GUEST_OPTIONS", {}))
    return launch_guest(series, arch=getattr(request.module, "GUEST_ARCH", "x86_64"), **options)


def _label(series: str, arch: str) -> str:
    """How the terminal summary names a guest: the series, with the architecture unless x86-64."""
    return series if arch == "x86_64" else f"{series}-{arch}"


GUEST_FIXTURES = frozenset({"guest_image", "boot_guest", "launch_guest", "guest"})


def pytest_report_header() -> str:
    """Name the QEMU this run boots (``$ARADIA_QEMU`` or the installed one) and its version."""
    try:
        out = subprocess.run([QEMU_BINARY, "--version"], capture_output=True, text=True, timeout=30,
                             check=False).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        out = f"cannot run it: {exc}"
    first = out.splitlines()[0] if out.strip() else "printed no version"
    return f"QEMU under test: {QEMU_BINARY}: {first}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``guest`` every test that uses a guest fixture (directly or through another fixture).

    So ``pytest -m "not guest"`` is the fast unit run by construction: every guest the suite boots
    comes from these fixtures (bare QEMUs without a kernel, ``tests/bare_qemu.py``, start in ~0.1 s
    and stay in the unit run; they need QEMU installed).
    """
    for item in items:
        if GUEST_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.guest)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Report how long guest builds and boots took."""
    if not BOOT_TIMES and not BUILD_TIMES:
        return
    terminalreporter.section("aradia guests")
    for series, seconds in BUILD_TIMES:
        terminalreporter.write_line(f"build {series:>5}: {seconds:6.2f} s")
    for series, seconds in BOOT_TIMES:
        terminalreporter.write_line(f"boot  {series:>5}: {seconds:6.2f} s")
    for series, why in BOOT_RETRIES:
        terminalreporter.write_line(f"retry {series:>5}: {why}")
