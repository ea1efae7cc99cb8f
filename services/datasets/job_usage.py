"""Which datasets the jobs that have not ended use, learned from the JobChanged events on TF_EVENTS.

DeleteDataset must refuse while a job still needs the dataset. The jobs service calls this one (to resolve
a job's dataset), so asking it back would make the service graph a cycle; instead this service keeps its
own small table (datasets_job_usage: job id -> organization, dataset ids, ended) from the JobChanged events
the jobs service publishes through its outbox, with a durable consumer of its own.

Events may arrive twice or out of order (redeliveries, several replicas): a row is only ever replaced by an
event of a higher Job.revision, so applying is idempotent and an older event never undoes a newer one. The
table lags the jobs service by the events in flight; `JobUsageConsumer.caught_up` lets a delete wait until
every event already in the stream is applied before it refuses.

A job DeleteJob deleted (its last JobChanged, with `deleted`) loses its row, and its id is kept in
datasets_deleted_jobs so that an older event of it delivered later cannot bring the row back.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import job_pb2

from services.datasets.models import DeletedJobRow, JobUsageRow
from services.kit.consumer import PermanentError, consume
from services.kit.db import Database
from services.kit.outbox import utcnow
from tuneforge_core import states, subjects

log = logging.getLogger(__name__)

# How long a delete that would be refused waits for the consumer to apply the events already in the stream.
CATCH_UP_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class JobUsage:
    """One job as this service needs to know it."""

    job_id: str
    organization: str
    dataset_id: str
    validation_dataset_id: str
    ended: bool
    revision: int


def usage_from_job(job: job_pb2.Job) -> JobUsage:
    """The job's usage; the jobs service stores dataset ids (never names) in the spec of a created job."""
    return JobUsage(job_id=job.id, organization=job.organization, dataset_id=job.spec.dataset,
                    validation_dataset_id=job.spec.validation_dataset, ended=states.is_final(job.state),
                    revision=job.revision)


class JobUsageRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def apply(self, usage: JobUsage) -> bool:
        """Records the job as the event shows it, unless a row of the same or a higher revision is already
        there; returns whether the row changed. A concurrent first insert of the same job loses with an
        IntegrityError (the consumer then retries the event, and finds the row)."""
        values = {"organization": usage.organization, "dataset_id": usage.dataset_id,
                  "validation_dataset_id": usage.validation_dataset_id, "ended": usage.ended,
                  "revision": usage.revision, "update_time": utcnow()}
        if self.session.get(DeletedJobRow, usage.job_id) is not None:
            return False  # an older event of a deleted job
        result = self.session.execute(update(JobUsageRow).where(
            JobUsageRow.job_id == usage.job_id, JobUsageRow.revision < usage.revision).values(**values))
        if result.rowcount:  # type: ignore[attr-defined]
            return True
        if self.session.get(JobUsageRow, usage.job_id) is not None:
            return False  # a duplicate, or older than what is recorded
        self.session.add(JobUsageRow(job_id=usage.job_id, **values))
        self.session.flush()
        return True

    def forget(self, job_id: str) -> bool:
        """Drops a deleted job's row and remembers that it was deleted; returns whether a row was there.
        Idempotent (a concurrent first tombstone loses with an IntegrityError, and the consumer retries)."""
        if self.session.get(DeletedJobRow, job_id) is None:
            self.session.add(DeletedJobRow(job_id=job_id))
        result = self.session.execute(delete(JobUsageRow).where(JobUsageRow.job_id == job_id))
        self.session.flush()
        return bool(result.rowcount)  # type: ignore[attr-defined]

    def active_jobs_using(self, organization: str, dataset_id: str) -> list[str]:
        """Ids of the organization's jobs that have not ended and train or validate on the dataset."""
        return list(self.session.scalars(
            select(JobUsageRow.job_id).where(
                JobUsageRow.organization == organization, JobUsageRow.ended.is_(False),
                or_(JobUsageRow.dataset_id == dataset_id, JobUsageRow.validation_dataset_id == dataset_id))
            .order_by(JobUsageRow.job_id)))


class JobUsageConsumer:
    """The durable consumer of JobChanged that keeps datasets_job_usage."""

    def __init__(self, db: Database, js: JetStreamContext) -> None:
        self.db = db
        self.js = js

    async def run(self) -> None:
        await consume(self.js, stream=subjects.STREAM_EVENTS, durable=subjects.DATASETS_JOB_EVENTS_CONSUMER,
                      subject=subjects.ALL_JOB_EVENTS, handler=self.on_job_changed)

    async def on_job_changed(self, msg: Msg) -> None:
        try:
            event = events_pb2.JobChanged.FromString(msg.data)
        except Exception as exc:
            raise PermanentError(f"undecodable JobChanged: {exc}") from exc
        if not event.job.id:
            raise PermanentError("JobChanged without a job id")
        if event.deleted:
            job_id = event.job.id
            if await self.db.run(lambda s: JobUsageRepository(s).forget(job_id)):
                log.debug("job %s deleted: its usage row is gone", job_id)
            return
        usage = usage_from_job(event.job)
        if await self.db.run(lambda s: JobUsageRepository(s).apply(usage)):
            log.debug("job %s (revision %d): ended=%s", usage.job_id, usage.revision, usage.ended)

    async def caught_up(self, timeout_s: float = CATCH_UP_TIMEOUT_S) -> bool:
        """Waits until every JobChanged already in the stream is applied (none left to deliver, none
        delivered and not yet acked; a message is acked after its row is committed); False if that did not
        happen within `timeout_s`, or the stream cannot be asked."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            try:
                info = await self.js.consumer_info(subjects.STREAM_EVENTS,
                                                   subjects.DATASETS_JOB_EVENTS_CONSUMER)
                if not info.num_pending and not info.num_ack_pending:
                    return True
            except NotFoundError:
                pass  # the consumer is being created (the service is starting)
            except Exception:
                log.warning("cannot ask JetStream how far the job events are applied", exc_info=True)
                return False
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.05)
