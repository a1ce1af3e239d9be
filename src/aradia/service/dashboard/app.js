// The dashboard's entry: sign-in, who is signed in, and hash routing (#/vms, #/vm/NAME[/TAB]).

import { api, clearToken, getToken, setToken } from "./api.js";
import { h } from "./dom.js";
import { showVm } from "./vm.js";
import { showVms } from "./vms.js";

const view = document.getElementById("view");
const signIn = document.getElementById("sign-in");
let me = null; // whoami: {name, operator, allow, operations, host, aggregate}
let leave = null; // the current page's clean-up (timers, sockets)

function banner(text) {
  const el = document.getElementById("banner");
  el.textContent = text;
  el.hidden = !text;
}

async function whoami() {
  me = await api("/whoami");
  document.getElementById("who").textContent =
    `${me.name}${me.operator ? " (operator)" : ""} on ${me.host}${me.aggregate ? " — aggregate, read-only" : ""}`;
  document.getElementById("sign-out").hidden = false;
}

function showSignIn(message = "") {
  if (leave) { leave(); leave = null; }
  view.replaceChildren();
  signIn.hidden = false;
  document.getElementById("who").textContent = "";
  document.getElementById("sign-out").hidden = true;
  document.getElementById("sign-in-error").textContent = message;
}

async function route() {
  if (leave) { leave(); leave = null; }
  if (!getToken()) { showSignIn(); return; }
  if (!me) {
    try {
      await whoami();
    } catch (e) {
      if (e.status === 401) clearToken();
      showSignIn(String(e));
      return;
    }
  }
  signIn.hidden = true;
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  view.replaceChildren();
  if (parts[0] === "vm" && parts[1]) leave = showVm(view, parts[1], parts[2] || "processes", me);
  else leave = showVms(view, me);
}

document.getElementById("sign-in-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const input = document.getElementById("token");
  setToken(input.value.trim());
  input.value = "";
  me = null;
  if (!location.hash) location.hash = "#/vms";
  route();
});

document.getElementById("sign-out").addEventListener("click", () => {
  clearToken();
  me = null;
  showSignIn();
});

window.addEventListener("hashchange", route);
if (typeof window.uPlot !== "function") {
  banner("The chart library (uPlot) is missing from this installation: run `python scripts/vendor.py` " +
         "(scripts/dev.sh does). Everything else works; charts are not drawn.");
}
view.append(h("p", { class: "note" }, "loading…"));
route();
