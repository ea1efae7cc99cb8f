"""`tuneforge jobs create --config FILE [--dataset] [--examples N] [--dry-run]` with the client stubbed at
its RPC boundary: the real CLI, the real config mapping and the real upload logic (services.client.
config_jobs), and a client whose create_job / plan_job / upload_dataset record what they were sent.
tests/platform/test_config_cli.py runs the same against the platform."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tuneforge.v1 import dataset_pb2, dataset_service_pb2, estimation_pb2, estimation_service_pb2, job_pb2
from typer.testing import CliRunner

from services.cli import main as cli_main
from services.client import TuneForgeClient
from tuneforge_core.spec import resolve_spec

runner = CliRunner()

SYNTH = """
[job]
model = "Qwen/Qwen2.5-0.5B"
data = "data/train.jsonl"

[data]
validation_path = "data/val.jsonl"

[training]
use_qlora = false

[hyperparameters]
n_epochs = 2
per_device_batch = 2
learning_rate = 1e-5
"""


class RecordingClient(TuneForgeClient):
    """The real client with its RPCs replaced by recorders."""

    calls: list[tuple[str, Any]] = []

    def create_job(self, spec: job_pb2.JobSpec, *, name: str = "", description: str = "",
                   request_id: str = "", validate_only: bool = False) -> job_pb2.Job:
        self.calls.append(("create_job", (spec, validate_only)))
        return job_pb2.Job(id="job_x", name=name or "job_x", spec=resolve_spec(spec),
                           state=job_pb2.JOB_STATE_QUEUED)

    def plan_job(self, spec: job_pb2.JobSpec, *, dataset_size: estimation_pb2.DatasetSize | None = None
                 ) -> estimation_service_pb2.PlanJobResponse:
        self.calls.append(("plan_job", (spec, dataset_size)))
        return estimation_service_pb2.PlanJobResponse(tokens_per_epoch=1234, training_tokens=2468)

    def upload_dataset(self, path: Path, name: str,
                       **kwargs: Any) -> dataset_service_pb2.UploadDatasetResponse:
        self.calls.append(("upload_dataset", (path, name, kwargs)))
        return dataset_service_pb2.UploadDatasetResponse(dataset=dataset_pb2.Dataset(id=f"ds_{path.stem}",
                                                                                     name=name))


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> type[RecordingClient]:
    RecordingClient.calls = []
    monkeypatch.setattr(cli_main, "TuneForgeClient", RecordingClient)
    return RecordingClient


@pytest.fixture
def synth_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # run from the project folder: relative paths resolve against it
    (tmp_path / "data").mkdir()
    for name in ("train", "val"):
        (tmp_path / "data" / f"{name}.jsonl").write_text('{"text": "hi"}\n' * 3)
    config = tmp_path / "sft.toml"
    config.write_text(SYNTH)
    return config


def cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(cli_main.app, ["jobs", "create", *args, "--address", "127.0.0.1:1"],
                           env={"TUNEFORGE_API_KEY": "k", "COLUMNS": "200"})
    return result.exit_code, result.output


def test_dry_run_with_a_local_file_uploads_nothing(recorder: type[RecordingClient], synth_file: Path) -> None:
    code, out = cli("--config", str(synth_file), "--examples", "2", "--dry-run")
    assert code == 0, out
    assert [c[0] for c in recorder.calls] == ["plan_job"]
    assert "would job.data: upload" in out and "first 2 examples" in out
    assert "would data.validation_path: upload" in out
    assert "ADAPTER_TYPE_FULL" in out and "training tokens: 2,468" in out and "nothing was created" in out
    # The file counted here, as its upload would count it: its first 2 rows, all of them train (the
    # validation file replaces its validation part).
    _, size = next(c[1] for c in recorder.calls if c[0] == "plan_job")
    assert size is not None and size.statistics.example_count == 2 and size.train_examples == 2


def test_dry_run_with_a_platform_dataset_asks_create_job_validate_only(
        recorder: type[RecordingClient], synth_file: Path) -> None:
    code, out = cli("--config", str(synth_file), "--dataset", "chat-0", "--dry-run", "--json")
    assert code == 0, out
    assert [c[0] for c in recorder.calls] == ["create_job", "plan_job"]  # the validation file: not uploaded
    create = next(c[1] for c in recorder.calls if c[0] == "create_job")
    assert create[1] is True and create[0].dataset == "chat-0"  # validate_only
    shown = json.loads(out)
    assert shown["checked_by_platform"] and shown["spec"]["adapter"] == "ADAPTER_TYPE_FULL"


def test_create_uploads_the_first_n_rows_and_the_validation_file(
        recorder: type[RecordingClient], synth_file: Path) -> None:
    code, out = cli("--config", str(synth_file), "--examples", "2", "--json")
    assert code == 0, out
    uploads = [c[1] for c in recorder.calls if c[0] == "upload_dataset"]
    assert [u[0].name for u in uploads] == ["train.jsonl", "val.jsonl"]
    assert uploads[0][2]["options"].max_samples == 2 and uploads[0][2]["min_examples"] == 2
    spec, validate_only = next(c[1] for c in recorder.calls if c[0] == "create_job")
    assert not validate_only
    assert (spec.dataset, spec.validation_dataset) == ("ds_train", "ds_val")
    assert spec.hyperparameters.epochs == 2 and spec.hyperparameters.learning_rate == 1e-5


def test_violations_name_the_file_keys_and_exit_2(recorder: type[RecordingClient], synth_file: Path) -> None:
    synth_file.write_text(SYNTH + "bogus_key = 1\n\n"
                          "[hyperparameters.parallelism]\npipeline_parallel_size = 4\n")
    code, out = cli("--config", str(synth_file), "--dry-run")
    assert code == 2
    assert "hyperparameters.bogus_key" in out and "hyperparameters.parallelism.pipeline_parallel_size" in out
    assert recorder.calls == []


def test_examples_on_a_platform_dataset_is_refused(recorder: type[RecordingClient], synth_file: Path) -> None:
    code, out = cli("--config", str(synth_file), "--dataset", "chat-0", "--examples", "5")
    assert code == 2 and "--examples" in out and "max_samples" in out
    assert recorder.calls == []


def test_spec_flags_do_not_combine_with_config(recorder: type[RecordingClient], synth_file: Path) -> None:
    code, out = cli("--config", str(synth_file), "--epochs", "3")
    assert code == 2 and "--epochs" in out
    code, out = cli("--dry-run")
    assert code == 2 and "--config" in out


def test_a_remote_dataset_uri_says_to_import_it_first(recorder: type[RecordingClient],
                                                      synth_file: Path) -> None:
    code, out = cli("--config", str(synth_file), "--dataset", "s3://bucket/train.jsonl", "--dry-run")
    assert code == 2 and "datasets import" in out
    assert recorder.calls == []
