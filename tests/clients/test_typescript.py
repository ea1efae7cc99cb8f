"""The TypeScript client generated into gen/ts (protoc-gen-es v2 + Connect v2 over gRPC/HTTP2) against the
running platform: clients/ts/src/e2e.ts, compiled with tsc, lists models, uploads a dataset by client
streaming, trains a LoRA job while following WatchJob and StreamMetrics, and decodes a bad request's
ErrorInfo and BadRequest. The program prints JSON lines; this test checks them against the platform as the
Python client sees it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from tuneforge.v1 import dataset_pb2, estimation_service_pb2, job_pb2, metrics_pb2

from services.client import TuneForgeClient
from tests.clients.conftest import REPO, RunningPlatform, run_make
from tuneforge_core.errors import ERROR_DOMAIN
from tuneforge_core.reasons import Reason

PROGRAM = REPO / "clients/ts/dist/clients/ts/src/e2e.js"


@pytest.fixture(scope="module")
def ts_program() -> Path:
    """clients/ts built from the committed package-lock.json (npm ci) and gen/ts (tsc, strict)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("no node/npm on this machine: the TypeScript client cannot be built")
    run_make("clients-ts")
    assert PROGRAM.is_file()
    return PROGRAM


def test_generated_typescript_compiles(ts_program: Path) -> None:
    """tsc (strict) accepted src/ and all of gen/ts; every generated file compiled to dist/."""
    generated = sorted(p.relative_to(REPO / "gen/ts").with_suffix("")
                       for p in (REPO / "gen/ts").rglob("*_pb.ts"))
    compiled = sorted(p.relative_to(REPO / "clients/ts/dist/gen/ts").with_suffix("")
                      for p in (REPO / "clients/ts/dist/gen/ts").rglob("*_pb.js"))
    assert generated and set(generated) <= set(compiled)
    for name in ("google/rpc/error_details_pb", "google/rpc/status_pb", "tuneforge/v1/job_service_pb"):
        assert Path(name) in generated


def run_program(program: Path, running: RunningPlatform) -> dict[str, dict[str, Any]]:
    env = {**os.environ, "TUNEFORGE_API_KEY": running.api_key}
    done = subprocess.run(["node", str(program), running.platform.address, str(running.model),
                           str(running.data)], env=env, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, f"e2e.js failed:\n{done.stdout}\n{done.stderr}"
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    by_step = {r["step"]: r for r in records}
    assert [r["step"] for r in records] == ["models", "upload", "create_job", "watch", "metrics", "error",
                                            "done"], done.stdout
    return by_step


@pytest.mark.slow
def test_typescript_client_trains_a_job_end_to_end(ts_program: Path,
                                                   running_platform: RunningPlatform) -> None:
    out = run_program(ts_program, running_platform)
    with TuneForgeClient(running_platform.platform.address, api_key=running_platform.api_key) as client:
        request = estimation_service_pb2.ListBaseModelsRequest(page_size=100)
        catalog = [m.id for m in client.estimation.ListBaseModels(request, timeout=30).models]
        assert out["models"]["count"] > 0 and out["models"]["ids"] == catalog

        # Client streaming: the dataset is READY, split, and the same for the Python client.
        upload = out["upload"]
        assert upload["state"] == "DATASET_STATE_READY" and upload["examples"] == 240, upload
        dataset = client.get_dataset(upload["id"])
        assert dataset.state == dataset_pb2.DATASET_STATE_READY
        assert sum(s.example_count for s in dataset.splits) == 240

        # The job: QUEUED at creation; WatchJob ended by itself at SUCCEEDED, its states in order.
        assert out["create_job"]["state"] == "JOB_STATE_QUEUED"
        watch = out["watch"]
        assert watch["final"] == "JOB_STATE_SUCCEEDED" and watch["ended"], watch
        order = ["JOB_STATE_QUEUED", "JOB_STATE_PREPARING", "JOB_STATE_RUNNING", "JOB_STATE_SUCCEEDED"]
        seen = [s for s in watch["states"] if s in order]
        assert seen == sorted(seen, key=order.index) and seen[-1] == "JOB_STATE_SUCCEEDED", watch
        job = client.get_job(out["create_job"]["id"])
        assert job.state == job_pb2.JOB_STATE_SUCCEEDED and job.progress.total_steps == 6

        # StreamMetrics (follow, batched) ended with the job and saw every stored training point once.
        stored = [p for p in client.stream_metrics(job.id, follow=False)
                  if p.kind == metrics_pb2.METRIC_KIND_TRAIN]
        metrics = out["metrics"]
        assert metrics["steps"] == [p.step for p in stored] and len(stored) >= 3, metrics
        assert all(isinstance(loss, float) for loss in metrics["losses"]), metrics

    # The bad request: INVALID_ARGUMENT, decoded from the status details by ConnectError.findDetails.
    error = out["error"]
    assert error["code"] == "InvalidArgument", error
    assert error["reason"] == Reason.INVALID_ARGUMENT.value and error["domain"] == ERROR_DOMAIN, error
    assert "spec.lora.rank" in {v["field"] for v in error["violations"]}, error
    assert all(v["description"] for v in error["violations"]), error


@pytest.mark.slow
def test_readme_typescript_example_runs(ts_program: Path, running_platform: RunningPlatform) -> None:
    """clients/ts/src/example.ts (the README's snippet): models, and WatchJob's NOT_FOUND decoded."""
    example = ts_program.parent / "example.js"
    env = {**os.environ, "TUNEFORGE_API_KEY": running_platform.api_key}
    done = subprocess.run(["node", str(example), running_platform.platform.address, "no-such-job"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    models, error = (json.loads(line) for line in done.stdout.splitlines())
    assert len(models["models"]) == 10
    assert error == {"code": "NotFound", "reason": Reason.NOT_FOUND.value, "domain": ERROR_DOMAIN,
                     "violations": []}, error
