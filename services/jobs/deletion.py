"""DeleteJob: a final job and all it left go; a crash halfway leaves nothing that a retry does not finish.

1. One transaction (`JobDeletions.delete`): the job is looked up in the caller's organization (another
   organization's job is NOT_FOUND, as everywhere), must have ended (else FAILED_PRECONDITION with reason
   JOB_STATE_CONFLICT naming its state), and then its row is deleted, a tombstone (`JobDeletionRow`: id,
   organization, name, request_id, when) is written, and a last JobChanged with `deleted` set goes into
   the outbox. From that commit on GetJob, ListJobs and WatchJob no longer see the job, and its name is
   free.
2. The purge (`JobDeletions.purge`), right after, and again from the sweep until it completes: every object
   under jobs/<organization>/<job id>/ in the object store (checkpoints, adapter, merged weights); once the
   deletion event is published, the job's messages that JetStream still holds (its worker subjects on
   TF_WORKER, and every earlier event of it on TF_EVENTS: the deletion event itself stays, for consumers
   yet to read it, until the stream's age limit); then its published outbox rows, and the tombstone is
   marked purged. Each step is idempotent, so a purge that fails or is cut short is simply run again.
3. The other services act on the deletion event: the metrics service deletes the job's points and log
   entries, the datasets service its usage row, the estimation service its copy of the job (calibration
   measurements stay, detached from the job); each keeps a tombstone of the id so that an older event or a
   late worker message delivered afterwards cannot bring anything back.

Deleting again is OK (`already_deleted`), by id, or by name while no newer job took the name; it also runs a
purge that has not completed. The tombstones hold no data of the job (its id, organization and name, and
the CreateJob request_id that made it: a create retried with it is told the job was deleted instead of
making it again) and are kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.orm import Session
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import job_pb2

from services.jobs.converters import job_to_proto
from services.jobs.models import JobDeletionRow, JobEventRow, JobOutbox, WorkerRow
from services.jobs.repository import JobRepository
from services.jobs.usage import totals
from services.kit.db import Database
from services.kit.outbox import OutboxRelay, add_event, utcnow
from services.kit.protos import to_timestamp
from services.kit.validation import check_organization
from tuneforge_core import states, subjects
from tuneforge_core.errors import FailedPrecondition, Unavailable, Violations, not_found
from tuneforge_core.ids import new_id
from tuneforge_core.reasons import Reason
from tuneforge_core.storage import ObjectStore

log = logging.getLogger(__name__)

# How long DeleteJob waits for the relay to publish the deletion event before it leaves the rest of the
# purge to the sweep.
PUBLISH_WAIT_S = 3.0
# How often the sweep looks for deletions whose purge has not completed.
SWEEP_INTERVAL_S = 60.0


def job_prefix(organization: str, job_id: str) -> str:
    """The job's folder in the object store (the worker's output prefix, services.jobs.manager)."""
    return f"jobs/{organization}/{job_id}/"


@dataclass(frozen=True)
class Deleted:
    job_id: str
    organization: str
    already_deleted: bool
    purged: bool


def _job_outbox_rows(job_id: str):  # type: ignore[no-untyped-def]
    """The job's own outbox rows: its events and its work assignment."""
    return or_(JobOutbox.subject == subjects.job_events(job_id), JobOutbox.event_id == f"{job_id}.assignment")


class JobDeletions:
    def __init__(self, db: Database, relay: OutboxRelay, store: ObjectStore,
                 js: JetStreamContext | None = None, *, publish_wait_s: float = PUBLISH_WAIT_S) -> None:
        self.db = db
        self.relay = relay
        self.store = store
        self.js = js
        self.publish_wait_s = publish_wait_s

    async def delete(self, organization: str, ref: str) -> Deleted:
        v = Violations()
        check_organization(v, organization)
        v.check(bool(ref), "job", "is required: a job id or name")
        v.raise_if_any("request is invalid")
        deleted = await self.db.run(lambda s: self._delete(s, organization, ref))
        if not deleted.already_deleted:
            self.relay.notify()
            log.info("job %s of organization %s deleted", deleted.job_id, organization)
        if deleted.purged:
            return deleted
        try:
            await self.purge(deleted.job_id, deleted.organization, wait_s=self.publish_wait_s)
        except Exception as exc:
            log.exception("job %s: the purge failed; the sweep will finish it", deleted.job_id)
            raise Unavailable(
                f"job '{ref}' is deleted, but removing what it stored failed ({exc}); a background sweep "
                "finishes it, or call DeleteJob again", metadata={"job": deleted.job_id}) from exc
        return deleted

    def _delete(self, session: Session, organization: str, ref: str) -> Deleted:
        row = JobRepository(session).find(organization, ref, for_update=True)
        if row is None:
            tombstone = session.scalars(
                select(JobDeletionRow).where(JobDeletionRow.organization == organization,
                                             or_(JobDeletionRow.job_id == ref, JobDeletionRow.name == ref))
                .order_by((JobDeletionRow.job_id == ref).desc(), JobDeletionRow.deleted_at.desc())
                .limit(1)).first()
            if tombstone is None:
                raise not_found("job", ref, organization)
            return Deleted(tombstone.job_id, tombstone.organization, True, tombstone.purged_at is not None)
        if not states.is_final(row.state):
            state = states.name(row.state)
            raise FailedPrecondition(
                f"job '{row.name}' is {state}: only a job that has ended (SUCCEEDED, FAILED or CANCELLED) "
                "can be deleted; cancel it first", reason=Reason.JOB_STATE_CONFLICT,
                metadata={"job": row.id, "state": state})
        previous = row.state
        row.revision += 1
        row.update_time = utcnow()
        event = events_pb2.JobChanged(event_id=new_id("evt"), job=job_to_proto(row), deleted=True,
                                      previous_state=job_pb2.JobState.ValueType(previous))
        event.time.CopyFrom(to_timestamp(row.update_time))
        add_event(session, JobOutbox, subjects.job_events(row.id), event, event.event_id)
        usage = totals(row, row.update_time)  # its last attempt ended with it: nothing runs on
        session.add(JobDeletionRow(job_id=row.id, organization=row.organization, name=row.name,
                                   deleted_at=row.update_time, request_id=row.request_id,
                                   request_hash=row.request_hash, state=row.state,
                                   create_time=row.create_time, end_time=row.end_time or row.update_time,
                                   usage_gpu_count=row.usage_gpu_count or 0,
                                   usage_run_seconds=usage.seconds, usage_cost_usd=usage.cost_usd,
                                   usage_tokens=row.usage_tokens or 0))
        # A worker whose last heartbeat named the job shows it no longer.
        session.execute(update(WorkerRow).where(WorkerRow.job_id == row.id)
                        .values(job_id="", job_organization="", attempt=0))
        job_id, org = row.id, row.organization
        session.execute(delete(JobEventRow).where(JobEventRow.job_id == job_id))  # its timeline, with it
        session.delete(row)
        session.flush()
        return Deleted(job_id, org, False, False)

    async def purge(self, job_id: str, organization: str, *, wait_s: float = 0.0) -> bool:
        """Removes what the deleted job left (see the module docstring); True when nothing is left. Waits up
        to `wait_s` for the relay to publish the deletion event; if it is still unpublished, the job's
        JetStream messages and outbox rows stay for the next sweep (False)."""
        prefix = job_prefix(organization, job_id)
        removed = await asyncio.to_thread(self.store.delete_prefix, prefix)
        if removed:
            log.info("job %s: %d objects under %s deleted", job_id, removed, prefix)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while await self.db.run(lambda s: self._unpublished(s, job_id)):
            if loop.time() >= deadline:
                return False
            self.relay.notify()
            await asyncio.sleep(0.05)
        if self.js is not None:
            # The worker's messages of the job, and every event of it but the last (the deletion).
            with contextlib.suppress(NotFoundError):
                await self.js.purge_stream(subjects.STREAM_WORKER,
                                           subject=f"tuneforge.worker.jobs.{job_id}.>")
            with contextlib.suppress(NotFoundError):
                await self.js.purge_stream(subjects.STREAM_EVENTS, subject=subjects.job_events(job_id),
                                           keep=1)
        return await self.db.run(lambda s: self._finish(s, job_id))

    @staticmethod
    def _unpublished(session: Session, job_id: str) -> int:
        return int(session.scalar(select(func.count()).select_from(JobOutbox).where(
            _job_outbox_rows(job_id), JobOutbox.published_at.is_(None))) or 0)

    def _finish(self, session: Session, job_id: str) -> bool:
        session.execute(delete(JobOutbox).where(_job_outbox_rows(job_id),
                                                JobOutbox.published_at.is_not(None)))
        if self._unpublished(session, job_id):
            return False
        session.execute(update(JobDeletionRow).where(JobDeletionRow.job_id == job_id,
                                                     JobDeletionRow.purged_at.is_(None))
                        .values(purged_at=utcnow()))
        return True

    async def sweep(self) -> int:
        """Purges every deletion whose purge has not completed (a crash, a storage or NATS outage);
        returns how many completed now."""
        pending = await self.db.run(lambda s: [(r.job_id, r.organization) for r in s.scalars(
            select(JobDeletionRow).where(JobDeletionRow.purged_at.is_(None)).order_by(JobDeletionRow.deleted_at))])
        done = 0
        for job_id, organization in pending:
            try:
                if await self.purge(job_id, organization):
                    done += 1
                    log.info("job %s: an interrupted deletion finished", job_id)
            except Exception:
                log.exception("job %s: the purge failed; will retry", job_id)
        return done

    async def sweep_forever(self, interval_s: float = SWEEP_INTERVAL_S) -> None:
        """Sweeps at start, then every `interval_s`."""
        while True:
            try:
                await self.sweep()
            except Exception:
                log.exception("the deletion sweep failed; will retry")
            await asyncio.sleep(interval_s)
