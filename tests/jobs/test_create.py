"""CreateJob refuses what could never be honoured, naming the field: models the organization may not use or
that are not there, half precision on a spec that may land on a CPU worker, early stopping without
validation data (or keep_best_model without it), dataset options training cannot honour. The manager runs
against a real SQLite database and a local object store; the datasets service is a stand-in that returns
READY datasets."""

from __future__ import annotations

from pathlib import Path

import pytest
from tuneforge.v1 import dataset_pb2, job_pb2, job_service_pb2

from services.jobs.component import MIGRATIONS
from services.jobs.manager import JobManager
from services.jobs.models import JobOutbox
from services.kit.db import Database
from services.kit.outbox import OutboxRelay
from tuneforge_core.errors import InvalidArgument
from tuneforge_core.models import S3_OUTSIDE, ModelPolicy
from tuneforge_core.reasons import Reason
from tuneforge_core.storage import LocalObjectStore

ORG = "acme"
K = dataset_pb2.DatasetSplitKind


class Datasets:
    """GetDataset as the jobs service sees it: READY chat datasets, with or without a validation split."""

    def __init__(self) -> None:
        self.datasets: dict[str, dataset_pb2.Dataset] = {}

    def add(self, name: str, *, validation: bool) -> None:
        splits = [dataset_pb2.DatasetSplit(kind=K.DATASET_SPLIT_KIND_TRAIN, example_count=90,
                                           uri=f"file:///objects/datasets/{ORG}/{name}/train.jsonl")]
        if validation:
            splits.append(dataset_pb2.DatasetSplit(kind=K.DATASET_SPLIT_KIND_VALIDATION, example_count=10,
                                                   uri=f"file:///objects/datasets/{ORG}/{name}/val.jsonl"))
        self.datasets[name] = dataset_pb2.Dataset(
            id=f"ds_{name}", name=name, organization=ORG, state=dataset_pb2.DATASET_STATE_READY,
            format=dataset_pb2.DATASET_FORMAT_OPENAI_CHAT, splits=splits)

    async def get(self, organization: str, ref: str, field: str) -> dataset_pb2.Dataset:
        return self.datasets[ref]


def model_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "model.safetensors").write_bytes(b"\0")
    return path


@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "objects")


@pytest.fixture
def roots(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    model_folder(root / "tiny")
    (root / "weightless").mkdir()
    (root / "weightless" / "config.json").write_text("{}")
    return root


@pytest.fixture
def manager(tmp_path: Path, store: LocalObjectStore, roots: Path) -> JobManager:
    db = Database(f"sqlite:///{tmp_path / 'jobs.db'}", "jobs")
    db.migrate(MIGRATIONS)
    datasets = Datasets()
    datasets.add("with-validation", validation=True)
    datasets.add("train-only", validation=False)
    relay = OutboxRelay(db, js=None, model=JobOutbox)  # type: ignore[arg-type]
    return JobManager(db, relay, datasets, store, nc=None,  # type: ignore[arg-type]
                      models=ModelPolicy(str(roots), store, tmp_path / "data"))


def spec(model: str | Path, dataset: str = "with-validation") -> job_pb2.JobSpec:
    return job_pb2.JobSpec(base_model=str(model), dataset=dataset)


async def create(manager: JobManager, job_spec: job_pb2.JobSpec) -> job_pb2.Job:
    return await manager.create(
        job_service_pb2.CreateJobRequest(organization=ORG, spec=job_spec, validate_only=True)
    )


async def refused(manager: JobManager, job_spec: job_pb2.JobSpec) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        await create(manager, job_spec)
    return info.value


async def test_server_paths_and_other_organizations_outputs_are_refused(
    manager: JobManager, store: LocalObjectStore, tmp_path: Path
) -> None:
    theirs = model_folder(store.root / "jobs" / "other-org" / "job_1" / "merged")
    for model in ("/etc", "../../", "file:///etc", str(theirs), theirs.as_uri(),
                  f"{tmp_path}/models/../objects/jobs/other-org/job_1/merged", "s3://private/models/x"):
        error = await refused(manager, spec(model))
        assert [v.field for v in error.violations] == ["spec.base_model"], (model, error)
    assert (await refused(manager, spec("s3://private/models/x"))).violations[0].description == S3_OUTSIDE
    # The organization's own outputs, and a model under a root, are fine.
    ours = model_folder(store.root / "jobs" / ORG / "job_2" / "merged")
    assert (await create(manager, spec(ours.as_uri()))).state == job_pb2.JOB_STATE_QUEUED
    assert (await create(manager, spec(tmp_path / "models" / "tiny"))).state == job_pb2.JOB_STATE_QUEUED


async def test_a_missing_or_incomplete_local_model_says_what_is_missing(
    manager: JobManager, roots: Path
) -> None:
    error = await refused(manager, spec(roots / "no-such-model"))
    assert error.reason == Reason.MODEL_NOT_FOUND
    assert [(v.field, v.description) for v in error.violations] == [
        ("spec.base_model", "no model folder exists there")
    ]
    error = await refused(manager, spec(roots / "weightless"))
    assert "no *.safetensors weights" in error.violations[0].description

    teacher = spec("org/student")
    teacher.method = job_pb2.TRAINING_METHOD_DISTILLATION
    teacher.distillation.teacher_model = "/etc"
    error = await refused(manager, teacher)
    assert [v.field for v in error.violations] == ["spec.distillation.teacher_model"]


async def test_half_precision_without_a_gpu_type_is_refused(manager: JobManager, roots: Path) -> None:
    fp16 = spec(roots / "tiny")
    fp16.hyperparameters.precision = job_pb2.PRECISION_FP16
    error = await refused(manager, fp16)
    assert [v.field for v in error.violations] == ["spec.hyperparameters.precision"]
    fp16.hardware.gpu_type = "nvidia-t4"
    assert (await create(manager, fp16)).spec.hyperparameters.precision == job_pb2.PRECISION_FP16


async def test_early_stopping_needs_validation_data(manager: JobManager, roots: Path) -> None:
    early = spec(roots / "tiny", "train-only")
    early.hyperparameters.early_stopping.enabled = True
    error = await refused(manager, early)
    assert [v.field for v in error.violations] == ["spec.hyperparameters.early_stopping.enabled"]
    assert "'train-only' has no validation split" in error.violations[0].description

    early.validation_dataset = "with-validation"  # a separate validation dataset is enough
    assert (await create(manager, early)).spec.hyperparameters.early_stopping.patience == 3
    own_split = spec(roots / "tiny", "with-validation")
    own_split.hyperparameters.early_stopping.enabled = True
    assert (await create(manager, own_split)).state == job_pb2.JOB_STATE_QUEUED


async def test_keep_best_model_needs_validation_data(manager: JobManager, roots: Path) -> None:
    best = spec(roots / "tiny", "train-only")
    best.hyperparameters.keep_best_model = True
    error = await refused(manager, best)
    assert [v.field for v in error.violations] == ["spec.hyperparameters.keep_best_model"]
    assert "keeping the best model needs validation data" in error.violations[0].description
    best.dataset = "with-validation"
    assert (await create(manager, best)).spec.hyperparameters.keep_best_model


@pytest.mark.parametrize("option", ["max_prompt_length", "lazy_tokenize", "streaming"])
async def test_dataset_options_training_cannot_honour_are_refused_at_create_job(
    manager: JobManager, roots: Path, option: str
) -> None:
    """They were stored with the dataset and never reached the worker: a job on it trained without them."""
    datasets = manager.datasets
    assert isinstance(datasets, Datasets)
    datasets.add("with-options", validation=True)
    value = 2048 if option == "max_prompt_length" else True
    setattr(datasets.datasets["with-options"].options, option, value)
    error = await refused(manager, spec(roots / "tiny", "with-options"))
    assert [v.field for v in error.violations] == ["spec.dataset"]
    assert f"options.{option}" in error.violations[0].description
    assert error.violations[0].description.endswith(f"upload it without options.{option}")


async def test_dpo_reference_and_grpo_reward_models_are_checked_like_the_teacher(
    manager: JobManager, roots: Path, store: LocalObjectStore
) -> None:
    theirs = model_folder(store.root / "jobs" / "other-org" / "job_1" / "merged")
    dpo = spec("org/student")
    dpo.method = job_pb2.TRAINING_METHOD_DPO
    grpo = spec("org/student")
    grpo.method = job_pb2.TRAINING_METHOD_GRPO
    grpo.grpo.reward_functions.append(job_pb2.REWARD_FUNCTION_REWARD_MODEL)
    for model in ("/etc", str(theirs), "s3://private/models/x", str(roots / "no-such-model")):
        dpo.dpo.reference_model = model
        error = await refused(manager, dpo)
        assert [v.field for v in error.violations] == ["spec.dpo.reference_model"], (model, error)
        grpo.grpo.reward_model = model
        error = await refused(manager, grpo)
        assert [v.field for v in error.violations] == ["spec.grpo.reward_model"], (model, error)
    assert error.reason == Reason.MODEL_NOT_FOUND  # the last one is only missing
