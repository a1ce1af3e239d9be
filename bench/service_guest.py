"""The service's guest sections of ``bench/service.py``: API latency and exec-to-WebSocket latency.

Both boot one guest (6.1, 2 vCPUs, TCG, shared RAM file, GDB stub) and run ``aradia serve`` for it as
its own process on a free port, as a user would:

* **api**: ``processes`` of the idle guest, first as the direct library call
  (``vm.linux.view("processes")`` in this process, the baseline) and then as ``GET
  /api/v1/vms/web1/processes`` through one kept-alive HTTP connection (the service's work plus HTTP,
  JSON and the audit row). Each side repeats ``--api-calls`` times after a warm-up call; medians and
  p90. The VM has one owner, so the library's attach is closed before the service starts.
* **ws**: a trace of ``execve`` started over HTTP, a WebSocket subscriber, and the guest running
  ``--execs`` execs of ``/bin/true``: for every event, the time from the tracer handling the hit
  (the record's ``time``: the guest is stopped at the exec at that moment) to the subscriber's
  receipt, p50/p99; the events must all arrive (exactly ``--execs``). Baseline: the same execs
  traced by the library in this process (the event's stamp to the consumer of ``Tracer.events()``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from aradia.client import Client
from aradia.lab.images import build_guest
from aradia.lab.launcher import Guest, launch
from aradia.machine.stubaddress import free_port
from aradia.service.policy import new_token
from aradia.trace.tracer import Tracer
from aradia.vm import attach

MAIN = "import sys; from aradia.cli import main; sys.exit(main())"


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@contextlib.contextmanager
def served(guest: Guest, tmp: Path) -> Iterator[tuple[str, str]]:
    """``aradia serve`` owning the guest as VM ``web1``: (base URL, operator token)."""
    token, digest = new_token()
    cfg = tmp / "serve.toml"
    cfg.write_text(f'[service]\nhost = "bench"\n[operator]\ntoken_sha256 = "{digest}"\n'
                   f'[[vm]]\nname = "web1"\nqmp = "{guest.qmp_path}"\n[store]\npath = "{tmp}/events.db"\n'
                   # the bench measures latency, not the rate limit (20/s by default)
                   '[limits]\nrate = 10000\nburst = 10000\n')
    port = free_port()
    log = open(tmp / "serve.log", "wb")  # noqa: SIM115 - the child writes it until it ends
    src = str(Path(__file__).resolve().parent.parent / "src")
    proc = subprocess.Popen([sys.executable, "-c", MAIN, "serve", "--config", str(cfg), "--listen",
                             f"127.0.0.1:{port}"], stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": src})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"aradia serve exited: {(tmp / 'serve.log').read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/api/v1/health", headers={"Authorization": f"Bearer {token}"},
                             timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("aradia serve did not come up")
            time.sleep(0.2)
        yield url, token
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def bench_api(args: argparse.Namespace, guest: Guest, tmp: Path) -> list[str]:
    """Library ``processes`` vs the API's; returns the ratio lines."""
    n = args.api_calls
    with attach(f"qmp:{guest.qmp_path}") as vm:
        kernel = vm.load_kernel()
        kernel.view("processes")
        lib = []
        for _ in range(n):
            t0 = time.perf_counter()
            doc = kernel.view("processes")
            lib.append(time.perf_counter() - t0)
        lib_count = len(doc["items"])
    with served(guest, tmp) as (url, token), \
            httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
        http.get("/api/v1/vms/web1/processes").raise_for_status()
        api = []
        for _ in range(n):
            t0 = time.perf_counter()
            r = http.get("/api/v1/vms/web1/processes")
            r.raise_for_status()
            items = r.json()["items"]
            api.append(time.perf_counter() - t0)
    lm, am = statistics.median(lib), statistics.median(api)
    print(f"library processes: {lib_count} processes, median {lm * 1e3:.2f} ms, "
          f"p90 {_pct(lib, 0.9) * 1e3:.2f} ms ({n} calls)")
    print(f"API processes:     {len(items)} processes, median {am * 1e3:.2f} ms, "
          f"p90 {_pct(api, 0.9) * 1e3:.2f} ms ({n} calls, HTTP keep-alive, JSON decoded)")
    verdict = "OK" if am <= 2 * lm else "over the 2x target"
    print(f"check API overhead <= 2x the library call: {am / lm:.2f}x {verdict}")
    return [f"ratio api-processes/library-processes: {am / lm:.2f}x"]


def bench_ws(args: argparse.Namespace, guest: Guest, tmp: Path) -> tuple[list[str], bool]:
    """Exec -> WebSocket latency; returns the ratio lines and whether every event arrived."""
    n = args.execs
    tag = "bench-ws"
    script = f"for i in $(seq {n}); do /bin/true {tag} $i; done\necho WS-DONE"
    guest.run(f"cat > /tmp/ws.sh <<'EOF'\n{script}\nEOF")
    lat: list[float] = []
    with served(guest, tmp) as (url, token), Client(url, token) as c, \
            c.live("web1", kind=["syscall"], name=["execve"]) as stream:
        if True:
            trace = c.start_trace("web1", {"kind": "syscalls", "syscalls": ["execve"]})
            got: list[dict[str, Any]] = []

            def read() -> None:
                for rec in stream.events(duration=600):
                    now = time.time()
                    if tag in (rec.get("args", {}).get("argv") or []):
                        got.append(rec)
                        lat.append(now - rec["time"])
                        if len(got) >= n:
                            return

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            t0 = time.monotonic()
            out = guest.run("bash /tmp/ws.sh", timeout=600)
            run_s = time.monotonic() - t0
            reader.join(timeout=60)
            c.stop_trace(trace["id"])
    ok = "WS-DONE" in out and len(got) == n and len({r["id"] for r in got}) == n
    p50, p99 = _pct(lat, 0.5), _pct(lat, 0.99)
    print(f"exec -> WebSocket: {len(got)} of {n} execs delivered in {run_s:.1f} s; latency p50 "
          f"{p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms, max {max(lat) * 1e3:.1f} ms "
          f"{'OK' if ok else 'FAILED: events missing or twice'}")
    lib = library_latency(guest, tag, n)
    l50, l99 = _pct(lib, 0.5), _pct(lib, 0.99)
    print(f"exec -> library Tracer.events() in-process (baseline): {len(lib)} of {n}; latency p50 "
          f"{l50 * 1e3:.2f} ms, p99 {l99 * 1e3:.2f} ms")
    return [f"ratio ws-p50/library-p50: {p50 / l50:.1f}x (+{(p50 - l50) * 1e3:.1f} ms)",
            f"ratio ws-p99/library-p99: {p99 / l99:.1f}x (+{(p99 - l99) * 1e3:.1f} ms)"], ok and len(lib) == n


def library_latency(guest: Guest, tag: str, n: int) -> list[float]:
    """The same execs traced by the library in this process: hit handled -> the consumer has it."""
    lat: list[float] = []
    done = threading.Event()
    with attach(f"qmp:{guest.qmp_path}") as vm, Tracer.open(vm) as tracer:
        tracer.add_syscall("execve")
        runner = threading.Thread(target=lambda: (guest.run("bash /tmp/ws.sh", timeout=600), done.set()),
                                  daemon=True)
        runner.start()
        for ev in tracer.events(duration=600, until=lambda: done.is_set() and len(lat) >= n):
            if tag in (ev.args.get("argv") or []):
                lat.append(time.monotonic() - ev.time)
        runner.join(timeout=60)
    return lat


def bench_guest(args: argparse.Namespace) -> tuple[list[str], bool]:
    """Boot the guest once for both sections."""
    image = build_guest("6.1")
    with tempfile.TemporaryDirectory(prefix="aradia-bench-svc-") as tmpdir, \
            launch(image, smp=2, gdb=True, shared_memory=True) as guest:
        tmp = Path(tmpdir)
        ratios = bench_api(args, guest, tmp)
        (tmp / "ws").mkdir()
        more, ok = bench_ws(args, guest, tmp / "ws")
    return ratios + more, ok
