"""The serving service as a kit Component: DeploymentService over gRPC, the OpenAI-compatible HTTP endpoint
(services.serving.http), the model processes (services.serving.processes), and a consumer of JobChanged
that deletes the deployments of a job DeleteJob deleted."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from nats.aio.msg import Msg
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import deployment_service_pb2_grpc

from services.kit.consumer import PermanentError, consume
from services.kit.db import Database
from services.kit.runtime import Component, Registration, Runtime
from services.serving.http import ChatServer
from services.serving.jobs_client import JobsClient
from services.serving.manager import DeploymentManager
from services.serving.servicer import DeploymentServicer
from services.serving.settings import ServingSettings
from tuneforge_core import subjects
from tuneforge_core.models import ModelPolicy

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
SERVICE_NAME = "tuneforge.v1.DeploymentService"
# The durable consumer of job events (JobChanged) on TF_EVENTS.
JOB_EVENTS_CONSUMER = "serving-service-job-events"


class ServingComponent(Component):
    def __init__(self, runtime: Runtime, settings: ServingSettings | None = None) -> None:
        super().__init__(runtime)
        self.settings = settings or ServingSettings.from_kit(runtime.settings)
        self.db = Database(self.settings.database_url_for("serving"), "serving", self.settings.db_workers)
        self.db.migrate(MIGRATIONS)
        jobs_address = self.settings.jobs_address
        jobs = JobsClient(lambda: runtime.channel(jobs_address),
                          timeout_s=self.settings.serving_jobs_timeout_s)
        self.manager = DeploymentManager(self.db, jobs, runtime.store, self.settings,
                                         ModelPolicy.from_settings(self.settings, runtime.store))
        self.http = ChatServer(self.manager, runtime.identity, self.settings)

    def registrations(self) -> Sequence[Registration]:
        return [Registration(SERVICE_NAME, DeploymentServicer(self.manager),
                             deployment_service_pb2_grpc.add_DeploymentServiceServicer_to_server)]

    async def start(self) -> None:
        self.manager.endpoint = await self.http.start()
        await self.manager.resume()
        self.spawn(consume(self.runtime.js, stream=subjects.STREAM_EVENTS, durable=JOB_EVENTS_CONSUMER,
                           subject=subjects.ALL_JOB_EVENTS, handler=self.on_job_changed),
                   name="serving-job-deletions")

    async def on_job_changed(self, msg: Msg) -> None:
        """Deletes the deployments of a deleted job; every other change is acked unread."""
        try:
            event = events_pb2.JobChanged.FromString(msg.data)
        except Exception as exc:
            raise PermanentError(f"undecodable JobChanged: {exc}") from exc
        if not event.deleted:
            return
        if not event.job.id:
            raise PermanentError("a deleting JobChanged without a job id")
        count = await self.manager.delete_job(event.job.id)
        if count:
            log.info("job %s deleted: %d deployment(s) deleted", event.job.id, count)

    async def stop(self) -> None:
        await super().stop()
        await self.manager.stop_all()
        await self.http.stop()
        self.db.dispose()
