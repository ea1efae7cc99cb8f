"""The web console (services/console), served by the platform's HTTP gateway.

The quick tests check what the server sends: the pages with their Content-Security-Policy, the static files
served from memory by exact path, the vendored uPlot as its README pins it, and that no console script uses
an HTML sink. The slow test starts a real platform (services, gateway, one worker), trains a tiny model,
and drives the console in real headless Chromium (Debian's /usr/bin/chromium through npm's
playwright-core, tests/console/console_e2e.mjs): sign in, follow the running job until it succeeds in the
page while its loss chart gains points, read the evaluation, logs and artifacts, the dataset page, plan
and launch a job and cancel it. Screenshots go to test-artifacts/console/ (with
TUNEFORGE_UPDATE_README_SCREENSHOT=1, one is copied to docs/console.png for the README). It is skipped,
saying why, only where Chromium (or Node) is missing:
`make console-test-deps` (a prerequisite of `make test`) installs them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import pytest
from aiohttp import web
from tuneforge.v1 import job_pb2, metrics_pb2

from services.client import TuneForgeClient
from services.console import CONTENT_SECURITY_POLICY, STATIC_DIR, STATIC_PREFIX, install
from tests.auth import make_key
from tests.e2e.conftest import lora_spec, start_platform, wait_for

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
ARTIFACTS = REPO / "test-artifacts" / "console"
SCREENSHOT_FOR_README = REPO / "docs" / "console.png"
CHROMIUM = Path(os.environ.get("TUNEFORGE_CHROMIUM", "/usr/bin/chromium"))


# -- what the server sends ------------------------------------------------------------------------------

@pytest.fixture
async def console_url() -> AsyncIterator[str]:
    app = web.Application()
    install(app)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Mapping[str, str], bytes]:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(url, headers=headers or {},
                                                               allow_redirects=False) as res:
        return res.status, res.headers.copy(), await res.read()  # names match in any case


async def test_pages_carry_a_strict_csp_and_escape_the_path(console_url: str) -> None:
    for page in ("/sign-in", "/jobs", "/jobs/job_x", "/datasets", "/datasets/ds_x", "/plan"):
        status, headers, body = await _get(console_url + page)
        assert status == 200, page
        assert headers["Content-Type"].startswith("text/html")
        csp = headers["Content-Security-Policy"]
        assert csp == CONTENT_SECURITY_POLICY
        assert "script-src 'self'" in csp and "unsafe" not in csp
        assert "require-trusted-types-for 'script'" in csp
        assert headers["X-Content-Type-Options"] == "nosniff" and headers["X-Frame-Options"] == "DENY"
        assert b"<script>" not in body and b" style=" not in body and b"onload" not in body
    # A hostile path variable is an attribute value, escaped; never markup.
    status, _, body = await _get(console_url + '/jobs/%22%3E%3Cscript%3Ealert(1)%3C%2Fscript%3E')
    assert status == 200
    assert b"<script>alert" not in body and b"&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in body
    status, headers, _ = await _get(console_url + "/")
    assert status == 302 and headers["Location"] == "/jobs"


async def test_static_files_are_served_from_memory_by_exact_path(console_url: str) -> None:
    status, headers, body = await _get(console_url + STATIC_PREFIX + "vendor/uplot/uPlot.iife.min.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    assert body == (STATIC_DIR / "vendor/uplot/uPlot.iife.min.js").read_bytes()
    etag = headers["ETag"]
    status, _, body = await _get(console_url + STATIC_PREFIX + "vendor/uplot/uPlot.iife.min.js",
                                 {"If-None-Match": etag})
    assert status == 304 and body == b""
    status, headers, _ = await _get(console_url + STATIC_PREFIX + "css/console.css")
    assert status == 200 and headers["Content-Type"].startswith("text/css")
    for missing in ("js/nope.js", "../__init__.py", "%2e%2e/__init__.py", "js/../../__init__.py", "js"):
        status, _, body = await _get(console_url + STATIC_PREFIX + missing)
        assert status == 404, missing
        assert b"import" not in body


def test_console_scripts_build_the_dom_without_html_sinks() -> None:
    """Data reaches the page as text only: no HTML sinks, no eval (the CSP's Trusted Types enforce the
    same in the browser; this says where, before a browser runs)."""
    sinks = re.compile(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function|"
                       r"setAttribute\(\s*['\"](on|style)")
    scripts = sorted((STATIC_DIR / "js").rglob("*.js"))
    assert len(scripts) >= 10
    comment = re.compile(r"^\s*(//|/?\*).*$", re.MULTILINE)  # whole-line comments may name the sinks
    for script in scripts:
        found = sinks.search(comment.sub("", script.read_text()))
        where = script.relative_to(REPO)
        assert found is None, f"{where} uses an HTML sink: {found.group(0) if found else ''}"


def test_vendored_uplot_is_the_pinned_release() -> None:
    readme = (STATIC_DIR / "vendor/uplot/README.md").read_text()
    pinned = dict(re.findall(r"^\| (\S+) \| \S+ \| ([0-9a-f]{64}) \|$", readme, re.MULTILINE))
    assert set(pinned) == {"uPlot.iife.min.js", "uPlot.min.css", "LICENSE"}
    for name, digest in pinned.items():
        assert hashlib.sha256((STATIC_DIR / "vendor/uplot" / name).read_bytes()).hexdigest() == digest, name
    assert "(v1.6.32)" in (STATIC_DIR / "vendor/uplot/uPlot.iife.min.js").read_text()[:200]
    assert "MIT License" in (STATIC_DIR / "vendor/uplot/LICENSE").read_text()


# -- in a real browser against a real platform ------------------------------------------------------------

def _browser_tools() -> Path:
    """node_modules with playwright-core (npm ci from the committed lock when missing); skips, saying why,
    where Chromium or Node cannot be had."""
    if not CHROMIUM.exists():
        pytest.skip(f"Chromium is not installed at {CHROMIUM} and could not be installed: `make "
                    "console-test-deps` installs Debian's chromium with apt-get (needs root and the Debian "
                    "archive)")
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js and npm are not installed: the console's browser test drives Chromium with "
                    "npm's playwright-core")
    modules = HERE / "node_modules"
    if not (modules / "playwright-core" / "package.json").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=HERE, check=True,
                       timeout=300)
    return modules


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from trainer_worker.tiny import build_tiny_chat_model, write_synthetic_chat_dataset

    root = tmp_path_factory.mktemp("console-assets")
    return build_tiny_chat_model(root / "tiny-chat"), write_synthetic_chat_dataset(root / "chat.jsonl", 240)


@pytest.mark.slow
def test_console_follows_a_training_job_in_chromium(tmp_path: Path, assets: tuple[Path, Path]) -> None:
    _browser_tools()
    model, data = assets
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    print(f"\nconsole test artifacts (screenshots, result.json): {ARTIFACTS}")

    platform = start_platform(tmp_path / "platform", workers=1, model=model)
    try:
        assert platform.http_url, "the platform started no HTTP gateway"
        key = make_key(platform.address, platform.data_dir, "console", "admin")
        with TuneForgeClient(platform.address, api_key=key) as client:
            # The description is markup on purpose: the dataset page must show it as text.
            ds = client.upload_dataset(data, "chat", description='<img src=x onerror="window.__xss=1">',
                                       tokenizer=str(model), max_length=256,
                                       request_id=str(uuid.uuid4())).dataset
            # Long enough to watch (a few hundred steps, a point each): the page sees it RUNNING.
            job = client.create_job(lora_spec(model, ds.id, epochs=12), name="watched-in-the-console")
            wait_for(client, job.id, lambda j: j.state == job_pb2.JOB_STATE_RUNNING, timeout_s=180)

            env = {**os.environ, "CONSOLE_URL": platform.http_url, "CONSOLE_API_KEY": key,
                   "CONSOLE_JOB": job.id, "CONSOLE_DATASET": ds.id, "CONSOLE_MODEL": str(model),
                   "CONSOLE_OUT": str(ARTIFACTS), "CHROMIUM": str(CHROMIUM), "CONSOLE_TIMEOUT_S": "400"}
            started = time.monotonic()
            run = subprocess.run(["node", str(HERE / "console_e2e.mjs")], cwd=HERE, env=env,
                                 capture_output=True, text=True, timeout=560)
            print(run.stdout[-4000:], run.stderr[-4000:], sep="\n")
            result_file = ARTIFACTS / "result.json"
            assert result_file.exists(), f"the browser script wrote no result (exit {run.returncode})"
            result = json.loads(result_file.read_text())
            assert result["ok"], f"the browser script failed: {result.get('error')}"
            assert run.returncode == 0
            print(f"browser run: {time.monotonic() - started:.0f} s")

            # Nothing went wrong in the page: no script error, no CSP violation, no server error.
            assert result["problems"] == []
            assert "refused" in result["refusedKeyMessage"]
            assert result["callerShown"].startswith("console")

            # The loss chart gained points while the page showed the job RUNNING, then the job succeeded.
            running = [s for s in result["samples"] if s["state"] == "RUNNING" and s["loss"] > 0]
            assert len(running) >= 2, result["samples"]
            assert running[-1]["loss"] > running[0]["loss"], running
            assert result["finalState"] == "SUCCEEDED"
            final = client.get_job(job.id)
            assert final.state == job_pb2.JOB_STATE_SUCCEEDED
            trained = [p for p in client.stream_metrics(job.id, follow=False)
                       if p.kind == metrics_pb2.METRIC_KIND_TRAIN and p.HasField("loss")]
            assert result["finalLossPoints"] == len(trained) > 0  # every stored point, once
            assert result["liveNote"].startswith("final")  # the live stream ended with the job
            events = client.list_job_events(job.id, page_size=1000)
            assert result["timeline"] == [job_pb2.JobEventType.Name(e.type).removeprefix("JOB_EVENT_TYPE_")
                                          for e in events.events]
            assert result["timeline"][-1] == "SUCCEEDED"
            assert result["evaluationStatus"] == "SUCCEEDED" and result["evaluationSamples"] == 3
            assert "adapter" in result["artifacts"]
            assert result["adapterDownload"]["status"] == 200 and result["adapterDownload"]["bytes"] > 0
            assert result["logLines"] > 0
            assert set(result["logLevelsAtWarning"]) <= {"WARNING", "ERROR", "CRITICAL"}
            assert result["logSourcesTrainingOnly"] in (["training"], [])
            assert result["jobsListState"] == "SUCCEEDED"

            # The dataset page: report and token statistics; the markup stayed text.
            assert result["datasetValid"] == "Valid" and result["tokenStatsShown"] == 1
            assert '<img src=x onerror="window.__xss=1">' in result["datasetDescription"]
            assert result["injectedImages"] == 0 and result["xss"] is None

            # Planned, launched from the plan page, cancelled from the job page.
            assert result["planRows"] > 0 and result["planFits"] > 0
            launched = client.get_job(result["launchedJob"])
            assert launched.name == "console-launched" and launched.state == job_pb2.JOB_STATE_CANCELLED
            assert result["launchedJobFinal"] == "CANCELLED"
            assert result["keyAfterSignOut"] == 0
    finally:
        platform.stop()

    shot = ARTIFACTS / "job-succeeded.png"
    assert shot.stat().st_size > 20_000
    shots = sorted(p.name for p in ARTIFACTS.glob('*.png'))
    if os.environ.get("TUNEFORGE_UPDATE_README_SCREENSHOT") == "1":
        shutil.copyfile(shot, SCREENSHOT_FOR_README)
        print(f"screenshots in {ARTIFACTS}: {shots}; {shot.name} copied to "
              f"{SCREENSHOT_FOR_README.relative_to(REPO)}")
    else:
        print(f"screenshots in {ARTIFACTS}: {shots}")


def test_sizes_are_said_in_binary_units_as_the_cli_says_them() -> None:
    """format.js fmtBytes divides by 1024, so it says KiB, MiB, GiB (not KB: 37,395 bytes are 36.5 KiB but
    37.4 KB)."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    script = (f"import {{fmtBytes}} from {json.dumps((STATIC_DIR / 'js' / 'format.js').as_uri())};"
              "console.log(JSON.stringify([0, 37395, 812082, 5 * 1024 ** 2, 3 * 1024 ** 3].map(fmtBytes)));")
    run = subprocess.run(["node", "--input-type=module", "-e", script], capture_output=True, text=True,
                         timeout=60, check=True)
    assert json.loads(run.stdout) == ["0 B", "36.5 KiB", "793 KiB", "5.0 MiB", "3.0 GiB"]
