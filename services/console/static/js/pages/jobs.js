// The jobs list: newest first, refreshed every few seconds while the tab is visible.

import { get } from "../api.js";
import { h, replace, table } from "../dom.js";
import { enumLabel, fmtAgo, fmtClock, fmtInt, fmtTime, fmtUsd, num } from "../format.js";
import { badge, errorBox, every, startPage } from "../layout.js";

const REFRESH_MS = 3000;
const STATES = ["QUEUED", "PREPARING", "RUNNING", "CANCELLING", "SUCCEEDED", "FAILED", "CANCELLED"];

const main = await startPage("Jobs");
const params = new URLSearchParams(location.search);
const filter = h("select", { id: "state-filter", "aria-label": "Show jobs in state", onchange: onFilter },
  h("option", { value: "" }, "All states"),
  STATES.map((s) => h("option", { value: s, selected: params.get("state") === s }, s.toLowerCase())));
const updated = h("span", { class: "muted", id: "jobs-updated" });
const errors = h("div");
const list = h("div", { id: "jobs-list" }, h("p", { class: "muted" }, "Loading jobs…"));
const more = h("div", { class: "pager" });
let pageToken = params.get("page") || "";

replace(main,
  h("div", { class: "page-head" }, h("h1", {}, "Jobs"), h("div", { class: "tools" }, filter, updated,
    h("a", { class: "button", href: "/plan" }, "New job"))),
  errors, list, more);

function onFilter() {
  const q = new URLSearchParams();
  if (filter.value) q.set("state", filter.value);
  history.replaceState(null, "", "/jobs" + (q.toString() ? "?" + q : ""));
  pageToken = "";
  refresh();
}

async function refresh() {
  try {
    const res = await get("/v1/jobs", {
      page_size: 50,
      page_token: pageToken,
      states: filter.value ? `JOB_STATE_${filter.value}` : undefined,
    });
    replace(errors);
    render(res.jobs || []);
    replace(more, res.nextPageToken
      ? h("a", { href: `/jobs?${new URLSearchParams({ ...(filter.value ? { state: filter.value } : {}), page: res.nextPageToken })}` }, "Older jobs →")
      : pageToken ? h("a", { href: "/jobs" }, "← Newest jobs") : null);
    replace(updated, `updated ${fmtClock(new Date().toISOString())}`);
  } catch (err) {
    replace(errors, errorBox(err, "Could not list jobs"));
  }
}

function progressCell(job) {
  const p = job.progress || {};
  const total = num(p.totalSteps);
  const step = num(p.step);
  const state = enumLabel(job.state, "JOB_STATE_");
  const fraction = state === "SUCCEEDED" ? 1 : total ? Math.min(1, step / total) : 0;
  return h("div", { class: "progress-cell" },
    h("progress", { max: "1", value: String(fraction), "aria-label": "progress" }),
    h("span", { class: "muted" }, total ? `${fmtInt(step)} / ${fmtInt(total)} steps` : state === "QUEUED" ? "waiting" : "—"));
}

function render(jobs) {
  if (!jobs.length) {
    replace(list, h("p", { class: "empty" }, filter.value ? "No jobs in this state." : "No jobs yet. ",
      filter.value ? null : h("a", { href: "/plan" }, "Plan and launch one.")));
    return;
  }
  const rows = jobs.map((job) => {
    const href = `/jobs/${encodeURIComponent(job.id)}`;
    const phase = job.phase && job.phase !== "JOB_PHASE_UNSPECIFIED" ? enumLabel(job.phase, "JOB_PHASE_").toLowerCase() : "";
    return [
      h("div", {}, h("a", { href, class: "job-link", dataset: { job: job.id } }, job.name || job.id),
        h("div", { class: "muted small mono" }, job.id)),
      h("div", {}, badge(job.state, "JOB_STATE_", { dataset: { state: enumLabel(job.state, "JOB_STATE_") } }),
        phase ? h("div", { class: "muted small" }, phase) : null),
      progressCell(job),
      h("span", { title: job.usage?.hardware || "" }, fmtUsd(job.usage?.costUsd)),
      h("span", { title: fmtTime(job.createTime) }, fmtAgo(job.createTime) || fmtTime(job.createTime)),
      h("span", { class: "mono small" }, job.spec?.baseModel ? shortModel(job.spec.baseModel) : "—"),
    ];
  });
  replace(list, table([
    { label: "Job" }, { label: "State" }, { label: "Progress", cls: "wide" }, { label: "Cost", cls: "num" },
    { label: "Created" }, { label: "Base model" },
  ], rows, { class: "list", id: "jobs-table" }));
}

function shortModel(model) {
  const s = String(model);
  return s.length > 48 ? "…" + s.slice(-47) : s;
}

every(REFRESH_MS, refresh);
