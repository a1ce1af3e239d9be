// Start and stop traces on one VM: syscalls, kernel probe, LIB:SYMBOL uprobe, process lifecycle,
// count (optional pid/comm filters), or the insider guard with a policy (TOML, as `aradia guard
// --policy` reads it). A refusal shows the service's answer (#trace-status).

import { api } from "./api.js";
import { h } from "./dom.js";

const KINDS = {
  syscalls: ["syscalls (comma-separated)", "execve"],
  probe: ["kernel functions", "do_sys_openat2"],
  uprobe: ["LIB:SYMBOL specs", "libc.so.6:malloc"],
  procs: ["lifecycle events", "fork,exec,exit"],
  count: ["kernel functions to count", "__x64_sys_getppid"],
  guard: ["the guard's policy goes in the box below", ""],
};
const POLICY_EXAMPLE = '[[protect]]\npath = "/srv/app"\naction = "block"\nallow = [{ comm = "deployer" }]\n';

const list = (text) => text.split(",").map((s) => s.trim()).filter(Boolean);

// The probe spec the form describes.
export function specOf(kind, what, process, pid, comm, policy = "", dryRun = false) {
  if (kind === "guard") return { kind, policy, dry_run: dryRun };
  const items = list(what || KINDS[kind][1]);
  const spec = { kind };
  if (kind === "syscalls") spec.syscalls = items;
  else if (kind === "probe" || kind === "count") spec.symbols = items;
  else if (kind === "uprobe") { spec.specs = items; if (process) spec.process = process; }
  else if (kind === "procs") spec.events = items;
  if (pid) spec.pid = list(pid).map(Number);
  if (comm) spec.comm = list(comm);
  return spec;
}

// Render the control panel into root; returns the clean-up function.
export function showTraces(root, vm, me) {
  const kind = h("select", { id: "trace-kind" }, Object.keys(KINDS).map((k) => h("option", { value: k }, k)));
  const what = h("input", { id: "trace-what", size: 28 });
  const process = h("input", { id: "trace-process", placeholder: "uprobe: process name", size: 14 });
  const pid = h("input", { id: "trace-pid", placeholder: "only pids", size: 10 });
  const comm = h("input", { id: "trace-comm", placeholder: "only comms", size: 12 });
  const policy = h("textarea", { id: "trace-policy", rows: 6, cols: 60, placeholder: POLICY_EXAMPLE });
  const dryRun = h("input", { id: "trace-dry-run", type: "checkbox" });
  const guardBox = h("div", { id: "trace-guard", class: "toolbar", hidden: true },
    policy, h("label", {}, dryRun, " dry run (report what would be blocked, block nothing)"),
    me.operator || (me.allow || []).includes("guard") ? ""
      : h("span", { class: "note" }, "Your token lacks the guard permission: the service will refuse it."));
  const status = h("p", { id: "trace-status", class: "status" });
  const rows = h("tbody", { id: "trace-rows" });
  const hint = () => {
    const guard = kind.value === "guard";
    what.placeholder = guard ? KINDS.guard[0] : `${KINDS[kind.value][0]}, e.g. ${KINDS[kind.value][1]}`;
    for (const el of [what, process, pid, comm]) el.disabled = guard;
    guardBox.hidden = !guard;
  };
  kind.addEventListener("change", hint);
  hint();
  let timer = null;
  let stopped = false;

  const refresh = async () => {
    try {
      const traces = (await api("/traces")).filter((t) => t.vm === vm);
      rows.replaceChildren(...traces.map((t) => h("tr", { dataset: { trace: t.id } },
        h("td", { class: "mono" }, t.id), h("td", { class: "mono" }, JSON.stringify(t.spec)),
        h("td", { class: "num" }, t.events ?? ""), h("td", { class: "mono" }, t.counts ? JSON.stringify(t.counts) : ""),
        h("td", {}, h("button", { type: "button", class: "stop", onclick: () => stop(t.id) }, "Stop")))));
    } catch (e) {
      rows.replaceChildren(h("tr", {}, h("td", { colSpan: 5, class: "error" }, String(e))));
    }
  };
  const start = async () => {
    status.className = "status";
    status.textContent = "starting…";
    try {
      const t = await api(`/vms/${encodeURIComponent(vm)}/traces`, { method: "POST",
        body: specOf(kind.value, what.value, process.value.trim(), pid.value.trim(), comm.value.trim(),
                     policy.value, dryRun.checked) });
      status.textContent = `trace ${t.id} started`;
      status.dataset.trace = t.id;
    } catch (e) {
      status.className = "error";
      status.textContent = String(e);
    }
    refresh();
  };
  const stop = async (id) => {
    try {
      await api(`/traces/${encodeURIComponent(id)}`, { method: "DELETE" });
      status.className = "status";
      status.textContent = `trace ${id} stopped`;
    } catch (e) {
      status.className = "error";
      status.textContent = String(e);
    }
    refresh();
  };
  const poll = async () => { await refresh(); if (!stopped) timer = setTimeout(poll, 3000); };
  root.append(h("h3", {}, "Traces"),
    me.operations.includes("trace.start") ? ""
      : h("p", { class: "note" }, "Your token lacks the trace permission: the service will refuse a start."),
    h("div", { class: "toolbar" }, kind, what, process, pid, comm,
      h("button", { type: "button", id: "trace-start", onclick: start }, "Start trace")),
    guardBox, status,
    h("table", {}, h("thead", {}, h("tr", {}, ["id", "spec", "events", "counts", ""].map((t) => h("th", {}, t)))), rows));
  poll();
  return () => { stopped = true; clearTimeout(timer); };
}
