"""The ingest in a process of its own (services.metrics.ingester, MetricsSettings.ingest_process): what it
stores is followed and listed as when the serving process stores it, it is started again when it dies, and
it ends with the service that started it, however that ends."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time
from multiprocessing.queues import Queue
from urllib.parse import urlsplit

import psutil
from tuneforge.v1 import metrics_pb2, metrics_service_pb2

from services.metrics.ingester import IngestProcess
from services.metrics.live import ORIGIN_HEADER
from services.metrics.settings import MetricsSettings
from tests.metrics.conftest import ORG, Stack, point, serving, wait_until
from tuneforge_core import subjects
from tuneforge_core.nats import connect, ensure_streams
from tuneforge_core.settings import KitSettings

# The ingest process imports the service's modules before it consumes anything: a second or two here, more
# on a loaded machine.
STARTED_S = 60.0


async def test_reports_are_stored_by_the_ingest_process_and_followed_exactly_once(
        process_stack: Stack) -> None:
    stack = process_stack
    ingester = stack.component.ingester
    assert ingester is not None and ingester.process is not None
    assert ingester.process.pid != os.getpid()
    job = stack.jobs.add()
    origins: list[str] = []

    async def announced(msg: object) -> None:
        origins.append((getattr(msg, "headers", None) or {}).get(ORIGIN_HEADER, ""))

    sub = await stack.nc.subscribe(subjects.live_metrics(job.id), cb=announced)
    got: list[metrics_pb2.MetricPoint] = []
    stack.collect(metrics_service_pb2.StreamMetricsRequest(organization=ORG, job_id=job.id, follow=True), got)
    for step in range(1, 21):
        await stack.report(job.id, [point(step)])
    await stack.report(job.id, [point(5)])  # a repeat: stored once, sent once
    stored = await stack.wait_stored(job.id, 20, timeout_s=STARTED_S)
    assert [p.step for p in stored] == list(range(1, 21))
    await wait_until(lambda: len(got) >= 20, timeout_s=STARTED_S)
    await asyncio.sleep(0.2)
    assert [p.step for p in got] == list(range(1, 21))
    # Announced by the ingest process' feed, not by the serving process' own.
    assert origins and all(origin and origin != stack.component.manager.live.origin  # type: ignore[attr-defined]
                           for origin in origins)
    await sub.unsubscribe()


async def test_an_ingest_process_that_dies_is_started_again_and_stores_what_was_reported(
        kit_settings: KitSettings) -> None:
    """The service releases the ingest lease the killed process held: the next one takes it at once, not
    after the lease's TTL (a minute here)."""
    settings = MetricsSettings(follow_grace_s=1.0, job_poll_interval_s=5.0, ingest_process=True,
                               ingest_lease_s=60)
    async with serving(kit_settings, settings) as stack:
        ingester = stack.component.ingester
        assert ingester is not None
        job = stack.jobs.add()
        await stack.report(job.id, [point(1)])
        assert len(await stack.wait_stored(job.id, 1, timeout_s=STARTED_S)) == 1
        first = ingester.process
        assert first is not None and first.pid is not None
        os.kill(first.pid, signal.SIGKILL)
        killed = time.monotonic()
        for step in range(2, 11):  # while it is down, and while the next one starts
            await stack.report(job.id, [point(step)])
        stored = await stack.wait_stored(job.id, 10, timeout_s=STARTED_S)
        assert [p.step for p in stored] == list(range(1, 11))
        assert time.monotonic() - killed < 40  # the lease's TTL is 60 s
        assert ingester.starts == 2
        assert ingester.process is not None and ingester.process.pid != first.pid


async def test_the_ingest_process_ends_when_its_service_stops(kit_settings: KitSettings) -> None:
    async with serving(kit_settings, MetricsSettings(ingest_process=True)) as stack:
        ingester = stack.component.ingester
        assert ingester is not None and ingester.process is not None
        process = ingester.process
        job = stack.jobs.add()
        await stack.report(job.id, [point(1)])
        await stack.wait_stored(job.id, 1, timeout_s=STARTED_S)  # it runs
    assert process.exitcode == 0  # it ended by itself, when told, and was not killed


def _start_and_wait(kit: KitSettings, pids: Queue[int]) -> None:
    """A stand-in service (in a process of its own): starts the ingest process and waits to be killed."""

    async def run() -> None:
        nc = await connect(kit.nats_url, "stand-in")
        await ensure_streams(nc.jetstream())  # as a service's runtime does before its components start
        ingester = IngestProcess(kit, MetricsSettings(ingest_processes=1), nc.jetstream())
        ingester.start()
        await wait_until(lambda: ingester.process is not None and ingester.process.pid is not None,
                         timeout_s=STARTED_S)
        assert ingester.process is not None and ingester.process.pid is not None
        pids.put(ingester.process.pid)
        await asyncio.Event().wait()

    asyncio.run(run())


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_the_ingest_process_ends_when_its_service_is_killed(kit_settings: KitSettings) -> None:
    context = multiprocessing.get_context("spawn")
    pids: Queue[int] = context.Queue()
    service = context.Process(target=_start_and_wait, args=(kit_settings, pids))
    service.start()
    try:
        child = pids.get(timeout=STARTED_S)
        nats_port = urlsplit(kit_settings.nats_url).port
        deadline = time.monotonic() + STARTED_S
        while not any(c.raddr and c.raddr.port == nats_port for c in psutil.Process(child).net_connections()):
            assert time.monotonic() < deadline, "the ingest process did not connect to NATS"
            time.sleep(0.1)  # until it is up, past its imports (NoSuchProcess: it died, and the test fails)
        while not (preparing := psutil.Process(child).children()):
            assert time.monotonic() < deadline, "the ingest process started no preparing process"
            time.sleep(0.1)
        os.kill(service.pid, signal.SIGKILL)  # type: ignore[arg-type]
        service.join(10)
        deadline = time.monotonic() + STARTED_S
        while not _gone(child):
            assert time.monotonic() < deadline, "the ingest process outlived its service"
            time.sleep(0.1)
        while not all(_gone(p.pid) for p in preparing):
            assert time.monotonic() < deadline, "a preparing process outlived the ingest process"
            time.sleep(0.1)
    finally:
        if service.is_alive():
            service.kill()
        service.join()



async def test_with_postgresql_the_ingest_has_a_process_of_its_own_by_default(
        kit_settings: KitSettings, postgres_url: str) -> None:
    kit = kit_settings.model_copy(update={"database_url": postgres_url})
    async with serving(kit, MetricsSettings()) as stack:
        ingester = stack.component.ingester
        assert ingester is not None and ingester.process is not None
        job = stack.jobs.add()
        for step in range(1, 6):
            await stack.report(job.id, [point(step)])
            if step == 3:  # a worker's broken report is given up on, alone; the rest are stored
                await stack.js.publish(subjects.worker_metrics(job.id), b"\xff not a MetricsReported")
        await stack.report_logs(job.id, [metrics_pb2.LogEntry(sequence=1, message="line 1", attempt=1,
                                                               level=metrics_pb2.LOG_LEVEL_INFO)])
        stored = await stack.wait_stored(job.id, 5, timeout_s=STARTED_S)
        assert [p.step for p in stored] == [1, 2, 3, 4, 5]
        lines: list[str] = []
        deadline = time.monotonic() + STARTED_S
        while not lines and time.monotonic() < deadline:  # logs are the child's other consumer
            lines = [r.entry.message async for r in stack.metrics.StreamLogs(
                metrics_service_pb2.StreamLogsRequest(organization=ORG, job_id=job.id))]
            await asyncio.sleep(0.05)
        assert lines == ["line 1"]
        rss_mb = psutil.Process(ingester.process.pid).memory_info().rss / 2**20
        print(f"ingest process resident memory: {rss_mb:.0f} MB")


def test_the_ingest_has_a_process_of_its_own_by_default_only_with_postgresql() -> None:
    assert MetricsSettings().ingest_in_own_process("postgresql")
    assert not MetricsSettings().ingest_in_own_process("sqlite")
    assert MetricsSettings(ingest_process=True).ingest_in_own_process("sqlite")
    assert not MetricsSettings(ingest_process=False).ingest_in_own_process("postgresql")
