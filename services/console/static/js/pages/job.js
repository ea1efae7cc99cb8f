// One job, live: its state (WatchJob), training and resource charts (ListMetrics, then StreamMetrics with
// follow), the timeline (ListJobEvents, then the events WatchJob sends), logs filtered by level and source
// (StreamLogs), the evaluation with sample answers (GetJobEvaluation), artifacts with download links
// (GetJobArtifacts), and a cancel button.

import { ApiError, get, path, post, storedCaller, stream } from "../api.js";
import { StepChart } from "../charts.js";
import { facts, h, replace, safeUrl, table } from "../dom.js";
import {
  enumLabel, fmtBytes, fmtClock, fmtDuration, fmtInt, fmtNum, fmtPercent, fmtTime, fmtUsd, num,
} from "../format.js";
import { badge, errorBox, handleAuth, section, startPage } from "../layout.js";

const FINAL = new Set(["JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED"]);
const CANCELLABLE = new Set(["JOB_STATE_QUEUED", "JOB_STATE_PREPARING", "JOB_STATE_RUNNING"]);
const RETRY_MS = 2000;
const MAX_LOG_LINES = 3000;

const jobId = document.body.dataset.job || "";
const main = await startPage(`Job ${jobId}`);
const jobPath = path("/v1/jobs/", jobId);

let job = null;
const events = new Map(); // sequence -> JobEvent
const points = new Map(); // "KIND:step" -> MetricPoint (a repeated step replaces the stored point)
const closed = new AbortController(); // aborted when the page goes away
window.addEventListener("pagehide", () => closed.abort());

// ---- layout -------------------------------------------------------------------------------------------

const title = h("h1", { id: "job-title" }, jobId);
const stateBadge = h("span", { id: "job-state", dataset: { state: "" } });
const phaseLabel = h("span", { id: "job-phase", class: "muted" });
const cancelButton = h("button", { type: "button", id: "cancel-job", class: "danger", hidden: true, onclick: onCancel },
  "Cancel job");
const headError = h("div", { id: "job-error" });
const statusMessage = h("p", { id: "job-status-message", class: "muted" });
const summary = h("div", { id: "job-summary", class: "summary-grid" });
const liveNote = h("span", { id: "metrics-live", class: "live", dataset: { live: "false" } });

const charts = {
  loss: new StepChart("chart-loss", "Loss", [{ label: "train loss" }, { label: "eval loss", points: true }]),
  lr: new StepChart("chart-learning-rate", "Learning rate", [{ label: "learning rate" }]),
  grad: new StepChart("chart-grad-norm", "Gradient norm", [{ label: "grad norm" }]),
  tps: new StepChart("chart-tokens-per-second", "Tokens / s", [{ label: "tokens/s" }],
    { format: (v) => fmtNum(v, 3) }),
  cpu: new StepChart("chart-cpu", "CPU (% of one core)", [{ label: "cpu %" }], { format: (v) => fmtNum(v, 3) }),
  mem: new StepChart("chart-memory", "Memory (RSS)", [{ label: "memory" }], { format: (v) => fmtBytes(v) }),
  gpuUtil: new StepChart("chart-gpu-utilization", "GPU utilization (%)", [{ label: "gpu %" }]),
  gpuMem: new StepChart("chart-gpu-memory", "GPU memory", [{ label: "gpu memory" }], { format: (v) => fmtBytes(v) }),
  gpuTemp: new StepChart("chart-gpu-temperature", "GPU temperature (°C)", [{ label: "°C" }]),
};
const gpuCharts = h("div", { class: "chart-grid", id: "gpu-charts", hidden: true },
  charts.gpuUtil.el, charts.gpuMem.el, charts.gpuTemp.el);
const gpuNote = h("p", { class: "muted", id: "gpu-note" }, "No GPU metrics: the worker reported none (a CPU worker).");

const [trainingSection, trainingBody] = section("Training", "training", liveNote);
trainingBody.append(h("div", { class: "chart-grid" }, charts.loss.el, charts.lr.el, charts.grad.el, charts.tps.el));
const [resourceSection, resourceBody] = section("Resources", "resources");
resourceBody.append(h("div", { class: "chart-grid" }, charts.cpu.el, charts.mem.el), gpuCharts, gpuNote);

const [timelineSection, timelineBody] = section("Timeline", "timeline");
const timeline = h("ol", { class: "timeline", id: "timeline-list" });
timelineBody.append(timeline);

const levelSelect = h("select", { id: "log-level", "aria-label": "Lowest level shown", onchange: () => logs.restart() },
  h("option", { value: "" }, "all levels"),
  ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"].map((l) => h("option", { value: `LOG_LEVEL_${l}` }, `${l.toLowerCase()} and above`)));
const sourceBoxes = ["WORKER", "TRAINING"].map((s) => h("input", {
  type: "checkbox", id: `log-source-${s.toLowerCase()}`, value: `LOG_SOURCE_${s}`, checked: true, onchange: () => logs.restart(),
}));
const autoScroll = h("input", { type: "checkbox", id: "log-autoscroll", checked: true });
const [logSection, logBody] = section("Logs", "logs",
  h("div", { class: "tools" }, levelSelect,
    sourceBoxes.map((box) => h("label", { class: "check" }, box, box.value.slice("LOG_SOURCE_".length).toLowerCase())),
    h("label", { class: "check" }, autoScroll, "follow")));
const logList = h("ol", { class: "log", id: "log-lines", dataset: { lines: "0" } });
const logStatus = h("p", { class: "muted small", id: "log-status" });
logBody.append(logList, logStatus);

const [evalSection, evalBody] = section("Evaluation", "evaluation");
const [artifactSection, artifactBody] = section("Artifacts", "artifacts",
  h("button", { type: "button", class: "link", id: "refresh-artifacts", onclick: () => loadArtifacts() }, "Refresh"));

replace(main,
  h("div", { class: "page-head" },
    h("div", {}, h("p", { class: "crumbs" }, h("a", { href: "/jobs" }, "Jobs"), " / ", h("span", { class: "mono" }, jobId)),
      title, h("div", { class: "head-line" }, stateBadge, phaseLabel)),
    h("div", { class: "tools" }, cancelButton)),
  headError, statusMessage, summary,
  h("nav", { class: "in-page" }, [["training", "Training"], ["resources", "Resources"], ["timeline", "Timeline"],
    ["logs", "Logs"], ["evaluation", "Evaluation"], ["artifacts", "Artifacts"]].map(([id, label]) => h("a", { href: `#${id}` }, label))),
  trainingSection, resourceSection, timelineSection, logSection, evalSection, artifactSection);

// ---- the job ------------------------------------------------------------------------------------------

function isFinal() {
  return job !== null && FINAL.has(job.state);
}

function setJob(next) {
  const before = job;
  job = next;
  const state = enumLabel(job.state, "JOB_STATE_");
  document.title = `${job.name || job.id} · TuneForge`;
  replace(title, job.name || job.id);
  replace(stateBadge, badge(job.state, "JOB_STATE_"));
  stateBadge.dataset.state = state;
  const phase = job.phase && job.phase !== "JOB_PHASE_UNSPECIFIED" ? enumLabel(job.phase, "JOB_PHASE_").toLowerCase() : "";
  replace(phaseLabel, phase ? ` ${phase}` : "");
  // A viewer key may not cancel (the service would refuse it): no button then.
  cancelButton.hidden = !CANCELLABLE.has(job.state) || storedCaller()?.role === "ROLE_VIEWER";
  replace(statusMessage, job.statusMessage || "");
  replace(headError, job.error?.message
    ? h("div", { class: "error", role: "alert" }, h("strong", {}, `${state}: `), job.error.message,
      reasonOf(job.error) ? h("span", { class: "reason" }, ` (${reasonOf(job.error)})`) : null)
    : null);
  renderSummary();
  if (FINAL.has(job.state) && liveNote.dataset.live === "true") replace(liveNote, "● receiving the last points");
  if (FINAL.has(job.state) && (!before || !FINAL.has(before.state))) {
    loadEvaluation();
    loadArtifacts();
  }
}

function reasonOf(status) {
  for (const d of status?.details || []) if (String(d["@type"] || "").endsWith("ErrorInfo")) return d.reason || "";
  return "";
}

function renderSummary() {
  const p = job.progress || {};
  const u = job.usage || {};
  const spec = job.spec || {};
  const hp = spec.hyperparameters || {};
  const total = num(p.totalSteps);
  const fraction = job.state === "JOB_STATE_SUCCEEDED" ? 1 : total ? Math.min(1, num(p.step) / total) : 0;
  replace(summary,
    h("div", { class: "card" }, h("h3", {}, "Progress"),
      h("progress", { id: "job-progress", max: "1", value: String(fraction) }),
      facts([
        ["Step", total ? `${fmtInt(p.step)} / ${fmtInt(total)} (${fmtPercent(fraction)})` : "—"],
        ["Epoch", p.epoch !== undefined ? fmtNum(p.epoch, 3) : ""],
        ["Loss", p.loss !== undefined ? fmtNum(p.loss) : ""],
        ["Tokens / s", p.tokensPerSecond !== undefined ? fmtNum(p.tokensPerSecond, 4) : ""],
        ["Time left", p.etaSeconds !== undefined && !isFinal() ? fmtDuration(p.etaSeconds) : ""],
        ["Tokens trained", u.tokensTrained ? fmtInt(u.tokensTrained) : ""],
      ])),
    h("div", { class: "card" }, h("h3", {}, "Cost"),
      facts([
        ["Cost", h("span", { id: "job-cost" }, fmtUsd(u.costUsd))],
        ["Hardware", u.hardware ? `${u.hardware}${u.gpuCount ? ` × ${u.gpuCount}` : ""}` : "not yet assigned"],
        ["Price", u.hourlyUsd ? `${fmtUsd(u.hourlyUsd)} / h` : ""],
        ["Run time", u.runTime ? fmtDuration(u.runTime) : ""],
        ["GPU hours", u.gpuHours ? fmtNum(u.gpuHours, 3) : ""],
        ["Estimate", u.estimatedCostUsd ? `${fmtUsd(u.estimatedCostUsd)}, ${fmtDuration(u.estimatedDuration)}` : ""],
      ])),
    h("div", { class: "card" }, h("h3", {}, "Spec"),
      facts([
        ["Base model", h("span", { class: "mono" }, spec.baseModel || "—")],
        ["Dataset", spec.dataset ? h("a", { href: path("/datasets/", spec.dataset) }, spec.dataset) : ""],
        ["Method", `${enumLabel(spec.method || "TRAINING_METHOD_SFT", "TRAINING_METHOD_")} · ${enumLabel(spec.adapter || "ADAPTER_TYPE_LORA", "ADAPTER_TYPE_")}`],
        ["Epochs", hp.maxSteps ? `${hp.maxSteps} steps` : hp.epochs ?? ""],
        ["Learning rate", hp.learningRate !== undefined ? fmtNum(hp.learningRate) : ""],
        ["Batch size", hp.batchSize ?? ""],
        ["GPU", spec.hardware?.gpuType ? `${spec.hardware.gpuType} × ${spec.hardware.gpuCount || 1}` : "any worker"],
      ])),
    h("div", { class: "card" }, h("h3", {}, "Run"),
      facts([
        ["Id", h("span", { class: "mono" }, job.id)],
        ["Created", fmtTime(job.createTime)],
        ["Started", job.startTime ? fmtTime(job.startTime) : ""],
        ["Ended", job.endTime ? fmtTime(job.endTime) : ""],
        ["Worker", job.workerId || ""],
        ["Attempt", job.attempt > 1 ? String(job.attempt) : ""],
        ["Priority", job.priority && job.priority !== "JOB_PRIORITY_UNSPECIFIED" ? enumLabel(job.priority, "JOB_PRIORITY_").toLowerCase() : ""],
      ])),
  );
}

async function onCancel() {
  if (!job || !window.confirm(`Cancel job ${job.name || job.id}? A running job stops at its next step.`)) return;
  cancelButton.disabled = true;
  try {
    const res = await post(path("/v1/jobs/", jobId, ":cancel"), {});
    if (res.job) setJob(res.job);
  } catch (err) {
    replace(headError, errorBox(err, "Could not cancel"));
  } finally {
    cancelButton.disabled = false;
  }
}

/** Follows the job (WatchJob) until it is final, reconnecting after a dropped stream. */
async function followJob() {
  for (;;) {
    try {
      await stream(path("/v1/jobs/", jobId, ":watch"), {}, (msg) => {
        if (msg.job) setJob(msg.job);
        addEvents(msg.events || []);
      }, { signal: closed.signal });
      if (isFinal()) return;
    } catch (err) {
      if (err?.name === "AbortError" || handleAuth(err)) return;
      if (err instanceof ApiError && (err.httpStatus === 404 || err.httpStatus === 403)) {
        replace(headError, errorBox(err, "Cannot show this job"));
        return;
      }
      console.warn("watch ended", err);
    }
    await sleep(RETRY_MS);
  }
}

// ---- timeline -----------------------------------------------------------------------------------------

const EVENT_LABELS = {
  QUEUED: "Queued", WORKER_ASSIGNED: "Worker assigned", MODEL_DOWNLOADED: "Model downloaded",
  DATA_DOWNLOADED: "Data downloaded", TRAINING_STARTED: "Training started", EPOCH_COMPLETED: "Epoch completed",
  CHECKPOINT_SAVED: "Checkpoint saved", EVALUATION_STARTED: "Evaluation started",
  EVALUATION_COMPLETED: "Evaluation completed", EARLY_STOPPED: "Early stopped", UPLOADING: "Uploading",
  RESTARTED: "Restarted", CANCEL_REQUESTED: "Cancel requested", CANCELLED: "Cancelled", FAILED: "Failed",
  SUCCEEDED: "Succeeded",
};

function addEvents(list) {
  let added = false;
  for (const e of list) {
    const seq = num(e.sequence);
    const isNew = !events.has(seq);
    added ||= isNew;
    events.set(seq, e);
    const type = enumLabel(e.type, "JOB_EVENT_TYPE_");
    if (isNew && type === "CHECKPOINT_SAVED") loadArtifacts();
    if (isNew && type === "EVALUATION_COMPLETED") loadEvaluation();
  }
  if (added) renderTimeline();
}

function renderTimeline() {
  const sorted = [...events.entries()].sort((a, b) => a[0] - b[0]).map(([, e]) => e);
  timeline.dataset.events = String(sorted.length);
  replace(timeline, sorted.length ? sorted.map((e) => {
    const type = enumLabel(e.type, "JOB_EVENT_TYPE_");
    const extras = [];
    if (num(e.step)) extras.push(`step ${fmtInt(e.step)}`);
    if (e.epoch) extras.push(`epoch ${fmtNum(e.epoch, 3)}`);
    if (num(e.sizeBytes)) extras.push(fmtBytes(e.sizeBytes));
    if (e.duration) extras.push(fmtDuration(e.duration));
    if (e.workerId) extras.push(`worker ${e.workerId}`);
    if (e.reason) extras.push(e.reason);
    for (const [k, v] of Object.entries(e.metrics || {})) extras.push(`${k} ${fmtNum(v)}`);
    return h("li", { class: `event event-${type.toLowerCase().replace(/_/g, "-")}`, dataset: { type } },
      h("time", { datetime: e.time || "", title: fmtTime(e.time) }, fmtClock(e.time)),
      h("span", { class: "event-type" }, EVENT_LABELS[type] || type),
      h("span", { class: "event-message" }, e.message || ""),
      extras.length ? h("span", { class: "muted small" }, extras.join(" · ")) : null,
      num(e.attempt) > 1 ? h("span", { class: "muted small" }, `attempt ${e.attempt}`) : null);
  }) : h("li", { class: "muted" }, "Nothing recorded yet."));
}

async function loadEvents() {
  let token = "";
  do {
    const page = await get(`${jobPath}/events`, { page_size: 1000, page_token: token });
    addEvents(page.events || []);
    token = page.nextPageToken || "";
  } while (token);
}

// ---- metrics ------------------------------------------------------------------------------------------

let chartTimer = null;

function addPoints(list) {
  for (const p of list || []) points.set(`${p.kind}:${num(p.step)}`, p);
  if (chartTimer === null) chartTimer = setTimeout(drawCharts, 200);
}

function maxStep() {
  let max = 0;
  for (const p of points.values()) max = Math.max(max, num(p.step));
  return max;
}

function seriesOf(kind) {
  return [...points.values()].filter((p) => p.kind === kind).sort((a, b) => num(a.step) - num(b.step));
}

/** A field of each point: a number, or null where the point lacks it (int64 fields arrive as strings). */
function values(list, field) {
  return list.map((p) => value(p, field));
}

function value(p, field) {
  const v = p[field];
  if (v === undefined || v === null || v === "") return null;
  const n = Number(v);
  return Number.isFinite(n) ? n : null;
}

function drawCharts() {
  chartTimer = null;
  const train = seriesOf("METRIC_KIND_TRAIN");
  const evals = seriesOf("METRIC_KIND_EVAL");
  const system = seriesOf("METRIC_KIND_SYSTEM");
  // Train and eval losses share one x axis: the union of their steps, each null where it has no point.
  const steps = [...new Set([...train, ...evals].map((p) => num(p.step)))].sort((a, b) => a - b);
  const trainLoss = new Map(train.filter((p) => value(p, "loss") !== null).map((p) => [num(p.step), value(p, "loss")]));
  const evalLoss = new Map(evals.filter((p) => value(p, "evalLoss") !== null).map((p) => [num(p.step), value(p, "evalLoss")]));
  charts.loss.setData(steps, [steps.map((s) => trainLoss.get(s) ?? null), steps.map((s) => evalLoss.get(s) ?? null)]);
  const trainSteps = train.map((p) => num(p.step));
  charts.lr.setData(trainSteps, [values(train, "learningRate")]);
  charts.grad.setData(trainSteps, [values(train, "gradNorm")]);
  charts.tps.setData(trainSteps, [values(train, "tokensPerSecond")]);
  const sysSteps = system.map((p) => num(p.step));
  charts.cpu.setData(sysSteps, [values(system, "cpuPercent")]);
  charts.mem.setData(sysSteps, [values(system, "memoryBytes")]);
  const hasGpu = system.some((p) => value(p, "gpuUtilization") !== null || value(p, "gpuMemoryBytes") !== null);
  gpuCharts.hidden = !hasGpu;
  gpuNote.hidden = hasGpu || !system.length;
  if (hasGpu) {
    charts.gpuUtil.setData(sysSteps, [values(system, "gpuUtilization")]);
    charts.gpuMem.setData(sysSteps, [values(system, "gpuMemoryBytes")]);
    charts.gpuTemp.setData(sysSteps, [values(system, "gpuTemperatureCelsius")]);
  }
}

function setLive(live, text) {
  liveNote.dataset.live = String(live);
  replace(liveNote, text);
}

/** The stored points (ListMetrics, page by page), then the live ones (StreamMetrics, follow). */
async function followMetrics() {
  setLive(false, "loading…");
  try {
    let token = "";
    do {
      const page = await get(`${jobPath}/metrics`, { page_size: 10000, page_token: token });
      addPoints(page.points);
      token = page.nextPageToken || "";
    } while (token);
  } catch (err) {
    if (handleAuth(err)) return;
    trainingBody.prepend(errorBox(err, "Could not read the stored metrics"));
  }
  for (;;) {
    if (isFinal() && points.size) break;
    setLive(true, "● live");
    try {
      // From the last stored step: that step's points come again and replace themselves (same key).
      await stream(`${jobPath}/metrics:stream`, { follow: true, batch: true, start_step: maxStep() }, (msg) => {
        addPoints(msg.points?.length ? msg.points : msg.point ? [msg.point] : []);
      }, { signal: closed.signal });
      // The stream ends when the job is final; WatchJob may tell us a moment later.
      const res = await get(jobPath);
      if (res.job) setJob(res.job);
      if (isFinal()) break;
    } catch (err) {
      if (err?.name === "AbortError" || handleAuth(err)) return;
      setLive(false, `reconnecting (${err.message || err})`);
    }
    await sleep(RETRY_MS);
  }
  setLive(false, `final · ${fmtInt(points.size)} points`);
}

// ---- logs ---------------------------------------------------------------------------------------------

const logs = {
  abort: null,
  seen: new Set(),
  count: 0,
  restart() {
    this.abort?.abort();
    this.abort = new AbortController();
    this.seen = new Set();
    this.count = 0;
    replace(logList);
    logList.dataset.lines = "0";
    this.follow(this.abort.signal);
  },
  async follow(signal) {
    const sources = sourceBoxes.filter((b) => b.checked).map((b) => b.value);
    if (!sources.length) {
      replace(logStatus, "No source selected.");
      return;
    }
    const query = {
      follow: true, batch: true, min_level: levelSelect.value || undefined,
      sources: sources.length === sourceBoxes.length ? undefined : sources,
    };
    for (;;) {
      replace(logStatus, "● following");
      try {
        await stream(`${jobPath}/logs:stream`, query, (msg) => this.add(msg.entries?.length ? msg.entries : msg.entry ? [msg.entry] : []),
          { signal });
        if (isFinal()) break;
      } catch (err) {
        if (err?.name === "AbortError" || signal.aborted || handleAuth(err)) return;
        replace(logStatus, `reconnecting (${err.message || err})`);
      }
      if (signal.aborted) return;
      await sleep(RETRY_MS);
      if (signal.aborted) return;
    }
    replace(logStatus, `${fmtInt(this.count)} lines; the job has ended.`);
  },
  add(entries) {
    const fresh = entries.filter((e) => !this.seen.has(String(e.sequence)));
    if (!fresh.length) return;
    const nearBottom = logList.scrollHeight - logList.scrollTop - logList.clientHeight < 40;
    for (const e of fresh) {
      this.seen.add(String(e.sequence));
      const level = enumLabel(e.level, "LOG_LEVEL_");
      const source = enumLabel(e.source, "LOG_SOURCE_").toLowerCase();
      logList.append(h("li", { class: `log-${level.toLowerCase()}`, dataset: { level, source } },
        h("time", { datetime: e.time || "" }, fmtClock(e.time)),
        h("span", { class: "log-level" }, level),
        h("span", { class: "log-source" }, source),
        h("span", { class: "log-message" }, e.message || "")));
      this.count += 1;
    }
    while (logList.childElementCount > MAX_LOG_LINES) logList.firstElementChild.remove();
    logList.dataset.lines = String(this.count);
    if (autoScroll.checked && (nearBottom || fresh.length === this.count)) logList.scrollTop = logList.scrollHeight;
  },
};

// ---- evaluation ---------------------------------------------------------------------------------------

// One load of a panel at a time; one asked for meanwhile (the job ended while a checkpoint's listing was on
// its way) runs once that one is back, so what the panel shows is never older than the last reason to load
// it, and two loads never render out of order.
function oneAtATime(load) {
  let running = false;
  let again = false;
  return async function run() {
    if (running) {
      again = true;
      return;
    }
    running = true;
    try {
      do {
        again = false;
        await load();
      } while (again);
    } finally {
      running = false;
    }
  };
}

const loadEvaluation = oneAtATime(async () => {
  try {
    const res = await get(`${jobPath}/evaluation`);
    renderEvaluation(res.evaluation || {});
  } catch (err) {
    replace(evalBody, errorBox(err, "Could not read the evaluation"));
  }
});

function renderEvaluation(report) {
  const status = report.status || "EVALUATION_STATUS_PENDING";
  evalBody.dataset.status = enumLabel(status, "EVALUATION_STATUS_");
  const parts = [h("p", {}, badge(status, "EVALUATION_STATUS_"), " ", report.message || "")];
  if (status === "EVALUATION_STATUS_PENDING") parts.push(h("p", { class: "muted" }, "Measured after training ends."));
  if (status === "EVALUATION_STATUS_SUCCEEDED") {
    const primary = report.primaryMetric || "";
    const names = [...new Set([...Object.keys(report.baseMetrics || {}), ...Object.keys(report.tunedMetrics || {})])];
    parts.push(facts([
      ["Split", report.split || ""],
      ["Examples", fmtInt(report.exampleCount)],
      ["Primary metric", primary],
      ["Improved", report.improved ? "yes: the tuned model scored better" : "no"],
      ["Took", report.startTime && report.endTime ? fmtDuration((new Date(report.endTime) - new Date(report.startTime)) / 1000) : ""],
    ]));
    parts.push(table([{ label: "Metric" }, { label: "Base", cls: "num" }, { label: "Tuned", cls: "num" }, { label: "Change", cls: "num" }],
      names.map((n) => {
        const base = report.baseMetrics?.[n];
        const tuned = report.tunedMetrics?.[n];
        const change = typeof base === "number" && typeof tuned === "number" ? fmtNum(tuned - base) : "—";
        return [n === primary ? h("strong", {}, n) : n, fmtNum(base), fmtNum(tuned), change];
      }), { class: "list compact", id: "evaluation-metrics" }));
    const samples = report.samples || [];
    if (samples.length) {
      parts.push(h("h3", {}, `Sample answers (${samples.length})`));
      parts.push(h("div", { class: "samples", id: "evaluation-samples" }, samples.map((s, i) => h("article", { class: "sample" },
        h("h4", {}, `Prompt ${i + 1}`), h("pre", { class: "text" }, s.prompt || ""),
        s.reference ? [h("h4", {}, "Reference"), h("pre", { class: "text" }, s.reference)] : null,
        h("div", { class: "side-by-side" },
          h("div", {}, h("h4", {}, "Base model"), h("pre", { class: "text" }, s.baseAnswer || "")),
          h("div", {}, h("h4", {}, "Tuned model"), h("pre", { class: "text" }, s.tunedAnswer || "")))))));
    }
  }
  replace(evalBody, parts);
}

// ---- artifacts ----------------------------------------------------------------------------------------

const loadArtifacts = oneAtATime(async () => {
  try {
    const res = await get(`${jobPath}/artifacts`);
    renderArtifacts(res.artifacts || []);
  } catch (err) {
    replace(artifactBody, errorBox(err, "Could not list the artifacts"));
  }
});

function renderArtifacts(artifacts) {
  artifactBody.dataset.count = String(artifacts.length);
  if (!artifacts.length) {
    replace(artifactBody, h("p", { class: "muted" }, isFinal() ? "This job stored no artifacts." : "Nothing stored yet: checkpoints appear as training saves them."));
    return;
  }
  replace(artifactBody, artifacts.map((a) => h("details", { class: "artifact", open: a.kind !== "ARTIFACT_KIND_CHECKPOINT", dataset: { name: a.name } },
    h("summary", {}, h("strong", {}, a.name), " ", h("span", { class: "muted" },
      `${enumLabel(a.kind, "ARTIFACT_KIND_").toLowerCase().replace(/_/g, " ")} · ${(a.files || []).length} files · ${fmtBytes(a.sizeBytes)}`)),
    table([{ label: "File" }, { label: "Size", cls: "num" }, { label: "SHA-256" }, { label: "Link expires" }],
      (a.files || []).map((f) => {
        const url = safeUrl(f.downloadUrl);
        return [
          url ? h("a", { href: url, download: f.path.split("/").pop(), rel: "noopener noreferrer", class: "mono" }, f.path)
            : h("span", { class: "mono" }, f.path),
          fmtBytes(f.sizeBytes),
          h("code", { title: f.sha256 || "" }, (f.sha256 || "").slice(0, 12)),
          fmtTime(f.expireTime),
        ];
      }), { class: "list compact" }))));
}

// ---- start --------------------------------------------------------------------------------------------

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

async function start() {
  try {
    const res = await get(jobPath);
    setJob(res.job);
  } catch (err) {
    replace(headError, errorBox(err, "Cannot show this job"));
    return;
  }
  renderTimeline();
  loadEvents().catch((err) => timelineBody.prepend(errorBox(err, "Could not read the timeline")));
  if (!isFinal()) {
    renderEvaluation({});
    loadArtifacts();
  }
  followJob();
  followMetrics();
  logs.restart();
}

start();
