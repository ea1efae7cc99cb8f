"""The estimation service as a kit Component: the catalog loaded once at start, its database (calibration
measurements and its copy of each job), its servicer, and two consumers of JobChanged: one keeps each job's
latest state for EstimateCost(job_id), one records what finished jobs measured. They are separate durable
consumers so that neither waits on the other, and so that the job copy, when first deployed, starts from
the oldest event TF_EVENTS still holds.

It calls the datasets service (GetDataset, when a request does not carry the dataset's size) and never the
jobs service: the jobs service calls this one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from nats.aio.msg import Msg
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import estimation_service_pb2_grpc, job_pb2

from services.estimation.calibration import CalibrationStore, measure
from services.estimation.catalog import Catalog
from services.estimation.datasets_client import GrpcDatasetLookup
from services.estimation.jobs import JobStore
from services.estimation.manager import EstimationManager
from services.estimation.servicer import EstimationServicer
from services.estimation.settings import EstimationSettings
from services.kit.consumer import PermanentError, consume
from services.kit.db import Database
from services.kit.runtime import Component, Registration, Runtime
from tuneforge_core import subjects
from tuneforge_core.models import ModelPolicy

log = logging.getLogger(__name__)

SERVICE_NAME = "tuneforge.v1.EstimationService"
MIGRATIONS_DIR = Path(__file__).parent / "migrations"


class EstimationComponent(Component):
    def __init__(self, runtime: Runtime, settings: EstimationSettings | None = None) -> None:
        super().__init__(runtime)
        self.settings = settings or EstimationSettings()
        # A malformed catalog stops the process at start, not at the first request.
        self.catalog = Catalog.load(self.settings.catalog_dir, self.settings.hourly_usd)
        self.db = Database(runtime.settings.database_url_for("estimation"), "estimation",
                           runtime.settings.db_workers)
        # Before the server takes calls: a request must never meet a missing table.
        self.db.migrate(MIGRATIONS_DIR)
        self.calibrations = CalibrationStore(self.db)
        self.jobs = JobStore(self.db)
        kit = runtime.settings
        timeout = self.settings.datasets_timeout_s
        datasets = GrpcDatasetLookup(lambda: runtime.channel(kit.datasets_address), timeout_s=timeout)
        self.models = ModelPolicy.from_settings(kit, runtime.store)
        self.manager = EstimationManager(self.catalog, datasets, self.jobs, self.calibrations, self.models)

    def registrations(self) -> Sequence[Registration]:
        return [
            Registration(
                SERVICE_NAME,
                EstimationServicer(self.manager),
                estimation_service_pb2_grpc.add_EstimationServiceServicer_to_server,
            )
        ]

    async def start(self) -> None:
        self.spawn(
            consume(
                self.runtime.js,
                stream=subjects.STREAM_EVENTS,
                durable=subjects.ESTIMATION_JOBS_CONSUMER,
                subject=subjects.ALL_JOB_EVENTS,
                handler=self.keep_job,
            ),
            "estimation-jobs",
        )
        self.spawn(
            consume(
                self.runtime.js,
                stream=subjects.STREAM_EVENTS,
                durable=subjects.ESTIMATION_JOB_EVENTS_CONSUMER,
                subject=subjects.ALL_JOB_EVENTS,
                handler=self.on_job_changed,
            ),
            "estimation-calibration",
        )

    async def stop(self) -> None:
        await super().stop()
        self.manager.close()
        self.db.dispose()

    async def keep_job(self, msg: Msg) -> None:
        """Keeps the job as the event says it, unless a newer revision is already kept; forgets a job
        DeleteJob deleted."""
        event = _event_of(msg)
        job = event.job
        if not job.id or not job.organization:
            raise PermanentError("a JobChanged without a job id or organization")
        if event.deleted:
            await self.jobs.forget(job.id)
            return
        await self.jobs.record(job)

    async def on_job_changed(self, msg: Msg) -> None:
        """Records the measurements of a job that just SUCCEEDED, and detaches them from a job DeleteJob
        deleted (services.estimation.calibration); every other change is acked unread."""
        event = _event_of(msg)
        job = event.job
        if event.deleted and job.id:
            await self.calibrations.detach(job.id)
            return
        if job.state != job_pb2.JOB_STATE_SUCCEEDED or not job.id:
            return
        measurement = measure(job, self.catalog, self.models)
        if measurement is not None and await self.calibrations.record(measurement):
            log.info(
                "calibration: job %s (%s on %s) recorded", job.id, measurement.family, measurement.gpu_type
            )


def _event_of(msg: Msg) -> events_pb2.JobChanged:
    try:
        return events_pb2.JobChanged.FromString(msg.data)
    except Exception as exc:
        raise PermanentError(f"undecodable JobChanged: {exc}") from exc
