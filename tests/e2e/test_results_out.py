"""Results out, end to end on embedded defaults (real nats-server, SQLite, local storage, a CPU worker
training a tiny model built locally), as a user goes through it: train a job, list its checkpoints,
download the adapter through the CLI (checksums verified), read its evaluation (tuned loss below base loss
on the test split) and its timeline and usage, chat with it through the OpenAI-compatible endpoint using
the `openai` client, start a second job from the first one's checkpoint, delete the first job and find none
of its objects, rows or metrics left."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from tuneforge.v1 import dataset_pb2, deployment_service_pb2, evaluation_pb2, job_pb2, metrics_pb2
from typer.testing import CliRunner

from services.cli.main import app
from services.client import TuneForgeClient
from services.platform.supervisor import Platform
from tests.e2e.conftest import lora_spec, wait_final
from tuneforge_core.errors import NotFound
from tuneforge_core.storage import LocalObjectStore

pytestmark = pytest.mark.slow

E = job_pb2.JobEventType


def eventually(check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{check.__name__} did not hold within {timeout_s}s"
        time.sleep(0.2)


def count(db: Path, table: str, job_id: str, column: str = "job_id") -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return len(list(conn.execute(f"SELECT 1 FROM {table} WHERE {column} = ?", (job_id,))))


def wait_ready(client: TuneForgeClient, ref: str,
               timeout_s: float = 180) -> deployment_service_pb2.Deployment:
    deadline = time.monotonic() + timeout_s
    while True:
        deployment = client.get_deployment(ref)
        if deployment.state != deployment_service_pb2.DEPLOYMENT_STATE_PENDING:
            return deployment
        assert time.monotonic() < deadline, "the deployment did not leave PENDING"
        time.sleep(0.5)


def test_train_evaluate_download_chat_continue_and_delete(
    client: TuneForgeClient, tiny_assets: tuple[Path, Path], platform: Platform, tmp_path: Path
) -> None:
    model, data = tiny_assets
    ds = client.upload_dataset(data, "results-chat", tokenizer=str(model), max_length=256)
    ds = ds.dataset
    assert any(s.kind == dataset_pb2.DATASET_SPLIT_KIND_TEST and s.example_count for s in ds.splits)

    spec = lora_spec(model, ds.id, epochs=3)
    spec.hyperparameters.save_steps = 10
    spec.evaluation.num_samples = 1
    spec.evaluation.max_new_tokens = 16
    job = client.create_job(spec, name="results-first")
    final = wait_final(client, job.id)
    assert final.state == job_pb2.JOB_STATE_SUCCEEDED, final.error
    # Progress is exact, and the job says what it used.
    assert final.progress.step == final.progress.total_steps > 0
    assert final.phase == job_pb2.JOB_PHASE_UNSPECIFIED
    assert final.usage.hardware == "cpu" and final.usage.gpu_count == 0 and final.usage.gpu_hours == 0
    assert final.usage.run_time.ToTimedelta().total_seconds() > 0 and final.usage.tokens_trained > 0
    assert final.output.kept_step == final.progress.step

    # Checkpoints as resources.
    checkpoints = client.list_checkpoints(job.id).checkpoints
    assert len(checkpoints) == 2 and checkpoints[-1].step == final.progress.step  # save_total_limit 2

    # Download through the CLI, checksums verified.
    runner = CliRunner(env={"TUNEFORGE_API_KEY": client.api_key})
    target = tmp_path / "adapter"
    result = runner.invoke(app, ["jobs", "download", job.id, str(target), "--address", platform.address])
    assert result.exit_code == 0 and "sha256 verified" in result.output, result.output
    assert (target / "adapter_model.safetensors").exists()

    # The evaluation: tuned loss below base loss on the test split, a sample side by side.
    report = client.get_job_evaluation(job.id).evaluation
    assert report.status == evaluation_pb2.EVALUATION_STATUS_SUCCEEDED, report.message
    assert report.split == "test" and report.example_count > 0 and report.primary_metric == "loss"
    assert report.tuned_metrics["loss"] < report.base_metrics["loss"] and report.improved
    assert len(report.samples) == 1 and report.samples[0].prompt and report.samples[0].tuned_answer
    shown = runner.invoke(app, ["jobs", "eval", job.id, "--address", platform.address])
    assert shown.exit_code == 0 and "loss" in shown.output, shown.output
    kinds = {a.name for a in client.get_job_artifacts(job.id)}
    assert {"adapter", "evaluation", "logs"} <= kinds, kinds

    # The job's story, in order.
    events = list(client.list_job_events(job.id, page_size=1000).events)
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    types = [e.type for e in events]
    for earlier, later in [(E.JOB_EVENT_TYPE_QUEUED, E.JOB_EVENT_TYPE_WORKER_ASSIGNED),
                           (E.JOB_EVENT_TYPE_WORKER_ASSIGNED, E.JOB_EVENT_TYPE_TRAINING_STARTED),
                           (E.JOB_EVENT_TYPE_TRAINING_STARTED, E.JOB_EVENT_TYPE_CHECKPOINT_SAVED),
                           (E.JOB_EVENT_TYPE_CHECKPOINT_SAVED, E.JOB_EVENT_TYPE_EVALUATION_COMPLETED),
                           (E.JOB_EVENT_TYPE_EVALUATION_COMPLETED, E.JOB_EVENT_TYPE_SUCCEEDED)]:
        assert types.index(earlier) < types.index(later), [E.Name(t) for t in types]
    assert E.JOB_EVENT_TYPE_MODEL_DOWNLOADED in types and E.JOB_EVENT_TYPE_DATA_DOWNLOADED in types
    assert types[-1] == E.JOB_EVENT_TYPE_SUCCEEDED

    # Chat with it through the OpenAI-compatible endpoint, with the official client.
    deployment = client.create_deployment(job.id, name="results-first-chat")
    deployment = wait_ready(client, deployment.id)
    assert deployment.state == deployment_service_pb2.DEPLOYMENT_STATE_READY, deployment.error
    assert deployment.check.loaded and deployment.check.generated and deployment.check.stopped_at_end_of_turn
    from openai import OpenAI

    openai = OpenAI(base_url=deployment.endpoint, api_key=client.api_key, max_retries=0, timeout=120)
    answer = openai.chat.completions.create(
        model=deployment.model, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16)
    assert answer.choices[0].message.content is not None and answer.choices[0].finish_reason in ("stop",
                                                                                                "length")
    chunks = list(openai.chat.completions.create(
        model=deployment.model, messages=[{"role": "user", "content": "Say hi."}], max_tokens=8, stream=True))
    assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")

    # A second job continues from the first one's checkpoint.
    second_spec = lora_spec(model, ds.id, epochs=1)
    second_spec.hyperparameters.max_steps = 3
    second_spec.evaluation.enabled = False
    second_spec.warm_start.job = job.id
    second_spec.warm_start.checkpoint_step = checkpoints[-1].step
    second = wait_final(client, client.create_job(second_spec, name="results-second").id)
    assert second.state == job_pb2.JOB_STATE_SUCCEEDED, second.error
    first_points = [p.loss for p in client.stream_metrics(job.id, follow=False)
                    if p.kind == metrics_pb2.METRIC_KIND_TRAIN]
    second_points = [p.loss for p in client.stream_metrics(second.id, follow=False)
                     if p.kind == metrics_pb2.METRIC_KIND_TRAIN]
    # It starts where the first one got to, not where the base model starts.
    assert second_points[0] < first_points[0]

    # Delete the first job: none of its objects, rows or metrics are left; its deployment goes with it.
    assert client.delete_job(job.id).already_deleted is False
    data_dir = platform.data_dir
    store = LocalObjectStore(data_dir / "objects")
    with pytest.raises(NotFound):
        client.get_job(job.id)

    def nothing_left() -> bool:
        return (not store.list_keys(f"jobs/{final.organization}/{job.id}/")
                and count(data_dir / "jobs.db", "jobs_jobs", job.id, "id") == 0
                and count(data_dir / "jobs.db", "jobs_events", job.id) == 0
                and count(data_dir / "metrics.db", "metrics_points", job.id) == 0
                and count(data_dir / "metrics.db", "metrics_log_entries", job.id) == 0
                and not [d for d in client.list_deployments().deployments if d.job == job.id])

    eventually(nothing_left)
    with pytest.raises(NotFound):
        client.get_deployment(deployment.id)
    # The second job, which copied its starting weights, is untouched.
    assert client.get_job(second.id).state == job_pb2.JOB_STATE_SUCCEEDED
