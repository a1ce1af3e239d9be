// Requests to /api/v1 with the token from session storage (never in a URL); errors carry the
// service's own message and HTTP status, so the page can show the policy's answer as it is.

const KEY = "aradia.token";

export function getToken() { return sessionStorage.getItem(KEY); }
export function setToken(token) { sessionStorage.setItem(KEY, token); }
export function clearToken() { sessionStorage.removeItem(KEY); }

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
  toString() { return `refused (${this.status}): ${this.message}`; }
}

async function request(path, options = {}) {
  const headers = { Authorization: `Bearer ${getToken() || ""}`, ...(options.headers || {}) };
  let response;
  try {
    response = await fetch(`/api/v1${path}`, { ...options, headers, cache: "no-store" });
  } catch (e) {
    throw new ApiError(0, `the service is not reachable: ${e.message}`);
  }
  if (!response.ok) {
    let message = response.statusText;
    try { message = (await response.json()).error || message; } catch { /* not JSON */ }
    throw new ApiError(response.status, message);
  }
  return response;
}

// GET (or another method with a JSON body) and decode the JSON answer.
export async function api(path, { method = "GET", body } = {}) {
  const options = { method };
  if (body !== undefined) {
    options.body = JSON.stringify(body);
    options.headers = { "Content-Type": "application/json" };
  }
  return parseJson(await (await request(path, options)).text());
}

// JSON with integers past 2^53 (kernel addresses) kept exact as BigInt (the reviver sees the source).
export function parseJson(text) {
  return JSON.parse(text, (key, value, context) =>
    (typeof value === "number" && !Number.isSafeInteger(value) && context && /^-?\d+$/.test(context.source)
      ? BigInt(context.source) : value));
}

// GET raw bytes (guest memory).
export async function apiBytes(path) {
  return new Uint8Array(await (await request(path)).arrayBuffer());
}

// A query string from an object (arrays repeat the key; empty values are left out).
export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    for (const one of Array.isArray(v) ? v : [v]) {
      if (one !== undefined && one !== null && one !== "") q.append(k, one);
    }
  }
  const s = q.toString();
  return s ? `?${s}` : "";
}

// Live events of one VM over the WebSocket: the token as the first message. Calls onEvent(record),
// onStatus(text, isError); reconnects after an unexpected close. Returns {close()}.
export function openLive(vm, onEvent, onStatus) {
  let socket = null;
  let closed = false;
  let timer = null;
  const connect = () => {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    socket = new WebSocket(`${scheme}://${location.host}/api/v1/vms/${encodeURIComponent(vm)}/events/ws`);
    socket.onopen = () => socket.send(JSON.stringify({ token: getToken() }));
    socket.onmessage = (msg) => {
      const data = JSON.parse(msg.data);
      if (data.subscribed !== undefined) onStatus("live", false);
      else if (data.dropped !== undefined) onStatus(`live (${data.dropped} events dropped: the page fell behind)`, true);
      else onEvent(data);
    };
    socket.onclose = (e) => {
      if (closed) return;
      if (e.code >= 4000 && e.code < 5000) {
        onStatus(`live events refused (${e.code - 4000}): ${e.reason}`, true);
        return;
      }
      onStatus("disconnected; reconnecting…", true);
      timer = setTimeout(connect, 2000);
    };
  };
  connect();
  return { close() { closed = true; clearTimeout(timer); if (socket) socket.close(); } };
}
