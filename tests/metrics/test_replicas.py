"""Two replicas of the metrics service on one nats-server and one database, as the production overlay
runs them (deploy/k8s/overlays/production: metrics x 2): a follower on either gets every point of a job
exactly once and in order, whichever replica stored it."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from tuneforge.v1 import metrics_service_pb2

from services.kit.lease import Lease
from services.metrics.ingest import INGEST_LEASE
from services.metrics.settings import MetricsSettings
from tests.metrics.conftest import ORG, point, serving, wait_until
from tuneforge_core import subjects
from tuneforge_core.nats import connect, ensure_pull_consumer
from tuneforge_core.settings import KitSettings

REPORTS = 300


@pytest.mark.parametrize("early", [False, True], ids=["stored-only", "early"])
async def test_a_follower_gets_every_point_once_in_order_with_two_replicas_ingesting(
        kit_settings: KitSettings, early: bool) -> None:
    settings = MetricsSettings(follow_grace_s=1.0, job_poll_interval_s=5.0, ingest_process=False,
                               live_from_reports=early)
    async with contextlib.AsyncExitStack() as replicas:
        a = await replicas.enter_async_context(serving(kit_settings, settings))
        b = await replicas.enter_async_context(serving(kit_settings, settings))
        job = a.jobs.add()
        b.jobs.jobs[job.id] = job
        await a.report(job.id, [point(0)])
        assert len(await a.wait_stored(job.id, 1)) == 1
        got_a: list = []
        got_b: list = []
        for stack, into in ((a, got_a), (b, got_b)):
            stack.collect(metrics_service_pb2.StreamMetricsRequest(organization=ORG, job_id=job.id,
                                                                    follow=True), into)
        await wait_until(lambda: len(got_a) == 1 and len(got_b) == 1)
        # As a worker reports: one report a step, each published once the last was accepted.
        for step in range(1, REPORTS + 1):
            await a.report(job.id, [point(step)])
        assert len(await a.wait_stored(job.id, REPORTS + 1, timeout_s=30)) == REPORTS + 1
        with contextlib.suppress(AssertionError):
            await wait_until(lambda: len(got_a) > REPORTS and len(got_b) > REPORTS, timeout_s=5)
        await asyncio.sleep(0.5)  # anything sent twice
        for got in (got_a, got_b):
            assert [p.step for p in got] == list(range(REPORTS + 1))


async def test_when_the_ingesting_replica_stops_the_other_takes_over_at_once(
        kit_settings: KitSettings) -> None:
    """The replica that ingests hands the lease over as it stops (not after the lease's TTL): the other
    stores what comes next, and its follower misses nothing. A replica starts its preparing processes only
    once it ingests."""
    settings = MetricsSettings(follow_grace_s=1.0, job_poll_interval_s=5.0, ingest_process=False,
                               ingest_lease_s=30, ingest_processes=1)
    async with contextlib.AsyncExitStack() as first:
        a = await first.enter_async_context(serving(kit_settings, settings))
        job = a.jobs.add()
        await a.report(job.id, [point(0)])
        assert len(await a.wait_stored(job.id, 1)) == 1  # a holds the lease: b is not started yet
        async with serving(kit_settings, settings) as b:
            b.jobs.jobs[job.id] = job
            got: list = []
            b.collect(metrics_service_pb2.StreamMetricsRequest(organization=ORG, job_id=job.id, follow=True),
                      got)
            await wait_until(lambda: len(got) == 1)
            for step in range(1, 51):
                await b.report(job.id, [point(step)])
            await b.wait_stored(job.id, 51)
            assert a.component.preparing.started and not b.component.preparing.started
            await first.aclose()  # a stops
            started = asyncio.get_running_loop().time()
            for step in range(51, 101):
                await b.report(job.id, [point(step)])
            assert len(await b.wait_stored(job.id, 101, timeout_s=30)) == 101
            # b took it within a quarter of the TTL (how often a waiting replica tries), not the TTL.
            assert asyncio.get_running_loop().time() - started < 30 / 4 + 8
            assert b.component.preparing.started
            await wait_until(lambda: len(got) == 101)
            assert [p.step for p in got] == list(range(101))


@pytest.mark.parametrize("early", [False, True], ids=["stored-only", "early"])
async def test_what_a_holder_that_died_had_fetched_is_stored_before_what_came_after_it(
        kit_settings: KitSettings, early: bool) -> None:
    """A holder of the ingest lease dies with reports fetched and not acked. The next holder stores them
    first, not after the ack wait (30 s) behind what was published after them, and a follower gets every
    point in order."""
    settings = MetricsSettings(follow_grace_s=1.0, job_poll_interval_s=5.0, ingest_process=False,
                               live_from_reports=early, ingest_lease_s=4)
    nc = await connect(kit_settings.nats_url, "test-dead-holder")
    js = nc.jetstream()
    try:
        # The holder that dies: it takes the lease (never renewed: gone 6 s on) and the consumer's first
        # reports, which it never acks.
        assert await Lease(js, INGEST_LEASE, "dead", 6).acquire(asyncio.Event())
        async with serving(kit_settings, settings) as b:  # waits for the lease
            await ensure_pull_consumer(js, subjects.STREAM_WORKER, subjects.METRICS_INGEST_CONSUMER,
                                       subjects.ALL_WORKER_METRICS, ack_wait_s=30.0, max_ack_pending=max(
                                           1000, settings.ingest_batch * settings.ingest_in_flight))
            job = b.jobs.add()
            got: list = []
            b.collect(metrics_service_pb2.StreamMetricsRequest(organization=ORG, job_id=job.id, follow=True),
                      got)
            for step in range(10):
                await b.report(job.id, [point(step)])
            sub = await js.pull_subscribe(subjects.ALL_WORKER_METRICS, stream=subjects.STREAM_WORKER,
                                          durable=subjects.METRICS_INGEST_CONSUMER)
            fetched: list = []
            while len(fetched) < 10:
                fetched += await sub.fetch(10 - len(fetched), timeout=5)
            await sub.unsubscribe()
            assert not await b.list_all(job.id)  # b waits for the lease
            for step in range(10, 20):
                await b.report(job.id, [point(step)])
            # b takes over once the lease expires: within 6 + 1 s, well before the ack wait.
            assert [p.step for p in await b.wait_stored(job.id, 20, timeout_s=20)] == list(range(20))
            await wait_until(lambda: len(got) >= 20, timeout_s=5)
            await asyncio.sleep(0.5)  # anything sent twice
            assert [p.step for p in got] == list(range(20))
    finally:
        await nc.close()
