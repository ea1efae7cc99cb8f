"""The work queue by GPU type and count: route names, one consumer per route with the max-deliveries
advisory of each captured, what older versions queued (on the one shared subject, or for several GPUs on a
GPU type's one-GPU route) moved to the routed ones, and the worker's NATS user able to pull every route."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StreamConfig
from nats.js.errors import NotFoundError
from sqlalchemy import select
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import job_pb2, job_service_pb2

from services.jobs.component import MIGRATIONS
from services.jobs.manager import JobManager
from services.jobs.models import JobOutbox
from services.jobs.quotas import JobQuotas
from services.kit.db import Database
from services.kit.embedded import EmbeddedNats, NatsAuth
from services.kit.outbox import OutboxRelay
from tests.jobs.test_create import Datasets
from tuneforge_core import nats as kit_nats
from tuneforge_core import subjects
from tuneforge_core.storage import LocalObjectStore


@pytest.mark.parametrize(
    ("gpu_type", "route"),
    [("", "any"), ("cpu", "any"), (" CPU ", "any"), ("nvidia-h100", "nvidia-h100"),
     ("NVIDIA-A100-80GB", "nvidia-a100-80gb"), ("weird.type >*", "weird_type___")],
)
def test_routes_are_one_safe_subject_token(gpu_type: str, route: str) -> None:
    assert subjects.gpu_route(gpu_type) == route
    assert subjects.work_jobs(gpu_type) == f"tuneforge.work.jobs.{route}"
    assert subjects.trainers_consumer(gpu_type) == f"trainers-{route}"


@pytest.mark.parametrize(
    ("gpu_type", "gpu_count", "route", "consumer", "count"),
    [("", 4, "any", "trainers-any", 0), ("cpu", 2, "any", "trainers-any", 0),
     ("nvidia-h100", 0, "nvidia-h100", "trainers-nvidia-h100", 1),
     ("nvidia-h100", 1, "nvidia-h100", "trainers-nvidia-h100", 1),
     ("NVIDIA-H100", 4, "nvidia-h100.x4", "trainers-nvidia-h100-x4", 4),
     ("weird.type", 8, "weird_type.x8", "trainers-weird_type-x8", 8)],
)
def test_jobs_for_several_gpus_have_a_route_per_count(gpu_type: str, gpu_count: int, route: str,
                                                     consumer: str, count: int) -> None:
    assert subjects.work_route(gpu_type, gpu_count) == route
    assert subjects.work_jobs(gpu_type, gpu_count) == f"tuneforge.work.jobs.{route}"
    assert subjects.trainers_consumer(gpu_type, gpu_count) == consumer
    assert subjects.route_gpu_count(route) == count
    assert subjects.route_gpu_type(route) == subjects.gpu_route(gpu_type)


@pytest.mark.parametrize("route", ["nvidia-h100.x1", "nvidia-h100.x0", "nvidia-h100.y2", "a.x2.x3", "a.x"])
def test_a_route_this_version_does_not_write_asks_for_no_gpus(route: str) -> None:
    """No worker pulls it for its count (`WorkerHardware.takes_route` wants 1 or more)."""
    assert subjects.route_gpu_count(route) == 0


def assignment(job_id: str, gpu_type: str = "", gpu_count: int = 0) -> events_pb2.JobAssignment:
    out = events_pb2.JobAssignment(event_id=f"{job_id}.assignment", job_id=job_id)
    out.spec.hardware.gpu_type = gpu_type
    if gpu_count:
        out.spec.hardware.gpu_count = gpu_count
    return out


async def test_every_routes_consumer_reports_running_out_of_deliveries(nats_url: str) -> None:
    nc = await kit_nats.connect(nats_url, "test")
    js = nc.jetstream()
    try:
        await kit_nats.ensure_streams(js)
        for gpu_type in ("", "nvidia-t4"):
            await kit_nats.ensure_trainers_consumer(js, gpu_type, ack_wait_s=0.5, max_deliver=1)
            job = assignment(f"job_{gpu_type or 'any'}", gpu_type)
            await kit_nats.publish(js, subjects.work_jobs(gpu_type), job, job.event_id)
            durable = subjects.trainers_consumer(gpu_type)
            sub = await js.pull_subscribe(subjects.work_jobs(gpu_type), durable=durable,
                                          stream=subjects.STREAM_WORK)
            (msg,) = await sub.fetch(1, timeout=2)
            assert msg.metadata.num_delivered == 1  # then never acked: the claim lapses
        advisories = await js.pull_subscribe(subjects.WORK_MAX_DELIVERIES, durable="test-advisories",
                                             stream=subjects.STREAM_ADVISORIES)
        seen: set[str] = set()
        for _ in range(50):
            try:
                for msg in await advisories.fetch(10, timeout=0.5):
                    seen.add(json.loads(msg.data)["consumer"])
            except Exception:
                pass
            if len(seen) == 2:
                break
            await asyncio.sleep(0.1)
        assert seen == {"trainers-any", "trainers-nvidia-t4"}
    finally:
        await nc.drain()


async def test_work_queued_by_an_older_version_is_moved_to_its_route(nats_url: str) -> None:
    nc = await kit_nats.connect(nats_url, "test")
    js = nc.jetstream()
    try:
        # As the version before routing left it: one subject, one consumer "trainers", two jobs waiting.
        await js.add_stream(StreamConfig(name=subjects.STREAM_WORK, subjects=[subjects.LEGACY_WORK_JOBS],
                                         retention=RetentionPolicy.WORK_QUEUE))
        await js.add_consumer(subjects.STREAM_WORK, ConsumerConfig(
            durable_name=subjects.LEGACY_TRAINERS_CONSUMER, ack_policy=AckPolicy.EXPLICIT,
            filter_subject=subjects.LEGACY_WORK_JOBS))
        for job in (assignment("job_a"), assignment("job_b", "nvidia-h100")):
            await kit_nats.publish(js, subjects.LEGACY_WORK_JOBS, job, job.event_id)

        await kit_nats.ensure_streams(js)
        assert await kit_nats.reroute_legacy_work(js) == 2
        assert await kit_nats.queued_routes(js) == ["any", "nvidia-h100"]
        info = await js.stream_info(subjects.STREAM_WORK)
        assert info.state.messages == 2, "the old copies were acked away"
        with pytest.raises(NotFoundError):
            await js.consumer_info(subjects.STREAM_WORK, subjects.LEGACY_TRAINERS_CONSUMER)
        assert await kit_nats.reroute_legacy_work(js) == 0, "nothing to do the next time"

        await kit_nats.ensure_trainers_consumer(js, "nvidia-h100", ack_wait_s=5, max_deliver=5)
        durable = subjects.trainers_consumer("nvidia-h100")
        sub = await js.pull_subscribe(subjects.work_jobs("nvidia-h100"), durable=durable,
                                      stream=subjects.STREAM_WORK)
        (msg,) = await sub.fetch(1, timeout=2)
        assert events_pb2.JobAssignment.FromString(msg.data).job_id == "job_b"
    finally:
        await nc.drain()


async def test_work_for_several_gpus_on_the_shared_subject_goes_to_its_count(nats_url: str) -> None:
    nc = await kit_nats.connect(nats_url, "test")
    js = nc.jetstream()
    try:
        await js.add_stream(StreamConfig(name=subjects.STREAM_WORK, subjects=[subjects.LEGACY_WORK_JOBS],
                                         retention=RetentionPolicy.WORK_QUEUE))
        await js.add_consumer(subjects.STREAM_WORK, ConsumerConfig(
            durable_name=subjects.LEGACY_TRAINERS_CONSUMER, ack_policy=AckPolicy.EXPLICIT,
            filter_subject=subjects.LEGACY_WORK_JOBS))
        job = assignment("job_x2", "nvidia-h100", 2)
        await kit_nats.publish(js, subjects.LEGACY_WORK_JOBS, job, job.event_id)
        await kit_nats.ensure_streams(js)
        assert await kit_nats.reroute_legacy_work(js) == 1
        assert await kit_nats.queued_routes(js) == ["nvidia-h100.x2"]
    finally:
        await nc.drain()


async def test_work_for_several_gpus_queued_by_gpu_type_alone_is_moved_to_its_count(nats_url: str) -> None:
    """The version that routed by GPU type alone queued every H100 job on "tuneforge.work.jobs.nvidia-h100":
    a job for four stays out of reach of a one-H100 worker only once it is on its own route. One a worker
    may hold now is left where it is (its worker refuses it if it has too few GPUs)."""
    nc = await kit_nats.connect(nats_url, "test")
    js = nc.jetstream()
    try:
        await js.add_stream(StreamConfig(
            name=subjects.STREAM_WORK, subjects=[subjects.ALL_WORK_JOBS, subjects.LEGACY_WORK_JOBS],
            retention=RetentionPolicy.WORK_QUEUE))
        await kit_nats.ensure_trainers_consumer(js, "nvidia-h100", ack_wait_s=30, max_deliver=5)
        jobs = [assignment("job_held", "nvidia-h100", 4), assignment("job_1", "nvidia-h100", 1),
                assignment("job_4", "nvidia-h100", 4), assignment("job_unset", "nvidia-h100"),
                assignment("job_t4", "nvidia-t4", 2), assignment("job_any", "", 4)]
        for job in jobs:  # each where that version put it: by GPU type alone
            old_subject = f"{subjects.WORK_JOBS_PREFIX}.{subjects.gpu_route(job.spec.hardware.gpu_type)}"
            await kit_nats.publish(js, old_subject, job, job.event_id)
        sub = await js.pull_subscribe(subjects.work_jobs("nvidia-h100"), durable="trainers-nvidia-h100",
                                      stream=subjects.STREAM_WORK)
        (held,) = await sub.fetch(1, timeout=2)  # a worker of that version holds it
        assert events_pb2.JobAssignment.FromString(held.data).job_id == "job_held"

        await kit_nats.ensure_streams(js)
        assert await kit_nats.reroute_legacy_work(js) == 2
        info = await js.stream_info(subjects.STREAM_WORK, subjects_filter=subjects.EVERY_WORK_ROUTE)
        prefix = subjects.WORK_JOBS_PREFIX
        assert info.state.subjects == {f"{prefix}.nvidia-h100": 3, f"{prefix}.nvidia-h100.x4": 1,
                                       f"{prefix}.nvidia-t4.x2": 1, f"{prefix}.any": 1}
        assert await kit_nats.reroute_legacy_work(js) == 0, "nothing to do the next time"

        await kit_nats.ensure_trainers_consumer(js, "nvidia-h100", ack_wait_s=5, max_deliver=5, gpu_count=4)
        x4 = await js.pull_subscribe(subjects.work_jobs("nvidia-h100", 4), durable="trainers-nvidia-h100-x4",
                                     stream=subjects.STREAM_WORK)
        (msg,) = await x4.fetch(1, timeout=2)
        assert events_pb2.JobAssignment.FromString(msg.data).job_id == "job_4"
        rest = [events_pb2.JobAssignment.FromString(m.data).job_id for m in await sub.fetch(5, timeout=1)]
        assert rest == ["job_1", "job_unset"]
    finally:
        await nc.drain()


async def test_the_worker_user_may_pull_every_route_it_takes(tmp_path: Path) -> None:
    """Subjects one token deeper for several GPUs: the "worker" user of the embedded nats-server creates
    and pulls "trainers-nvidia-h100-x4" as it does "trainers-nvidia-h100", and still creates no consumer
    outside TF_WORK's routes."""
    auth = NatsAuth.load_or_create(tmp_path / "nats" / "auth")
    server = EmbeddedNats(tmp_path / "nats", auth=auth)
    server.start()
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    try:
        services = await kit_nats.connect(server.url, "services", user=kit_nats.SERVICES_USER,
                                          password=auth.passwords[kit_nats.SERVICES_USER])
        worker = await nats.connect(server.url, user=kit_nats.WORKER_USER,
                                    password=auth.passwords[kit_nats.WORKER_USER], error_cb=on_error,
                                    inbox_prefix=kit_nats.inbox_prefix(kit_nats.WORKER_USER),
                                    max_reconnect_attempts=0)
        try:
            await kit_nats.ensure_streams(services.jetstream())
            job = assignment("job_x4", "nvidia-h100", 4)
            await kit_nats.publish(services.jetstream(), subjects.work_jobs("nvidia-h100", 4), job,
                                   job.event_id)
            js = worker.jetstream(timeout=2.0)
            await kit_nats.ensure_streams(js)
            for count in (4, 1):
                await kit_nats.ensure_trainers_consumer(js, "nvidia-h100", 30.0, 5, gpu_count=count)
            # Named with its filter in the request subject, as newer clients create consumers.
            named = ConsumerConfig(name="trainers-nvidia-h100-x2", durable_name="trainers-nvidia-h100-x2",
                                   ack_policy=AckPolicy.EXPLICIT,
                                   filter_subject=subjects.work_jobs("nvidia-h100", 2))
            await js.add_consumer(subjects.STREAM_WORK, named)
            assert await kit_nats.queued_routes(js) == ["nvidia-h100.x4"]
            sub = await js.pull_subscribe(subjects.work_jobs("nvidia-h100", 4),
                                          durable=subjects.trainers_consumer("nvidia-h100", 4),
                                          stream=subjects.STREAM_WORK)
            (msg,) = await sub.fetch(1, timeout=2)
            await msg.in_progress()
            await msg.ack_sync()
            await sub.unsubscribe()
            # A pool's routes, one token deeper still for several GPUs ("pool-<pool>.<type>.x<N>").
            pooled = assignment("job_pool", "nvidia-h100", 4)
            pooled.spec.hardware.pool = "gpu-a"
            await kit_nats.publish(services.jetstream(), subjects.work_jobs("nvidia-h100", 4, "gpu-a"),
                                   pooled, pooled.event_id)
            route = subjects.pooled_route("gpu-a", "nvidia-h100", 4)
            await kit_nats.ensure_route_consumer(js, route, 30.0, 5)
            x2 = subjects.trainers_consumer("nvidia-h100", 2, "gpu-a")
            await js.add_consumer(subjects.STREAM_WORK, ConsumerConfig(
                name=x2, durable_name=x2, ack_policy=AckPolicy.EXPLICIT,
                filter_subject=subjects.work_jobs("nvidia-h100", 2, "gpu-a")))
            sub = await js.pull_subscribe(subjects.route_subject(route),
                                          durable=subjects.route_consumer(route), stream=subjects.STREAM_WORK)
            (msg,) = await sub.fetch(1, timeout=2)
            assert events_pb2.JobAssignment.FromString(msg.data).job_id == "job_pool"
            await msg.ack_sync()
            await sub.unsubscribe()
            assert errors == []
            denied = [  # not a route: the legacy subject, and another stream
                js.add_consumer(subjects.STREAM_WORK, ConsumerConfig(
                    name="spy", durable_name="spy", filter_subject=subjects.LEGACY_WORK_JOBS)),
                kit_nats.ensure_pull_consumer(js, subjects.STREAM_EVENTS, "spy", subjects.ALL_JOB_EVENTS),
            ]
            for attempt in denied:
                with pytest.raises(Exception):  # noqa: B017 - denied: the server never answers
                    await attempt
            assert len([e for e in errors if "permissions violation" in e.lower()]) == len(denied), errors
        finally:
            await worker.close()
            await services.close()
    finally:
        server.stop()


async def test_an_existing_work_stream_gains_the_pooled_routes_in_place(nats_url: str) -> None:
    """A deployment from before pools has TF_WORK without the pooled multi-GPU subjects: ensure_streams
    updates it in place, keeping what is queued."""
    nc = await kit_nats.connect(nats_url, "test")
    js = nc.jetstream()
    try:
        await js.add_stream(StreamConfig(
            name=subjects.STREAM_WORK, retention=RetentionPolicy.WORK_QUEUE,
            subjects=[subjects.ALL_WORK_JOBS, subjects.ALL_MULTI_GPU_WORK_JOBS, subjects.LEGACY_WORK_JOBS]))
        old = assignment("job_old", "nvidia-h100", 2)
        await kit_nats.publish(js, subjects.work_jobs("nvidia-h100", 2), old, old.event_id)
        await kit_nats.ensure_streams(js)
        info = await js.stream_info(subjects.STREAM_WORK)
        assert subjects.ALL_POOLED_MULTI_GPU_WORK_JOBS in (info.config.subjects or [])
        assert info.state.messages == 1
        for job_id, count in (("job_new", 2), ("job_one", 1)):
            pooled = assignment(job_id, "nvidia-h100", count)
            pooled.spec.hardware.pool = "gpu-a"
            await kit_nats.publish(js, subjects.work_jobs("nvidia-h100", count, "gpu-a"), pooled,
                                   pooled.event_id)
        routes = ["nvidia-h100.x2", "pool-gpu-a.nvidia-h100", "pool-gpu-a.nvidia-h100.x2"]
        assert sorted(await kit_nats.queued_routes(js)) == routes
        # The start-up moves of older versions' work leave a pool's jobs on their pool's routes.
        assert await kit_nats.reroute_legacy_work(js) == 0
        assert sorted(await kit_nats.queued_routes(js)) == routes
    finally:
        await nc.close()


async def test_the_jobs_service_queues_a_job_on_its_gpu_type_and_counts_route(tmp_path: Path) -> None:
    """CreateJob writes the assignment to the outbox on the job's route, and so does the dispatch of a job
    the organization's running limit held."""
    db = Database(f"sqlite:///{tmp_path / 'jobs.db'}", "jobs")
    db.migrate(MIGRATIONS)
    datasets = Datasets()
    datasets.add("data", validation=False)
    relay = OutboxRelay(db, js=None, model=JobOutbox)  # type: ignore[arg-type]
    manager = JobManager(db, relay, datasets, LocalObjectStore(tmp_path / "objects"), nc=None,  # type: ignore[arg-type]
                         quotas=JobQuotas(max_queued_jobs_per_org=0, max_running_jobs_per_org=3))
    try:
        jobs = []
        for gpu_type, gpu_count in [("nvidia-h100", 4), ("nvidia-h100", 1), ("", 2), ("nvidia-h100", 2)]:
            spec = job_pb2.JobSpec(base_model="org/model", dataset="data")
            spec.hardware.gpu_type, spec.hardware.gpu_count = gpu_type, gpu_count
            request = job_service_pb2.CreateJobRequest(organization="acme", spec=spec)
            jobs.append(await manager.create(request))
        assert jobs[0].status_message.startswith("waiting for a worker with nvidia-h100 x4; none seen ")
        assert jobs[3].status_message.startswith("waiting: organization acme runs 3 jobs"), "held"
        await manager.cancel("acme", jobs[1].id)  # a slot frees: the held job goes to the work queue
        with db.session() as s:
            rows = s.execute(select(JobOutbox.subject, JobOutbox.payload).order_by(JobOutbox.id)).all()
        queued = [(events_pb2.JobAssignment.FromString(payload).job_id, subject) for subject, payload in rows
                  if subject.startswith(subjects.WORK_JOBS_PREFIX)]
        prefix = subjects.WORK_JOBS_PREFIX
        assert queued == [(jobs[0].id, f"{prefix}.nvidia-h100.x4"), (jobs[1].id, f"{prefix}.nvidia-h100"),
                          (jobs[2].id, f"{prefix}.any"), (jobs[3].id, f"{prefix}.nvidia-h100.x2")]
    finally:
        db.dispose()
