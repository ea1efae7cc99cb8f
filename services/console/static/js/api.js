// The REST/JSON API of the platform's gateway (/v1/...), called with the caller's API key.
//
// The key lives in this tab's sessionStorage only (never in a cookie or a URL): it is sent as
// "Authorization: Bearer <key>", so the services authenticate, authorize and scope every call exactly as
// they do over gRPC. Errors come back as google.rpc.Status JSON; ApiError keeps its code, message,
// ErrorInfo reason and BadRequest field violations. Server streams are server-sent events read with
// fetch() and a stream reader (EventSource cannot send the Authorization header).

const KEY = "tuneforge.console.apiKey";
const CALLER = "tuneforge.console.caller";

export function apiKey() {
  return sessionStorage.getItem(KEY) || "";
}

export function storeSignIn(key, caller) {
  sessionStorage.setItem(KEY, key);
  sessionStorage.setItem(CALLER, JSON.stringify(caller || {}));
}

export function storedCaller() {
  try {
    return JSON.parse(sessionStorage.getItem(CALLER) || "null");
  } catch {
    return null;
  }
}

export function signOut(message = "") {
  sessionStorage.removeItem(KEY);
  sessionStorage.removeItem(CALLER);
  goToSignIn(message);
}

/** Sends the browser to the sign-in page, coming back to this page afterwards. */
export function goToSignIn(message = "") {
  const params = new URLSearchParams();
  const here = location.pathname + location.search;
  if (here !== "/sign-in" && !here.startsWith("/sign-in?")) params.set("next", here);
  if (message) params.set("reason", message);
  location.assign("/sign-in" + (params.toString() ? "?" + params.toString() : ""));
}

// grpc-gateway's table: the HTTP status of each canonical code (for errors that arrive inside a stream).
const CODE_NAMES = ["OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
  "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
  "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"];
const CODE_HTTP = [200, 499, 500, 400, 504, 404, 409, 403, 429, 400, 409, 400, 501, 500, 503, 500, 401];

export class ApiError extends Error {
  constructor(httpStatus, status, fallback) {
    const code = typeof status?.code === "number" ? status.code : undefined;
    super(status?.message || fallback || `HTTP ${httpStatus}`);
    this.name = "ApiError";
    this.httpStatus = httpStatus || (code !== undefined ? CODE_HTTP[code] : 0);
    this.code = code;
    this.codeName = code !== undefined ? CODE_NAMES[code] || String(code) : "";
    this.reason = "";
    this.violations = [];
    for (const detail of status?.details || []) {
      const type = String(detail?.["@type"] || "");
      if (type.endsWith("google.rpc.ErrorInfo")) this.reason = String(detail.reason || "");
      if (type.endsWith("google.rpc.BadRequest")) {
        for (const v of detail.fieldViolations || detail.field_violations || []) {
          this.violations.push({ field: String(v.field || ""), description: String(v.description || "") });
        }
      }
    }
  }

  get unauthenticated() {
    return this.httpStatus === 401;
  }
}

function buildUrl(path, query) {
  const url = new URL(path, location.origin);
  for (const [name, value] of Object.entries(query || {})) {
    if (value === undefined || value === null || value === "") continue;
    if (Array.isArray(value)) value.forEach((v) => url.searchParams.append(name, String(v)));
    else url.searchParams.set(name, String(value));
  }
  return url;
}

function headers(key, extra = {}) {
  const h = { Accept: "application/json", ...extra };
  const k = key ?? apiKey();
  if (k) h.Authorization = `Bearer ${k}`;
  return h;
}

/** Calls a route; resolves to the response message (parsed JSON), rejects with ApiError. */
export async function call(method, path, { query, body, signal, key } = {}) {
  const init = { method, headers: headers(key), signal, cache: "no-store", credentials: "omit" };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  let res;
  try {
    res = await fetch(buildUrl(path, query), init);
  } catch (err) {
    if (err?.name === "AbortError") throw err;
    throw new ApiError(0, { code: 14, message: `cannot reach the platform (${err?.message || err})` });
  }
  const text = await res.text();
  let parsed = null;
  try {
    parsed = text ? JSON.parse(text) : {};
  } catch {
    parsed = null;
  }
  if (!res.ok) throw new ApiError(res.status, parsed, text.slice(0, 200) || res.statusText);
  return parsed ?? {};
}

export const get = (path, query, opts = {}) => call("GET", path, { ...opts, query });
export const post = (path, body, opts = {}) => call("POST", path, { ...opts, body: body ?? {} });

/** Every page of a list route: `field` is the repeated field, pages follow next_page_token. */
export async function listAll(path, field, query = {}, { limit = 10000, signal } = {}) {
  const items = [];
  let token = "";
  do {
    const page = await get(path, { ...query, page_token: token }, { signal });
    items.push(...(page[field] || []));
    token = page.nextPageToken || "";
  } while (token && items.length < limit);
  return items;
}

/**
 * Reads a server-streaming route (text/event-stream): calls onMessage(message) for each event, and
 * resolves when the server ends the stream. An `event: error` rejects with the ApiError it carries; an
 * abort (signal) rejects with an AbortError.
 */
export async function stream(path, query, onMessage, { signal } = {}) {
  let res;
  try {
    res = await fetch(buildUrl(path, query), {
      headers: headers(undefined, { Accept: "text/event-stream" }), signal, cache: "no-store", credentials: "omit",
    });
  } catch (err) {
    if (err?.name === "AbortError") throw err;
    throw new ApiError(0, { code: 14, message: `cannot reach the platform (${err?.message || err})` });
  }
  if (!res.ok) {
    const text = await res.text();
    let parsed = null;
    try {
      parsed = JSON.parse(text);
    } catch {
      parsed = null;
    }
    throw new ApiError(res.status, parsed, text.slice(0, 200) || res.statusText);
  }
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      // Events end with a blank line; a chunk may end inside one (or between "\r" and "\n").
      let end;
      while ((end = findEventEnd(buffer)) !== null) {
        const [block, rest] = end;
        buffer = rest;
        const event = parseEvent(block);
        if (event === null) continue;
        if (event.type === "error") {
          let status = null;
          try {
            status = JSON.parse(event.data);
          } catch {
            status = { message: event.data };
          }
          throw new ApiError(0, status);
        }
        if (event.data) onMessage(JSON.parse(event.data));
      }
    }
  } finally {
    reader.releaseLock();
  }
}

function findEventEnd(buffer) {
  const m = /\r\n\r\n|\n\n|\r\r/.exec(buffer);
  if (!m) return null;
  return [buffer.slice(0, m.index), buffer.slice(m.index + m[0].length)];
}

function parseEvent(block) {
  let type = "message";
  const data = [];
  for (const line of block.split(/\r\n|\n|\r/)) {
    if (!line || line.startsWith(":")) continue; // comments keep the connection alive
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") type = value;
    else if (field === "data") data.push(value);
  }
  if (!data.length && type === "message") return null;
  return { type, data: data.join("\n") };
}

/** A route path with each variable part escaped: path("/v1/jobs/", id, ":cancel"). */
export function path(...parts) {
  return parts.map((p, i) => (i % 2 === 1 ? encodeURIComponent(String(p)) : p)).join("");
}
