"""The metrics service as a kit Component: its servicer, its database, its two ingest consumers, and a
consumer of JobChanged that deletes the points and log entries of a job DeleteJob deleted."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

from nats.aio.msg import Msg
from tuneforge.events.v1 import events_pb2

from services.kit.consumer import PermanentError, consume
from services.kit.db import Database
from services.kit.runtime import Component, Registration, Runtime
from services.kit.tasks import cancel_and_wait
from services.metrics.ingest import HANDOVER_S, IngestHandlers, preparing_processes, run_ingest
from services.metrics.ingester import IngestProcess
from services.metrics.jobs_client import JobsClient
from services.metrics.live import NatsLiveFeed
from services.metrics.manager import MetricsManager
from services.metrics.repository import StorageForm
from services.metrics.servicer import MetricsServicer
from services.metrics.servicer import add_to_server as add_metrics_servicer
from services.metrics.settings import MetricsSettings
from tuneforge_core import subjects

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
SERVICE_NAME = "tuneforge.v1.MetricsService"


class MetricsComponent(Component):
    def __init__(self, runtime: Runtime, settings: MetricsSettings | None = None) -> None:
        super().__init__(runtime)
        self.settings = settings or MetricsSettings()
        self.db = Database(runtime.settings.database_url_for("metrics"), "metrics",
                           runtime.settings.db_workers)
        # Before the server takes calls: a request must never meet a missing table.
        self.db.migrate(MIGRATIONS_DIR)
        jobs_address = runtime.settings.jobs_address
        jobs = JobsClient(lambda: runtime.channel(jobs_address), timeout_s=self.settings.jobs_timeout_s)
        self.preparing = preparing_processes(self.settings, runtime.settings)
        self.manager = MetricsManager(self.db, jobs, NatsLiveFeed(runtime.nc), self.settings,
                                      preparing=self.preparing)
        self.handlers = IngestHandlers(self.manager)
        self.ingester: IngestProcess | None = None
        self._stop_ingest = asyncio.Event()
        self._ingesting: asyncio.Task[None] | None = None

    def registrations(self) -> Sequence[Registration]:
        # Not the generated add function: the streams write pre-serialized bytes (see the servicer).
        return [Registration(SERVICE_NAME, MetricsServicer(self.manager), add_metrics_servicer)]

    async def start(self) -> None:
        js = self.runtime.js
        self.spawn(consume(js, stream=subjects.STREAM_EVENTS, durable=subjects.METRICS_JOB_EVENTS_CONSUMER,
                           subject=subjects.ALL_JOB_EVENTS, handler=self.on_job_changed),
                   name="metrics-job-deletions")
        if self.settings.ingest_in_own_process(self.db.engine.dialect.name):
            self.ingester = IngestProcess(self.runtime.settings, self.settings, js)
            self.ingester.start()
            return
        # The preparing processes start once this replica holds the ingest lease: one that waits needs none.
        form = StorageForm.of(self.db.engine.dialect)
        self._ingesting = asyncio.create_task(
            run_ingest(js, self.settings, self.handlers, self._stop_ingest,
                       on_held=lambda: self.preparing.start(form)), name="metrics-ingest")
        self._ingesting.add_done_callback(_crashed)

    async def on_job_changed(self, msg: Msg) -> None:
        """Deletes what is stored of a deleted job; every other change is acked unread."""
        try:
            event = events_pb2.JobChanged.FromString(msg.data)
        except Exception as exc:
            raise PermanentError(f"undecodable JobChanged: {exc}") from exc
        if not event.deleted:
            return
        if not event.job.id:
            raise PermanentError("a deleting JobChanged without a job id")
        points, entries = await self.manager.delete_job(event.job.id)
        log.info("job %s deleted: %d points and %d log entries removed", event.job.id, points, entries)

    async def stop(self) -> None:
        if self.ingester is not None:
            await self.ingester.stop()
        if self._ingesting is not None:
            # What it fetched is stored and acked, and the lease released, before the rest stops.
            self._stop_ingest.set()
            await asyncio.wait([self._ingesting], timeout=HANDOVER_S + 5)
            await cancel_and_wait([self._ingesting])
        await super().stop()
        self.preparing.close()
        self.db.dispose()


def _crashed(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the metrics ingest stopped: %r", task.exception(), exc_info=task.exception())
