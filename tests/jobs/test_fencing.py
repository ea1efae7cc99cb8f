"""Worker updates are fenced: the real jobs component, served against a real nats-server (SQLite, local
object storage), takes a WorkerJobUpdate only from the delivery that holds the job, never after the job
ended, and never with artifacts outside the job's own output prefix. Forged and stale updates are
published to TF_WORKER as a worker would publish them; each is refused (logged and passed to the
on_rejected_update hook) and the job does not change, while the genuine worker's updates go through."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TypeAlias

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import job_pb2

from services.jobs.component import JobsComponent
from services.jobs.manager import JobManager
from services.jobs.models import JobRow
from services.jobs.settings import JobSettings
from services.kit.outbox import utcnow
from services.kit.runtime import Runtime, serve
from tuneforge_core import subjects
from tuneforge_core.ids import new_id
from tuneforge_core.nats import connect, publish
from tuneforge_core.settings import KitSettings

S = job_pb2.JobState
U = events_pb2.WorkerUpdateKind
Kind: TypeAlias = events_pb2.WorkerUpdateKind.ValueType
W = job_pb2.WorkerState
ORG = "acme"


@dataclass
class Jobs:
    """The served jobs component, a worker's NATS connection, and what the rejection hook received."""

    component: JobsComponent
    nc: NATS
    js: JetStreamContext
    rejected: list[tuple[str, str, str, str]] = field(default_factory=list)

    @property
    def manager(self) -> JobManager:
        return self.component.manager

    def insert_job(self, job_id: str | None = None) -> str:
        job_id = job_id or new_id("job")
        spec = job_pb2.JobSpec(base_model="org/m", dataset="ds_1")
        with self.manager.db.session() as s:
            s.add(JobRow(id=job_id, organization=ORG, name=job_id, spec=spec.SerializeToString(),
                         state=S.JOB_STATE_QUEUED, revision=1, request_hash=""))
        return job_id

    def output_uri(self, job_id: str, name: str = "adapter", organization: str = ORG) -> str:
        """Where the worker uploads an output: under the job's output prefix."""
        return self.manager.store.uri(f"jobs/{organization}/{job_id}/{name}")

    async def send(self, job_id: str, worker: str, attempt: int, kind: Kind, *, event_id: str = "",
                   subject: str = "", adapter_uri: str = "") -> events_pb2.WorkerJobUpdate:
        """Publishes an update as a worker does: to TF_WORKER, Nats-Msg-Id = event id."""
        update = events_pb2.WorkerJobUpdate(event_id=event_id or new_id("evt"), job_id=job_id,
                                            worker_id=worker, attempt=attempt, kind=kind)
        if adapter_uri:
            update.output.adapter_uri = adapter_uri
        await publish(self.js, subject or subjects.worker_status(job_id), update, new_id("msg"))
        return update

    async def job(self, job_id: str) -> job_pb2.Job:
        return await self.manager.get(ORG, job_id)

    async def until(self, predicate: Callable[[], object], timeout_s: float = 10.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not predicate():
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError("condition not met in time")
            await asyncio.sleep(0.02)

    async def refused(self, count: int) -> list[tuple[str, str, str, str]]:
        """Waits until the hook has seen `count` refusals in all; returns them."""
        await self.until(lambda: len(self.rejected) >= count)
        return self.rejected[:count]

    async def reaches(self, job_id: str, state: int, revision: int) -> job_pb2.Job:
        """Waits until the job is in `state` at `revision` or later (the consumer is in order, so every
        update published before the one that got it there has been handled too)."""
        job = await self.job(job_id)
        deadline = asyncio.get_running_loop().time() + 10
        while not (job.state == state and job.revision >= revision):
            assert asyncio.get_running_loop().time() < deadline, f"job stayed {job}"
            await asyncio.sleep(0.02)
            job = await self.job(job_id)
        return job

    async def run_on(self, job_id: str, worker: str, attempt: int) -> job_pb2.Job:
        """The genuine start of a delivery: PREPARING, then RUNNING."""
        before = (await self.job(job_id)).revision
        await self.send(job_id, worker, attempt, U.WORKER_UPDATE_KIND_PREPARING)
        await self.send(job_id, worker, attempt, U.WORKER_UPDATE_KIND_RUNNING)
        job = await self.reaches(job_id, S.JOB_STATE_RUNNING, before + 2)
        assert (job.worker_id, job.attempt) == (worker, attempt)
        return job


@pytest.fixture
async def jobs(kit_settings: KitSettings) -> AsyncIterator[Jobs]:
    settings = JobSettings(**{**kit_settings.model_dump(), "work_max_deliver": 3})
    built: list[JobsComponent] = []

    def factory(runtime: Runtime) -> JobsComponent:
        built.append(JobsComponent(runtime, settings))
        return built[0]

    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    server = asyncio.create_task(serve([factory], kit_settings, name="jobs-fencing-test",
                                       on_ready=ready.set_result, stop=stop))
    await asyncio.wait_for(ready, 15)
    nc = await connect(kit_settings.nats_url, "test-worker")
    stack = Jobs(built[0], nc, nc.jetstream())
    stack.manager.on_rejected_update = lambda *args: stack.rejected.append(args)
    try:
        yield stack
    finally:
        with contextlib.suppress(Exception):
            await nc.drain()
        stop.set()
        await asyncio.wait_for(server, 15)


def unchanged(before: job_pb2.Job, after: job_pb2.Job) -> None:
    # Job.usage is computed live (a running attempt counts up to now): it moves with the clock alone.
    before, after = _without_usage(before), _without_usage(after)
    assert after == before, f"the job changed:\n{before}\n->\n{after}"


def _without_usage(job: job_pb2.Job) -> job_pb2.Job:
    out = job_pb2.Job()
    out.CopyFrom(job)
    out.ClearField("usage")
    return out


async def test_forged_updates_from_a_worker_that_holds_no_delivery_are_refused(
    jobs: Jobs, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="services.jobs.manager")
    job_id = jobs.insert_job()
    queued = await jobs.job(job_id)

    # The reported attack: a QUEUED job straight to SUCCEEDED with an attacker's adapter.
    await jobs.send(job_id, "evil", 1, U.WORKER_UPDATE_KIND_SUCCEEDED,
                    adapter_uri="s3://attacker-bucket/jobs/acme/adapter")
    await jobs.send(job_id, "evil", 0, U.WORKER_UPDATE_KIND_RUNNING)  # attempt 0 is no delivery
    (first, second) = await jobs.refused(2)
    assert first[:3] == (job_id, ORG, "evil") and "starts with PREPARING or RUNNING" in first[3]
    assert "attempt 0 is no delivery" in second[3]
    unchanged(queued, await jobs.job(job_id))
    assert f"worker update refused: job {job_id} (organization acme), worker 'evil'" in caplog.text

    # The genuine worker takes it; an unknown worker's updates on its delivery change nothing.
    running = await jobs.run_on(job_id, "w1", 1)
    await jobs.send(job_id, "evil", 1, U.WORKER_UPDATE_KIND_SUCCEEDED, adapter_uri=jobs.output_uri(job_id))
    await jobs.send(job_id, "evil", 1, U.WORKER_UPDATE_KIND_FAILED)
    await jobs.send(job_id, "evil", 1, U.WORKER_UPDATE_KIND_PROGRESS)
    refusals = (await jobs.refused(5))[2:]
    assert all(r[:3] == (job_id, ORG, "evil") for r in refusals)
    assert all("worker evil does not hold the job: attempt 1 is on worker w1" in r[3] for r in refusals)
    unchanged(running, await jobs.job(job_id))

    # A forged copy did not use up the event id: the genuine update with the same id still counts.
    forged = await jobs.send(job_id, "evil", 1, U.WORKER_UPDATE_KIND_SUCCEEDED,
                             adapter_uri=jobs.output_uri(job_id))
    await jobs.refused(6)
    await jobs.send(job_id, "w1", 1, U.WORKER_UPDATE_KIND_SUCCEEDED, event_id=forged.event_id,
                    adapter_uri=jobs.output_uri(job_id))
    done = await jobs.reaches(job_id, S.JOB_STATE_SUCCEEDED, running.revision + 1)
    assert done.output.adapter_uri == jobs.output_uri(job_id) and done.worker_id == "w1"


async def test_the_previous_attempts_worker_is_refused_after_a_requeue(jobs: Jobs) -> None:
    job_id = jobs.insert_job()
    await jobs.run_on(job_id, "w1", 1)
    manager, now = jobs.manager, utcnow()
    beat = events_pb2.WorkerHeartbeat(worker_id="w1", state=W.WORKER_STATE_BUSY, job_id=job_id, attempt=1,
                                      interval_seconds=1.0)
    await manager.record_heartbeat(beat, now=now)
    # w1 goes quiet past its claim: back to the queue, still recorded as w1's attempt 1.
    assert await manager.check_workers(now=now + timedelta(minutes=5)) >= 1
    requeued = await jobs.job(job_id)
    assert (requeued.state, requeued.worker_id, requeued.attempt) == (S.JOB_STATE_QUEUED, "w1", 1)

    # The work queue's next delivery goes to w2: its first update makes it the holder.
    taken = await jobs.run_on(job_id, "w2", 2)
    assert taken.status_message == ""

    # w1 was only cut off, and comes back with the delivery it had: its word no longer counts.
    await jobs.send(job_id, "w1", 1, U.WORKER_UPDATE_KIND_SUCCEEDED, adapter_uri=jobs.output_uri(job_id))
    await jobs.send(job_id, "w1", 1, U.WORKER_UPDATE_KIND_RUNNING)
    await jobs.send(job_id, "w1", 1, U.WORKER_UPDATE_KIND_FAILED)
    refusals = await jobs.refused(3)
    assert all(r[:3] == (job_id, ORG, "w1") for r in refusals)
    assert all("attempt 1 is stale: the job's current delivery is attempt 2, on worker w2" in r[3]
               for r in refusals)
    # Nor do its heartbeats take the job back.
    assert not await manager.record_heartbeat(beat, now=now + timedelta(minutes=5, seconds=1))
    unchanged(taken, await jobs.job(job_id))

    # A made-up later delivery, past the work queue's deliveries (3 here), cannot take it either.
    await jobs.send(job_id, "evil", 4, U.WORKER_UPDATE_KIND_PREPARING)
    assert "beyond the work queue's 3 deliveries" in (await jobs.refused(4))[3][3]
    unchanged(taken, await jobs.job(job_id))

    # w2 finishes normally.
    await jobs.send(job_id, "w2", 2, U.WORKER_UPDATE_KIND_SUCCEEDED, adapter_uri=jobs.output_uri(job_id))
    done = await jobs.reaches(job_id, S.JOB_STATE_SUCCEEDED, taken.revision + 1)
    assert (done.worker_id, done.attempt) == ("w2", 2)


async def test_artifacts_outside_the_jobs_own_output_prefix_are_refused(jobs: Jobs) -> None:
    job_id = jobs.insert_job()
    other = jobs.insert_job()
    running = await jobs.run_on(job_id, "w1", 1)
    prefix = jobs.manager.store.uri(f"jobs/{ORG}/{job_id}")
    outside = [
        "s3://attacker-bucket/jobs/acme/" + job_id + "/adapter",  # another store
        jobs.output_uri(other),  # another job's prefix
        jobs.output_uri(job_id, organization="umbrella"),  # another organization's
        f"{prefix}/../{other}/adapter",  # out of the prefix by ".."
        f"{prefix}-x/adapter",  # a sibling whose name starts the same
        prefix,  # the prefix itself, not an artifact under it
        f"{prefix}/adapter?version=2",  # not the canonical URI of a key
    ]
    for uri in outside:
        await jobs.send(job_id, "w1", 1, U.WORKER_UPDATE_KIND_SUCCEEDED, adapter_uri=uri)
    refusals = await jobs.refused(len(outside))
    assert all(r[:3] == (job_id, ORG, "w1") for r in refusals)
    assert "not in this deployment's object store" in refusals[0][3]
    assert all("is not under the job's output prefix" in r[3] for r in refusals[1:]), refusals
    # The merged model is checked the same way.
    merged = events_pb2.WorkerJobUpdate(event_id=new_id("evt"), job_id=job_id, worker_id="w1", attempt=1,
                                        kind=U.WORKER_UPDATE_KIND_SUCCEEDED)
    merged.output.adapter_uri = jobs.output_uri(job_id)
    merged.output.merged_model_uri = jobs.output_uri(other, "merged")
    await publish(jobs.js, subjects.worker_status(job_id), merged, merged.event_id)
    assert "output.merged_model_uri" in (await jobs.refused(len(outside) + 1))[-1][3]
    unchanged(running, await jobs.job(job_id))

    merged.event_id = new_id("evt")
    merged.output.merged_model_uri = jobs.output_uri(job_id, "merged")
    await publish(jobs.js, subjects.worker_status(job_id), merged, merged.event_id)
    done = await jobs.reaches(job_id, S.JOB_STATE_SUCCEEDED, running.revision + 1)
    assert done.output == merged.output


async def test_nothing_is_taken_after_the_job_ended(jobs: Jobs) -> None:
    job_id = jobs.insert_job()
    await jobs.run_on(job_id, "w1", 1)
    await jobs.send(job_id, "w1", 1, U.WORKER_UPDATE_KIND_FAILED)
    failed = await jobs.reaches(job_id, S.JOB_STATE_FAILED, 0)

    await jobs.send(job_id, "w1", 1, U.WORKER_UPDATE_KIND_SUCCEEDED, adapter_uri=jobs.output_uri(job_id))
    await jobs.send(job_id, "w2", 2, U.WORKER_UPDATE_KIND_PREPARING)  # even a newer delivery
    await jobs.send(job_id, "w1", 1, U.WORKER_UPDATE_KIND_PROGRESS)
    refusals = await jobs.refused(3)
    assert [r[2] for r in refusals] == ["w1", "w2", "w1"]
    assert all(r[3] == "the job already ended FAILED" for r in refusals), refusals
    unchanged(failed, await jobs.job(job_id))


async def test_an_update_on_another_jobs_subject_or_for_no_job_is_refused(jobs: Jobs) -> None:
    job_id = jobs.insert_job()
    decoy = jobs.insert_job()
    running = await jobs.run_on(job_id, "w1", 1)
    await jobs.send(job_id, "w1", 1, U.WORKER_UPDATE_KIND_FAILED, subject=subjects.worker_status(decoy))
    await jobs.send("job_nope", "w1", 1, U.WORKER_UPDATE_KIND_RUNNING)
    (wrong_subject, no_job) = await jobs.refused(2)
    assert wrong_subject[:3] == (job_id, ORG, "w1") and "not the job's own" in wrong_subject[3]
    assert no_job == ("job_nope", "", "w1", "the job does not exist")
    unchanged(running, await jobs.job(job_id))


async def test_a_refused_update_is_in_the_organizations_audit_log(jobs: Jobs) -> None:
    """The component's own hook (the fixture replaces it elsewhere) writes each refusal to the audit log."""
    component = jobs.component
    record = component._audit_refused_update
    jobs.manager.on_rejected_update = lambda *args: (record(*args), jobs.rejected.append(args))
    job_id = jobs.insert_job()
    await jobs.send(job_id, "evil", 1, U.WORKER_UPDATE_KIND_SUCCEEDED,
                    adapter_uri="s3://attacker-bucket/jobs/acme/adapter")
    await jobs.refused(1)
    events, _ = component.runtime.identity.list_events(ORG, 50, "", "", True)
    (event,) = [e for e in events if e.resource == job_id]
    assert (event.code, event.principal) == ("PERMISSION_DENIED", "worker:evil")
    assert event.method == f"nats:tuneforge.worker.jobs.{job_id}.status" and event.message
