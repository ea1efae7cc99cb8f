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


async def test_a_deleted_job_is_forgotten_and_its_calibration_detached(database_url: str) -> None:
    from sqlalchemy import select

    from services.estimation.calibration import CalibrationStore
    from services.estimation.models import CalibrationRow

    db = Database(database_url, "estimation")
    try:
        db.migrate(MIGRATIONS_DIR)
        store, calibrations = JobStore(db), CalibrationStore(db)
        assert await store.record(job(4, job_pb2.JOB_STATE_SUCCEEDED, step=100))

        def measured(session: object) -> None:
            session.add(CalibrationRow(  # type: ignore[attr-defined]
                job_id="job_1", family="qwen2", gpu_type="nvidia-a100", gpu_count=1, adapter="lora",
                method="sft", base_model="file:///objects/jobs/acme/job_0/merged",
                measured_tokens_per_second=900.0, predicted_tokens_per_second=1000.0))

        await db.run(measured)
        assert await store.forget("job_1") and not await store.forget("job_1")
        assert await store.get("acme", "job_1") is None
        assert not await store.record(job(3, step=50))  # a late event of the deleted job
        assert await store.get("acme", "job_1") is None

        assert await calibrations.detach("job_1") and not await calibrations.detach("job_1")
        rows = await db.run(lambda s: [(r.job_id, r.base_model, r.measured_tokens_per_second)
                                       for r in s.scalars(select(CalibrationRow))])
        assert len(rows) == 1 and rows[0][0].startswith("cal_") and rows[0][1:] == ("", 900.0)
    finally:
        db.dispose()


async def test_both_handlers_of_one_deletion_record_it_once(database_url: str) -> None:
    """The service consumes each JobChanged twice (the job copy's handler and calibration's), concurrently:
    for a deleted job both record it as deleted, and neither may fail for the other having done so first
    (a failed handler is retried, but logs an ERROR on every DeleteJob)."""
    from sqlalchemy import func, select

    from services.estimation.calibration import CalibrationStore
    from services.estimation.models import DeletedJobRow

    db = Database(database_url, "estimation")
    try:
        db.migrate(MIGRATIONS_DIR)
        store, calibrations = JobStore(db), CalibrationStore(db)
        ids = [f"job_{n}" for n in range(20)]
        for _ in range(2):  # and once more, as a redelivery would
            await asyncio.gather(*(step for job_id in ids
                                   for step in (store.forget(job_id), calibrations.detach(job_id))))
        counts = await db.run(lambda s: dict(s.execute(
            select(DeletedJobRow.job_id, func.count()).group_by(DeletedJobRow.job_id)).tuples().all()))
        assert counts == {job_id: 1 for job_id in ids}
        assert not await store.record(job(3, step=50))  # a late event of a deleted job is still ignored
        assert await store.get("acme", "job_1") is None
    finally:
        db.dispose()
