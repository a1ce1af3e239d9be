"""The dashboard (``aradia serve`` at ``/``) in Debian's chromium driven by Playwright, against the real
service owning a real guest. Ground truth comes from the guest: the processes it started (their pids
and parents from its own ``/proc``) and the execs it ran.

The service owns ``web1`` (the guest, tenant alice: views, read, trace) and ``web2`` (tenant carol:
views only; its QMP socket does not exist, so it is configured but away). Screenshots of the VM list,
the process tree and the live stream go to ``tests/artifacts/``.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from aradia.lab.launcher import Guest
from dashboard_env import launch_chromium, local_input, screenshot, sign_in
from service_env import ServiceProcess, VMEntry, api, config_text, principal, serving
from waiting import wait_until

OPERATOR = principal("operator")
ALICE = principal("alice", ["views", "read", "trace"])
CAROL = principal("carol", ["views"])
N_EXEC = 20


@dataclass
class Dash:
    """The guest, the service and the browser."""

    guest: Guest
    svc: ServiceProcess
    browser: Browser


@pytest.fixture(scope="module")
def dash(launch_guest: Callable[..., Guest]) -> Iterator[Dash]:
    guest = launch_guest("6.1", smp=2, gdb=True, shared_memory=True)
    vms = lambda tmp: [VMEntry("web1", str(guest.qmp_path), "alice"),  # noqa: E731
                       VMEntry("web2", str(tmp / "no-such-qmp.sock"), "carol")]
    with serving(OPERATOR, [ALICE, CAROL], vms, "aradia-dash-") as svc, sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            yield Dash(guest, svc, browser)
        finally:
            browser.close()


class _Markup(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.inline: list[str] = []  # inline script text, style attributes, event handler attributes
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "script":
            self.scripts.append(a)
            self._in_script = True
        if tag == "style":
            self.inline.append("<style>")
        self.inline += [f"{tag} {k}=" for k in a if k == "style" or k.startswith("on")]

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline.append(f"<script>{data.strip()[:40]}")


def _rows(page: Page, selector: str) -> list[dict[str, str]]:
    """Every row matching ``selector``: its data attributes, class and cells' text."""
    return page.eval_on_selector_all(selector, """rows => rows.map(r => ({...r.dataset, class: r.className,
        cells: [...r.cells].map(c => c.textContent)}))""")


@pytest.mark.timeout(300)
def test_page_assets_content_types_and_csp(dash: Dash) -> None:
    csp = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
           "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'")
    index = httpx.get(f"{dash.svc.url}/", timeout=30)
    health = api(dash.svc.url, ALICE.token, "GET", "/health")
    refused = api(dash.svc.url, "aradia_wrong", "GET", "/vms")
    for r, status in ((index, 200), (health, 200), (refused, 401)):
        assert r.status_code == status
        assert r.headers["content-security-policy"] == csp
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["referrer-policy"] == "no-referrer"
    assert index.headers["content-type"] == "text/html; charset=utf-8"
    markup = _Markup()
    markup.feed(index.text)
    assert markup.inline == []
    assert [s.get("src") for s in markup.scripts] == ["/static/vendor/uPlot.iife.min.js", "/static/app.js"]
    types = {"/static/app.js": "text/javascript; charset=utf-8", "/static/events.js": "text/javascript; charset=utf-8",
             "/static/vendor/uPlot.iife.min.js": "text/javascript; charset=utf-8",
             "/static/style.css": "text/css; charset=utf-8", "/static/vendor/uPlot.min.css": "text/css; charset=utf-8"}
    for path, ctype in types.items():
        r = httpx.get(f"{dash.svc.url}{path}", timeout=30)
        assert (r.status_code, r.headers["content-type"]) == (200, ctype), path
        assert r.headers["content-security-policy"] == csp
    for path in ("/static/../web.py", "/static/vendor/uPlot.integrity", "/static/nosuch.js"):
        assert httpx.get(f"{dash.svc.url}{path}", timeout=30).status_code == 404, path


@pytest.mark.timeout(300)
def test_wrong_token_shows_the_401(dash: Dash) -> None:
    page = sign_in(dash.browser, dash.svc.url, "aradia_not-a-token")
    page.wait_for_selector("#sign-in-error:has-text('401')", timeout=10_000)
    assert page.inner_text("#sign-in-error") == "refused (401): the token is not valid"
    assert page.evaluate("sessionStorage.getItem('aradia.token')") is None  # a wrong token is not kept
    assert "aradia_not-a-token" not in page.url
    page.fill("#token", ALICE.token)  # the right one, same page: signed in
    page.click("#sign-in-button")
    page.wait_for_selector("#vm-rows tr", timeout=10_000)
    assert page.inner_text("#who") == "alice on hv1"
    page.context.close()


@pytest.mark.timeout(300)
def test_a_tenant_sees_only_its_vms_and_a_refusal_for_another(dash: Dash) -> None:
    page = sign_in(dash.browser, dash.svc.url, ALICE.token)
    page.wait_for_selector("#vm-rows tr", timeout=10_000)
    rows = _rows(page, "#vm-rows tr")
    assert [r["vm"] for r in rows] == ["web1"]
    kernel = dash.guest.run("uname -r").strip()
    assert rows[0]["cells"][1] == "running (attached)" and rows[0]["cells"][2] == kernel
    assert rows[0]["cells"][3:5] == ["2", "shared-file"]
    assert ALICE.token not in page.url and page.evaluate("sessionStorage.getItem('aradia.token')") == ALICE.token
    screenshot(page, "dashboard-vms")
    page.goto(f"{dash.svc.url}/#/vm/web2")
    page.wait_for_selector("#vm-error", timeout=10_000)
    assert page.inner_text("#vm-error") == "refused (403): tenant 'alice' has no VM named 'web2'"
    assert page.query_selector("#tab-body") is None and page.query_selector("#proc-tree") is None
    page.context.close()
    op = sign_in(dash.browser, dash.svc.url, OPERATOR.token)  # the operator sees both
    op.wait_for_selector("#vm-rows tr[data-vm='web2']", timeout=10_000)
    assert [r["vm"] for r in _rows(op, "#vm-rows tr")] == ["web1", "web2"]
    op.context.close()


@pytest.mark.timeout(300)
def test_a_new_process_appears_under_its_parent_and_is_marked_gone(dash: Dash) -> None:
    g = dash.guest
    page = sign_in(dash.browser, dash.svc.url, ALICE.token, "#/vm/web1")
    page.wait_for_selector("#proc-rows tr[data-pid='1']", timeout=30_000)
    g.run("cp /bin/bash /tmp/dashproc")
    pid = int(g.run("/tmp/dashproc -c 'sleep 600; true' dash-arg0 dash-arg1 >/dev/null 2>&1 </dev/null & echo $!"))
    t0 = time.monotonic()
    child = int(wait_until(lambda: bool(g.run(f"cat /proc/{pid}/task/{pid}/children").strip()), 10, "sleep")
                and g.run(f"cat /proc/{pid}/task/{pid}/children").split()[0])
    ppid = int(g.run(f"cut -d' ' -f4 /proc/{pid}/stat"))
    cmdline = g.run(f"tr '\\0' ' ' < /proc/{pid}/cmdline").strip()
    assert cmdline == "/tmp/dashproc -c sleep 600; true dash-arg0 dash-arg1"
    sel = f"#proc-rows tr[data-pid='{pid}']"
    page.wait_for_selector(f"#proc-rows tr[data-pid='{child}']", timeout=10_000)
    seen = time.monotonic() - t0
    assert seen < 2.0, f"the new process took {seen:.2f} s to appear"
    rows = _rows(page, "#proc-rows tr")
    order = [int(r["pid"]) for r in rows]
    by_pid = {int(r["pid"]): r for r in rows}
    me, kid, parent = by_pid[pid], by_pid[child], by_pid[ppid]
    assert int(me["ppid"]) == ppid and int(kid["ppid"]) == pid
    assert int(me["depth"]) == int(parent["depth"]) + 1 and int(kid["depth"]) == int(me["depth"]) + 1
    assert order.index(ppid) < order.index(pid) < order.index(child)  # under its parent, in tree order
    assert "new" in me["class"].split() and "new" in kid["class"].split()
    assert "new" not in by_pid[1]["class"].split()  # there from the first poll: not new
    assert me["cells"][3] == "dashproc" and me["cells"][4] == cmdline and kid["cells"][4] == "sleep 600"
    screenshot(page, "dashboard-process-tree")
    # collapse its parent: it is hidden; expand: back
    page.click(f"#proc-rows tr[data-pid='{pid}'] button.toggle")
    page.wait_for_selector(f"#proc-rows tr[data-pid='{child}']", state="detached", timeout=5_000)
    page.click(f"#proc-rows tr[data-pid='{pid}'] button.toggle")
    page.wait_for_selector(f"#proc-rows tr[data-pid='{child}']", timeout=5_000)
    # maps and open files one click away
    page.click(sel)
    page.click("#show-maps")
    page.wait_for_selector("#proc-maps tr", timeout=10_000)
    maps_lines = len(g.run(f"cat /proc/{pid}/maps").splitlines())
    assert page.eval_on_selector_all("#proc-maps tbody tr", "r => r.length") == maps_lines
    g.run(f"kill {child} {pid}")
    t1 = time.monotonic()
    page.wait_for_selector(f"{sel}.gone", timeout=10_000)
    assert time.monotonic() - t1 < 2.5
    assert g.run(f"test -e /proc/{pid} && echo alive || echo gone").strip() == "gone"
    assert "gone" in _rows(page, f"#proc-rows tr[data-pid='{child}']")[0]["class"].split()
    assert "gone" not in _rows(page, "#proc-rows tr[data-pid='1']")[0]["class"].split()
    page.context.close()


def _exec_script(tag: str, n: int) -> str:
    return "\n".join([f"/bin/true {tag}{i} arg-{i * 7}" for i in range(n)] + [f"echo {tag}-DONE"])


def _run_from(g: Guest, runner: str, tag: str, n: int) -> None:
    """Run ``n`` execs of /bin/true from a copy of bash named ``runner`` (their comm at exec)."""
    g.run(f"cp /bin/bash /tmp/{runner}; cat > /tmp/{tag}.sh <<'EOF'\n{_exec_script(tag, n)}\nEOF")
    assert f"{tag}-DONE" in g.run(f"/tmp/{runner} /tmp/{tag}.sh", timeout=300)


def _expected(tag: str, n: int) -> list[str]:
    return [f"/bin/true {tag}{i} arg-{i * 7}" for i in range(n)]


@pytest.mark.timeout(600)
def test_a_trace_started_from_the_page_shows_every_exec_live_in_the_chart_and_in_history(dash: Dash) -> None:
    page = sign_in(dash.browser, dash.svc.url, ALICE.token, "#/vm/web1/events")
    page.wait_for_selector("#live-status:text('live')", timeout=30_000)
    page.select_option("#trace-kind", "syscalls")
    page.fill("#trace-what", "execve")
    page.fill("#trace-comm", "dashrun")
    page.click("#trace-start")
    page.wait_for_selector("#trace-status:has-text('started')", timeout=30_000)
    trace_id = page.get_attribute("#trace-status", "data-trace")
    traces = api(dash.svc.url, ALICE.token, "GET", "/traces").json()
    assert [(t["id"], t["spec"]) for t in traces] == [
        (trace_id, {"kind": "syscalls", "syscalls": ["execve"], "comm": ["dashrun"]})]
    t_start = time.time()
    _run_from(dash.guest, "dashrun", "dash-ex", N_EXEC)
    t_end = time.time()
    wait_until(lambda: page.eval_on_selector_all("#live-rows tr", "r => r.length") >= N_EXEC, 30, "20 live rows")
    live = _rows(page, "#live-rows tr")
    assert [r["cells"][6] for r in reversed(live)] == _expected("dash-ex", N_EXEC)  # newest first
    assert {(r["name"], r["kind"], r["comm"]) for r in live} == {("execve", "syscall", "dashrun")}
    wait_until(lambda: page.get_attribute("#chart-totals span[data-name='execve']", "data-total") == str(N_EXEC),
               5, "the chart's execve count")
    assert page.inner_text("#chart-totals") == f"execve: {N_EXEC}"
    screenshot(page, "dashboard-live-stream")
    # the same 20 in stored history for the time range
    page.fill("#history-from", local_input(t_start - 1))
    page.fill("#history-to", local_input(t_end + 2))
    page.click("#history-load")
    page.wait_for_selector("#history-count", timeout=30_000)
    assert page.get_attribute("#history-count", "data-count") == str(N_EXEC)
    history = _rows(page, "#history-rows tr")
    assert [r["id"] for r in history] == [r["id"] for r in reversed(live)]
    assert [r["cells"][6] for r in history] == _expected("dash-ex", N_EXEC)
    # a range before the trace holds none of them
    page.fill("#history-from", local_input(t_start - 120))
    page.fill("#history-to", local_input(t_start - 60))
    page.click("#history-load")
    page.wait_for_selector("#history-count[data-count='0']", timeout=30_000)
    # pause: new events are held back; resume: shown
    page.click("#pause")
    _run_from(dash.guest, "dashrun", "dash-pz", 3)
    time.sleep(1.5)
    assert page.eval_on_selector_all("#live-rows tr", "r => r.length") == N_EXEC
    assert page.inner_text("#live-count") == f"{N_EXEC} shown of {N_EXEC + 3} kept, paused (3 waiting)"
    page.click("#pause")
    assert page.eval_on_selector_all("#live-rows tr", "r => r.length") == N_EXEC + 3
    page.click(f"#trace-rows tr[data-trace='{trace_id}'] button.stop")
    page.wait_for_selector("#trace-status:has-text('stopped')", timeout=30_000)
    assert api(dash.svc.url, ALICE.token, "GET", "/traces").json() == []
    page.context.close()


@pytest.mark.timeout(600)
def test_a_filter_by_comm_shows_exactly_that_process_events(dash: Dash) -> None:
    page = sign_in(dash.browser, dash.svc.url, ALICE.token, "#/vm/web1/events")
    page.wait_for_selector("#live-status:text('live')", timeout=30_000)
    page.fill("#trace-what", "execve")
    page.click("#trace-start")
    page.wait_for_selector("#trace-status:has-text('started')", timeout=30_000)
    trace_id = page.get_attribute("#trace-status", "data-trace")
    _run_from(dash.guest, "dashcomm", "dash-cm", 5)
    wait_until(lambda: sum("dash-cm" in r["cells"][6] for r in _rows(page, "#live-rows tr")) >= 5, 30, "5 rows")
    everything = _rows(page, "#live-rows tr")
    assert {r["comm"] for r in everything} - {"dashcomm"}  # other processes' execs are in the table
    page.fill("#filter-comm", "dashcomm")
    only = _rows(page, "#live-rows tr")
    assert [r["cells"][6] for r in reversed(only)] == _expected("dash-cm", 5)
    assert {r["comm"] for r in only} == {"dashcomm"}
    page.fill("#filter-comm", "")
    # every row is back (the guest's own later execs may have joined them meanwhile)
    assert {r["id"] for r in everything} <= {r["id"] for r in _rows(page, "#live-rows tr")}
    api(dash.svc.url, ALICE.token, "DELETE", f"/traces/{trace_id}")
    page.context.close()


@pytest.mark.timeout(300)
def test_a_tenant_without_trace_sees_the_policy_refuse_the_start(dash: Dash) -> None:
    page = sign_in(dash.browser, dash.svc.url, CAROL.token, "#/vm/web2/events")
    page.wait_for_selector("#trace-start", timeout=30_000)
    assert "lacks the trace permission" in page.inner_text("#traces")
    page.fill("#trace-what", "execve")
    page.click("#trace-start")
    page.wait_for_selector("#trace-status.error", timeout=30_000)
    assert page.inner_text("#trace-status") == "refused (403): tenant 'carol' may not use 'trace'"
    rows = api(dash.svc.url, OPERATOR.token, "GET", "/audit", params={"tenant": "carol", "limit": 1000}).json()["items"]
    starts = [(r["operation"], r["vm"], r["status"], r["allowed"]) for r in rows if r["operation"] == "trace.start"]
    assert starts == [("trace.start", "web2", 403, False)]
    alice = api(dash.svc.url, OPERATOR.token, "GET", "/audit", params={"tenant": "alice", "limit": 10000}).json()["items"]
    assert [r["status"] for r in alice if r["operation"] == "trace.start"] == [200, 200]  # the page's own starts
    page.context.close()


@pytest.mark.timeout(600)
def test_the_aggregate_service_lists_the_hosts_vms_read_only(dash: Dash) -> None:
    """hv1 restarted with a nats-server; an ``--aggregate`` service reads its stream: its page lists
    hv1's web1 with the exact count of stored events, shows them, and offers no trace control."""
    from nats_server import NatsServer

    tmp = Path(tempfile.mkdtemp(prefix="aradia-dash-agg-"))
    broker = NatsServer(tmp / "jetstream").start()
    agg = None
    try:
        dash.svc.stop()
        dash.svc.config.write_text(dash.svc.config.read_text() + f'[nats]\nurl = "{broker.url}"\n')
        dash.svc.start(OPERATOR.token)
        since = time.time()  # what hv1 stored before it had a bus was never published
        trace = api(dash.svc.url, ALICE.token, "POST", "/vms/web1/traces",
                    json={"kind": "syscalls", "syscalls": ["execve"], "comm": ["dashagg"]}).json()
        _run_from(dash.guest, "dashagg", "dash-ag", 4)
        api(dash.svc.url, ALICE.token, "DELETE", f"/traces/{trace['id']}")
        cfg = tmp / "agg.toml"
        cfg.write_text(config_text(host="fleet", store=tmp / "agg.db", operator=OPERATOR, nats=broker.url,
                                   aggregate=True))
        agg = ServiceProcess(cfg, tmp)
        agg.start(OPERATOR.token)
        own = api(dash.svc.url, OPERATOR.token, "GET", "/events", params={"vm": "web1", "since": since, "limit": 10000}).json()
        wait_until(lambda: [(v["host"], v["name"], v["events"]) for v in
                            api(agg.url, OPERATOR.token, "GET", "/vms").json()] == [("hv1", "web1", len(own["items"]))],
                   60, "the aggregate's VM list", step=0.5)
        page = sign_in(dash.browser, agg.url, OPERATOR.token)
        page.wait_for_selector("#vm-rows tr[data-host='hv1']", timeout=30_000)
        rows = _rows(page, "#vm-rows tr")
        assert [(r["host"], r["vm"], r["cells"][2]) for r in rows] == [("hv1", "web1", str(len(own["items"])))]
        assert "aggregate, read-only" in page.inner_text("#who")
        page.click("#vm-rows tr[data-host='hv1'] a")
        page.wait_for_selector("#history-count", timeout=30_000)
        assert page.query_selector("#trace-start") is None  # read-only: no control
        page.fill("#filter-q", "dash-ag")
        page.click("#history-load")
        page.wait_for_selector("#history-count[data-count='4']", timeout=30_000)
        assert [r["cells"][6] for r in _rows(page, "#history-rows tr")] == _expected("dash-ag", 4)
        # live too: hv1's next events reach the aggregate's page through the stream
        page.fill("#filter-q", "")
        page.wait_for_selector("#live-status:text('live')", timeout=30_000)
        trace = api(dash.svc.url, ALICE.token, "POST", "/vms/web1/traces",
                    json={"kind": "syscalls", "syscalls": ["execve"], "comm": ["dashagg"]}).json()
        _run_from(dash.guest, "dashagg", "dash-al", 3)
        api(dash.svc.url, ALICE.token, "DELETE", f"/traces/{trace['id']}")
        wait_until(lambda: page.eval_on_selector_all("#live-rows tr", "r => r.length") >= 3, 60,
                   "3 live rows on the aggregate's page")
        live = _rows(page, "#live-rows tr")
        assert [r["cells"][6] for r in reversed(live)] == _expected("dash-al", 3)
        page.context.close()
    finally:
        if agg is not None:
            agg.stop()
        broker.kill()
        shutil.rmtree(tmp, ignore_errors=True)
