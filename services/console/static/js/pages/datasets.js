// The organization's datasets: state, format, size, examples and what validation found.

import { get } from "../api.js";
import { h, replace, table } from "../dom.js";
import { enumLabel, fmtAgo, fmtBytes, fmtInt, fmtTime } from "../format.js";
import { badge, errorBox, every, startPage } from "../layout.js";

const main = await startPage("Datasets");
const list = h("div", { id: "datasets-list" }, h("p", { class: "muted" }, "Loading datasets…"));
const errors = h("div");
const more = h("div", { class: "pager" });
const pageToken = new URLSearchParams(location.search).get("page") || "";

replace(main,
  h("div", { class: "page-head" }, h("h1", {}, "Datasets"),
    h("p", { class: "muted" }, "Upload with ", h("code", {}, "tuneforge datasets upload FILE"), ".")),
  errors, list, more);

function validation(ds) {
  const v = ds.validation || {};
  if (ds.state === "DATASET_STATE_PROCESSING") return h("span", { class: "muted" }, "checking…");
  const errs = Number(v.errorCount || 0);
  const warns = Number(v.warningCount || 0);
  return h("span", { class: v.valid ? "ok" : "bad" }, v.valid ? "valid" : "invalid",
    errs || warns ? h("span", { class: "muted" }, ` · ${fmtInt(errs)} errors, ${fmtInt(warns)} warnings`) : null);
}

async function refresh() {
  try {
    const res = await get("/v1/datasets", { page_size: 100, page_token: pageToken });
    replace(errors);
    const datasets = res.datasets || [];
    if (!datasets.length) {
      replace(list, h("p", { class: "empty" }, "No datasets yet."));
    } else {
      replace(list, table([
        { label: "Dataset" }, { label: "State" }, { label: "Format" }, { label: "Examples", cls: "num" },
        { label: "Tokens", cls: "num" }, { label: "Size", cls: "num" }, { label: "Validation" }, { label: "Created" },
      ], datasets.map((ds) => [
        h("div", {}, h("a", { href: `/datasets/${encodeURIComponent(ds.id)}`, class: "dataset-link" }, ds.name || ds.id),
          h("div", { class: "muted small mono" }, ds.id)),
        badge(ds.state, "DATASET_STATE_"),
        enumLabel(ds.format, "DATASET_FORMAT_").toLowerCase().replace(/_/g, " "),
        fmtInt(ds.statistics?.exampleCount),
        ds.statistics?.tokens?.total ? fmtInt(ds.statistics.tokens.total) : "—",
        fmtBytes(ds.sizeBytes),
        validation(ds),
        h("span", { title: fmtTime(ds.createTime) }, fmtAgo(ds.createTime)),
      ]), { class: "list", id: "datasets-table" }));
    }
    replace(more, res.nextPageToken ? h("a", { href: `/datasets?page=${encodeURIComponent(res.nextPageToken)}` }, "More →") : null);
  } catch (err) {
    replace(errors, errorBox(err, "Could not list datasets"));
  }
}

every(10000, refresh);
