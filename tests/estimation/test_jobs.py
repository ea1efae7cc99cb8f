"""The estimation service's copy of jobs, on its migrated database (SQLite and PostgreSQL): kept from events
that may come twice or out of order, read per organization by id or name."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from tuneforge.v1 import job_pb2

from services.estimation.component import MIGRATIONS_DIR
from services.estimation.jobs import JobStore
from services.kit.db import Database


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'estimation.db'}"
    return request.getfixturevalue("postgres_url")


def job(
    revision: int, state: job_pb2.JobState.ValueType = job_pb2.JOB_STATE_RUNNING, step: int = 0
) -> job_pb2.Job:
    out = job_pb2.Job(
        id="job_1",
        organization="acme",
        name="nightly",
        spec=job_pb2.JobSpec(base_model="Qwen/Qwen2.5-0.5B", dataset="chats"),
        state=state,
        progress=job_pb2.JobProgress(step=step, total_steps=100),
        revision=revision,
    )
    out.start_time.FromSeconds(1_800_000_000)
    if state == job_pb2.JOB_STATE_SUCCEEDED:
        out.end_time.FromSeconds(1_800_003_600)
    return out


async def test_the_job_copy_only_moves_forward(database_url: str) -> None:
    db = Database(database_url, "estimation")
    try:
        db.migrate(MIGRATIONS_DIR)
        db.migrate(MIGRATIONS_DIR)  # every start runs them
        store = JobStore(db)
        assert await store.get("acme", "job_1") is None

        assert await store.record(job(2, step=10))
        assert not await store.record(job(2, step=10))  # the same event again
        assert not await store.record(job(1))  # an older one, late
        assert await store.record(job(4, job_pb2.JOB_STATE_SUCCEEDED, step=100))
        assert not await store.record(job(3, step=50))

        kept = await store.get("acme", "job_1")
        assert kept is not None
        assert (kept.revision, kept.state, kept.progress.step) == (4, job_pb2.JOB_STATE_SUCCEEDED, 100)
        assert kept.spec.base_model == "Qwen/Qwen2.5-0.5B" and kept.name == "nightly"
        assert kept.start_time is not None and kept.start_time.timestamp() == 1_800_000_000
        assert kept.end_time is not None and kept.end_time.timestamp() == 1_800_003_600
        assert (await store.get("acme", "nightly")) == kept  # by name too
        assert await store.get("other-org", "job_1") is None  # another organization's job is not found

        # Replicas racing on the same job: whatever the interleaving, the highest revision stays.
        await asyncio.gather(*(store.record(job(r, step=r)) for r in (7, 5, 9, 6, 8)))
        latest = await store.get("acme", "job_1")
        assert latest is not None and (latest.revision, latest.progress.step) == (9, 9)
    finally:
        db.dispose()
