// What every signed-in page shares: the key check, the caller in the header, sign-out, error banners.

import { ApiError, apiKey, get, goToSignIn, signOut, storedCaller, storeSignIn } from "./api.js";
import { h, replace } from "./dom.js";
import { enumLabel } from "./format.js";

/**
 * Starts a signed-in page and resolves to its <main>; without a key it sends the browser to sign in and
 * never resolves (the page module, awaiting it at top level, stops there quietly).
 */
export async function startPage(title) {
  if (!apiKey()) {
    goToSignIn();
    await new Promise(() => {});
  }
  document.title = `${title} · TuneForge`;
  const main = document.getElementById("main");
  replace(main);
  showCaller(storedCaller());
  document.getElementById("sign-out")?.addEventListener("click", () => signOut());
  // The key may have expired or been revoked since sign-in: check it once per page.
  get("/v1/caller").then((res) => {
    storeSignIn(apiKey(), res.caller || {});
    showCaller(res.caller || {});
  }, (err) => handleAuth(err));
  return main;
}

function showCaller(caller) {
  const who = document.getElementById("who");
  if (!who || !caller) return;
  const role = enumLabel(caller.role, "ROLE_").toLowerCase();
  replace(document.getElementById("caller"), h("span", { class: "org" }, caller.organization || "?"),
    " · ", role);
  document.getElementById("caller").title = caller.principal || "";
  who.hidden = false;
}

/** Sends the browser to sign in when `err` says the key was refused; returns whether it did. */
export function handleAuth(err) {
  if (err instanceof ApiError && err.unauthenticated) {
    signOut(`The platform refused the key: ${err.message}`);
    return true;
  }
  return false;
}

/** An error banner: the message, the ErrorInfo reason, and each field violation. */
export function errorBox(err, prefix = "") {
  if (handleAuth(err)) return h("div");
  const message = err?.message || String(err);
  const box = h("div", { class: "error", role: "alert" },
    h("strong", {}, prefix ? `${prefix}: ` : ""), message,
    err?.reason ? h("span", { class: "reason" }, ` (${err.reason})`) : null);
  if (err?.violations?.length) {
    box.append(h("ul", {}, err.violations.map((v) => h("li", {}, h("code", {}, v.field), ": ", v.description))));
  }
  return box;
}

/** A section with a heading and a body element (returned as [section, body]). */
export function section(title, id, ...extra) {
  const body = h("div", { class: "section-body" });
  const el = h("section", { id, class: "card" }, h("header", { class: "card-head" }, h("h2", {}, title), ...extra), body);
  return [el, body];
}

/** A coloured badge of an enum value: badge("JOB_STATE_RUNNING", "JOB_STATE_"). */
export function badge(value, prefix, attrs = {}) {
  const label = enumLabel(value, prefix);
  return h("span", { class: ["badge", `badge-${label.toLowerCase().replace(/[^a-z0-9]+/g, "-")}`], ...attrs }, label);
}

/** Runs `fn` every `ms` while the tab is visible (and once at once); returns a stop function. */
export function every(ms, fn) {
  let timer = null;
  let stopped = false;
  const tick = async () => {
    if (stopped) return;
    if (!document.hidden) {
      try {
        await fn();
      } catch (err) {
        console.warn(err);
      }
    }
    if (!stopped) timer = setTimeout(tick, ms);
  };
  tick();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}
