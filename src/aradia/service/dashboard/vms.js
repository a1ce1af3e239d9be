// The VM list: name, run state, kernel, vCPUs, memory path, a sparkline of events/s; polled every 2 s.
// On an aggregate service: every host's VMs seen in the event stream (read-only).

import { api } from "./api.js";
import { clock, errorLine, h } from "./dom.js";

const POLL_MS = 2000;

// Draw counts (one per second) on a small canvas.
function sparkline(counts) {
  const canvas = h("canvas", { class: "spark", width: 120, height: 24 });
  const ctx = canvas.getContext("2d");
  const max = Math.max(1, ...counts);
  ctx.strokeStyle = "#4060c0";
  ctx.beginPath();
  counts.forEach((c, i) => {
    const x = (i / Math.max(1, counts.length - 1)) * 119;
    const y = 23 - (c / max) * 22;
    if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
  });
  ctx.stroke();
  return canvas;
}

function perSecond(rate) {
  const kinds = Object.values((rate && rate.kinds) || {});
  const n = (rate && rate.seconds) || 60;
  return Array.from({ length: n }, (_, i) => kinds.reduce((sum, k) => sum + (k[i] || 0), 0));
}

// "Linux version 6.1.0-57-cloud-amd64 (…) …" -> "6.1.0-57-cloud-amd64".
function shortKernel(banner) {
  const m = /Linux version (\S+)/.exec(banner || "");
  return m ? m[1] : banner || "";
}

function ownRow(vm) {
  const link = h("a", { href: `#/vm/${encodeURIComponent(vm.name)}` }, vm.name);
  return h("tr", { dataset: { vm: vm.name } },
    h("td", {}, link),
    h("td", { class: `state-${vm.state}` }, `${vm.state} (${vm.owner})`),
    h("td", { title: vm.kernel || "" }, shortKernel(vm.kernel)),
    h("td", { class: "num" }, vm.vcpus ?? ""),
    h("td", {}, vm.memory_path || ""),
    h("td", { class: "num" }, vm.traces),
    h("td", {}, sparkline(perSecond(vm.rate)), ` ${(vm.rate && vm.rate.total) || 0} in 60 s`),
    h("td", { class: "error" }, vm.error || ""));
}

function aggregateRow(vm) {
  const link = h("a", { href: `#/vm/${encodeURIComponent(vm.name)}` }, vm.name);
  return h("tr", { dataset: { vm: vm.name, host: vm.host } },
    h("td", {}, vm.host), h("td", {}, link), h("td", { class: "num" }, vm.events),
    h("td", {}, vm.last_event ? clock(vm.last_event) : ""));
}

// Render the list into root and keep it fresh; returns the clean-up function.
export function showVms(root, me) {
  const heads = me.aggregate
    ? ["host", "VM", "events stored", "last event"]
    : ["VM", "run state", "kernel", "vCPUs", "memory path", "traces", "events/s (60 s)", "error"];
  const tbody = h("tbody", { id: "vm-rows" });
  const status = h("p", { class: "status", id: "vms-status" });
  root.append(h("h1", {}, "VMs"),
    me.aggregate ? h("p", { class: "note" }, "An aggregate service: every host's VMs, read-only.") : "",
    h("table", { id: "vms" }, h("thead", {}, h("tr", {}, heads.map((t) => h("th", {}, t)))), tbody), status);
  let timer = null;
  let stopped = false;
  const poll = async () => {
    try {
      const vms = await api("/vms");
      tbody.replaceChildren(...vms.map(me.aggregate ? aggregateRow : ownRow));
      status.textContent = `${vms.length} VM${vms.length === 1 ? "" : "s"}, updated ${clock(Date.now() / 1000)}`;
    } catch (e) {
      status.replaceChildren(errorLine(e));
    }
    if (!stopped) timer = setTimeout(poll, POLL_MS);
  };
  poll();
  return () => { stopped = true; clearTimeout(timer); };
}
