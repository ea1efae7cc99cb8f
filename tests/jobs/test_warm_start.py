"""Warm start at CreateJob: the source job is resolved in the same organization (another organization's is
"not found"), its final adapter or a complete checkpoint in the real local object store is what the
assignment carries, and every mismatch of model, adapter shape or optimizer state is INVALID_ARGUMENT naming
the field."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import job_pb2, job_service_pb2

from services.jobs.artifacts import COMPLETE
from services.jobs.component import MIGRATIONS
from services.jobs.manager import JobManager
from services.jobs.models import JobOutbox, JobRow
from services.kit.db import Database
from services.kit.outbox import OutboxRelay
from tests.jobs.test_create import Datasets
from tuneforge_core.errors import InvalidArgument
from tuneforge_core.spec import resolve_spec
from tuneforge_core.storage import LocalObjectStore

ORG = "acme"
S = job_pb2.JobState
A = job_pb2.AdapterType


@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "objects")


@pytest.fixture
def manager(tmp_path: Path, store: LocalObjectStore) -> JobManager:
    db = Database(f"sqlite:///{tmp_path / 'jobs.db'}", "jobs")
    db.migrate(MIGRATIONS)
    datasets = Datasets()
    datasets.add("d", validation=True)
    relay = OutboxRelay(db, js=None, model=JobOutbox)  # type: ignore[arg-type]
    return JobManager(db, relay, datasets, store, nc=None)  # type: ignore[arg-type]


def spec(**fields: object) -> job_pb2.JobSpec:
    out = job_pb2.JobSpec(base_model="org/m", dataset="d", **fields)  # type: ignore[arg-type]
    return out


def add_source(manager: JobManager, store: LocalObjectStore, job_id: str = "job_src", *,
               organization: str = ORG, state: int = S.JOB_STATE_SUCCEEDED,
               source: job_pb2.JobSpec | None = None, checkpoints: dict[int, bool] | None = None) -> None:
    """A source job with its adapter stored, and complete checkpoints {step: optimizer state kept}."""
    resolved = resolve_spec(source or spec())
    prefix = f"jobs/{organization}/{job_id}"
    store.put_bytes(f"{prefix}/adapter/adapter_model.safetensors", b"\0")
    output = job_pb2.JobOutput(adapter_uri=store.uri(f"{prefix}/adapter"))
    for step, kept in (checkpoints or {}).items():
        folder = f"{prefix}/checkpoints/checkpoint-{step}"
        store.put_bytes(f"{folder}/adapter_model.safetensors", b"\0")
        if kept:
            store.put_bytes(f"{folder}/optimizer.pt", b"\0")
        store.put_bytes(f"{folder}/{COMPLETE}", b"")
    with manager.db.session() as s:
        s.add(JobRow(id=job_id, organization=organization, name=f"{job_id}-name",
                     spec=resolved.SerializeToString(), state=state, revision=1, request_hash="",
                     output=output.SerializeToString() if state == S.JOB_STATE_SUCCEEDED else None))


async def refused(manager: JobManager, job_spec: job_pb2.JobSpec) -> list[tuple[str, str]]:
    with pytest.raises(InvalidArgument) as info:
        await manager.create(job_service_pb2.CreateJobRequest(organization=ORG, spec=job_spec,
                                                              validate_only=True))
    return [(v.field, v.description) for v in info.value.violations]


def assignment_of(manager: JobManager, job_id: str) -> events_pb2.JobAssignment:
    with manager.db.session() as s:
        payload = s.scalars(select(JobOutbox.payload).where(
            JobOutbox.event_id == f"{job_id}.assignment")).one()
    return events_pb2.JobAssignment.FromString(payload)


async def test_the_final_adapter_of_a_succeeded_job_is_what_the_worker_starts_from(
    manager: JobManager, store: LocalObjectStore
) -> None:
    add_source(manager, store)
    job = await manager.create(job_service_pb2.CreateJobRequest(
        organization=ORG, spec=spec(warm_start=job_pb2.WarmStartConfig(job="job_src-name"))))
    assert job.spec.warm_start.job == "job_src", "stored as the source's id"
    warm = assignment_of(manager, job.id).warm_start
    assert (warm.job_id, warm.uri, warm.step, warm.restore_optimizer_state) == (
        "job_src", store.uri("jobs/acme/job_src/adapter"), 0, False)


async def test_a_checkpoint_with_its_optimizer_state(manager: JobManager, store: LocalObjectStore) -> None:
    add_source(manager, store, state=S.JOB_STATE_RUNNING, checkpoints={5: False, 10: True})
    job = await manager.create(job_service_pb2.CreateJobRequest(organization=ORG, spec=spec(
        warm_start=job_pb2.WarmStartConfig(job="job_src", checkpoint_step=10, restore_optimizer_state=True))))
    warm = assignment_of(manager, job.id).warm_start
    assert (warm.uri, warm.step, warm.restore_optimizer_state) == (
        store.uri("jobs/acme/job_src/checkpoints/checkpoint-10"), 10, True)

    assert await refused(manager, spec(warm_start=job_pb2.WarmStartConfig(
        job="job_src", checkpoint_step=5, restore_optimizer_state=True))) == [
        ("spec.warm_start.restore_optimizer_state",
         "checkpoint checkpoint-5 of job 'job_src-name' no longer stores its optimizer state (only the last "
         "checkpoint keeps it after a job ends, unless spec.output.keep_optimizer_state was set)")]
    hp = job_pb2.Hyperparameters(optimizer=job_pb2.OPTIMIZER_SGD)
    violations = await refused(manager, spec(hyperparameters=hp, warm_start=job_pb2.WarmStartConfig(
        job="job_src", checkpoint_step=10, restore_optimizer_state=True)))
    assert violations[0][0] == "spec.warm_start.restore_optimizer_state"
    assert "OPTIMIZER_SGD" in violations[0][1] and "needs the same optimizer" in violations[0][1]


async def test_a_missing_checkpoint_lists_the_steps_there_are(
    manager: JobManager, store: LocalObjectStore
) -> None:
    add_source(manager, store, checkpoints={5: True, 10: True})
    warm = job_pb2.WarmStartConfig(job="job_src", checkpoint_step=7)
    assert await refused(manager, spec(warm_start=warm)) == [
        ("spec.warm_start.checkpoint_step",
         "job 'job_src-name' has no checkpoint at step 7; its checkpoints are at steps: 5, 10")]


async def test_another_organizations_job_is_not_found(manager: JobManager, store: LocalObjectStore) -> None:
    add_source(manager, store, "job_theirs", organization="other")
    for ref in ("job_theirs", "job_theirs-name", "nope"):
        assert await refused(manager, spec(warm_start=job_pb2.WarmStartConfig(job=ref))) == [
            ("spec.warm_start.job", f"job '{ref}' was not found in organization 'acme'")]


async def test_an_unfinished_job_has_no_final_adapter(manager: JobManager, store: LocalObjectStore) -> None:
    add_source(manager, store, state=S.JOB_STATE_FAILED)
    [(field, description)] = await refused(manager, spec(warm_start=job_pb2.WarmStartConfig(job="job_src")))
    assert field == "spec.warm_start.job" and "is FAILED" in description
    assert "checkpoint_step" in description


@pytest.mark.parametrize(("source", "ours", "field"), [
    (spec(), job_pb2.JobSpec(base_model="org/other"), "spec.base_model"),
    (spec(), job_pb2.JobSpec(adapter=A.ADAPTER_TYPE_FULL), "spec.adapter"),
    (spec(lora=job_pb2.LoraConfig(rank=8)), job_pb2.JobSpec(lora=job_pb2.LoraConfig(rank=16)),
     "spec.lora.rank"),
    (spec(), job_pb2.JobSpec(lora=job_pb2.LoraConfig(target_modules=["q_proj"])), "spec.lora.target_modules"),
    (spec(), job_pb2.JobSpec(lora=job_pb2.LoraConfig(use_dora=True)), "spec.lora.use_dora"),
    (spec(adapter=A.ADAPTER_TYPE_PROMPT_TUNING),
     job_pb2.JobSpec(adapter=A.ADAPTER_TYPE_PROMPT_TUNING,
                     prompt_tuning=job_pb2.PromptTuningConfig(num_virtual_tokens=8)),
     "spec.prompt_tuning.num_virtual_tokens"),
    (spec(adapter=A.ADAPTER_TYPE_QLORA),
     job_pb2.JobSpec(adapter=A.ADAPTER_TYPE_QLORA, quantization=job_pb2.QuantizationConfig(bits=8)),
     "spec.quantization.bits"),
])
async def test_mismatches_name_the_field_and_both_values(
    manager: JobManager, store: LocalObjectStore, source: job_pb2.JobSpec, ours: job_pb2.JobSpec, field: str
) -> None:
    add_source(manager, store, source=source)
    mine = spec(warm_start=job_pb2.WarmStartConfig(job="job_src"))
    mine.MergeFrom(ours)
    if ours.base_model:
        mine.base_model = ours.base_model
    violations = await refused(manager, mine)
    assert [f for f, _ in violations] == [field], violations
    assert "warm-start job 'job_src-name' has" in violations[0][1]


async def test_the_spec_checks_its_own_warm_start_fields(manager: JobManager) -> None:
    cases = [
        (job_pb2.WarmStartConfig(job="x", checkpoint_step=0), "spec.warm_start.checkpoint_step"),
        (job_pb2.WarmStartConfig(job="x", restore_optimizer_state=True),
         "spec.warm_start.restore_optimizer_state"),
        (job_pb2.WarmStartConfig(checkpoint_step=3), "spec.warm_start.job"),
    ]
    for warm, field in cases:
        assert [f for f, _ in await refused(manager, spec(warm_start=warm))] == [field], warm
