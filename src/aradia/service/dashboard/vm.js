// One VM: its info line and tabs (processes, sockets, modules, mounts, kernel log, memory, events).
// A refused VM (another tenant's, or none) shows the service's refusal and nothing else.

import { api } from "./api.js";
import { errorLine, h, table } from "./dom.js";
import { showEvents } from "./events.js";
import { showMemory } from "./hexview.js";
import { showProcesses } from "./proctree.js";

const TABS = ["processes", "sockets", "modules", "mounts", "dmesg", "memory", "events"];
const TITLES = { dmesg: "kernel log", events: "events & traces" };

async function viewTable(root, vm, name, columns) {
  const doc = await api(`/vms/${encodeURIComponent(vm)}/${name}`);
  root.append(h("p", { class: "status" }, `${doc.items.length} ${name}`,
    doc.warnings.length ? ` (${doc.warnings.length} warnings)` : ""));
  root.append(h("div", { class: "scroll" }, table(doc.items, columns)));
  return doc;
}

async function showSockets(root, vm) {
  const [sockets, procs] = await Promise.all([
    api(`/vms/${encodeURIComponent(vm)}/sockets`), api(`/vms/${encodeURIComponent(vm)}/processes`)]);
  const comm = new Map(procs.items.map((p) => [p.pid, p.name || p.comm]));
  const order = (s) => (s.state === "LISTEN" ? 0 : s.state === "ESTABLISHED" || s.state === "CONNECTED" ? 1 : 2);
  const items = sockets.items.slice().sort((a, b) => order(a) - order(b) || a.pid - b.pid)
    .map((s) => ({ ...s, local: `${s.local_address}${s.local_port ? `:${s.local_port}` : ""}`,
                   remote: `${s.remote_address}${s.remote_port ? `:${s.remote_port}` : ""}`,
                   process: `${s.pid} ${comm.get(s.pid) || "?"}` }));
  root.append(h("p", { class: "status" }, `${items.length} sockets (listening first, then connected)`));
  root.append(h("div", { class: "scroll" }, table(items,
    ["family", "proto", "state", "local", "remote", "process", "fd", "inode"])));
}

// Render the VM page; returns the clean-up function.
export function showVm(root, vm, tab, me) {
  const cleanups = [];
  const body = h("div", { class: "panel", id: "tab-body" });
  const info = h("p", { class: "status", id: "vm-info" }, "…");
  root.append(h("h1", {}, h("a", { href: "#/vms" }, "VMs"), ` / ${vm}`), info);
  const tabs = me.aggregate ? ["events"] : TABS;
  const bar = h("div", { class: "tabs" });
  let current = null;
  const open = async (name) => {
    while (cleanups.length) cleanups.pop()();
    current = name;
    for (const b of bar.children) b.classList.toggle("active", b.dataset.tab === name);
    body.replaceChildren();
    try {
      if (name === "processes") cleanups.push(showProcesses(body, vm, me));
      else if (name === "events") cleanups.push(showEvents(body, vm, me));
      else if (name === "memory") showMemory(body, vm, me);
      else if (name === "sockets") await showSockets(body, vm);
      else await viewTable(body, vm, name);
    } catch (e) {
      if (current === name) body.append(errorLine(e, "tab-error"));
    }
  };
  for (const name of tabs) {
    bar.append(h("button", { type: "button", dataset: { tab: name }, onclick: () => open(name) },
      TITLES[name] || name));
  }
  if (me.aggregate) {
    info.textContent = "stored events of this VM, from every host (aggregate service, read-only)";
    root.append(bar, body);
    open("events");
  } else {
    api(`/vms/${encodeURIComponent(vm)}`).then((i) => {
      info.textContent = `${i.kernel || ""} — ${Array.isArray(i.vcpus) ? i.vcpus.length : (i.vcpus ?? "?")} vCPUs, memory through ${i.memory_path || "?"}, ` +
        `${(i.owner && i.owner.state) || ""}`;
      root.append(bar, body);
      open(tabs.includes(tab) ? tab : "processes");
    }).catch((e) => {
      info.replaceChildren(errorLine(e, "vm-error"));
      // refused (or signed out): nothing more; a VM of one's own that is away: its tabs say what fails
      if (![401, 403, 404].includes(e.status)) {
        root.append(bar, body);
        open(tabs.includes(tab) ? tab : "processes");
      }
    });
  }
  return () => { while (cleanups.length) cleanups.pop()(); };
}
