"""The jobs schema and lifecycle on PostgreSQL, the production database."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import job_pb2

from services.jobs.component import MIGRATIONS
from services.jobs.manager import JobManager
from services.jobs.models import JobOutbox, JobRow
from services.kit.db import Database
from services.kit.outbox import OutboxRelay

pytestmark = pytest.mark.postgres
PG_URL = os.environ.get("TUNEFORGE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A private schema on the local PostgreSQL, dropped afterwards; skips when none is reachable."""
    try:
        admin = create_engine(PG_URL)
        with admin.connect() as conn:
            conn.execute(text("select 1"))
    except Exception as exc:
        pytest.skip(f"no PostgreSQL reachable at {PG_URL}: {exc.__class__.__name__}")
    schema = f"tf_jobs_{uuid.uuid4().hex[:8]}"
    with admin.begin() as conn:
        conn.execute(text(f'create schema "{schema}"'))
    sep = "&" if "?" in PG_URL else "?"
    try:
        yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'drop schema "{schema}" cascade'))
        admin.dispose()


async def test_migrations_and_lifecycle_on_postgres(pg_url: str) -> None:
    db = Database(pg_url, "jobs")
    db.migrate(MIGRATIONS)
    db.migrate(MIGRATIONS)
    manager = JobManager(db, OutboxRelay(db, js=None, model=JobOutbox),  # type: ignore[arg-type]
                         datasets=None, store=None, nc=None)  # type: ignore[arg-type]
    with db.session() as s:
        s.add(JobRow(id="job_pg", organization="acme", name="pg", revision=1, request_hash="",
                     spec=job_pb2.JobSpec(base_model="org/m").SerializeToString(),
                     state=job_pb2.JOB_STATE_QUEUED))
    running = events_pb2.WorkerJobUpdate(event_id="e1", job_id="job_pg", attempt=1, worker_id="w",
                                         kind=events_pb2.WORKER_UPDATE_KIND_RUNNING)
    assert await manager.apply_worker_update(running)
    assert not await manager.apply_worker_update(running)
    job = await manager.cancel("acme", "pg")
    assert job.state == job_pb2.JOB_STATE_CANCELLING and job.revision == 3
    db.dispose()
