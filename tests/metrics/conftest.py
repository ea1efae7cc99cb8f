"""The metrics service served for real (gRPC on port 0, nats-server, SQLite) beside a fake JobService.

The fake answers GetJob from a dict; tests move a job along by changing the dict and publishing the
JobChanged the jobs service's outbox would publish.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc
import grpc.aio
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import (
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
    metrics_pb2,
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)

from services.kit.runtime import Component, Registration, Runtime, serve
from services.metrics.component import MetricsComponent
from services.metrics.settings import MetricsSettings
from tests.auth import service_credentials
from tuneforge_core import subjects
from tuneforge_core.errors import FieldViolation, InvalidArgument, not_found
from tuneforge_core.ids import new_id
from tuneforge_core.nats import connect, publish
from tuneforge_core.settings import KitSettings

ORG = "acme"
TRAIN = metrics_pb2.METRIC_KIND_TRAIN
EVAL = metrics_pb2.METRIC_KIND_EVAL
SYSTEM = metrics_pb2.METRIC_KIND_SYSTEM


class FakeJobService(job_service_pb2_grpc.JobServiceServicer):
    """GetJob from a dict, with the real service's error shapes."""

    def __init__(self) -> None:
        self.jobs: dict[str, job_pb2.Job] = {}
        self.calls = 0

    def add(self, state: int = job_pb2.JOB_STATE_RUNNING, organization: str = ORG,
            name: str = "") -> job_pb2.Job:
        job_id = new_id("job")
        job = job_pb2.Job(id=job_id, organization=organization, name=name or job_id, state=state)
        self.jobs[job_id] = job
        return job

    async def GetJob(self, request: job_service_pb2.GetJobRequest,
                     context: grpc.aio.ServicerContext) -> job_service_pb2.GetJobResponse:
        self.calls += 1
        if request.job.startswith("BAD"):
            raise InvalidArgument("job: must be an id or a name",
                                  violations=[FieldViolation("job", "must be an id or a name")])
        for job in self.jobs.values():
            if job.organization == request.organization and request.job in (job.id, job.name):
                return job_service_pb2.GetJobResponse(job=job)
        raise not_found("job", request.job, request.organization)


class FakeJobsComponent(Component):
    def __init__(self, runtime: Runtime, servicer: FakeJobService) -> None:
        super().__init__(runtime)
        self.servicer = servicer

    def registrations(self) -> Sequence[Registration]:
        return [Registration("tuneforge.v1.JobService", self.servicer,
                             job_service_pb2_grpc.add_JobServiceServicer_to_server)]


def point(step: int, kind: int = TRAIN, loss: float | None = None,
          attempt: int = 1) -> metrics_pb2.MetricPoint:
    p = metrics_pb2.MetricPoint(kind=kind, step=step, total_steps=1000, attempt=attempt)
    p.loss = float(step) if loss is None else loss
    return p


@dataclass
class Stack:
    """The served metrics service, its fake jobs service, and a worker's NATS connection."""

    metrics: metrics_service_pb2_grpc.MetricsServiceStub
    jobs: FakeJobService
    component: MetricsComponent
    nc: NATS
    js: JetStreamContext
    tasks: list[asyncio.Task[object]] = field(default_factory=list)

    async def report(self, job_id: str, points: Sequence[metrics_pb2.MetricPoint],
                     event_id: str = "") -> str:
        """Publishes MetricsReported as a worker does: to JetStream, Nats-Msg-Id = event id."""
        event_id = event_id or new_id("evt")
        await publish(self.js, subjects.worker_metrics(job_id),
                      events_pb2.MetricsReported(event_id=event_id, points=points), event_id)
        return event_id

    async def report_logs(self, job_id: str, entries: Sequence[metrics_pb2.LogEntry]) -> None:
        event_id = new_id("evt")
        await publish(self.js, subjects.worker_logs(job_id),
                      events_pb2.LogsReported(event_id=event_id, entries=entries), event_id)

    async def change_state(self, job: job_pb2.Job, state: int) -> None:
        """What the jobs service does on a state change: commit, then JobChanged through its outbox."""
        previous = job.state
        job.state = state
        if state in (job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED):
            job.end_time.GetCurrentTime()
        self.jobs.jobs[job.id] = job
        event_id = new_id("evt")
        await publish(self.js, subjects.job_events(job.id),
                      events_pb2.JobChanged(event_id=event_id, previous_state=previous, job=job), event_id)

    async def list_all(self, job_id: str, kinds: Sequence[int] = ()) -> list[metrics_pb2.MetricPoint]:
        response = await self.metrics.ListMetrics(metrics_service_pb2.ListMetricsRequest(
            organization=ORG, job_id=job_id, kinds=kinds, page_size=10_000))
        return list(response.points)

    async def wait_stored(self, job_id: str, count: int,
                          timeout_s: float = 10.0) -> list[metrics_pb2.MetricPoint]:
        """Waits until the ingest consumer has stored `count` points of the job."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            points = await self.list_all(job_id)
            if len(points) >= count or asyncio.get_running_loop().time() > deadline:
                return points
            await asyncio.sleep(0.05)

    def collect(self, request: metrics_service_pb2.StreamMetricsRequest,
                into: list[metrics_pb2.MetricPoint]) -> asyncio.Task[object]:
        """Runs StreamMetrics in the background, appending each point to `into`."""

        async def run() -> None:
            async for response in self.metrics.StreamMetrics(request):
                into.append(response.point)

        task: asyncio.Task[object] = asyncio.create_task(run())
        self.tasks.append(task)
        return task


async def wait_until(predicate: object, timeout_s: float = 10.0) -> None:
    assert callable(predicate)
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


@pytest.fixture
async def stack(kit_settings: KitSettings) -> AsyncIterator[Stack]:
    """The service with its ingest in the serving process (MetricsSettings.ingest_process off): tests that
    reach into the ingest, or wait for it a fixed moment, are not slowed or raced by a second process."""
    async with serving(kit_settings, MetricsSettings(follow_grace_s=1.0, job_poll_interval_s=5.0,
                                                     ingest_process=False)) as running:
        yield running


@pytest.fixture
async def process_stack(kit_settings: KitSettings) -> AsyncIterator[Stack]:
    """The service as deployed: its ingest in a process of its own (services.metrics.ingester)."""
    async with serving(kit_settings, MetricsSettings(follow_grace_s=1.0, job_poll_interval_s=5.0,
                                                     ingest_process=True)) as running:
        yield running


@contextlib.asynccontextmanager
async def serving(kit_settings: KitSettings, settings: MetricsSettings) -> AsyncIterator[Stack]:
    fake = FakeJobService()
    components: list[MetricsComponent] = []

    def metrics_factory(runtime: Runtime) -> MetricsComponent:
        components.append(MetricsComponent(runtime, settings))
        return components[0]

    loop = asyncio.get_running_loop()
    ready: asyncio.Future[str] = loop.create_future()
    stop = asyncio.Event()
    server = asyncio.create_task(serve(
        [metrics_factory, lambda runtime: FakeJobsComponent(runtime, fake)], kit_settings,
        name="metrics-test", on_ready=ready.set_result, stop=stop))
    address = await asyncio.wait_for(ready, 15)
    nc = await connect(kit_settings.nats_url, "test-worker")
    channel = grpc.aio.insecure_channel(address, interceptors=service_credentials())
    stack = Stack(metrics_service_pb2_grpc.MetricsServiceStub(channel), fake, components[0], nc,
                  nc.jetstream())
    try:
        yield stack
    finally:
        for task in stack.tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await task
        await channel.close()
        await nc.drain()
        stop.set()
        await asyncio.wait_for(server, 15)
