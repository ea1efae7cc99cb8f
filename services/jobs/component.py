"""The jobs service as a runnable component: servicer, outbox relay, worker-update consumer, and the
watch for jobs that ran out of deliveries."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from nats.aio.msg import Msg
from nats.js.errors import NotFoundError
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import job_service_pb2_grpc

from services.jobs.datasets_client import DatasetLookup
from services.jobs.estimation_client import HardwareCheck
from services.jobs.manager import JobManager
from services.jobs.models import JobOutbox
from services.jobs.servicer import JobServicer
from services.jobs.settings import JobSettings
from services.kit.consumer import PermanentError, consume
from services.kit.db import Database
from services.kit.outbox import OutboxRelay
from services.kit.runtime import Component, Registration, Runtime
from tuneforge_core import subjects
from tuneforge_core.models import ModelPolicy
from tuneforge_core.nats import ensure_trainers_consumer

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"


class JobsComponent(Component):
    def __init__(self, runtime: Runtime, settings: JobSettings | None = None) -> None:
        super().__init__(runtime)
        settings = settings or JobSettings.from_kit(runtime.settings)
        self.db = Database(settings.database_url_for("jobs"), "jobs")
        self.db.migrate(MIGRATIONS)
        self.relay = OutboxRelay(self.db, runtime.js, JobOutbox)
        self.manager = JobManager(self.db, self.relay,
                                  DatasetLookup(runtime.channel(settings.datasets_address)),
                                  runtime.store, runtime.nc,
                                  hardware=HardwareCheck(runtime.channel(settings.estimation_address)),
                                  allow_user_reward_code=settings.allow_user_reward_code,
                                  models=ModelPolicy.from_settings(settings, runtime.store))

    def registrations(self) -> Sequence[Registration]:
        return [Registration("tuneforge.v1.JobService", JobServicer(self.manager),
                             job_service_pb2_grpc.add_JobServiceServicer_to_server)]

    async def start(self) -> None:
        settings = self.runtime.settings
        await ensure_trainers_consumer(self.runtime.js, settings.work_ack_wait_s, settings.work_max_deliver)
        self.spawn(self.relay.run(), "jobs-outbox-relay")
        self.spawn(consume(self.runtime.js, stream=subjects.STREAM_WORKER,
                           durable=subjects.JOBS_STATUS_CONSUMER, subject=subjects.ALL_WORKER_STATUS,
                           handler=self._on_worker_update), "jobs-worker-updates")
        self.spawn(consume(self.runtime.js, stream=subjects.STREAM_ADVISORIES,
                           durable=subjects.JOBS_LOST_CONSUMER, subject=subjects.WORK_MAX_DELIVERIES,
                           handler=self._on_max_deliveries), "jobs-lost-work")

    async def stop(self) -> None:
        await super().stop()
        self.db.dispose()

    async def _on_worker_update(self, msg: Msg) -> None:
        try:
            update = events_pb2.WorkerJobUpdate.FromString(msg.data)
        except Exception as exc:
            raise PermanentError(f"undecodable WorkerJobUpdate: {exc}") from exc
        if not update.event_id or not update.job_id:
            raise PermanentError("WorkerJobUpdate without event_id or job_id")
        await self.manager.apply_worker_update(update)

    async def _on_max_deliveries(self, msg: Msg) -> None:
        """Fails the job whose assignment no worker finished, then drops the assignment from the queue.

        Redelivery of the advisory is harmless: failing a final job is a no-op, and an assignment that is
        already gone means an earlier delivery did the work.
        """
        try:
            advisory = json.loads(msg.data)
            seq = int(advisory["stream_seq"])
        except (ValueError, KeyError, TypeError) as exc:
            raise PermanentError(f"undecodable max-deliveries advisory: {exc}") from exc
        try:
            raw = await self.runtime.js.get_msg(subjects.STREAM_WORK, seq)
        except NotFoundError:
            return
        assignment = events_pb2.JobAssignment.FromString(raw.data or b"")
        if await self.manager.fail_lost(assignment.job_id, int(advisory.get("deliveries", 0))):
            log.warning("job %s failed: no worker finished it", assignment.job_id)
        await self.runtime.js.delete_msg(subjects.STREAM_WORK, seq)
