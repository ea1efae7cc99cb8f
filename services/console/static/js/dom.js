// Building the DOM without HTML strings: every piece of data becomes a text node (textContent), never
// markup. The page's Content-Security-Policy requires Trusted Types, so an innerHTML with a string would
// throw anyway; these helpers are the only way the console makes elements.

/**
 * h("a", {href: "/jobs", class: "x", dataset: {id: "1"}, onclick: fn}, "text", child, [more])
 * Attributes named on* take functions (event listeners); `text` sets textContent; `href` and `src` must be
 * safe URLs (see safeUrl) or they are left out; everything else goes through setAttribute.
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) {
      if (typeof value === "function") el.addEventListener(name.slice(2), value);
    } else if (name === "class") {
      el.className = Array.isArray(value) ? value.filter(Boolean).join(" ") : String(value);
    } else if (name === "text") {
      el.textContent = String(value);
    } else if (name === "dataset") {
      for (const [k, v] of Object.entries(value)) el.dataset[k] = String(v);
    } else if (name === "href" || name === "src" || name === "action") {
      const url = safeUrl(value);
      if (url !== null) el.setAttribute(name, url);
    } else if (name === "style") {
      throw new Error("inline style attributes are refused by the page's CSP; use a class");
    } else if (value === true) {
      el.setAttribute(name, "");
    } else {
      el.setAttribute(name, String(value));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else if (child instanceof Node) el.appendChild(child);
    else el.appendChild(document.createTextNode(String(child)));
  }
}

/** Replaces the children of `el` with `children`. */
export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

/**
 * `url` when it is a same-origin path ("/jobs/x") or an absolute http(s) URL; null for anything else
 * (javascript:, data:, protocol-relative "//host"), so data can never become a script URL.
 */
export function safeUrl(url) {
  const s = String(url ?? "");
  if (s.startsWith("/") && !s.startsWith("//") && !s.startsWith("/\\")) return s;
  if (s.startsWith("#") || s.startsWith("?")) return s;
  try {
    const parsed = new URL(s);
    if (parsed.protocol === "http:" || parsed.protocol === "https:") return parsed.href;
  } catch {
    // not a URL
  }
  return null;
}

/** A definition list from [[term, value], ...]; values may be nodes or text; empty ones are skipped. */
export function facts(rows, cls = "facts") {
  const dl = h("dl", { class: cls });
  for (const [term, value] of rows) {
    if (value === undefined || value === null || value === "") continue;
    dl.append(h("dt", {}, term), h("dd", {}, value));
  }
  return dl;
}

/** A table: columns [{label, cls}], rows of cells (text or nodes). */
export function table(columns, rows, attrs = {}) {
  return h("table", attrs,
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", { class: c.cls, scope: "col" }, c.label)))),
    h("tbody", {}, rows.map((cells) => h("tr", {}, cells.map((cell, i) => h("td", { class: columns[i]?.cls }, cell))))),
  );
}
