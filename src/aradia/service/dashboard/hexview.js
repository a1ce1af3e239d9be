// A bounded hex view of guest memory: a process's virtual address (or the kernel's), at most 4 KiB.
// Needs the "read" permission; without it the service's refusal is shown.

import { apiBytes, query } from "./api.js";
import { errorLine, h } from "./dom.js";

const MAX = 4096;

// Offset, 16 bytes in hex, and their printable characters, per line.
export function hexdump(bytes, base) {
  const lines = [];
  for (let i = 0; i < bytes.length; i += 16) {
    const chunk = bytes.slice(i, i + 16);
    const hex = [...chunk].map((b) => b.toString(16).padStart(2, "0")).join(" ").padEnd(47);
    const text = [...chunk].map((b) => (b >= 32 && b < 127 ? String.fromCharCode(b) : ".")).join("");
    lines.push(`${(base + BigInt(i)).toString(16).padStart(16, "0")}  ${hex}  ${text}`);
  }
  return lines.join("\n");
}

// Render the form and the dump into root.
export function showMemory(root, vm, me) {
  const pid = h("input", { id: "hex-pid", placeholder: "pid (empty: kernel)", size: 12,
                           value: sessionStorage.getItem("aradia.hexpid") || "" });
  const addr = h("input", { id: "hex-addr", placeholder: "address, e.g. 0x400000", size: 22,
                            value: sessionStorage.getItem("aradia.hexaddr") || "" });
  const size = h("input", { id: "hex-size", type: "number", min: 1, max: MAX, value: 256 });
  const out = h("div", { id: "hex-out" });
  const read = async () => {
    out.replaceChildren(h("p", { class: "note" }, "reading…"));
    try {
      const n = Math.min(MAX, Math.max(1, parseInt(size.value, 10) || 256));
      const base = BigInt(addr.value.trim());
      const bytes = await apiBytes(`/vms/${encodeURIComponent(vm)}/memory${query({
        virt: `0x${base.toString(16)}`, pid: pid.value.trim(), size: n })}`);
      out.replaceChildren(h("pre", { class: "hex", id: "hex-dump" }, hexdump(bytes, base)));
    } catch (e) {
      out.replaceChildren(errorLine(e, "hex-error"));
    }
  };
  root.append(
    me.operations.includes("memory") ? ""
      : h("p", { class: "note" }, "Your token lacks the read permission: the service will refuse a read."),
    h("div", { class: "toolbar" }, pid, addr, size, h("button", { type: "button", id: "hex-read", onclick: read }, "Read"),
      h("span", { class: "note" }, `at most ${MAX} bytes`)),
    out);
}
