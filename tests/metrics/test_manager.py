"""The follow loop's fallbacks, with the manager's two ports played by in-memory fakes (no NATS, no gRPC)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from tuneforge.v1 import job_pb2, metrics_pb2

from services.kit.db import Database
from services.metrics.component import MIGRATIONS_DIR
from services.metrics.live import Deliver, LiveMessage
from services.metrics.manager import MetricsManager
from services.metrics.settings import MetricsSettings
from tests.metrics.conftest import point
from tuneforge_core.errors import InvalidArgument, Unavailable, not_found


class DictJobs:
    def __init__(self) -> None:
        self.jobs: dict[str, job_pb2.Job] = {}
        self.unavailable = False
        self.calls = 0

    async def get_job(self, organization: str, job: str) -> job_pb2.Job:
        self.calls += 1
        if self.unavailable:
            raise Unavailable("jobs service down")
        if job not in self.jobs:
            raise not_found("job", job, organization)
        return self.jobs[job]


class MemoryFeed:
    """Delivers what is published to the subscribers of that subject, like core NATS (to listeners from
    within `publish`, as NatsLiveFeed does for its own process)."""

    def __init__(self) -> None:
        self.subscribers: list[tuple[set[str], Deliver]] = []

    async def publish(self, subject: str, payload: bytes) -> None:
        for subjects, deliver in list(self.subscribers):
            if subject in subjects:
                deliver(subject, payload)

    @contextlib.asynccontextmanager
    async def subscribe(self, subjects: Sequence[str]) -> AsyncIterator[asyncio.Queue[LiveMessage]]:
        queue: asyncio.Queue[LiveMessage] = asyncio.Queue()
        async with self.listen(subjects, lambda subject, data: queue.put_nowait((subject, data))):
            yield queue

    @contextlib.asynccontextmanager
    async def listen(self, subjects: Sequence[str], deliver: Deliver) -> AsyncIterator[None]:
        entry = (set(subjects), deliver)
        self.subscribers.append(entry)
        try:
            yield
        finally:
            self.subscribers.remove(entry)


@pytest.fixture
def parts(tmp_path: Path) -> tuple[MetricsManager, DictJobs, MemoryFeed]:
    db = Database(f"sqlite:///{tmp_path / 'metrics.db'}", "metrics")
    db.migrate(MIGRATIONS_DIR)
    jobs, feed = DictJobs(), MemoryFeed()
    settings = MetricsSettings(follow_grace_s=0.1, job_poll_interval_s=0.2)
    return MetricsManager(db, jobs, feed, settings), jobs, feed


async def collect(stream: AsyncIterator[metrics_pb2.MetricPoint]) -> list[int]:
    return [p.step async for p in stream]


async def test_a_lost_job_changed_is_made_up_for_by_polling(
        parts: tuple[MetricsManager, DictJobs, MemoryFeed]) -> None:
    manager, jobs, feed = parts
    jobs.jobs["job_a"] = job_pb2.Job(id="job_a", organization="acme", state=job_pb2.JOB_STATE_RUNNING)
    await manager.record_metrics("job_a", [point(1)])
    task = asyncio.create_task(collect(manager.stream_metrics("acme", "job_a", [], 0, True)))
    await asyncio.sleep(0.1)
    await manager.record_metrics("job_a", [point(2)])
    # The jobs service is briefly down: the stream keeps following instead of failing.
    jobs.unavailable = True
    await asyncio.sleep(0.5)
    assert not task.done()
    jobs.unavailable = False
    jobs.jobs["job_a"] = job_pb2.Job(id="job_a", organization="acme", state=job_pb2.JOB_STATE_SUCCEEDED)
    assert await asyncio.wait_for(task, 3) == [1, 2]  # ended by a poll: no JobChanged was published
    assert feed.subscribers == []


async def test_points_of_another_job_on_the_subject_are_refused(
        parts: tuple[MetricsManager, DictJobs, MemoryFeed]) -> None:
    manager, _, _ = parts
    stray = point(1)
    stray.job_id = "job_b"
    with pytest.raises(InvalidArgument):
        await manager.record_metrics("job_a", [stray])
    # Points without a kind or with a negative step are skipped, the rest stored.
    assert await manager.record_metrics("job_a", [point(1, kind=0), point(-1), point(3)]) == 1
