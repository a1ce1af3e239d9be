"""``aradia serve`` as a user runs it, for tests: a config written from parts, the service a real
process on a free port (as root or under ``setpriv`` as an unprivileged id), killed however a test
needs."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from aradia.machine.stubaddress import free_port
from aradia.service.policy import new_token
from cli_runner import MAIN, SRC, cli_argv


@dataclass
class Principal:
    """A token and the config block that names it."""

    name: str
    token: str
    sha256: str
    allow: tuple[str, ...] = ()
    rate: float | None = None
    burst: int | None = None


def principal(name: str, allow: Sequence[str] = (), *, rate: float | None = None,
              burst: int | None = None) -> Principal:
    """A fresh token for ``name`` (``operator`` for the operator)."""
    token, digest = new_token()
    return Principal(name, token, digest, tuple(allow), rate, burst)


@dataclass
class VMEntry:
    """One ``[[vm]]`` of the config."""

    name: str
    qmp: str
    tenant: str | None = None


def _toml(value: Any) -> str:
    return json.dumps(value)  # JSON strings, numbers, booleans and arrays are TOML too


def config_text(*, host: str, store: Path, operator: Principal | None = None,
                tenants: Sequence[Principal] = (), vms: Sequence[VMEntry] = (), nats: str | None = None,
                limits: dict[str, Any] | None = None, tls: tuple[Path, Path] | None = None,
                aggregate: bool = False) -> str:
    """A service config (TOML) from its parts."""
    lines = ["[service]", f"host = {_toml(host)}"]
    if aggregate:
        lines.append("aggregate = true")
    if operator is not None:
        lines += ["[operator]", f"token_sha256 = {_toml(operator.sha256)}"]
    for t in tenants:
        lines += ["[[tenant]]", f"name = {_toml(t.name)}", f"token_sha256 = {_toml(t.sha256)}",
                  f"allow = {_toml(list(t.allow))}"]
        if t.rate is not None:
            lines.append(f"rate = {_toml(t.rate)}")
        if t.burst is not None:
            lines.append(f"burst = {_toml(t.burst)}")
    for vm in vms:
        lines += ["[[vm]]", f"name = {_toml(vm.name)}", f"qmp = {_toml(vm.qmp)}"]
        if vm.tenant:
            lines.append(f"tenant = {_toml(vm.tenant)}")
    lines += ["[store]", f"path = {_toml(str(store))}"]
    if nats:
        lines += ["[nats]", f"url = {_toml(nats)}"]
    if limits:
        lines += ["[limits]"] + [f"{k} = {_toml(v)}" for k, v in limits.items()]
    if tls:
        lines += ["[tls]", f"cert = {_toml(str(tls[0]))}", f"key = {_toml(str(tls[1]))}"]
    return "\n".join(lines) + "\n"


def _reachable_by_anyone(path: Path) -> bool:
    """Whether every directory above ``path`` lets others through and ``path`` lets them read/run it."""
    path = path.resolve()
    return all(p.stat().st_mode & 0o001 for p in path.parents) and bool(path.stat().st_mode & 0o005)


def deployment(workdir: Path) -> tuple[str, str]:
    """An interpreter and a ``PYTHONPATH`` an unprivileged user can use to run this checkout's aradia.

    As an operator installs aradia for a service user: readable by everyone. This checkout's packages
    and source are linked (hard links: instant, same file system) or copied into ``workdir`` when
    their own place is not reachable (a clone under /root); the interpreter is this one when others
    may run it, else Debian's ``/usr/bin/python3.X`` of the same version (same ABI).
    """
    exe = Path(sys.executable)
    if not _reachable_by_anyone(exe):
        exe = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
        if not exe.exists():
            raise AssertionError(f"no interpreter an unprivileged user can run: {sys.executable} is not "
                                 f"reachable and {exe} does not exist (scripts/dev.sh builds .venv "
                                 "from Debian's python3)")
    site = Path(httpx.__file__).resolve().parent.parent
    paths = [SRC, site]
    if all(_reachable_by_anyone(p) for p in paths):
        return str(exe), os.pathsep.join(map(str, paths))
    out = []
    for name, p in (("src", SRC), ("site-packages", site)):
        dest = workdir / "deploy" / name
        if not dest.exists():
            shutil.copytree(p, dest, copy_function=_link_or_copy, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
        out.append(dest)
    for d in [workdir / "deploy", *(workdir / "deploy").rglob("*")]:
        if d.is_dir():
            d.chmod(0o755)
    return str(exe), os.pathsep.join(map(str, out))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@dataclass
class ServiceProcess:
    """``aradia serve --config FILE --listen 127.0.0.1:PORT`` in its own process."""

    config: Path
    workdir: Path
    user: tuple[int, int] | None = None  # (uid, gid) to run as, through setpriv
    env: dict[str, str] = field(default_factory=dict)
    scheme: str = "http"
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        """The service's base URL."""
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def start(self, token: str, *, timeout: float = 180, verify: bool | str = True,
              extra: Sequence[str] = ()) -> None:
        """Start it and wait until ``/api/v1/health`` answers ``token``."""
        self.starts += 1
        self.log_path = self.workdir / f"serve-{self.port}-{self.starts}.log"
        argv = cli_argv("serve", "--config", str(self.config), "--listen", f"127.0.0.1:{self.port}", *extra)
        if self.user is not None:
            uid, gid = self.user
            python, path = deployment(self.workdir)
            argv = ["env", f"PYTHONPATH={path}", python, "-c", MAIN, *argv[argv.index(MAIN) + 1:]]
            argv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                    "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", *argv]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env={**os.environ, **self.env}, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"aradia serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                r = api(self.url, token, "GET", "/health", verify=verify)
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"aradia serve did not answer within {timeout} s:\n{self.log()}")
            time.sleep(0.2)

    def log(self) -> str:
        """What the service logged (its structured lines)."""
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def log_records(self) -> list[dict[str, Any]]:
        """The service's log lines that are JSON objects."""
        out = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    out.append(json.loads(line))
        return out

    def kill(self) -> None:
        """``kill -9`` (children such as the guardian are not signalled: they are what is tested)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> int | None:
        """SIGTERM and wait; the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        return self.proc.returncode


@contextlib.contextmanager
def serving(operator: Principal, tenants: Sequence[Principal], vms: Callable[[Path], Sequence[VMEntry]],
            prefix: str) -> Iterator[ServiceProcess]:
    """``aradia serve`` as host ``hv1`` in a fresh directory (its store there too) for ``tenants`` and
    the VMs ``vms(directory)`` lists; started with the operator's token, stopped and its directory
    removed afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    cfg = tmp / "serve.toml"
    cfg.write_text(config_text(host="hv1", store=tmp / "events.db", operator=operator, tenants=tenants,
                               vms=vms(tmp)))
    svc = ServiceProcess(cfg, tmp)
    svc.start(operator.token)
    try:
        yield svc
    finally:
        svc.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def api(url: str, token: str | None, method: str, path: str, *, verify: bool | str = True,
        **kwargs: Any) -> httpx.Response:
    """One HTTP request to the service, with ``token`` as the bearer (none when None)."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    tls = ssl.create_default_context(cafile=verify) if isinstance(verify, str) else verify
    return httpx.request(method, f"{url}/api/v1{path}", headers=headers, timeout=120, verify=tls,
                         **kwargs)
