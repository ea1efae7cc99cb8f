// Sign in with an API key: checked with GET /v1/caller, then kept in this tab's sessionStorage.

import { apiKey, ApiError, get, storeSignIn } from "../api.js";
import { h, replace } from "../dom.js";
import { enumLabel } from "../format.js";

const params = new URLSearchParams(location.search);

/** Where to go after signing in: a path on this origin only (never another site). */
function nextPath() {
  const next = params.get("next") || "";
  if (next.startsWith("/") && !next.startsWith("//") && !next.startsWith("/\\") && !next.startsWith("/sign-in")) {
    return next;
  }
  return "/jobs";
}

const main = document.getElementById("main");
const status = h("div", { id: "sign-in-status", role: "status" });
const input = h("input", {
  id: "api-key", name: "api-key", type: "password", autocomplete: "off", spellcheck: "false",
  placeholder: "tf_…", required: true,
});
const submit = h("button", { type: "submit", id: "sign-in-button", class: "primary" }, "Sign in");
const form = h("form", { id: "sign-in-form", class: "sign-in", onsubmit: onSubmit },
  h("h1", {}, "Sign in to TuneForge"),
  h("p", { class: "muted" },
    "Paste an API key of your organization (`tuneforge keys create` makes one). The key stays in this ",
    "browser tab only and is sent with each request; closing the tab forgets it."),
  h("label", { for: "api-key" }, "API key"),
  input,
  submit,
  status,
);
replace(main, form);
document.title = "Sign in · TuneForge";
if (params.get("reason")) replace(status, h("div", { class: "error" }, params.get("reason")));
if (apiKey()) {
  replace(status, h("p", { class: "muted" }, "You are signed in. ", h("a", { href: nextPath() }, "Continue"),
    " or paste another key."));
}
input.focus();

async function onSubmit(event) {
  event.preventDefault();
  const key = input.value.trim();
  if (!key) return;
  submit.disabled = true;
  replace(status, h("p", { class: "muted" }, "Checking the key…"));
  try {
    const res = await get("/v1/caller", {}, { key });
    const caller = res.caller || {};
    storeSignIn(key, caller);
    replace(status, h("p", {}, `Signed in to ${caller.organization} as ${enumLabel(caller.role, "ROLE_").toLowerCase()}.`));
    location.assign(nextPath());
  } catch (err) {
    const why = err instanceof ApiError && err.unauthenticated
      ? `The platform refused this key: ${err.message}`
      : `Could not sign in: ${err.message || err}`;
    replace(status, h("div", { class: "error", role: "alert" }, why));
    submit.disabled = false;
  }
}
