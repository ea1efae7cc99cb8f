"""The job state machine against a real SQLite database with the real migrations applied."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import job_pb2

from services.jobs.component import MIGRATIONS
from services.jobs.manager import JobManager
from services.jobs.models import JobOutbox, JobRow
from services.kit.db import Database
from services.kit.outbox import OutboxRelay
from tuneforge_core.errors import FailedPrecondition, NotFound
from tuneforge_core.storage import LocalObjectStore

S = job_pb2.JobState
U = events_pb2.WorkerUpdateKind


@pytest.fixture
def manager(tmp_path: Path) -> JobManager:
    db = Database(f"sqlite:///{tmp_path / 'jobs.db'}", "jobs")
    db.migrate(MIGRATIONS)
    db.migrate(MIGRATIONS)  # idempotent
    relay = OutboxRelay(db, js=None, model=JobOutbox)  # type: ignore[arg-type]
    store = LocalObjectStore(tmp_path / "objects")
    return JobManager(db, relay, datasets=None, store=store, nc=None)  # type: ignore[arg-type]


def insert_job(manager: JobManager, job_id: str = "job_1", state: int = S.JOB_STATE_QUEUED) -> None:
    spec = job_pb2.JobSpec(base_model="org/m", dataset="ds_1")
    with manager.db.session() as s:
        s.add(JobRow(id=job_id, organization="acme", name=job_id, spec=spec.SerializeToString(),
                     state=state, revision=1, request_hash=""))


def update(kind: int, attempt: int = 1, event_id: str = "", job_id: str = "job_1"
           ) -> events_pb2.WorkerJobUpdate:
    return events_pb2.WorkerJobUpdate(event_id=event_id or f"e-{kind}-{attempt}", job_id=job_id,
                                      worker_id="w1", attempt=attempt, kind=kind)


def outbox_count(manager: JobManager) -> int:
    with manager.db.session() as s:
        return s.scalar(select(func.count()).select_from(JobOutbox)) or 0


async def test_happy_path_and_events(manager: JobManager) -> None:
    insert_job(manager)
    for kind in (U.WORKER_UPDATE_KIND_PREPARING, U.WORKER_UPDATE_KIND_RUNNING):
        assert await manager.apply_worker_update(update(kind))
    progress = update(U.WORKER_UPDATE_KIND_PROGRESS, event_id="p1")
    progress.progress.step, progress.progress.total_steps = 5, 10
    assert await manager.apply_worker_update(progress)
    done = update(U.WORKER_UPDATE_KIND_SUCCEEDED)
    done.output.adapter_uri = manager.store.uri("jobs/acme/job_1/adapter")  # under the job's prefix
    assert await manager.apply_worker_update(done)
    job = await manager.get("acme", "job_1")
    assert job.state == S.JOB_STATE_SUCCEEDED
    assert job.output.adapter_uri == done.output.adapter_uri
    assert job.progress.step == 5 and job.end_time.seconds > 0
    assert job.revision == 5
    assert outbox_count(manager) == 4  # one JobChanged per change


async def test_redelivered_update_is_applied_once(manager: JobManager) -> None:
    insert_job(manager)
    first = update(U.WORKER_UPDATE_KIND_RUNNING, event_id="same")
    assert await manager.apply_worker_update(first)
    assert not await manager.apply_worker_update(first)
    assert outbox_count(manager) == 1


async def test_final_states_never_change(manager: JobManager) -> None:
    insert_job(manager)
    await manager.apply_worker_update(update(U.WORKER_UPDATE_KIND_RUNNING))
    await manager.apply_worker_update(update(U.WORKER_UPDATE_KIND_FAILED))
    assert not await manager.apply_worker_update(update(U.WORKER_UPDATE_KIND_SUCCEEDED))
    job = await manager.get("acme", "job_1")
    assert job.state == S.JOB_STATE_FAILED
    assert job.error.message


async def test_stale_attempt_is_ignored(manager: JobManager) -> None:
    insert_job(manager)
    await manager.apply_worker_update(update(U.WORKER_UPDATE_KIND_RUNNING, attempt=1))
    await manager.apply_worker_update(update(U.WORKER_UPDATE_KIND_RUNNING, attempt=2))
    assert not await manager.apply_worker_update(update(U.WORKER_UPDATE_KIND_FAILED, attempt=1))
    job = await manager.get("acme", "job_1")
    assert (job.state, job.attempt) == (S.JOB_STATE_RUNNING, 2)


async def test_cancel_queued_is_final_at_once(manager: JobManager) -> None:
    insert_job(manager)
    job = await manager.cancel("acme", "job_1")
    assert job.state == S.JOB_STATE_CANCELLED
    assert not await manager.apply_worker_update(update(U.WORKER_UPDATE_KIND_RUNNING))


async def test_cancel_running_waits_for_the_worker(manager: JobManager) -> None:
    insert_job(manager)
    await manager.apply_worker_update(update(U.WORKER_UPDATE_KIND_RUNNING))
    assert (await manager.cancel("acme", "job_1")).state == S.JOB_STATE_CANCELLING
    assert (await manager.cancel("acme", "job_1")).state == S.JOB_STATE_CANCELLING  # no-op
    await manager.apply_worker_update(update(U.WORKER_UPDATE_KIND_CANCELLED))
    assert (await manager.get("acme", "job_1")).state == S.JOB_STATE_CANCELLED


async def test_cancel_finished_job_is_refused(manager: JobManager) -> None:
    insert_job(manager, state=S.JOB_STATE_SUCCEEDED)
    with pytest.raises(FailedPrecondition):
        await manager.cancel("acme", "job_1")


async def test_jobs_are_invisible_across_organizations(manager: JobManager) -> None:
    insert_job(manager)
    with pytest.raises(NotFound):
        await manager.get("other-org", "job_1")
    with pytest.raises(NotFound):
        await manager.cancel("other-org", "job_1")


async def test_lost_job_fails_with_reason(manager: JobManager) -> None:
    insert_job(manager)
    await manager.apply_worker_update(update(U.WORKER_UPDATE_KIND_RUNNING))
    assert await manager.fail_lost("job_1", 5)
    job = await manager.get("acme", "job_1")
    assert job.state == S.JOB_STATE_FAILED
    assert b"WORKER_LOST" in job.error.details[0].value


async def test_list_pages_newest_first(manager: JobManager) -> None:
    for i in range(5):
        insert_job(manager, job_id=f"job_{i}")
    jobs, token = await manager.list("acme", [], 2, "")
    assert [j.id for j in jobs] == ["job_4", "job_3"] and token
    jobs, token = await manager.list("acme", [], 2, token)
    assert [j.id for j in jobs] == ["job_2", "job_1"]
    jobs, token = await manager.list("acme", [], 2, token)
    assert [j.id for j in jobs] == ["job_0"] and token == ""
