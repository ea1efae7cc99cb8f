// One dataset: what it is, its splits, its token statistics and its validation report.

import { get, path } from "../api.js";
import { facts, h, replace, table } from "../dom.js";
import { enumLabel, fmtBytes, fmtInt, fmtNum, fmtTime, num } from "../format.js";
import { badge, errorBox, section, startPage } from "../layout.js";

const datasetId = document.body.dataset.dataset || "";
const main = await startPage(`Dataset ${datasetId}`);
const datasetPath = path("/v1/datasets/", datasetId);

const title = h("h1", { id: "dataset-title" }, datasetId);
const head = h("div", { class: "head-line" });
const errors = h("div");
const [aboutSection, aboutBody] = section("About", "about");
const [statsSection, statsBody] = section("Token statistics", "token-statistics");
const [reportSection, reportBody] = section("Validation report", "validation-report");

replace(main,
  h("div", { class: "page-head" }, h("div", {},
    h("p", { class: "crumbs" }, h("a", { href: "/datasets" }, "Datasets"), " / ", h("span", { class: "mono" }, datasetId)),
    title, head)),
  errors, aboutSection, statsSection, reportSection);

function source(src) {
  if (!src) return "";
  return src.uploadFilename ? `upload: ${src.uploadFilename}` : src.s3Uri || src.gcsUri
    || (src.huggingfaceId ? `Hugging Face: ${src.huggingfaceId}` : "");
}

function renderDataset(ds) {
  document.title = `${ds.name || ds.id} · TuneForge`;
  replace(title, ds.name || ds.id);
  replace(head, badge(ds.state, "DATASET_STATE_", { id: "dataset-state" }), " ",
    h("span", { class: "muted" }, enumLabel(ds.format, "DATASET_FORMAT_").toLowerCase().replace(/_/g, " ")));
  const st = ds.statistics || {};
  replace(aboutBody,
    ds.failureMessage ? h("div", { class: "error", role: "alert" }, ds.failureMessage) : null,
    h("div", { class: "summary-grid" },
      h("div", {}, facts([
        ["Id", h("span", { class: "mono" }, ds.id)],
        ["Description", ds.description || ""],
        ["Source", source(ds.source)],
        ["Size", fmtBytes(ds.sizeBytes)],
        ["SHA-256", ds.sha256 ? h("code", { title: ds.sha256 }, ds.sha256.slice(0, 16) + "…") : ""],
        ["Created", fmtTime(ds.createTime)],
        ["Validation set", ds.validationDatasetId ? h("a", { href: path("/datasets/", ds.validationDatasetId) }, ds.validationDatasetId) : ""],
      ])),
      h("div", {}, facts([
        ["Examples", fmtInt(st.exampleCount)],
        ["Messages / example", st.meanMessagesPerExample ? fmtNum(st.meanMessagesPerExample, 3) : ""],
        ["Characters", fmtInt(st.totalCharacters)],
        ["Duplicates", num(st.duplicateCount) ? fmtInt(st.duplicateCount) : "none"],
        ["Dropped by max_samples", num(st.droppedByMaxSamples) ? fmtInt(st.droppedByMaxSamples) : ""],
      ])),
      h("div", {}, h("h3", {}, "Splits"), (ds.splits || []).length
        ? table([{ label: "Split" }, { label: "Examples", cls: "num" }],
          ds.splits.map((s) => [enumLabel(s.kind, "DATASET_SPLIT_KIND_").toLowerCase(), fmtInt(s.exampleCount)]),
          { class: "list compact", id: "dataset-splits" })
        : h("p", { class: "muted" }, "Not split yet.")),
    ));
  renderTokens(st.tokens);
}

function renderTokens(t) {
  if (!t || !num(t.total)) {
    replace(statsBody, h("p", { class: "muted" }, "No token statistics: the dataset was not tokenized."));
    return;
  }
  const max = Math.max(num(t.max), 1);
  const bars = [["min", t.min], ["median", t.median], ["p95", t.p95], ["max", t.max]].map(([label, v]) =>
    h("div", { class: "bar-row" }, h("span", { class: "bar-label" }, label),
      h("meter", { min: "0", max: String(max), value: String(num(v)), "aria-label": `${label} tokens` }),
      h("span", { class: "num" }, fmtInt(v))));
  replace(statsBody, h("div", { class: "summary-grid", id: "token-stats" },
    h("div", {}, facts([
      ["Tokenizer", h("span", { class: "mono" }, t.tokenizer || "")],
      ["Tokens in all", fmtInt(t.total)],
      ["Tokens per epoch", t.trainTokens ? fmtInt(t.trainTokens) : ""],
      ["Max length", t.maxLength ? fmtInt(t.maxLength) : ""],
      ["Longer than that", num(t.truncatedCount) ? `${fmtInt(t.truncatedCount)} examples (truncated in training)` : "none"],
    ])),
    h("div", { class: "bars" }, h("h3", {}, "Tokens per example"), bars)));
}

async function loadReport() {
  try {
    const res = await get(`${datasetPath}/validation-report`);
    const r = res.report || {};
    const issues = r.issues || [];
    replace(reportBody,
      h("p", {}, h("span", { class: r.valid ? "ok" : "bad", id: "report-valid" }, r.valid ? "Valid" : "Not valid"),
        h("span", { class: "muted" }, ` · ${fmtInt(r.examplesChecked)} examples checked · ${fmtInt(r.errorCount)} errors · ${fmtInt(r.warningCount)} warnings`)),
      issues.length ? table(
        [{ label: "Severity" }, { label: "Code" }, { label: "Line", cls: "num" }, { label: "Field" }, { label: "What is wrong" }],
        issues.map((i) => [badge(i.severity, "ISSUE_SEVERITY_"), h("code", {}, i.code || ""), num(i.line) ? fmtInt(i.line) : "—",
          h("code", {}, i.field || ""), i.message || ""]),
        { class: "list compact", id: "report-issues" }) : h("p", { class: "muted" }, "No issues found."),
      r.issuesTruncated ? h("p", { class: "muted" }, "More issues were found than the report lists.") : null);
  } catch (err) {
    replace(reportBody, errorBox(err, "Could not read the validation report"));
  }
}

async function start() {
  try {
    const res = await get(datasetPath);
    renderDataset(res.dataset || {});
  } catch (err) {
    replace(errors, errorBox(err, "Cannot show this dataset"));
    return;
  }
  loadReport();
}

start();
