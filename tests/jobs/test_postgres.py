"""The jobs schema and lifecycle on PostgreSQL, the production database."""

from __future__ import annotations

import pytest
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import job_pb2

from services.jobs.component import MIGRATIONS
from services.jobs.manager import JobManager
from services.jobs.models import JobOutbox, JobRow
from services.kit.db import Database
from services.kit.outbox import OutboxRelay

pytestmark = pytest.mark.postgres


def queued_job(postgres_url: str, job_id: str, name: str) -> tuple[Database, JobManager]:
    """The jobs schema migrated (twice: it is idempotent) and one QUEUED job, with a manager on it."""
    db = Database(postgres_url, "jobs")
    db.migrate(MIGRATIONS)
    db.migrate(MIGRATIONS)
    manager = JobManager(db, OutboxRelay(db, js=None, model=JobOutbox),  # type: ignore[arg-type]
                         datasets=None, store=None, nc=None)  # type: ignore[arg-type]
    with db.session() as s:
        s.add(JobRow(id=job_id, organization="acme", name=name, revision=1, request_hash="",
                     spec=job_pb2.JobSpec(base_model="org/m").SerializeToString(),
                     state=job_pb2.JOB_STATE_QUEUED))
    return db, manager


async def test_migrations_and_lifecycle_on_postgres(postgres_url: str) -> None:
    db, manager = queued_job(postgres_url, "job_pg", "pg")
    running = events_pb2.WorkerJobUpdate(event_id="e1", job_id="job_pg", attempt=1, worker_id="w",
                                         kind=events_pb2.WORKER_UPDATE_KIND_RUNNING)
    assert await manager.apply_worker_update(running)
    assert not await manager.apply_worker_update(running)
    job = await manager.cancel("acme", "pg")
    assert job.state == job_pb2.JOB_STATE_CANCELLING and job.revision == 3
    db.dispose()


async def test_a_worker_update_carrying_nul_characters_applies_on_postgres(postgres_url: str) -> None:
    """PostgreSQL's text cannot hold a NUL: an update with one in its worker id, an event's message or its
    error (an exception's text) failed on every redelivery and the job never moved. Stored as U+FFFD."""
    from google.rpc import status_pb2

    db, manager = queued_job(postgres_url, "job_nul", "nul")
    running = events_pb2.WorkerJobUpdate(event_id="n1", job_id="job_nul", attempt=1, worker_id="w\x00",
                                         kind=events_pb2.WORKER_UPDATE_KIND_RUNNING)
    running.events.add(message="model\x00downloaded")
    assert await manager.apply_worker_update(running)
    failed = events_pb2.WorkerJobUpdate(event_id="n2", job_id="job_nul", attempt=1, worker_id="w\x00",
                                        kind=events_pb2.WORKER_UPDATE_KIND_FAILED,
                                        error=status_pb2.Status(code=13, message="CUDA\x00error"))
    assert await manager.apply_worker_update(failed)
    job = await manager.get("acme", "job_nul")
    assert job.state == job_pb2.JOB_STATE_FAILED and job.worker_id == "w\ufffd"
    assert job.error.message == "CUDA\ufffderror"
    db.dispose()


async def test_a_worker_update_with_an_event_id_longer_than_its_column_applies_once_on_postgres(
        postgres_url: str) -> None:
    """The inbox keeps event ids in 128 characters: a longer one failed the update's transaction on every
    redelivery on PostgreSQL (SQLite does not enforce the length). It is kept as its SHA-256, so the update
    applies, and only once."""
    db, manager = queued_job(postgres_url, "job_long_event", "long-event")
    running = events_pb2.WorkerJobUpdate(event_id="e" * 300, job_id="job_long_event", attempt=1,
                                         worker_id="w", kind=events_pb2.WORKER_UPDATE_KIND_RUNNING)
    running.events.add(message="started")
    assert await manager.apply_worker_update(running)
    assert not await manager.apply_worker_update(running)
    other = events_pb2.WorkerJobUpdate(event_id="e" * 299 + "f", job_id="job_long_event", attempt=1,
                                       worker_id="w", kind=events_pb2.WORKER_UPDATE_KIND_SUCCEEDED)
    assert await manager.apply_worker_update(other)
    job = await manager.get("acme", "job_long_event")
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED
    db.dispose()
