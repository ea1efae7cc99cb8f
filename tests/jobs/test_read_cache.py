"""GetJob's kept answers (services.jobs.read_cache): given again while the job is unchanged, never once this
process changed it (even in a transaction that has not committed yet, and even a change that left the
revision as it was), never after another replica's change was announced, at most `ttl_s` old otherwise,
and never for a deleted job or another organization."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from tuneforge.v1 import job_pb2

from services.jobs import repository
from services.jobs.component import MIGRATIONS
from services.jobs.manager import JobManager
from services.jobs.models import JobDeletionRow, JobOutbox, JobRow
from services.jobs.repository import JobLookups, JobRepository
from services.kit.db import Database
from services.kit.outbox import OutboxRelay
from tests.jobs.test_light_reads import ORG, OTHER, add_job
from tuneforge_core.errors import NotFound

S = job_pb2.JobState


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    url = f"sqlite:///{tmp_path / 'jobs.db'}" if request.param == "sqlite" \
        else request.getfixturevalue("postgres_url")
    database = Database(url, "jobs")
    database.migrate(MIGRATIONS)
    yield database
    database.dispose()


def replica(db: Database) -> JobManager:
    relay = OutboxRelay(db, js=None, model=JobOutbox)  # type: ignore[arg-type]
    return JobManager(db, relay, datasets=None, store=None, nc=None)  # type: ignore[arg-type]


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The job refs GetJob read from the database."""
    seen: list[str] = []
    find = JobLookups.find

    async def counting(self: JobLookups, organization: str, ref: str) -> repository.JobRecord | None:
        seen.append(ref)
        return await find(self, organization, ref)

    monkeypatch.setattr(JobLookups, "find", counting)
    return seen


async def test_an_unchanged_job_is_read_once_and_a_change_is_seen_at_once(db: Database,
                                                                          reads: list[str]) -> None:
    manager = replica(db)
    add_job(db, "job_a", "a")
    first = await manager.get(ORG, "job_a")
    assert await manager.get(ORG, "job_a") == first
    assert reads == ["job_a"]
    # A change through this process: the next GetJob reads it, whatever the kept answer said.
    cancelled = await manager.cancel(ORG, "job_a")
    again = await manager.get(ORG, "job_a")
    assert (again.state, again.revision) == (S.JOB_STATE_CANCELLED, cancelled.revision)
    assert reads == ["job_a", "job_a"]
    # By name it is always read (a name may pass to another job); another organization never sees it.
    assert (await manager.get(ORG, "a")).id == "job_a"
    with pytest.raises(NotFound):
        await manager.get(OTHER, "job_a")


async def test_a_change_flushed_but_not_committed_keeps_a_concurrent_read_out(db: Database) -> None:
    manager = replica(db)
    add_job(db, "job_a", "a")
    cache = manager.read_cache
    generation = cache.generation("job_a")
    stale = await manager.get(ORG, "job_a")  # read ...
    cache.forget_all()
    with db.session() as session:  # ... while a change is flushed, then committed
        row = JobRepository(session).get("job_a", for_update=True)
        assert row is not None
        row.revision += 1
        session.flush()
        cache.keep(stale, generation)  # the read that began before the change comes back now
        assert cache.get(ORG, "job_a") is None
    assert (await manager.get(ORG, "job_a")).revision == stale.revision + 1


async def test_another_replicas_change_is_seen_once_announced_or_after_the_ttl(db: Database) -> None:
    other_process = Database(db.url, "jobs")  # its own engine and sessions, as another replica has
    a, b = replica(db), replica(other_process)
    add_job(db, "job_a", "a")
    a.read_cache.ttl_s = 0.3
    await a.get(ORG, "job_a")
    changed = await b.cancel(ORG, "job_a")  # b's process: a hears nothing of its flush
    assert (await a.get(ORG, "job_a")).state == S.JOB_STATE_QUEUED  # kept, until ...
    a.read_cache.observe(changed.id)  # ... b's JobChanged arrives
    assert (await a.get(ORG, "job_a")).state == S.JOB_STATE_CANCELLED

    add_job(db, "job_b", "b")
    await a.get(ORG, "job_b")
    await b.cancel(ORG, "job_b")  # its event lost: the answer lapses after ttl_s
    await asyncio.sleep(0.35)
    assert (await a.get(ORG, "job_b")).state == S.JOB_STATE_CANCELLED
    other_process.dispose()


async def test_a_deleted_job_is_never_answered_from_the_cache(db: Database) -> None:
    manager = replica(db)
    add_job(db, "job_a", "a", state=S.JOB_STATE_CANCELLED)
    await manager.get(ORG, "job_a")
    with db.session() as session:
        session.add(JobDeletionRow(job_id="job_a", organization=ORG, name="a"))
        session.delete(session.get(JobRow, "job_a"))
    with pytest.raises(NotFound):
        await manager.get(ORG, "job_a")
