"""Per-organization quotas on jobs (services.jobs.quotas), through CreateJob and the worker updates, on a
real SQLite database with the real migrations and a local object store; the datasets service is a
stand-in that returns READY datasets. What goes to the work queue is read from the outbox, where the
assignment is written in the same transaction as the job."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from sqlalchemy import select
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import job_pb2, job_service_pb2

from services.jobs.component import MIGRATIONS
from services.jobs.manager import JobManager
from services.jobs.models import JobOutbox
from services.jobs.quotas import JobQuotas
from services.jobs.settings import JobSettings
from services.kit.db import Database
from services.kit.outbox import OutboxRelay
from tests.jobs.test_create import Datasets
from tuneforge_core import subjects
from tuneforge_core.errors import ResourceExhausted
from tuneforge_core.reasons import Reason
from tuneforge_core.settings import KitSettings
from tuneforge_core.storage import LocalObjectStore

S = job_pb2.JobState
U = events_pb2.WorkerUpdateKind


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def manager(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobManager]:
    """The manager on SQLite, and on PostgreSQL where one is reachable (skipped with the reason if not)."""
    url = (f"sqlite:///{tmp_path / 'jobs.db'}" if request.param == "sqlite"
           else request.getfixturevalue("postgres_url"))
    db = Database(url, "jobs")
    db.migrate(MIGRATIONS)
    datasets = Datasets()
    datasets.add("data", validation=False)
    relay = OutboxRelay(db, js=None, model=JobOutbox)  # type: ignore[arg-type]
    yield JobManager(db, relay, datasets, LocalObjectStore(tmp_path / "objects"), nc=None,  # type: ignore[arg-type]
                     quotas=JobQuotas(max_queued_jobs_per_org=3, max_running_jobs_per_org=2))
    db.dispose()


async def create(manager: JobManager, org: str = "acme", *, validate_only: bool = False,
                 request_id: str = "") -> job_pb2.Job:
    return await manager.create(job_service_pb2.CreateJobRequest(
        organization=org, spec=job_pb2.JobSpec(base_model="org/model", dataset="data"),
        validate_only=validate_only, request_id=request_id))


def dispatched(manager: JobManager) -> list[str]:
    """Ids of the jobs whose assignment went to the work queue, in order."""
    with manager.db.session() as s:
        rows = s.execute(select(JobOutbox.subject, JobOutbox.payload).order_by(JobOutbox.id)).all()
    return [events_pb2.JobAssignment.FromString(payload).job_id for subject, payload in rows
            if subject.startswith(subjects.WORK_JOBS_PREFIX)]


async def update(manager: JobManager, job_id: str, kind: events_pb2.WorkerUpdateKind.ValueType,
                 worker: str = "w1", attempt: int = 1) -> bool:
    done = events_pb2.WorkerJobUpdate(event_id=f"{job_id}-{worker}-{attempt}-{kind}", job_id=job_id,
                                      worker_id=worker, attempt=attempt, kind=kind)
    if kind == U.WORKER_UPDATE_KIND_SUCCEEDED:
        done.output.adapter_uri = manager.store.uri(f"jobs/acme/{job_id}/adapter")
    return await manager.apply_worker_update(done)


async def test_create_beyond_the_queued_limit_is_resource_exhausted(manager: JobManager) -> None:
    manager.quotas = JobQuotas(max_queued_jobs_per_org=3, max_running_jobs_per_org=0)
    jobs = [await create(manager, request_id=f"r{i}") for i in range(3)]
    for attempt in (lambda: create(manager), lambda: create(manager, validate_only=True)):
        with pytest.raises(ResourceExhausted) as info:
            await attempt()
        error = info.value
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.reason == Reason.QUOTA_EXCEEDED
        assert error.metadata["limit"] == "max_queued_jobs_per_org" and error.metadata["value"] == "3"
        assert "organization acme has 3 queued jobs, its limit (max_queued_jobs_per_org = 3)" in error.message
    # A retried create of a job that exists is no new job; another organization has its own count.
    assert (await create(manager, request_id="r0")).id == jobs[0].id
    assert (await create(manager, "umbrella")).state == S.JOB_STATE_QUEUED
    # A job that starts (or is cancelled) is no longer queued: room for the next.
    assert await update(manager, jobs[0].id, U.WORKER_UPDATE_KIND_RUNNING)
    assert (await create(manager)).state == S.JOB_STATE_QUEUED
    await manager.cancel("acme", jobs[1].id)
    assert (await create(manager)).state == S.JOB_STATE_QUEUED
    with pytest.raises(ResourceExhausted):
        await create(manager)

    manager.quotas = JobQuotas(max_queued_jobs_per_org=0, max_running_jobs_per_org=0)  # 0: no limit
    assert (await create(manager)).state == S.JOB_STATE_QUEUED


async def test_a_job_beyond_the_running_limit_waits_queued_until_a_slot_frees(manager: JobManager) -> None:
    manager.quotas = JobQuotas(max_queued_jobs_per_org=0, max_running_jobs_per_org=2)
    first, second, third, fourth = [await create(manager) for _ in range(4)]
    assert dispatched(manager) == [first.id, second.id]
    for held in (third, fourth):
        assert held.state == S.JOB_STATE_QUEUED
        assert held.status_message == (
            "waiting: organization acme runs 2 jobs, its limit (max_running_jobs_per_org = 2); this job "
            "starts when one of them ends")
    theirs = await create(manager, "umbrella")  # another organization has its own slots
    assert dispatched(manager) == [first.id, second.id, theirs.id]
    assert not theirs.status_message.startswith("waiting: organization")

    # No worker could have been handed a held job: an update that says it was is refused.
    rejected: list[tuple[str, str, str, str]] = []
    manager.on_rejected_update = lambda *args: rejected.append(args)
    assert not await update(manager, third.id, U.WORKER_UPDATE_KIND_PREPARING)
    assert rejected == [(third.id, "acme", "w1", "the job was never handed to the work queue (its "
                                                 "organization's running limit holds it)")]

    # The first job runs and ends: the oldest held job goes to the work queue in the same transaction.
    for kind in (U.WORKER_UPDATE_KIND_PREPARING, U.WORKER_UPDATE_KIND_RUNNING):
        assert await update(manager, first.id, kind)
    assert len(dispatched(manager)) == 3, "running is no end: still 2 slots taken"
    assert await update(manager, first.id, U.WORKER_UPDATE_KIND_SUCCEEDED)
    assert dispatched(manager)[3:] == [third.id]
    third = await manager.get("acme", third.id)
    assert third.state == S.JOB_STATE_QUEUED and not third.status_message.startswith("waiting: organization")
    assert (await manager.get("acme", fourth.id)).status_message.startswith(
        "waiting: organization acme runs 2 jobs")

    # A dispatched job cancelled while still queued frees its slot too; a held one cancelled frees none.
    fifth = await create(manager)
    await manager.cancel("acme", fourth.id)
    assert dispatched(manager)[-1] == third.id
    await manager.cancel("acme", second.id)
    assert dispatched(manager)[-1] == fifth.id
    assert (await manager.get("acme", fourth.id)).state == S.JOB_STATE_CANCELLED
    assert fourth.id not in dispatched(manager), "a job cancelled while held never reaches a worker"


async def test_concurrent_creates_never_take_more_than_the_limit(manager: JobManager) -> None:
    manager.quotas = JobQuotas(max_queued_jobs_per_org=5, max_running_jobs_per_org=2)
    results = await asyncio.gather(*(create(manager) for _ in range(8)), return_exceptions=True)
    created = [r for r in results if isinstance(r, job_pb2.Job)]
    # Every job is QUEUED (no worker here), dispatched or not: 5 fit the queued limit, 2 of them the running.
    assert len(created) == 5 and sum(isinstance(r, ResourceExhausted) for r in results) == 3, results
    assert len(dispatched(manager)) == 2


async def test_the_periodic_check_dispatches_held_jobs_when_the_limit_is_raised(manager: JobManager) -> None:
    manager.quotas = JobQuotas(max_queued_jobs_per_org=0, max_running_jobs_per_org=1)
    jobs = [await create(manager) for _ in range(3)]
    assert dispatched(manager) == [jobs[0].id]
    await manager.check_workers()
    assert dispatched(manager) == [jobs[0].id], "no slot free: nothing more"
    assert (await manager.get("acme", jobs[2].id)).status_message.startswith(
        "waiting: organization acme runs 1 job, its limit (max_running_jobs_per_org = 1)")

    manager.quotas = JobQuotas(max_queued_jobs_per_org=0, max_running_jobs_per_org=2)
    assert await manager.check_workers() >= 1
    assert dispatched(manager) == [jobs[0].id, jobs[1].id]
    assert (await manager.get("acme", jobs[2].id)).status_message.startswith(
        "waiting: organization acme runs 2 jobs, its limit (max_running_jobs_per_org = 2)")
    manager.quotas = JobQuotas(max_queued_jobs_per_org=0, max_running_jobs_per_org=0)
    await manager.check_workers()
    assert dispatched(manager) == [job.id for job in jobs]


def test_quota_settings_have_defaults_and_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = JobSettings.from_kit(KitSettings())
    assert (settings.max_queued_jobs_per_org, settings.max_running_jobs_per_org) == (20, 4)
    assert JobQuotas() == JobQuotas(max_queued_jobs_per_org=20, max_running_jobs_per_org=4)
    monkeypatch.setenv("TUNEFORGE_MAX_QUEUED_JOBS_PER_ORG", "0")
    monkeypatch.setenv("TUNEFORGE_MAX_RUNNING_JOBS_PER_ORG", "7")
    settings = JobSettings.from_kit(KitSettings())
    assert (settings.max_queued_jobs_per_org, settings.max_running_jobs_per_org) == (0, 7)
