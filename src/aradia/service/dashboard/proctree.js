// The process tree, polled every second while shown: parent/child rows (collapsible), new processes
// marked "new" for a while, exited ones kept a while and marked "gone". Rows carry data-pid,
// data-ppid and data-depth. A click on a row shows its maps and open files one click away.

import { api } from "./api.js";
import { errorLine, h, sinceBoot, table } from "./dom.js";

const POLL_MS = 1000;
const NEW_MS = 10000;
const GONE_MS = 30000;

const keyOf = (p) => `${p.pid}:${p.start_time}`;

// Render the tree into root and keep it fresh; returns the clean-up function.
export function showProcesses(root, vm, me) {
  const known = new Map(); // key -> {proc, firstSeen, goneSince}
  const collapsed = new Set(); // pids whose children are hidden
  let selected = null;
  let polls = 0;
  let stopped = false;
  let timer = null;
  const status = h("p", { class: "status", id: "procs-status" });
  const tbody = h("tbody", { id: "proc-rows" });
  const details = h("div", { id: "proc-details" }, h("p", { class: "note" }, "Click a process for its maps and open files."));
  const heads = ["", "pid", "user", "comm", "cmdline", "started (after boot)", "state"];
  root.append(status, h("div", { class: "split" },
    h("div", { class: "scroll" }, h("table", { id: "proc-tree" },
      h("thead", {}, h("tr", {}, heads.map((t) => h("th", {}, t)))), tbody)),
    details));

  const showDetails = async (proc, what) => {
    details.replaceChildren(h("h3", {}, `${proc.pid} ${proc.name || proc.comm}`),
      h("div", { class: "toolbar" },
        h("button", { type: "button", id: "show-maps", onclick: () => showDetails(proc, "maps") }, "maps"),
        h("button", { type: "button", id: "show-files", onclick: () => showDetails(proc, "files") }, "open files"),
        me.operations.includes("memory")
          ? h("a", { href: `#/vm/${encodeURIComponent(vm)}/memory`, id: "show-memory",
                     onclick: () => sessionStorage.setItem("aradia.hexpid", String(proc.pid)) }, "memory…")
          : ""));
    if (!what) return;
    try {
      const doc = await api(`/vms/${encodeURIComponent(vm)}/${what}/${proc.pid}`);
      if (what === "maps" && doc.items.length) sessionStorage.setItem("aradia.hexaddr", `0x${doc.items[0].start.toString(16)}`);
      const items = what === "maps"
        ? doc.items.map((m) => ({ ...m, start: `0x${m.start.toString(16)}`, end: `0x${m.end.toString(16)}` }))
        : doc.items;
      details.append(h("p", { class: "status" }, `${items.length} ${what === "maps" ? "mappings" : "open files"}`),
        h("div", { class: "scroll", id: `proc-${what}` }, table(items)));
    } catch (e) {
      details.append(errorLine(e, "details-error"));
    }
  };

  const render = () => {
    const now = Date.now();
    const byPid = new Map();
    for (const entry of known.values()) byPid.set(entry.proc.pid, entry);
    const children = new Map();
    const roots = [];
    for (const entry of known.values()) {
      const { pid, ppid } = entry.proc;
      if (ppid !== pid && byPid.has(ppid)) {
        if (!children.has(ppid)) children.set(ppid, []);
        children.get(ppid).push(entry);
      } else roots.push(entry);
    }
    const rows = [];
    const walk = (entry, depth) => {
      const p = entry.proc;
      const kids = (children.get(p.pid) || []).sort((a, b) => a.proc.pid - b.proc.pid);
      const classes = [entry.goneSince ? "gone" : "", !entry.goneSince && now - entry.firstSeen < NEW_MS && entry.marked ? "new" : "",
        selected === p.pid ? "selected" : ""].filter(Boolean).join(" ");
      const toggle = kids.length
        ? h("button", { type: "button", class: "toggle", title: "collapse/expand",
                        onclick: (e) => { e.stopPropagation(); if (collapsed.has(p.pid)) collapsed.delete(p.pid); else collapsed.add(p.pid); render(); } },
            collapsed.has(p.pid) ? "▸" : "▾")
        : "";
      const comm = h("td", {}, p.name || p.comm);
      comm.style.paddingLeft = `${8 + depth * 14}px`;
      rows.push(h("tr", { class: classes, dataset: { pid: p.pid, ppid: p.ppid, depth, comm: p.comm },
                          onclick: () => { selected = p.pid; render(); showDetails(p); } },
        h("td", {}, toggle), h("td", { class: "num" }, p.pid), h("td", { class: "num" }, p.uid), comm,
        h("td", { class: "mono" }, (p.cmdline || []).join(" ")), h("td", {}, sinceBoot(p.start_time)),
        h("td", {}, entry.goneSince ? "exited" : p.state)));
      if (!collapsed.has(p.pid)) for (const k of kids) walk(k, depth + 1);
    };
    for (const r of roots.sort((a, b) => a.proc.pid - b.proc.pid)) walk(r, 0);
    tbody.replaceChildren(...rows);
  };

  const poll = async () => {
    if (document.visibilityState === "visible") {
      try {
        const doc = await api(`/vms/${encodeURIComponent(vm)}/processes`);
        const now = Date.now();
        const seen = new Set();
        for (const p of doc.items) {
          const key = keyOf(p);
          seen.add(key);
          const entry = known.get(key);
          if (entry) { entry.proc = p; entry.goneSince = null; }
          else known.set(key, { proc: p, firstSeen: now, goneSince: null, marked: polls > 0 });
        }
        for (const [key, entry] of known) {
          if (seen.has(key)) continue;
          if (!entry.goneSince) entry.goneSince = now;
          else if (now - entry.goneSince > GONE_MS) known.delete(key);
        }
        polls += 1;
        const gone = [...known.values()].filter((e) => e.goneSince).length;
        status.textContent = `${doc.items.length} processes${gone ? `, ${gone} exited lately` : ""}; ` +
          `polled every ${POLL_MS / 1000} s`;
        render();
      } catch (e) {
        status.replaceChildren(errorLine(e));
      }
    }
    if (!stopped) timer = setTimeout(poll, POLL_MS);
  };
  poll();
  return () => { stopped = true; clearTimeout(timer); };
}
