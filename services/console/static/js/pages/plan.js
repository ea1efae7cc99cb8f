// Plan a job: pick the model, dataset and method, see whether it fits and what it takes per GPU type
// (POST /v1/jobs:plan), then launch it (POST /v1/jobs).

import { get, listAll, path, post } from "../api.js";
import { facts, h, replace, table } from "../dom.js";
import { enumLabel, fmtBytes, fmtDuration, fmtInt, fmtUsd } from "../format.js";
import { errorBox, startPage } from "../layout.js";

const main = await startPage("Plan a job");

const METHODS = ["SFT", "DPO", "ORPO", "KTO", "GRPO", "DISTILLATION"];
const ADAPTERS = ["LORA", "QLORA", "FULL", "PROMPT_TUNING"];

const field = (label, input, hint = "") => h("div", { class: "field" },
  h("label", { for: input.id }, label), input, hint ? h("small", { class: "muted" }, hint) : null);

const modelInput = h("input", { id: "plan-model", list: "plan-models", required: true, autocomplete: "off",
  placeholder: "meta-llama/Llama-3.1-8B-Instruct or a local path" });
const modelList = h("datalist", { id: "plan-models" });
const datasetSelect = h("select", { id: "plan-dataset", required: true }, h("option", { value: "" }, "Loading…"));
const methodSelect = h("select", { id: "plan-method" }, METHODS.map((m) => h("option", { value: `TRAINING_METHOD_${m}` }, m)));
const adapterSelect = h("select", { id: "plan-adapter" }, ADAPTERS.map((a) => h("option", { value: `ADAPTER_TYPE_${a}` }, a.replace("_", " ").toLowerCase())));
const epochsInput = h("input", { id: "plan-epochs", type: "number", min: "1", max: "50", step: "1", placeholder: "3" });
const batchInput = h("input", { id: "plan-batch-size", type: "number", min: "1", max: "256", step: "1", placeholder: "4" });
const lrInput = h("input", { id: "plan-learning-rate", type: "number", min: "0", max: "0.01", step: "any", placeholder: "2e-4" });
const seqInput = h("input", { id: "plan-max-seq-length", type: "number", min: "16", step: "1", placeholder: "2048" });
const gpuSelect = h("select", { id: "plan-gpu-type" }, h("option", { value: "" }, "any worker"), h("option", { value: "cpu" }, "cpu"));
const gpuCountInput = h("input", { id: "plan-gpu-count", type: "number", min: "1", max: "8", step: "1", placeholder: "1" });
const nameInput = h("input", { id: "plan-name", autocomplete: "off", placeholder: "optional; unique in the organization" });
const planButton = h("button", { type: "submit", class: "primary", id: "plan-button" }, "Plan");
const launchButton = h("button", { type: "button", id: "launch-button", disabled: true, onclick: onLaunch }, "Launch job");
const errors = h("div", { id: "plan-errors" });
const result = h("div", { id: "plan-result" });

replace(main,
  h("div", { class: "page-head" }, h("h1", {}, "Plan a job")),
  h("form", { id: "plan-form", class: "card plan-form", onsubmit: onPlan },
    h("div", { class: "form-grid" },
      field("Base model", modelInput, "A catalog model, or a path the platform may read."), modelList,
      field("Dataset", datasetSelect),
      field("Method", methodSelect), field("Adapter", adapterSelect),
      field("Epochs", epochsInput), field("Batch size", batchInput),
      field("Learning rate", lrInput), field("Max sequence length", seqInput),
      field("GPU type", gpuSelect, "The fit on this type is checked; 'any worker' lets any worker take it."),
      field("GPUs", gpuCountInput), field("Job name", nameInput)),
    h("div", { class: "actions" }, planButton, launchButton)),
  errors, result);

let hardware = [];

async function loadChoices() {
  const [models, hw, datasets] = await Promise.allSettled([
    listAll("/v1/models", "models", { page_size: 200 }, { limit: 1000 }),
    get("/v1/hardware"),
    listAll("/v1/datasets", "datasets", { page_size: 200, state: "DATASET_STATE_READY" }, { limit: 1000 }),
  ]);
  if (models.status === "fulfilled") {
    replace(modelList, models.value.map((m) => h("option", { value: m.id }, `${m.family || ""} ${fmtInt(m.parameterCount)} parameters`)));
  }
  if (hw.status === "fulfilled") {
    hardware = hw.value.options || [];
    gpuSelect.append(...hardware.map((o) => h("option", { value: o.gpuType }, `${o.displayName || o.gpuType} (${fmtBytes(o.memoryBytes)}, ${fmtUsd(o.hourlyUsd)}/h)`)));
  }
  if (datasets.status === "fulfilled") {
    const ready = datasets.value;
    replace(datasetSelect, h("option", { value: "" }, ready.length ? "Choose a dataset" : "No READY dataset: upload one first"),
      ready.map((d) => h("option", { value: d.id }, `${d.name} (${fmtInt(d.statistics?.exampleCount)} examples)`)));
  } else {
    replace(errors, errorBox(datasets.reason, "Could not list datasets"));
  }
  const params = new URLSearchParams(location.search);
  if (params.get("dataset")) datasetSelect.value = params.get("dataset");
  if (params.get("model")) modelInput.value = params.get("model");
}

function intOrUndefined(input) {
  return input.value === "" ? undefined : parseInt(input.value, 10);
}

function spec() {
  const hp = {};
  if (epochsInput.value) hp.epochs = intOrUndefined(epochsInput);
  if (batchInput.value) hp.batchSize = intOrUndefined(batchInput);
  if (lrInput.value) hp.learningRate = parseFloat(lrInput.value);
  if (seqInput.value) hp.maxSeqLength = intOrUndefined(seqInput);
  const s = {
    baseModel: modelInput.value.trim(),
    dataset: datasetSelect.value,
    method: methodSelect.value,
    adapter: adapterSelect.value,
    hyperparameters: hp,
  };
  if (gpuSelect.value) {
    s.hardware = { gpuType: gpuSelect.value };
    if (gpuCountInput.value) s.hardware.gpuCount = intOrUndefined(gpuCountInput);
  }
  return s;
}

let planned = null; // the spec the shown plan is for; launching uses exactly that

async function onPlan(event) {
  event.preventDefault();
  planButton.disabled = true;
  launchButton.disabled = true;
  replace(errors);
  replace(result, h("p", { class: "muted" }, "Planning…"));
  const s = spec();
  try {
    const res = await post("/v1/jobs:plan", { spec: s });
    planned = s;
    renderPlan(res);
    launchButton.disabled = false;
  } catch (err) {
    replace(result);
    replace(errors, errorBox(err, "Cannot plan this job"));
  } finally {
    planButton.disabled = false;
  }
}

function fitRow(fit, cheapest) {
  const name = hardware.find((o) => o.gpuType === fit.gpuType)?.displayName || fit.gpuType;
  const isCheapest = cheapest && cheapest.gpuType === fit.gpuType && cheapest.gpuCount === fit.gpuCount;
  return [
    h("span", {}, name, isCheapest ? h("span", { class: "badge badge-succeeded" }, "cheapest") : null),
    fmtInt(fit.gpuCount || 1),
    fit.fits ? h("span", { class: "ok" }, "fits") : h("span", { class: "bad", title: fit.reason || "" }, "does not fit"),
    fit.memoryPerGpu?.total ? fmtBytes(fit.memoryPerGpu.total) : "—",
    fit.fits && fit.time?.totalSeconds ? fmtDuration(fit.time.totalSeconds) : "—",
    fit.fits && fit.cost ? fmtUsd(fit.cost.totalUsd) : "—",
    fit.fits ? h("button", { type: "button", class: "link", onclick: () => useFit(fit) }, "use") : h("small", { class: "muted" }, fit.reason || ""),
  ];
}

function useFit(fit) {
  gpuSelect.value = fit.gpuType;
  gpuCountInput.value = String(fit.gpuCount || 1);
  planButton.click();
}

function renderPlan(res) {
  const v = res.datasetValidation || {};
  replace(result,
    h("section", { class: "card", id: "plan-summary" }, h("h2", {}, "Plan"),
      facts([
        ["Training examples", res.trainExamples ? fmtInt(res.trainExamples) : ""],
        ["Tokens per epoch", fmtInt(res.tokensPerEpoch)],
        ["Training tokens", fmtInt(res.trainingTokens)],
        ["Estimate from", enumLabel(res.source, "ESTIMATE_SOURCE_").toLowerCase()],
        ["Dataset validation", `${v.valid ? "valid" : "not valid"} · ${fmtInt(v.errorCount)} errors · ${fmtInt(v.warningCount)} warnings`],
        ["Requested hardware", res.requested ? (res.requested.fits ? `${res.requested.gpuType} × ${res.requested.gpuCount}: fits` : `${res.requested.gpuType}: ${res.requested.reason}`) : ""],
      ]),
      (res.suggestions || []).length ? h("div", { class: "note" }, h("strong", {}, "To make it fit: "),
        h("ul", {}, res.suggestions.map((s) => h("li", {}, s)))) : null,
      (res.notes || []).length ? h("ul", { class: "muted small" }, res.notes.map((n) => h("li", {}, n))) : null),
    h("section", { class: "card" }, h("h2", {}, "Fit, time and cost per GPU type"),
      table([{ label: "GPU" }, { label: "GPUs", cls: "num" }, { label: "Fits" }, { label: "Memory / GPU", cls: "num" },
        { label: "Time", cls: "num" }, { label: "Cost", cls: "num" }, { label: "" }],
      (res.fits || []).map((f) => fitRow(f, res.cheapestFit)), { class: "list", id: "plan-fits" })));
}

function requestId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

async function onLaunch() {
  if (!planned) return;
  launchButton.disabled = true;
  replace(errors);
  try {
    const body = { spec: planned, requestId: requestId() };
    if (nameInput.value.trim()) body.name = nameInput.value.trim();
    const res = await post("/v1/jobs", body);
    location.assign(path("/jobs/", res.job.id));
  } catch (err) {
    replace(errors, errorBox(err, "Could not launch the job"));
    launchButton.disabled = false;
  }
}

loadChoices().catch((err) => replace(errors, errorBox(err)));
