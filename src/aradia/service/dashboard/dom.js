// Small DOM helpers: elements, tables, formatting.

// An element: h("td", {class: "num", dataset: {pid: 1}}, "text", child…).
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "dataset") Object.assign(el.dataset, v);
    else if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k in el && k !== "list") el[k] = v;
    else el.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

// Text of any JSON value for a cell.
export function cell(value) {
  if (value === null || value === undefined) return "";
  if (Array.isArray(value)) return value.join(" ");
  if (typeof value === "bigint") return `0x${value.toString(16)}`;
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

// A table of items with the given columns ([key, title] or key); columns default to the first item's keys.
export function table(items, columns) {
  const cols = (columns || Object.keys(items[0] || {})).map((c) => (Array.isArray(c) ? c : [c, c]));
  const head = h("tr", {}, cols.map(([, title]) => h("th", {}, title)));
  const rows = items.map((it) => h("tr", {}, cols.map(([key]) => h("td", {
    class: ["number", "bigint"].includes(typeof it[key]) ? "num" : "" }, cell(it[key])))));
  return h("table", {}, h("thead", {}, head), h("tbody", {}, rows));
}

// Wall-clock seconds as local time with milliseconds.
export function clock(seconds) {
  const d = new Date(seconds * 1000);
  return `${d.toLocaleTimeString([], { hour12: false })}.${String(d.getMilliseconds()).padStart(3, "0")}`;
}

// Seconds since the guest booted as d+hh:mm:ss.
export function sinceBoot(seconds) {
  const s = Math.floor(seconds);
  const hms = [Math.floor(s / 3600) % 24, Math.floor(s / 60) % 60, s % 60].map((n) => String(n).padStart(2, "0"));
  const days = Math.floor(s / 86400);
  return `${days ? `${days}d+` : ""}${hms.join(":")}`;
}

// An error line (ApiError's text: status and the service's message).
export function errorLine(err, id) {
  return h("p", { class: "error", id }, String(err));
}
