// Turning proto3 JSON values into text for people: enum names, int64 strings, Timestamps, Durations.

/** "JOB_STATE_RUNNING" -> "RUNNING" (the enum's prefix removed). */
export function enumLabel(value, prefix) {
  if (!value) return "—";
  const s = String(value);
  return s.startsWith(prefix) ? s.slice(prefix.length) : s;
}

/** "JOB_STATE_RUNNING" -> "running": a CSS-safe class suffix (letters and "-" only). */
export function enumClass(value, prefix) {
  return enumLabel(value, prefix).toLowerCase().replace(/[^a-z0-9]+/g, "-");
}

/** An int64 (a JSON string) or number as a Number; absent means 0. */
export function num(value) {
  if (value === undefined || value === null || value === "") return 0;
  const n = Number(value);
  return Number.isFinite(n) ? n : 0;
}

export function fmtInt(value) {
  return num(value).toLocaleString("en-US");
}

/** A number with a few significant digits (losses, learning rates). */
export function fmtNum(value, digits = 4) {
  if (value === undefined || value === null) return "—";
  const n = Number(value);
  if (!Number.isFinite(n)) return "—";
  if (n !== 0 && (Math.abs(n) < 1e-3 || Math.abs(n) >= 1e6)) return n.toExponential(2);
  return Number(n.toPrecision(digits)).toString();
}

export function fmtUsd(value) {
  const n = num(value);
  if (n === 0) return "$0";
  if (n < 0.01) return "$" + n.toFixed(4);
  return "$" + n.toFixed(2);
}

export function fmtBytes(value) {
  let n = num(value);
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];  // powers of 1024, as the CLI says them
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return (i === 0 ? n.toFixed(0) : n.toFixed(n >= 100 ? 0 : 1)) + " " + units[i];
}

/** An RFC 3339 Timestamp as local date and time; "—" when unset. */
export function fmtTime(value) {
  if (!value) return "—";
  const d = new Date(value);
  if (Number.isNaN(d.getTime())) return String(value);
  return d.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "medium" });
}

export function fmtClock(value) {
  if (!value) return "";
  const d = new Date(value);
  return Number.isNaN(d.getTime()) ? "" : d.toLocaleTimeString(undefined, { hour12: false });
}

/** A proto Duration ("93.5s") or a number of seconds as "1m 34s". */
export function fmtDuration(value) {
  if (value === undefined || value === null || value === "") return "—";
  const seconds = typeof value === "number" ? value : parseFloat(String(value));
  if (!Number.isFinite(seconds)) return String(value);
  if (seconds < 1) return `${(seconds * 1000).toFixed(0)} ms`;
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`;
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const rest = s % 60;
  return h ? `${h}h ${m}m` : `${m}m ${rest}s`;
}

/** Seconds since an RFC 3339 Timestamp, as "3 min ago". */
export function fmtAgo(value) {
  if (!value) return "";
  const d = new Date(value);
  const s = (Date.now() - d.getTime()) / 1000;
  if (!Number.isFinite(s)) return "";
  if (s < 45) return "just now";
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

export function fmtPercent(fraction) {
  return `${Math.round(num(fraction) * 100)}%`;
}
