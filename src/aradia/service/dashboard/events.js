// Live events of one VM: a stream table (newest first, the last 2,000 kept) with filters (kind, pid,
// comm, free text), pause/resume, a per-name events/s chart, the trace controls, and stored history
// over a time range. Each live row records when the page showed it (data-shown, ms since the epoch).

import { api, openLive, query } from "./api.js";
import { RateChart } from "./chart.js";
import { clock, errorLine, h } from "./dom.js";
import { showTraces } from "./traces.js";

const KEEP = 2000;

// A guard alert as one line: action, operation, object, process, login session.
function alertText(record) {
  const a = record.args || {};
  const o = a.object || {};
  const p = a.process || { comm: record.comm, pid: record.tgid, uid: record.uid };
  const s = a.session;
  const who = s ? `session ${s.user} from ${s.client}:${s.client_port}` : "no login session";
  return `${String(a.action || "?").toUpperCase()} ${record.name} ${o.path} (ino ${o.ino}) by ` +
    `${p.comm}[${p.pid}] uid=${p.uid}; ${who}; rule ${a.rule}`;
}

// Decoded arguments as text: argv for an exec, an alert's line, else key=value pairs.
export function argsText(record) {
  const a = record.args || {};
  if (record.kind === "guard") return alertText(record);
  if (Array.isArray(a.argv)) return a.argv.join(" ");
  return Object.entries(a).map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(" ");
}

function row(record, shown) {
  const alert = record.kind === "guard" ? `alert alert-${(record.args || {}).action}` : undefined;
  return h("tr", { class: alert, dataset: { id: record.id, name: record.name, kind: record.kind, pid: record.pid,
                              comm: record.comm, time: record.time, ...(shown ? { shown } : {}) } },
    h("td", {}, clock(record.time)), h("td", { class: "num" }, record.vcpu), h("td", { class: "num" }, record.pid),
    h("td", {}, record.comm), h("td", {}, record.kind), h("td", {}, record.name),
    h("td", { class: "mono args" }, argsText(record)));
}

const HEADS = ["time", "vCPU", "pid", "comm", "kind", "name", "arguments"];
const thead = () => h("thead", {}, h("tr", {}, HEADS.map((t) => h("th", {}, t))));

// datetime-local value -> Unix seconds (local time), or undefined when empty.
const seconds = (value) => (value ? new Date(value).getTime() / 1000 : undefined);

// Render the events tab; returns the clean-up function.
export function showEvents(root, vm, me) {
  const cleanups = [];
  const f = {
    kind: h("input", { id: "filter-kind", placeholder: "kind (syscall, exec…)", size: 14 }),
    pid: h("input", { id: "filter-pid", placeholder: "pid", size: 7 }),
    comm: h("input", { id: "filter-comm", placeholder: "comm", size: 12 }),
    q: h("input", { id: "filter-q", placeholder: "free text", size: 16 }),
  };
  const pause = h("button", { type: "button", id: "pause" }, "Pause");
  const status = h("span", { class: "status", id: "live-status" }, "connecting…");
  const count = h("span", { class: "status", id: "live-count" });
  const tbody = h("tbody", { id: "live-rows" });
  const buffer = []; // newest last
  const pending = []; // received, not yet drawn
  let paused = false;
  let scheduled = false;

  const keep = (r) => {
    const { kind, pid, comm, q } = Object.fromEntries(Object.entries(f).map(([k, el]) => [k, el.value.trim()]));
    if (kind && r.kind !== kind && r.name !== kind) return false;
    if (pid && String(r.pid) !== pid && String(r.tgid) !== pid) return false;
    if (comm && r.comm !== comm) return false;
    if (q) {
      const hay = `${r.comm}\n${r.name}\n${JSON.stringify(r.args)}`.toLowerCase();
      if (!hay.includes(q.toLowerCase())) return false;
    }
    return true;
  };
  const showCount = () => {
    count.textContent = `${tbody.childElementCount} shown of ${buffer.length} kept` +
      (paused ? `, paused (${pending.length} waiting)` : "");
  };
  const redraw = () => {
    tbody.replaceChildren(...buffer.filter(keep).reverse().map((r) => row(r)));
    showCount();
  };
  const flush = () => {
    scheduled = false;
    if (paused || !pending.length) return;
    const shown = String(performance.timeOrigin + performance.now());
    const rows = pending.splice(0).filter(keep).reverse().map((r) => row(r, shown));
    tbody.prepend(...rows);
    while (tbody.childElementCount > KEEP) tbody.lastElementChild.remove();
    showCount();
  };
  const chartBox = h("div");
  const chart = new RateChart(chartBox);
  const onEvent = (record) => {
    buffer.push(record);
    if (buffer.length > KEEP) buffer.splice(0, buffer.length - KEEP);
    chart.add(record);
    pending.push(record);
    if (pending.length > KEEP) pending.splice(0, pending.length - KEEP);
    if (paused) showCount();
    else if (!scheduled) { scheduled = true; requestAnimationFrame(flush); }
  };
  pause.addEventListener("click", () => {
    paused = !paused;
    pause.textContent = paused ? "Resume" : "Pause";
    if (!paused) { pending.length = 0; redraw(); } else showCount();
  });
  for (const el of Object.values(f)) el.addEventListener("input", redraw);

  // stored history
  const from = h("input", { id: "history-from", type: "datetime-local", step: 1 });
  const to = h("input", { id: "history-to", type: "datetime-local", step: 1 });
  const historyOut = h("div", { id: "history" });
  const loadHistory = async () => {
    historyOut.replaceChildren(h("p", { class: "note" }, "loading…"));
    try {
      const items = [];
      let cursor;
      const base = { vm, kind: f.kind.value.trim() || undefined, pid: f.pid.value.trim() || undefined,
                     q: f.q.value.trim() || undefined, since: seconds(from.value), until: seconds(to.value), limit: 1000 };
      for (let page = 0; page < 10; page++) {
        const doc = await api(`/events${query({ ...base, cursor })}`);
        items.push(...doc.items);
        cursor = doc.next;
        if (!cursor) break;
      }
      const comm = f.comm.value.trim();
      const shown = items.filter((r) => (!comm || r.comm === comm) && (!base.kind || r.kind === base.kind || r.name === base.kind));
      historyOut.replaceChildren(
        h("p", { class: "status", id: "history-count", dataset: { count: shown.length } },
          `${shown.length} stored events${cursor ? " (more: narrow the range)" : ""}`),
        h("div", { class: "scroll" }, h("table", { id: "history-table" }, thead(),
          h("tbody", { id: "history-rows" }, shown.map((r) => row(r))))));
    } catch (e) {
      historyOut.replaceChildren(errorLine(e, "history-error"));
    }
  };

  if (!me.aggregate) {  // an aggregate is read-only: it shows what the hosts' traces see
    const traces = h("div", { id: "traces" });
    root.append(traces);
    cleanups.push(showTraces(traces, vm, me));
  }
  root.append(chartBox);
  root.append(h("h3", {}, "Live events"),
    h("div", { class: "toolbar" }, f.kind, f.pid, f.comm, f.q, pause, status, count),
    h("div", { class: "scroll" }, h("table", { id: "live" }, thead(), tbody)));
  const live = openLive(vm, onEvent, (text, bad) => {
    status.textContent = text;
    status.className = bad ? "error" : "status";
  });
  cleanups.push(() => live.close());
  const timer = setInterval(() => chart.draw(), 1000);
  cleanups.push(() => { clearInterval(timer); chart.destroy(); });
  root.append(h("h3", {}, "Stored history"),
    h("div", { class: "toolbar" }, "from", from, "to", to,
      h("button", { type: "button", id: "history-load", onclick: loadHistory }, "Show stored events")),
    historyOut);
  if (me.aggregate) loadHistory();
  return () => { while (cleanups.length) cleanups.pop()(); };
}
