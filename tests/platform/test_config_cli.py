"""`tuneforge jobs create --config` against the platform as `tuneforge up` runs it (its own, so the jobs it
creates do not change what the shared seeded platform's paging tests count): a dry run is CreateJob
validate_only plus PlanJob and creates nothing; a real run uploads the file's first N rows
(DatasetOptions.max_samples) and queues the job the file describes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from tuneforge.v1 import dataset_pb2, job_pb2
from typer.testing import CliRunner

from services.cli.main import app
from services.client import TuneForgeClient
from tests.auth import make_key
from tests.platform.conftest import ORG, Seeded, chat_file, seed_platform

runner = CliRunner()

SYNTH = """
[job]
model = "Qwen/Qwen2.5-0.5B"
data = "data/chat.jsonl"

[training]
use_qlora = false

[training.validation]
evaluation_strategy = "epoch"

[hyperparameters]
n_epochs = 2
per_device_batch = 2
learning_rate = 1e-5
"""


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    yield from seed_platform(tmp_path_factory.mktemp("config-platform"))


@pytest.fixture(scope="module")
def key(platform: Seeded) -> str:
    return make_key(platform.address, platform.platform.data_dir, ORG, "admin")


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # run from the project folder: relative paths resolve against it
    (tmp_path / "data").mkdir()
    chat_file(tmp_path / "data" / "chat.jsonl", rows=150)
    path = tmp_path / "sft.toml"
    path.write_text(SYNTH)
    return path


def cli(platform: Seeded, key: str, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["jobs", "create", *args, "--address", platform.address],
                           env={"TUNEFORGE_API_KEY": key, "COLUMNS": "200",
                                "TUNEFORGE_DATA_DIR": "/nonexistent"})
    return result.exit_code, result.output


def jobs_of(platform: Seeded, key: str) -> int:
    with TuneForgeClient(platform.address, api_key=key) as client:
        return len(client.list_jobs(page_size=100).jobs)


def test_dry_run_resolves_on_the_platform_and_creates_nothing(platform: Seeded, key: str,
                                                              config: Path) -> None:
    before = jobs_of(platform, key)
    code, out = cli(platform, key, "--config", str(config), "--dataset", platform.dataset_ids[0], "--dry-run",
                    "--json")
    assert code == 0, out
    shown = json.loads(out)
    assert shown["checked_by_platform"] is True
    spec = shown["spec"]
    assert spec["dataset"] == platform.dataset_ids[0] and spec["adapter"] == "ADAPTER_TYPE_FULL"
    assert spec["hyperparameters"]["epochs"] == 2 and spec["hyperparameters"]["batch_size"] == 2
    assert shown["plan"] is not None or shown["plan_error"]
    assert jobs_of(platform, key) == before


def test_a_dry_run_of_a_local_file_plans_it_as_its_upload_would_count_it(platform: Seeded, key: str,
                                                                         config: Path) -> None:
    """The file is checked and counted here (services.datasets.local) and PlanJob gets its size: the plan
    is the one a real run's upload would get, and nothing is uploaded or created."""
    with TuneForgeClient(platform.address, api_key=key) as client:
        datasets = len(client.list_datasets(page_size=100).datasets)
    before = jobs_of(platform, key)
    code, out = cli(platform, key, "--config", str(config), "--examples", "120", "--dry-run", "--json")
    assert code == 0, out
    shown = json.loads(out)
    assert shown["checked_by_platform"] is False and shown["plan_error"] == "", shown["plan_error"]
    plan = shown["plan"]
    # 120 examples split as an upload splits them by default (0.8 / 0.15 / 0.05): 96 train on, twice.
    assert plan["train_examples"] == "96"
    assert int(plan["training_tokens"]) == 2 * int(plan["tokens_per_epoch"]) > 0
    assert plan["fits"]
    assert jobs_of(platform, key) == before
    with TuneForgeClient(platform.address, api_key=key) as client:
        assert len(client.list_datasets(page_size=100).datasets) == datasets


def test_a_dry_run_of_a_file_the_upload_would_refuse_says_why_instead_of_a_plan(platform: Seeded, key: str,
                                                                                config: Path) -> None:
    (config.parent / "data" / "chat.jsonl").write_text('{"messages": "not a list"}\n' * 150)
    code, out = cli(platform, key, "--config", str(config), "--dry-run", "--json")
    assert code == 0, out
    shown = json.loads(out)
    assert shown["plan"] is None
    assert "the upload would refuse" in shown["plan_error"] and "line 1" in shown["plan_error"]
    assert "tuneforge datasets validate" in shown["plan_error"]


def test_create_uploads_the_first_n_rows_and_queues_the_job(platform: Seeded, key: str, config: Path) -> None:
    code, out = cli(platform, key, "--config", str(config), "--examples", "120", "--name", "from-synth",
                    "--json")
    assert code == 0, out
    job = json.loads(out)
    assert job["state"] == "JOB_STATE_QUEUED" and job["name"] == "from-synth"
    with TuneForgeClient(platform.address, api_key=key) as client:
        created = client.get_job("from-synth")
        dataset = client.get_dataset(created.spec.dataset)
    assert created.spec.adapter == job_pb2.ADAPTER_TYPE_FULL
    assert created.spec.hyperparameters.learning_rate == 1e-5
    assert dataset.options.max_samples == 120
    assert dataset.statistics.example_count == 120 and dataset.statistics.dropped_by_max_samples == 30
    # What a dry run of the same file counted (the test before).
    train = dataset_pb2.DATASET_SPLIT_KIND_TRAIN
    assert sum(s.example_count for s in dataset.splits if s.kind == train) == 96


def test_a_key_it_cannot_honour_is_refused_by_name(platform: Seeded, key: str, config: Path) -> None:
    config.write_text(SYNTH + "\n[hyperparameters.parallelism]\ntensor_parallel_size = 2\n")
    code, out = cli(platform, key, "--config", str(config), "--dataset", platform.dataset_ids[0])
    assert code == 2 and "hyperparameters.parallelism.tensor_parallel_size" in out
