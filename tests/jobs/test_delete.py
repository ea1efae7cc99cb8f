"""DeleteJob's two steps against a real SQLite database and a local object store: a crash (a storage
failure) after the tombstone leaves the job deleted from every read and everything it stored to the sweep,
which finishes it, as it does after a restart; a repeated DeleteJob finishes it too. The whole path over
gRPC and NATS, with the other services, is tests/platform/test_delete_job.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import job_pb2, job_service_pb2

from services.jobs.component import MIGRATIONS
from services.jobs.deletion import JobDeletions
from services.jobs.manager import JobManager
from services.jobs.models import JobDeletionRow, JobOutbox, JobRow
from services.kit.db import Database
from services.kit.outbox import OutboxRelay, add_event, utcnow
from tests.jobs.test_create import Datasets
from tuneforge_core import subjects
from tuneforge_core.errors import AlreadyExists, FailedPrecondition, NotFound, Unavailable
from tuneforge_core.reasons import Reason
from tuneforge_core.storage import LocalObjectStore

ORG = "acme"
S = job_pb2.JobState


class FakeJetStream:
    """What the relay and the purge use of JetStream: publish, and purge by subject."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []
        self.purged: list[tuple[str, str, int | None]] = []

    async def publish(self, subject: str, payload: bytes, **_: Any) -> None:
        self.published.append((subject, payload))

    async def purge_stream(self, name: str, subject: str = "", keep: int | None = None) -> bool:
        self.purged.append((name, subject, keep))
        return True


class CrashingStore(LocalObjectStore):
    """Deleting fails the first `failures` times, as a crash or a storage outage would cut it short."""

    failures = 0

    def delete_prefix(self, prefix: str) -> int:
        if self.failures:
            self.failures -= 1
            raise OSError("storage went away")
        return super().delete_prefix(prefix)


@pytest.fixture
def db(tmp_path: Path) -> Database:
    database = Database(f"sqlite:///{tmp_path / 'jobs.db'}", "jobs")
    database.migrate(MIGRATIONS)
    return database


@pytest.fixture
def js() -> FakeJetStream:
    return FakeJetStream()


@pytest.fixture
def relay(db: Database, js: FakeJetStream) -> OutboxRelay:
    return OutboxRelay(db, js, JobOutbox)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> CrashingStore:
    return CrashingStore(tmp_path / "objects")


def deletions(db: Database, relay: OutboxRelay, store: CrashingStore, js: FakeJetStream) -> JobDeletions:
    return JobDeletions(db, relay, store, js, publish_wait_s=0.2)  # type: ignore[arg-type]


def manager(db: Database, relay: OutboxRelay, store: CrashingStore) -> JobManager:
    return JobManager(db, relay, datasets=None, store=store, nc=None)  # type: ignore[arg-type]


async def make_job(db: Database, store: CrashingStore, name: str, state: int) -> str:
    job_id = f"job_{name}"

    def insert(session: Any) -> None:
        session.add(JobRow(id=job_id, organization=ORG, name=name, spec=job_pb2.JobSpec().SerializeToString(),
                           state=state, revision=3, create_time=utcnow(), update_time=utcnow()))
        event = events_pb2.JobChanged(event_id=f"evt_{name}", job=job_pb2.Job(id=job_id))
        add_event(session, JobOutbox, subjects.job_events(job_id), event, event.event_id)
        assignment = events_pb2.JobAssignment(event_id=f"{job_id}.assignment", job_id=job_id)
        add_event(session, JobOutbox, subjects.work_jobs(""), assignment, assignment.event_id)

    await db.run(insert)
    for key in ("checkpoints/checkpoint-2/adapter_model.safetensors", "adapter/adapter_model.safetensors"):
        store.put_bytes(f"jobs/{ORG}/{job_id}/{key}", b"weights")
    return job_id


async def outbox(db: Database, job_id: str) -> list[str]:
    mine = (JobOutbox.subject == subjects.job_events(job_id)) | (JobOutbox.event_id == f"{job_id}.assignment")
    return await db.run(lambda s: list(s.scalars(select(JobOutbox.event_id).where(mine))))


async def tombstone(db: Database, job_id: str) -> tuple[str, bool] | None:
    row = await db.run(lambda s: s.get(JobDeletionRow, job_id))
    return None if row is None else (row.name, row.purged_at is not None)


async def test_a_crash_after_the_tombstone_is_finished_by_the_sweep(
        db: Database, relay: OutboxRelay, store: CrashingStore, js: FakeJetStream) -> None:
    job_id = await make_job(db, store, "first", S.JOB_STATE_SUCCEEDED)
    other = await make_job(db, store, "second", S.JOB_STATE_FAILED)
    await relay.relay_once()
    store.failures = 1
    with pytest.raises(Unavailable):
        await deletions(db, relay, store, js).delete(ORG, "first")

    # The job is gone from every read at once, though its objects are still there.
    jobs = manager(db, relay, store)
    with pytest.raises(NotFound):
        await jobs.get(ORG, job_id)
    assert job_id not in {j.id for j in (await jobs.list(ORG, [], 100, ""))[0]}
    assert store.list_keys(f"jobs/{ORG}/{job_id}/")
    assert await tombstone(db, job_id) == ("first", False)
    # The deletion event went into the outbox with the job as it was, final, at a higher revision.
    pending = await db.run(lambda s: [events_pb2.JobChanged.FromString(r.payload) for r in s.scalars(
        select(JobOutbox).where(JobOutbox.published_at.is_(None)))])
    assert [(e.deleted, e.job.id, e.job.state, e.job.revision) for e in pending] == [
        (True, job_id, S.JOB_STATE_SUCCEEDED, 4)]

    # The process "restarts": a new sweep finds the unfinished deletion and finishes it.
    await relay.relay_once()
    assert await deletions(db, relay, store, js).sweep() == 1
    assert not store.list_keys(f"jobs/{ORG}/{job_id}/")
    assert await outbox(db, job_id) == []
    assert await tombstone(db, job_id) == ("first", True)
    assert ("TF_WORKER", f"tuneforge.worker.jobs.{job_id}.>", None) in js.purged
    assert ("TF_EVENTS", subjects.job_events(job_id), 1) in js.purged
    # Nothing of the other job was touched; a second sweep has nothing to do.
    assert store.list_keys(f"jobs/{ORG}/{other}/") and len(await outbox(db, other)) == 2
    assert (await jobs.get(ORG, other)).state == S.JOB_STATE_FAILED
    assert await deletions(db, relay, store, js).sweep() == 0


async def test_deleting_again_finishes_an_interrupted_deletion_and_is_idempotent(
        db: Database, relay: OutboxRelay, store: CrashingStore, js: FakeJetStream) -> None:
    job_id = await make_job(db, store, "first", S.JOB_STATE_CANCELLED)
    jobs = deletions(db, relay, store, js)
    store.failures = 1
    with pytest.raises(Unavailable):
        await jobs.delete(ORG, job_id)
    await relay.relay_once()
    again = await jobs.delete(ORG, job_id)
    assert (again.job_id, again.already_deleted) == (job_id, True)
    assert not store.list_keys(f"jobs/{ORG}/{job_id}/")
    assert await tombstone(db, job_id) == ("first", True)
    assert (await jobs.delete(ORG, "first")).already_deleted
    with pytest.raises(NotFound):
        await jobs.delete("bravo", job_id)


async def test_a_job_that_has_not_ended_is_refused(
        db: Database, relay: OutboxRelay, store: CrashingStore, js: FakeJetStream) -> None:
    jobs = deletions(db, relay, store, js)
    for state in (S.JOB_STATE_QUEUED, S.JOB_STATE_PREPARING, S.JOB_STATE_RUNNING, S.JOB_STATE_CANCELLING):
        name = S.Name(state).removeprefix("JOB_STATE_").lower()
        job_id = await make_job(db, store, name, state)
        with pytest.raises(FailedPrecondition) as refused:
            await jobs.delete(ORG, job_id)
        assert refused.value.reason == Reason.JOB_STATE_CONFLICT
        assert refused.value.metadata["state"] == name.upper() and name.upper() in refused.value.message
        assert store.list_keys(f"jobs/{ORG}/{job_id}/") and await tombstone(db, job_id) is None
    with pytest.raises(NotFound):
        await jobs.delete(ORG, "never-was")


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_a_create_retried_after_its_job_was_deleted_does_not_make_it_again(
        request: pytest.FixtureRequest, tmp_path: Path, backend: str) -> None:
    """CreateJob with a request_id is idempotent while its job exists (the same job), and after the job was
    deleted too: the retry is refused, naming the deleted job, instead of creating it anew."""
    url = (f"sqlite:///{tmp_path / 'jobs.db'}" if backend == "sqlite"
           else request.getfixturevalue("postgres_url"))
    db = Database(url, "jobs")
    db.migrate(MIGRATIONS)
    js = FakeJetStream()
    relay = OutboxRelay(db, js, JobOutbox)  # type: ignore[arg-type]
    store = CrashingStore(tmp_path / "objects")
    datasets = Datasets()
    datasets.add("data", validation=False)
    jobs = JobManager(db, relay, datasets, store, nc=None)  # type: ignore[arg-type]
    try:
        create = job_service_pb2.CreateJobRequest(
            organization=ORG, spec=job_pb2.JobSpec(base_model="org/model", dataset="data"), request_id="once")
        job = await jobs.create(create)
        assert (await jobs.create(create)).id == job.id  # retried while it exists: the same job
        await jobs.cancel(ORG, job.id)
        await deletions(db, relay, store, js).delete(ORG, job.id)

        with pytest.raises(AlreadyExists) as info:
            await jobs.create(create)
        error = info.value
        assert error.reason == Reason.REQUEST_ID_REUSED
        assert error.metadata == {"request_id": "once", "job": job.id, "deleted": "true"}
        assert f"request_id 'once' already created job {job.id}, which was deleted at" in error.message
        assert [v.field for v in error.violations] == ["request_id"]
        # Another request under that request_id is refused as before; a new request_id makes a new job.
        other = job_service_pb2.CreateJobRequest(organization=ORG, name="other", spec=create.spec,
                                                 request_id="once")
        with pytest.raises(AlreadyExists, match="already used for a different request") as reused:
            await jobs.create(other)
        assert [(v.field, v.description.split(":")[0]) for v in reused.value.violations] == [
            ("request_id", "was already used for a different request")]
        assert (await jobs.create(job_service_pb2.CreateJobRequest(
            organization=ORG, spec=create.spec, request_id="twice"))).id != job.id
        # Another organization's request_ids are its own.
        assert (await jobs.create(job_service_pb2.CreateJobRequest(
            organization="umbrella", spec=create.spec, request_id="once"))).organization == "umbrella"
    finally:
        db.dispose()
