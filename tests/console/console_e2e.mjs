// Drives the web console in headless Chromium (Debian's /usr/bin/chromium, through playwright-core) against a
// running platform, as a person would: sign in with a key, follow a running job until it succeeds, look at
// its dataset, plan and launch a job and cancel it. Run by tests/console/test_console.py, which starts the
// platform and the training job; the result (what was seen, and when) is written as JSON to
// $CONSOLE_OUT/result.json for the test to assert on, and screenshots beside it.
//
// Environment: CONSOLE_URL, CONSOLE_API_KEY, CONSOLE_JOB (the running job's id), CONSOLE_DATASET,
// CONSOLE_MODEL (a base model path the platform may read), CONSOLE_OUT (a folder), CHROMIUM (default
// /usr/bin/chromium), CONSOLE_TIMEOUT_S (default 420: how long the job may take to succeed).

import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";

const env = (name, fallback) => {
  const v = process.env[name] ?? fallback;
  if (v === undefined) throw new Error(`${name} is not set`);
  return v;
};
const base = env("CONSOLE_URL").replace(/\/$/, "");
const key = env("CONSOLE_API_KEY");
const jobId = env("CONSOLE_JOB");
const datasetId = env("CONSOLE_DATASET");
const model = env("CONSOLE_MODEL");
const out = env("CONSOLE_OUT");
const timeoutMs = Number(env("CONSOLE_TIMEOUT_S", "420")) * 1000;

const result = { steps: [], samples: [], problems: [], screenshots: [] };
const step = (name, extra = {}) => {
  result.steps.push({ name, t: Date.now(), ...extra });
  console.log(`[console-e2e] ${name}${Object.keys(extra).length ? " " + JSON.stringify(extra) : ""}`);
};

const browser = await chromium.launch({
  executablePath: env("CHROMIUM", "/usr/bin/chromium"),
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run"],
});
const context = await browser.newContext({ viewport: { width: 1440, height: 900 }, deviceScaleFactor: 1 });
const page = await context.newPage();
page.setDefaultTimeout(30_000);

// Anything the page logs as an error, any uncaught exception, and any CSP violation is a problem.
page.on("console", (msg) => {
  if (msg.type() === "error") result.problems.push(`console error: ${msg.text()}`);
});
page.on("pageerror", (err) => result.problems.push(`page error: ${err.message}`));
// Every refused request is named with its answer (the console's own "Failed to load resource" line names
// neither); only the deliberately wrong key's 401 at sign-in is expected.
page.on("response", async (res) => {
  if (res.status() < 400) return;
  const auth = res.request().headers()["authorization"] || "";
  if (res.status() === 401 && auth.includes("tf_not_a_real_key")) return;
  let body = "";
  try {
    body = (await res.text()).slice(0, 400);
  } catch {
    // the body may be gone with the page
  }
  result.problems.push(`HTTP ${res.status()} for ${res.request().method()} ${res.url()}: ${body}`);
});
await context.addInitScript(() => {
  document.addEventListener("securitypolicyviolation", (e) => {
    console.error(`CSP violation: ${e.violatedDirective} ${e.blockedURI}`);
  });
});

async function shot(name, { fullPage = false, selector = null } = {}) {
  const file = join(out, `${name}.png`);
  if (selector) await page.locator(selector).screenshot({ path: file });
  else await page.screenshot({ path: file, fullPage });
  result.screenshots.push(file);
  return file;
}

async function chartPoints(id) {
  return Number(await page.getAttribute(`#${id}`, "data-points"));
}

try {
  // -- sign in: an unsigned visit is sent to the sign-in page, a wrong key is refused, the right one works
  await page.goto(`${base}/jobs/${jobId}`);
  await page.waitForURL(/\/sign-in\?next=/);
  step("redirected to sign-in", { url: page.url() });
  await page.fill("#api-key", "tf_not_a_real_key");
  await page.click("#sign-in-button");
  await page.waitForSelector("#sign-in-status .error");
  result.refusedKeyMessage = await page.textContent("#sign-in-status");
  step("wrong key refused", { message: result.refusedKeyMessage });
  result.problems = result.problems.filter((p) => !p.includes("401")); // the refused key's 401 is expected
  await page.fill("#api-key", key);
  await page.click("#sign-in-button");
  await page.waitForURL(`${base}/jobs/${jobId}`);
  result.callerShown = (await page.textContent("#caller")) || "";
  step("signed in, back on the job page", { caller: result.callerShown });

  // -- the job page follows the running job: the loss chart gains points while the state is RUNNING
  await page.waitForSelector("#job-state[data-state]");
  const deadline = Date.now() + timeoutMs;
  let runningShot = false;
  for (;;) {
    const state = await page.getAttribute("#job-state", "data-state");
    const loss = await chartPoints("chart-loss");
    const sample = { t: Date.now(), state, loss, lr: await chartPoints("chart-learning-rate"),
      cpu: await chartPoints("chart-cpu"), logs: Number(await page.getAttribute("#log-lines", "data-lines")),
      events: Number(await page.getAttribute("#timeline-list", "data-events") || 0) };
    result.samples.push(sample);
    if (!runningShot && state === "RUNNING" && loss >= 20) {
      await shot("job-running");
      runningShot = true;
    }
    if (["SUCCEEDED", "FAILED", "CANCELLED"].includes(state)) break;
    if (Date.now() > deadline) throw new Error(`the job page still says ${state} after ${timeoutMs / 1000} s`);
    await page.waitForTimeout(1000);
  }
  result.finalState = await page.getAttribute("#job-state", "data-state");
  step("job ended in the page", { state: result.finalState });

  // After the end: the evaluation and the artifacts are shown, the chart holds every point.
  await page.waitForSelector("#evaluation .section-body[data-status]:not([data-status='PENDING'])", { timeout: 60_000 });
  result.evaluationStatus = await page.getAttribute("#evaluation .section-body", "data-status");
  result.evaluationSamples = await page.locator("#evaluation-samples .sample").count();
  await page.waitForSelector("#artifacts .section-body[data-count]");
  await page.waitForFunction(() => document.querySelectorAll("#artifacts details.artifact").length > 0
    && [...document.querySelectorAll("#artifacts details.artifact")].some((d) => d.dataset.name === "adapter"),
  null, { timeout: 60_000 });
  result.artifacts = await page.$$eval("#artifacts details.artifact", (els) => els.map((e) => e.dataset.name));
  result.downloadLinks = await page.$$eval("#artifacts a[download]", (els) => els.map((a) => a.href));
  // The metrics stream ends by itself once the job is final (StreamMetrics with follow).
  await page.waitForSelector("#metrics-live[data-live='false']", { timeout: 60_000 });
  result.finalLossPoints = await chartPoints("chart-loss");
  result.finalEvalLossInLegend = await page.locator("#chart-loss .u-legend").count();
  result.timeline = await page.$$eval("#timeline-list li[data-type]", (els) => els.map((e) => e.dataset.type));
  result.logLines = Number(await page.getAttribute("#log-lines", "data-lines"));
  result.liveNote = await page.textContent("#metrics-live");
  // The adapter's files download with the link as shown (a signed URL, no key needed).
  const adapterLink = await page.locator("#artifacts details[data-name='adapter'] a[download]").first().getAttribute("href");
  const download = await page.request.get(adapterLink);
  result.adapterDownload = { status: download.status(), bytes: (await download.body()).length };
  step("job page complete", { artifacts: result.artifacts, evaluation: result.evaluationStatus });
  await page.evaluate(() => window.scrollTo(0, 0));
  await shot("job-succeeded");
  await shot("job-succeeded-full", { fullPage: true });

  // Logs filtered by level: warnings and above is a subset of everything.
  await page.selectOption("#log-level", "LOG_LEVEL_WARNING");
  await page.waitForTimeout(1500);
  result.logLevelsAtWarning = await page.$$eval("#log-lines li", (els) => [...new Set(els.map((e) => e.dataset.level))]);
  await page.selectOption("#log-level", "");
  await page.uncheck("#log-source-worker");
  await page.waitForTimeout(1500);
  result.logSourcesTrainingOnly = await page.$$eval("#log-lines li", (els) => [...new Set(els.map((e) => e.dataset.source))]);
  step("log filters", { warning: result.logLevelsAtWarning, training: result.logSourcesTrainingOnly });

  // -- the jobs list shows the job with its state, progress and cost
  await page.click("nav.sections a[href='/jobs']");
  await page.waitForSelector(`#jobs-table a[data-job='${jobId}']`);
  result.jobsListState = await page.textContent(`#jobs-table tr:has(a[data-job='${jobId}']) .badge`);
  await shot("jobs");
  step("jobs list", { state: result.jobsListState });

  // -- the dataset page: validation report and token statistics; its description (markup) stays text
  await page.click("nav.sections a[href='/datasets']");
  await page.waitForSelector("#datasets-table a.dataset-link");
  await page.click(`#datasets-table a[href='/datasets/${datasetId}']`);
  await page.waitForSelector("#report-valid");
  await page.waitForSelector("#token-stats, #token-statistics .muted");
  result.datasetValid = await page.textContent("#report-valid");
  result.tokenStatsShown = await page.locator("#token-stats").count();
  result.datasetDescription = await page.textContent("#about dl.facts");
  result.injectedImages = await page.locator("#about img").count();
  result.xss = await page.evaluate(() => window.__xss ?? null);
  await shot("dataset");
  step("dataset page", { valid: result.datasetValid, tokenStats: result.tokenStatsShown });

  // -- plan a job: fit, time and cost per GPU type; launch it; cancel it from its page
  await page.click("nav.sections a[href='/plan']");
  await page.waitForSelector(`#plan-dataset option[value='${datasetId}']`, { state: "attached" });
  await page.fill("#plan-model", model);
  await page.selectOption("#plan-dataset", datasetId);
  await page.fill("#plan-epochs", "40");
  await page.fill("#plan-batch-size", "8");
  await page.fill("#plan-max-seq-length", "256");
  await page.fill("#plan-name", "console-launched");
  await page.click("#plan-button");
  await page.waitForSelector("#plan-fits tbody tr");
  result.planRows = await page.locator("#plan-fits tbody tr").count();
  result.planFits = await page.locator("#plan-fits .ok").count();
  await shot("plan");
  step("plan", { rows: result.planRows, fits: result.planFits });
  await page.click("#launch-button");
  await page.waitForURL(/\/jobs\/job_/);
  result.launchedJob = page.url().split("/").pop();
  await page.waitForSelector("#job-state[data-state]");
  await page.waitForSelector("#cancel-job:not([hidden])");
  page.once("dialog", (d) => d.accept());
  await page.click("#cancel-job");
  await page.waitForFunction(() => ["CANCELLING", "CANCELLED"].includes(document.querySelector("#job-state")?.dataset.state),
    null, { timeout: 60_000 });
  await page.waitForSelector("#job-state[data-state='CANCELLED']", { timeout: 120_000 });
  result.launchedJobFinal = await page.getAttribute("#job-state", "data-state");
  step("launched and cancelled", { job: result.launchedJob, state: result.launchedJobFinal });

  // -- sign out: the key is gone and the pages send the browser back to sign in
  await page.click("#sign-out");
  await page.waitForURL(/\/sign-in/);
  result.keyAfterSignOut = await page.evaluate(() => sessionStorage.length);
  await page.goto(`${base}/datasets`);
  await page.waitForURL(/\/sign-in\?next=%2Fdatasets/);
  step("signed out");
  result.ok = true;
} catch (err) {
  result.ok = false;
  result.error = String(err?.stack || err);
  try {
    await shot("failure", { fullPage: true });
  } catch {
    // the page may be gone
  }
} finally {
  writeFileSync(join(out, "result.json"), JSON.stringify(result, null, 1));
  await browser.close();
}
console.log(JSON.stringify({ ok: result.ok, error: result.error, problems: result.problems }));
process.exit(result.ok ? 0 : 1);
