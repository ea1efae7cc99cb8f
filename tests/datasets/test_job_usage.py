"""DeleteDataset and the jobs that use the dataset, learned from JobChanged events (job_usage.py).

The table on real databases with the real migrations; then the whole service (gRPC, nats-server)
fed JobChanged events the way the jobs service's outbox publishes them.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from nats.js import JetStreamContext
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import dataset_service_pb2 as pb
from tuneforge.v1 import job_pb2
from tuneforge.v1.dataset_service_pb2_grpc import DatasetServiceStub

from services.datasets.component import MIGRATIONS
from services.datasets.job_usage import JobUsage, JobUsageRepository, usage_from_job
from services.datasets.settings import DatasetSettings
from services.kit.db import Database
from tests.datasets.helpers import ErrorDetails, chat_lines, jsonl, meta, upload_requests
from tuneforge_core import subjects
from tuneforge_core.ids import new_id
from tuneforge_core.nats import connect, publish

RUNNING = job_pb2.JOB_STATE_RUNNING
QUEUED = job_pb2.JOB_STATE_QUEUED
SUCCEEDED = job_pb2.JOB_STATE_SUCCEEDED


def job(state: int, revision: int, dataset: str = "ds_x", validation_dataset: str = "",
        organization: str = "acme", job_id: str = "job_1") -> job_pb2.Job:
    return job_pb2.Job(id=job_id, organization=organization, state=state, revision=revision,  # type: ignore[arg-type]
                       spec=job_pb2.JobSpec(dataset=dataset, validation_dataset=validation_dataset))


# -- the table -------------------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """The real migrations on SQLite, and on PostgreSQL where one is reachable."""
    url = (f"sqlite:///{tmp_path / 'datasets.db'}" if request.param == "sqlite"
           else request.getfixturevalue("postgres_url"))
    database = Database(url, "datasets")
    database.migrate(MIGRATIONS)
    try:
        yield database
    finally:
        database.dispose()


def apply(db: Database, usage: JobUsage) -> bool:
    with db.session() as session:
        return JobUsageRepository(session).apply(usage)


def users(db: Database, dataset_id: str, organization: str = "acme") -> list[str]:
    with db.session() as session:
        return JobUsageRepository(session).active_jobs_using(organization, dataset_id)


def test_usage_follows_the_newest_revision_whatever_the_order(db: Database) -> None:
    assert apply(db, usage_from_job(job(QUEUED, 1)))
    assert users(db, "ds_x") == ["job_1"]
    assert apply(db, usage_from_job(job(SUCCEEDED, 3)))
    assert users(db, "ds_x") == []
    # Late and repeated events change nothing: RUNNING (2) arrives after SUCCEEDED (3), SUCCEEDED twice.
    assert not apply(db, usage_from_job(job(RUNNING, 2)))
    assert not apply(db, usage_from_job(job(SUCCEEDED, 3)))
    assert users(db, "ds_x") == []


def test_usage_counts_validation_datasets_and_stays_in_its_organization(db: Database) -> None:
    apply(db, usage_from_job(job(RUNNING, 2, dataset="ds_x", validation_dataset="ds_v")))
    apply(db, usage_from_job(job(QUEUED, 1, dataset="ds_v", job_id="job_2")))
    apply(db, usage_from_job(job(RUNNING, 5, dataset="ds_x", organization="globex", job_id="job_3")))
    assert users(db, "ds_x") == ["job_1"]
    assert users(db, "ds_v") == ["job_1", "job_2"]
    assert users(db, "ds_x", organization="globex") == ["job_3"]
    assert users(db, "ds_other") == []


def test_a_deleted_job_loses_its_row_and_a_late_event_does_not_bring_it_back(db: Database) -> None:
    assert apply(db, usage_from_job(job(SUCCEEDED, 3)))
    with db.session() as session:
        assert JobUsageRepository(session).forget("job_1")
    with db.session() as session:
        assert not JobUsageRepository(session).forget("job_1")  # idempotent
    # An older event delivered after the deletion (a redelivery) changes nothing.
    assert not apply(db, usage_from_job(job(RUNNING, 2)))
    assert users(db, "ds_x") == []
    with db.session() as session:
        assert session.execute(sa.text("SELECT count(*) FROM datasets_job_usage")).scalar() == 0


# -- through the service ---------------------------------------------------------------------------------


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    nc = await connect(nats_url, "test-jobs-outbox")
    try:
        yield nc.jetstream()
    finally:
        await nc.drain()


async def job_changed(js: JetStreamContext, changed: job_pb2.Job) -> None:
    """What the jobs service's outbox relay publishes after committing a change of the job."""
    event_id = new_id("evt")
    await publish(js, subjects.job_events(changed.id),
                  events_pb2.JobChanged(event_id=event_id, job=changed), event_id)


async def all_applied(js: JetStreamContext, timeout_s: float = 10.0) -> None:
    """Until the service's consumer has acked every JobChanged published so far."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        try:
            info = await js.consumer_info(subjects.STREAM_EVENTS, subjects.DATASETS_JOB_EVENTS_CONSUMER)
        except Exception:  # not created yet
            info = None
        if info is not None and info.num_pending == 0 and info.num_ack_pending == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the datasets service did not apply the job events in time")


def ended(running: job_pb2.Job, revision: int) -> job_pb2.Job:
    done = job_pb2.Job()
    done.CopyFrom(running)
    done.state, done.revision = SUCCEEDED, revision
    return done


async def upload(stub: DatasetServiceStub, name: str) -> str:
    response = await stub.UploadDataset(upload_requests(meta(name=name), jsonl(chat_lines(120))))
    return response.dataset.id


async def delete(stub: DatasetServiceStub, dataset_id: str) -> ErrorDetails | None:
    """None when the delete succeeded, else the error."""
    try:
        await stub.DeleteDataset(pb.DeleteDatasetRequest(organization="acme", dataset=dataset_id))
    except grpc.aio.AioRpcError as err:
        return ErrorDetails(err)
    return None


async def test_delete_is_refused_while_a_job_that_has_not_ended_uses_the_dataset(
        stub: DatasetServiceStub, js: JetStreamContext) -> None:
    train, validation = await upload(stub, "train-set"), await upload(stub, "validation-set")
    running = job(RUNNING, 2, dataset=train, validation_dataset=validation, job_id=new_id("job"))
    await job_changed(js, running)
    await all_applied(js)

    for dataset_id in (train, validation):
        err = await delete(stub, dataset_id)
        assert err is not None and err.code == grpc.StatusCode.FAILED_PRECONDITION, err
        assert err.reason == "DATASET_IN_USE"
        assert err.info.metadata["jobs"] == running.id and running.id in err.message

    # The job ends: nothing blocks the delete any more.
    await job_changed(js, ended(running, revision=4))
    await all_applied(js)
    assert await delete(stub, train) is None

    # A late, older event (the RUNNING one again, as a redelivery would bring it) does not bring it back.
    await job_changed(js, running)
    await all_applied(js)
    assert await delete(stub, validation) is None
    missing = await delete(stub, train)
    assert missing is not None and missing.code == grpc.StatusCode.NOT_FOUND


async def test_a_delete_right_after_the_job_ended_waits_for_that_event(
        stub: DatasetServiceStub, js: JetStreamContext, datasets_settings: DatasetSettings) -> None:
    """The caller may see the job end (WatchJob gets the same event) before this service applied it."""
    dataset_id = await upload(stub, "chats")
    running = job(RUNNING, 2, dataset=dataset_id, job_id=new_id("job"))
    await job_changed(js, running)
    await all_applied(js)
    # Hold the database's write lock, so the consumer cannot apply the next event until it is released.
    path = datasets_settings.database_url_for("datasets").removeprefix("sqlite:///")
    lock = sqlite3.connect(path, isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")
        await job_changed(js, ended(running, revision=3))
        deleting = asyncio.create_task(delete(stub, dataset_id))
        await asyncio.sleep(0.5)
        assert not deleting.done(), "the delete did not wait for the event in the stream"
        lock.execute("ROLLBACK")
        assert await asyncio.wait_for(deleting, 10) is None
    finally:
        lock.close()
