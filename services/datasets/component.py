"""The datasets service as a runnable component: its database, servicer, outbox relay, and the consumer of
JobChanged events that tells it which datasets jobs still use."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tuneforge.v1 import dataset_service_pb2_grpc

from services.datasets.job_usage import JobUsageConsumer
from services.datasets.manager import DatasetManager
from services.datasets.models import DatasetOutbox
from services.datasets.servicer import DatasetServicer
from services.datasets.settings import DatasetSettings
from services.kit.db import Database
from services.kit.outbox import OutboxRelay
from services.kit.runtime import Component, Registration, Runtime

MIGRATIONS = Path(__file__).parent / "migrations"
SERVICE_NAME = "tuneforge.v1.DatasetService"


class DatasetsComponent(Component):
    """Migrates its tables when built (before the server accepts calls), then serves DatasetService.

    It calls no other service: what it must know of jobs comes from their events.
    """

    def __init__(self, runtime: Runtime, settings: DatasetSettings | None = None) -> None:
        super().__init__(runtime)
        self.settings = settings or DatasetSettings.from_kit(runtime.settings)
        self.db = Database(self.settings.database_url_for("datasets"), "datasets", self.settings.db_workers)
        self.db.migrate(MIGRATIONS)
        self.relay = OutboxRelay(self.db, runtime.js, DatasetOutbox)
        self.job_usage = JobUsageConsumer(self.db, runtime.js)
        self.manager = DatasetManager(self.db, runtime.store, self.settings, notify=self.relay.notify,
                                      job_events_applied=self.job_usage.caught_up)

    def registrations(self) -> Sequence[Registration]:
        return [Registration(SERVICE_NAME, DatasetServicer(self.manager),
                             dataset_service_pb2_grpc.add_DatasetServiceServicer_to_server)]

    async def start(self) -> None:
        self.spawn(self.relay.run(), "datasets-outbox-relay")
        self.spawn(self.job_usage.run(), "datasets-job-usage")
        # Imports an earlier run left PROCESSING (it stopped or crashed mid-import) start again.
        self.spawn(self._resume_imports(), "datasets-resume-imports")

    async def _resume_imports(self) -> None:
        await self.manager.imports.resume()

    async def stop(self) -> None:
        # Running imports stop first; each keeps only its sealed request, for the next start.
        await self.manager.close()
        await super().stop()
        self.db.dispose()
