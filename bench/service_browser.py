"""The ``browser`` section of ``bench/service.py``: guest exec -> row visible in the dashboard.

One guest (6.1, 2 vCPUs, TCG, shared RAM file) and ``aradia serve`` for it; Debian's chromium (driven
by Playwright) signed in on the VM's events page, and at the same time a Python WebSocket subscriber
(``aradia.client``), the baseline. A trace of ``execve`` and ``--execs`` execs of ``/bin/true`` in the
guest; for each event, the page's own clock when it appended the row (``performance.timeOrigin +
performance.now()``, the row's ``data-shown``) minus the record's ``time`` (when the tracer handled
the hit), and for the same events the Python subscriber's receipt minus ``time``: p50/p99 of each.
Every event must reach both (exactly ``--execs`` rows, none twice).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from playwright.sync_api import sync_playwright

from aradia.client import Client
from aradia.lab.images import build_guest
from aradia.lab.launcher import launch
from service_guest import _pct, served

CHROMIUM = "/usr/bin/chromium"
TAG = "bench-browser"


def bench_browser(args: argparse.Namespace) -> tuple[list[str], bool]:
    """Exec -> browser row latency against exec -> Python WebSocket latency; (ratio lines, ok)."""
    n = args.execs
    script = f"for i in $(seq {n}); do /bin/true {TAG} $i; done\necho BR-DONE"
    with tempfile.TemporaryDirectory(prefix="aradia-bench-browser-") as tmpdir, \
            launch(build_guest("6.1"), smp=2, gdb=True, shared_memory=True) as guest, \
            served(guest, Path(tmpdir)) as (url, token), sync_playwright() as pw:
        guest.run(f"cat > /tmp/br.sh <<'EOF'\n{script}\nEOF")
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(f"{url}/#/vm/web1/events")
        page.fill("#token", token)
        page.click("#sign-in-button")
        page.wait_for_selector("#live-status:text('live')", timeout=60_000)
        got: list[tuple[dict[str, Any], float]] = []
        with Client(url, token) as c, c.live("web1", kind=["syscall"], name=["execve"]) as stream:
            trace = c.start_trace("web1", {"kind": "syscalls", "syscalls": ["execve"]})

            def read() -> None:
                for rec in stream.events(duration=600):
                    now = time.time()
                    if TAG in (rec.get("args", {}).get("argv") or []):
                        got.append((rec, now))
                        if len(got) >= n:
                            return

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            t0 = time.monotonic()
            out = guest.run("bash /tmp/br.sh", timeout=600)
            run_s = time.monotonic() - t0
            reader.join(timeout=60)
            deadline = time.monotonic() + 30
            rows: list[dict[str, str]] = []
            while time.monotonic() < deadline:
                rows = page.eval_on_selector_all(
                    "#live-rows tr", "rs => rs.map(r => ({id: r.dataset.id, time: r.dataset.time, "
                    "shown: r.dataset.shown, args: r.cells[6].textContent}))")
                rows = [r for r in rows if f" {TAG} " in f" {r['args']} "]
                if len(rows) >= n:
                    break
                time.sleep(0.2)
            c.stop_trace(trace["id"])
        browser.close()
    ws_by_id = {rec["id"]: now - rec["time"] for rec, now in got}
    br = [float(r["shown"]) / 1000 - float(r["time"]) for r in rows]
    both = [r["id"] for r in rows if r["id"] in ws_by_id]
    ok = "BR-DONE" in out and len(rows) == n and len({r["id"] for r in rows}) == n and len(both) == n
    ws = [ws_by_id[i] for i in both]
    b50, b99 = _pct(br, 0.5), _pct(br, 0.99)
    w50, w99 = _pct(ws, 0.5), _pct(ws, 0.99)
    verdict = "OK" if ok else "FAILED: rows missing or twice"
    print(f"exec -> browser row: {len(rows)} of {n} execs shown in {run_s:.1f} s; latency p50 "
          f"{b50 * 1e3:.1f} ms, p99 {b99 * 1e3:.1f} ms, max {max(br) * 1e3:.1f} ms {verdict}")
    print(f"exec -> Python WebSocket (baseline, same events): {len(ws)} of {n}; latency p50 "
          f"{w50 * 1e3:.1f} ms, p99 {w99 * 1e3:.1f} ms")
    return [f"ratio browser-p50/websocket-p50: {b50 / w50:.2f}x (+{(b50 - w50) * 1e3:.1f} ms)",
            f"ratio browser-p99/websocket-p99: {b99 / w99:.2f}x (+{(b99 - w99) * 1e3:.1f} ms)"], ok
