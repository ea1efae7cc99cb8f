"""Experiment trackers through the whole platform (JobSpec.integrations): CreateJob seals the secrets, the
worker that holds the job gets them from the jobs service and hands them to the training process, the
loss lands in MLflow and in TensorBoard event files among the job's artifacts, and no secret is ever
returned, logged or stored in the clear anywhere in the data dir (databases, NATS, object storage)."""

from __future__ import annotations

import base64
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from tuneforge.v1 import artifact_pb2, job_pb2, metrics_pb2

from services.client import TuneForgeClient
from services.client.errors import InvalidArgument
from services.platform.supervisor import Platform
from tests.auth import org_client
from tests.e2e.conftest import lora_spec, start_platform, wait_final

WANDB_KEY = "0123456789abcdef0123456789abcdef76543210"  # W&B's 40-character key shape
MLFLOW_TOKEN = "mlflow-token-fedcba9876543210fedcba"

pytestmark = pytest.mark.slow


class FakeWandb:
    """A W&B server that refuses every call (401) and remembers the Authorization headers it saw."""

    def __init__(self) -> None:
        seen = self.authorizations = []  # type: list[str]

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                seen.append(self.headers.get("Authorization") or "")
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(401)
                self.end_headers()

            do_GET = do_POST

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory, tiny_assets: tuple[Path, Path]) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("trackers")
    mlflow_db = root / "mlflow.db"
    platform = start_platform(root / "platform", workers=1, model=tiny_assets[0],
                              TUNEFORGE_MLFLOW_TRACKING_URI=f"sqlite:///{mlflow_db}")
    fake = FakeWandb()
    try:
        yield {"platform": platform, "mlflow_uri": f"sqlite:///{mlflow_db}", "wandb": fake}
    finally:
        fake.close()
        platform.stop()


@pytest.fixture(scope="module")
def client(tracked: dict) -> Iterator[TuneForgeClient]:
    platform: Platform = tracked["platform"]
    with org_client(platform.address, platform.data_dir, "trackers") as c:
        yield c


@pytest.fixture(scope="module")
def dataset_id(client: TuneForgeClient, tiny_assets: tuple[Path, Path]) -> str:
    model, data = tiny_assets
    return client.upload_dataset(data, "trackers-chat", tokenizer=str(model), max_length=256).dataset.id


@pytest.fixture(scope="module")
def finished(client: TuneForgeClient, tiny_assets: tuple[Path, Path], dataset_id: str) -> job_pb2.Job:
    """A job reporting to MLflow (with a token) and TensorBoard that trains to the end."""
    spec = lora_spec(tiny_assets[0], dataset_id, epochs=1)
    spec.hyperparameters.logging_steps = 2
    spec.evaluation.enabled = False
    spec.integrations.add().mlflow.CopyFrom(job_pb2.MlflowIntegration(
        experiment_name="tf-e2e", run_name="e2e-run", token=MLFLOW_TOKEN))
    spec.integrations.add().tensorboard.SetInParent()
    job = client.create_job(spec, name="tracked-mlflow-tb")
    assert not job.spec.integrations[0].mlflow.token  # CreateJob's answer already lacks it
    final = wait_final(client, job.id)
    assert final.state == job_pb2.JOB_STATE_SUCCEEDED, final.error
    return final


def _losses(client: TuneForgeClient, job_id: str) -> dict[int, float]:
    return {p.step: p.loss for p in client.list_metrics(job_id, [metrics_pb2.METRIC_KIND_TRAIN])
            if p.HasField("loss")}


def test_mlflow_run_holds_the_jobs_loss(client: TuneForgeClient, finished: job_pb2.Job,
                                        tracked: dict) -> None:
    from mlflow.tracking import MlflowClient

    mlflow = MlflowClient(tracking_uri=tracked["mlflow_uri"])
    experiment = mlflow.get_experiment_by_name("tf-e2e")
    assert experiment is not None
    (run,) = mlflow.search_runs([experiment.experiment_id])
    assert run.info.run_name == "e2e-run" and run.info.status == "FINISHED"
    assert run.data.tags["tuneforge.job_id"] == finished.id
    logged = {m.step: m.value for m in mlflow.get_metric_history(run.info.run_id, "loss")}
    ours = _losses(client, finished.id)
    common = sorted(set(logged) & set(ours))
    assert len(common) >= 2, (logged, ours)
    for step in common:
        assert logged[step] == pytest.approx(ours[step], rel=1e-4)


def test_tensorboard_events_are_an_artifact_holding_the_jobs_loss(
        client: TuneForgeClient, finished: job_pb2.Job, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (artifact,) = client.get_job_artifacts(finished.id, [artifact_pb2.ARTIFACT_KIND_TENSORBOARD])
    assert artifact.name == "tensorboard" and artifact.files
    client.download_artifact(finished.id, tmp_path / "tb", artifact=artifact)
    accumulator = EventAccumulator(str(tmp_path / "tb"))
    accumulator.Reload()
    logged = {e.step: e.value for e in accumulator.Scalars("train/loss")}
    ours = _losses(client, finished.id)
    common = sorted(set(logged) & set(ours))
    assert len(common) >= 2, (logged, ours)
    for step in common:
        assert logged[step] == pytest.approx(ours[step], rel=1e-4)


def test_the_job_log_names_the_trackers_and_no_secret(client: TuneForgeClient, finished: job_pb2.Job) -> None:
    lines = [e.message for e in client.stream_logs(finished.id)]
    assert any("Reporting to MLflow (experiment tf-e2e" in line and "with the job's token" in line
               for line in lines), lines
    assert any("Started the MLflow run" in line for line in lines), lines
    assert not [line for line in lines if MLFLOW_TOKEN in line]


def test_wandb_key_reaches_the_training_process_and_a_refused_key_fails_the_job(
        client: TuneForgeClient, tiny_assets: tuple[Path, Path], dataset_id: str, tracked: dict) -> None:
    spec = lora_spec(tiny_assets[0], dataset_id, epochs=1)
    spec.evaluation.enabled = False
    spec.integrations.add().wandb.CopyFrom(job_pb2.WandbIntegration(
        project="tf-e2e", api_key=WANDB_KEY, base_url=tracked["wandb"].url, tags=["e2e"]))
    job = client.create_job(spec, name="tracked-wandb-refused")
    assert job.spec.integrations[0].wandb.project == "tf-e2e" and not job.spec.integrations[0].wandb.api_key
    final = wait_final(client, job.id)
    assert final.state == job_pb2.JOB_STATE_FAILED
    assert "DEPENDENCY_ERROR" in str(final.error) and "Weights & Biases did not start" in final.error.message
    expected = "Basic " + base64.b64encode(f"api:{WANDB_KEY}".encode()).decode()
    assert expected in tracked["wandb"].authorizations  # the job's own key, as W&B sends it
    assert WANDB_KEY not in final.error.message


def test_no_secret_is_returned_or_stored_in_the_clear(client: TuneForgeClient, finished: job_pb2.Job,
                                                      tracked: dict) -> None:
    for job in [*client.list_jobs(page_size=100).jobs, client.get_job(finished.id)]:
        for integration in job.spec.integrations:
            assert not integration.wandb.api_key and not integration.mlflow.token
    # Databases, the outbox, NATS' JetStream files, object storage, logs: nowhere in the data dir.
    platform: Platform = tracked["platform"]
    for path in Path(platform.data_dir).rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert WANDB_KEY.encode() not in data and MLFLOW_TOKEN.encode() not in data, path


def test_a_bad_integration_is_refused_naming_the_field(client: TuneForgeClient,
                                                        tiny_assets: tuple[Path, Path],
                                                        dataset_id: str) -> None:
    spec = lora_spec(tiny_assets[0], dataset_id)
    spec.integrations.add().wandb.CopyFrom(job_pb2.WandbIntegration(project="", api_key=WANDB_KEY))
    spec.integrations.add().tensorboard.SetInParent()
    spec.integrations.add().tensorboard.SetInParent()
    with pytest.raises(InvalidArgument) as caught:
        client.create_job(spec, name="tracked-bad")
    fields = {v.field: v.description for v in caught.value.violations}
    assert set(fields) == {"spec.integrations[0].wandb.project", "spec.integrations[2]"}, fields
    assert "at most one tensorboard" in fields["spec.integrations[2]"]
    assert WANDB_KEY not in str(caught.value) + repr(fields)


def test_cli_jobs_create_adds_the_trackers_and_never_shows_the_key(
        client: TuneForgeClient, tiny_assets: tuple[Path, Path], dataset_id: str, tracked: dict) -> None:
    from typer.testing import CliRunner

    from services.cli.main import app

    runner = CliRunner(env={"TUNEFORGE_API_KEY": client.api_key, "WANDB_API_KEY": WANDB_KEY})
    address = tracked["platform"].address
    result = runner.invoke(app, [
        "jobs", "create", "--model", str(tiny_assets[0]), "--dataset", dataset_id, "--validate-only",
        "--json", "--wandb-project", "cli-proj", "--wandb-tag", "a", "--wandb-tag", "b", "--mlflow",
        "--mlflow-experiment", "cli-exp", "--tensorboard", "--address", address])
    assert result.exit_code == 0, result.output
    assert "cli-proj" in result.output and "cli-exp" in result.output and "tensorboard" in result.output
    assert WANDB_KEY not in result.output
    refused = runner.invoke(app, ["jobs", "create", "--model", str(tiny_assets[0]), "--dataset", dataset_id,
                                  "--validate-only", "--wandb-project", "a/b", "--address", address])
    assert refused.exit_code != 0 and "spec.integrations[0].wandb.project" in refused.output, refused.output
    assert WANDB_KEY not in refused.output
