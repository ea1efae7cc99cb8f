"""The fair scheduler in the real jobs component, served against a real nats-server (SQLite, local object
storage; the datasets service is a stand-in that returns READY datasets): workers announce themselves
with WorkerHeartbeats, and a test "worker" pulls assignments from the real JetStream consumers and reports
PREPARING and SUCCEEDED on TF_WORKER as a trainer worker does, so every dispatch decision is exact.

Shown: jobs go to the work queue only as workers free up, one organization's many jobs do not keep
another's one waiting for more than the next free worker, weights share the workers in proportion, a
higher priority goes first within an organization, and each job lands in its own worker pool while one
for a pool with no worker waits with the reason (and is counted in ListPools)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import job_pb2, job_service_pb2

from services.jobs.component import JobsComponent
from services.jobs.manager import JobManager
from services.jobs.settings import JobSettings
from services.kit.outbox import utcnow
from services.kit.protos import to_timestamp
from services.kit.runtime import Runtime, serve
from tests.jobs.test_create import Datasets
from tuneforge_core import subjects
from tuneforge_core.ids import new_id
from tuneforge_core.nats import connect, ensure_route_consumer, publish
from tuneforge_core.settings import KitSettings

S = job_pb2.JobState
U = events_pb2.WorkerUpdateKind
W = job_pb2.WorkerState
P = job_pb2.JobPriority


@dataclass
class Fleet:
    """The served jobs component (fair scheduler) and a worker's NATS connection."""

    component: JobsComponent
    nc: NATS
    js: JetStreamContext
    started: dict[str, object] = field(default_factory=dict)

    @property
    def manager(self) -> JobManager:
        return self.component.manager

    async def create(self, org: str, name: str, *, pool: str = "",
                     priority: int = P.JOB_PRIORITY_UNSPECIFIED, nodes: int = 1) -> job_pb2.Job:
        spec = job_pb2.JobSpec(base_model="org/model", dataset="data")
        spec.hardware.pool = pool
        if nodes > 1:
            spec.hardware.node_count = nodes
        return await self.manager.create(job_service_pb2.CreateJobRequest(
            organization=org, name=name, spec=spec, priority=job_pb2.JobPriority.ValueType(priority)))

    async def beat(self, worker: str, *, pool: str = "", through_nats: bool = False,
                   multi_node: bool = False) -> None:
        """An IDLE CPU worker's heartbeat; through NATS (then waited for) or handed to the manager as the
        heartbeat subscription does (returns once its scheduler pass is done)."""
        heartbeat = events_pb2.WorkerHeartbeat(worker_id=worker, hostname="test", gpu_type="cpu",
                                               state=W.WORKER_STATE_IDLE, interval_seconds=2.0, pool=pool,
                                               multi_node=multi_node)
        heartbeat.started_at.CopyFrom(to_timestamp(utcnow()))
        if through_nats:
            await self.nc.publish(subjects.WORKER_HEARTBEATS, heartbeat.SerializeToString())
        else:
            await self.manager.record_heartbeat(heartbeat)

    async def pull(self, worker: str, pool: str = "") -> str:
        """Takes the next assignment of the worker's routes (its pool's first) as a worker does, acks it and
        reports PREPARING; returns the job id."""
        routes = [subjects.pooled_route(pool, "cpu"), subjects.ANY_ROUTE] if pool else [subjects.ANY_ROUTE]
        deadline = asyncio.get_running_loop().time() + 10
        while asyncio.get_running_loop().time() < deadline:
            for route in routes:
                durable = await ensure_route_consumer(self.js, route, 60.0, 5)
                sub = await self.js.pull_subscribe(subjects.route_subject(route), durable=durable,
                                                   stream=subjects.STREAM_WORK)
                try:
                    messages = await sub.fetch(1, timeout=0.3)
                except TimeoutError:
                    continue
                finally:
                    await sub.unsubscribe()
                msg = messages[0]
                assignment = events_pb2.JobAssignment.FromString(msg.data)
                await msg.ack()
                await self.send(assignment.job_id, worker, msg.metadata.num_delivered,
                                U.WORKER_UPDATE_KIND_PREPARING)
                await self.until_state(assignment.job_id, S.JOB_STATE_PREPARING)
                return assignment.job_id
        raise AssertionError(f"worker {worker} found no assignment in time")

    async def nothing_to_pull(self, route: str = subjects.ANY_ROUTE) -> bool:
        durable = await ensure_route_consumer(self.js, route, 60.0, 5)
        info = await self.js.consumer_info(subjects.STREAM_WORK, durable)
        return info.num_pending == 0

    async def finish(self, job_id: str) -> str:
        """Reports the job SUCCEEDED from the worker that holds it; returns that worker's id."""
        job = await self.manager.get(self.org_of(job_id), job_id)
        await self.send(job_id, job.worker_id, job.attempt, U.WORKER_UPDATE_KIND_SUCCEEDED,
                        adapter_uri=self.manager.store.uri(f"jobs/{job.organization}/{job_id}/adapter"))
        await self.until_state(job_id, S.JOB_STATE_SUCCEEDED)
        return job.worker_id

    def org_of(self, job_id: str) -> str:
        return str(self.started[job_id])

    async def send(self, job_id: str, worker: str, attempt: int, kind: events_pb2.WorkerUpdateKind.ValueType,
                   *, adapter_uri: str = "") -> events_pb2.WorkerJobUpdate:
        update = events_pb2.WorkerJobUpdate(event_id=new_id("evt"), job_id=job_id, worker_id=worker,
                                            attempt=attempt, kind=kind)
        if adapter_uri:
            update.output.adapter_uri = adapter_uri
        await publish(self.js, subjects.worker_status(job_id), update, new_id("msg"))
        return update

    async def until_state(self, job_id: str, state: int) -> None:
        deadline = asyncio.get_running_loop().time() + 10
        while (await self.manager.get(self.org_of(job_id), job_id)).state != state:
            assert asyncio.get_running_loop().time() < deadline, f"job {job_id} never reached {state}"
            await asyncio.sleep(0.02)


async def start_fleet(kit_settings: KitSettings, **overrides: object) -> AsyncIterator[Fleet]:
    settings = JobSettings(**{**kit_settings.model_dump(), "scheduler": "fair", "max_queued_jobs_per_org": 0,
                              "max_running_jobs_per_org": 0, "worker_check_interval_s": 3600.0, **overrides})
    built: list[JobsComponent] = []

    def factory(runtime: Runtime) -> JobsComponent:
        built.append(JobsComponent(runtime, settings))
        return built[0]

    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    server = asyncio.create_task(serve([factory], kit_settings, name="jobs-fair-queue-test",
                                       on_ready=ready.set_result, stop=stop))
    await asyncio.wait_for(ready, 15)
    datasets = Datasets()
    datasets.add("data", validation=False)
    built[0].manager.datasets = datasets
    built[0].manager.hardware = None  # no estimation service here: the fit check is not what is tested
    nc = await connect(kit_settings.nats_url, "test-worker")
    fleet = Fleet(built[0], nc, nc.jetstream())
    real_create = fleet.create

    async def create(org: str, name: str, **kwargs: object) -> job_pb2.Job:
        job = await real_create(org, name, **kwargs)  # type: ignore[arg-type]
        fleet.started[job.id] = org
        return job

    fleet.create = create  # type: ignore[method-assign]
    try:
        yield fleet
    finally:
        with contextlib.suppress(Exception):
            await nc.drain()
        stop.set()
        await asyncio.wait_for(server, 15)


@pytest.fixture
async def fleet(kit_settings: KitSettings) -> AsyncIterator[Fleet]:
    async for stack in start_fleet(kit_settings):
        yield stack


@pytest.fixture
async def weighted(kit_settings: KitSettings) -> AsyncIterator[Fleet]:
    async for stack in start_fleet(kit_settings, org_weights="org-a=2"):
        yield stack


async def test_one_organizations_queue_does_not_keep_anothers_job_waiting(fleet: Fleet) -> None:
    await fleet.beat("w1")
    await fleet.beat("w2")
    a = [await fleet.create("org-a", f"a{i}") for i in range(6)]
    # Two free workers: two jobs go to the queue, the rest are held with the reason.
    assert [job.status_message for job in a[:2]] == ["", ""]
    assert a[2].status_message == ("waiting for a free worker: all 2 workers that would take it are busy; 2 "
                                   "jobs ahead of it")
    b = await fleet.create("org-b", "b0")
    assert b.status_message.startswith("waiting for a free worker: all 2 workers that would take it are busy")
    pulled = [await fleet.pull("w1"), await fleet.pull("w2")]
    assert pulled == [a[0].id, a[1].id]
    assert await fleet.nothing_to_pull()  # the queue holds no more than the workers can start

    await fleet.finish(a[0].id)  # w1 is free: org-b has nothing running, org-a one job
    pulled.append(await fleet.pull("w1"))
    await fleet.finish(a[1].id)
    pulled.append(await fleet.pull("w2"))
    assert pulled == [a[0].id, a[1].id, b.id, a[2].id]  # before 4 of org-a's 6 jobs
    assert (await fleet.manager.get("org-a", a[3].id)).state == S.JOB_STATE_QUEUED


async def test_weights_share_the_workers_and_priorities_order_an_organizations_jobs(weighted: Fleet) -> None:
    fleet = weighted
    a = [await fleet.create("org-a", f"a{i}") for i in range(6)]
    b = [await fleet.create("org-b", f"b{i}") for i in range(6)]
    urgent = await fleet.create("org-b", "b-urgent", priority=P.JOB_PRIORITY_HIGH)
    later = await fleet.create("org-b", "b-later", priority=P.JOB_PRIORITY_LOW)
    assert (urgent.priority, later.priority, b[0].priority) == (
        P.JOB_PRIORITY_HIGH, P.JOB_PRIORITY_LOW, P.JOB_PRIORITY_NORMAL)
    assert a[0].status_message.startswith("waiting for a worker; none seen ")
    # Three workers come up (the first heartbeat of each dispatches at once): org-a weighs 2, org-b 1.
    for worker in ("w1", "w2", "w3"):
        await fleet.beat(worker, through_nats=True)
    pulled = [await fleet.pull(worker) for worker in ("w1", "w2", "w3")]
    assert pulled == [a[0].id, urgent.id, a[1].id]
    for _ in range(3):
        worker = await fleet.finish(pulled[-3])  # that worker is free: it pulls what goes next
        pulled.append(await fleet.pull(worker))
    # org-a runs two for each one of org-b's; org-b's own jobs go by priority, then age.
    assert pulled == [a[0].id, urgent.id, a[1].id, a[2].id, b[0].id, a[3].id]
    assert (await fleet.manager.get("org-b", later.id)).state == S.JOB_STATE_QUEUED


async def test_each_job_lands_in_its_own_pool_and_one_for_a_pool_without_workers_waits(fleet: Fleet) -> None:
    for_a = await fleet.create("org-a", "for-a", pool="cpu-a")
    for_b = await fleet.create("org-a", "for-b", pool="cpu-b")
    for_c = await fleet.create("org-b", "for-c", pool="cpu-c")
    # Two workers announce their pools; the first heartbeat of each dispatches its pool's job at once.
    await fleet.beat("wa", pool="cpu-a", through_nats=True)
    await fleet.beat("wb", pool="cpu-b", through_nats=True)
    assert await fleet.pull("wb", pool="cpu-b") == for_b.id
    assert await fleet.pull("wa", pool="cpu-a") == for_a.id
    job = await fleet.manager.get("org-b", for_c.id)
    assert job.state == S.JOB_STATE_QUEUED
    assert job.status_message.startswith("waiting for a worker in pool cpu-c; none seen ")
    pools = {p.name: p for p in await fleet.manager.list_pools("org-a")}
    assert set(pools) == {"cpu-a", "cpu-b", "cpu-c"}
    cpu_a, cpu_c = pools["cpu-a"], pools["cpu-c"]
    assert (cpu_a.workers_alive, cpu_a.workers_busy, cpu_a.running_jobs, cpu_a.queued_jobs) == (1, 1, 1, 0)
    assert (cpu_c.workers_alive, cpu_c.queued_jobs, cpu_c.queued_jobs_own) == (0, 1, 0)
    assert cpu_c.gpu_type == "cpu"
    assert [(p.queued_jobs, p.queued_jobs_own) for p in await fleet.manager.list_pools("org-b")
            if p.name == "cpu-c"] == [(1, 1)]


async def test_a_job_on_several_nodes_waits_for_a_worker_that_runs_them(fleet: Fleet) -> None:
    """A worker without a Ray cluster is never handed a multi-node job, however idle; one with it is."""
    await fleet.beat("plain")
    job = await fleet.create("org-a", "two-nodes", nodes=2)
    assert await fleet.nothing_to_pull()
    waiting = await fleet.manager.get("org-a", job.id)
    assert waiting.status_message.startswith(
        "waiting for a worker that runs jobs on 2 nodes (TUNEFORGE_RAY_ADDRESS); none seen "), waiting
    await fleet.beat("ray-driver", multi_node=True)
    assert await fleet.pull("ray-driver") == job.id
    workers = {w.id: w for w in (await fleet.manager.list_workers("org-a", 10, ""))[0]}
    assert (workers["plain"].multi_node, workers["ray-driver"].multi_node) == (False, True)
