"""What the estimation service knows of jobs: what EstimateCost(job_id) needs of each, kept from the
JobChanged events it consumes, so that it never calls the jobs service back (jobs asks estimation, never the
reverse).

The copy trails the jobs service by the relay of one event: right after CreateJob returns, before the job's
first JobChanged has arrived (normally well under a second), the job is not known here and EstimateCost
answers NOT_FOUND; a caller that has just created the job retries. Later changes (progress, the end) are
likewise seen an event late. Jobs whose last event left TF_EVENTS before this table existed (the stream keeps
7 days) are not known either.

Events may arrive twice or out of order (redeliveries, several replicas): a row only ever moves forward, to
an event with a higher `Job.revision`.

A job DeleteJob deleted (its last JobChanged, with `deleted`) is forgotten: its row goes, and its id is kept
in estimation_deleted_jobs so that an older event of it delivered later is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import delete, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from tuneforge.v1 import job_pb2

from services.estimation.models import DeletedJobRow, JobRow, record_deleted
from services.kit.db import Database
from services.kit.outbox import utcnow


@dataclass(frozen=True)
class JobRecord:
    """One job as its latest event said it."""

    id: str
    organization: str
    name: str
    spec: job_pb2.JobSpec
    state: int
    start_time: datetime | None
    end_time: datetime | None
    progress: job_pb2.JobProgress
    revision: int


def job_record_from_proto(job: job_pb2.Job) -> JobRecord:
    return JobRecord(
        id=job.id,
        organization=job.organization,
        name=job.name or job.id,
        spec=job.spec,
        state=job.state,
        start_time=job.start_time.ToDatetime(tzinfo=UTC) if job.HasField("start_time") else None,
        end_time=job.end_time.ToDatetime(tzinfo=UTC) if job.HasField("end_time") else None,
        progress=job.progress,
        revision=job.revision,
    )


def _from_row(row: JobRow) -> JobRecord:
    return JobRecord(
        id=row.id,
        organization=row.organization,
        name=row.name,
        spec=job_pb2.JobSpec.FromString(row.spec),
        state=row.state,
        start_time=_aware(row.start_time),
        end_time=_aware(row.end_time),
        progress=job_pb2.JobProgress.FromString(row.progress),
        revision=row.revision,
    )


def _aware(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes for what was stored as UTC."""
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


class JobStore:
    """The `estimation_jobs` table."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def record(self, job: job_pb2.Job) -> bool:
        """Keeps the job as this event says it, unless a row of the same or a higher revision is already
        there; True when the row changed. Safe under redelivery and between replicas: the write is one
        conditional UPDATE (or an INSERT whose primary key settles a race, the loser retrying)."""
        record = job_record_from_proto(job)
        values = {
            "organization": record.organization,
            "name": record.name[:63],
            "spec": record.spec.SerializeToString(),
            "state": record.state,
            "start_time": record.start_time,
            "end_time": record.end_time,
            "progress": record.progress.SerializeToString(),
            "revision": record.revision,
            "update_time": utcnow(),
        }

        def _record(session: Session) -> bool:
            moved = session.execute(
                update(JobRow)
                .where(JobRow.id == record.id, JobRow.revision < record.revision)
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            if moved.rowcount:  # type: ignore[attr-defined]
                return True
            if session.get(DeletedJobRow, record.id) is not None:
                return False  # an older event of a deleted job
            if session.get(JobRow, record.id) is not None:
                return False  # the same or a newer revision is kept
            session.add(JobRow(id=record.id, **values))
            return True

        try:
            return await self.db.run(_record)
        except IntegrityError:
            # Another replica inserted the same job in between: now it is an UPDATE (or nothing).
            return await self.db.run(_record)

    async def forget(self, job_id: str) -> bool:
        """Drops a deleted job's copy and remembers that it was deleted; returns whether a copy was there.
        Idempotent, and safe beside calibration's `detach` recording the same deletion at the same time
        (models.record_deleted)."""

        def _forget(session: Session) -> bool:
            record_deleted(session, job_id)
            gone = session.execute(delete(JobRow).where(JobRow.id == job_id)
                                   .execution_options(synchronize_session=False))
            return bool(gone.rowcount)  # type: ignore[attr-defined]

        return await self.db.run(_forget)

    async def get(self, organization: str, job: str) -> JobRecord | None:
        """The organization's job by id or name; None when no event of it has arrived. A job of another
        organization is not found, as the jobs service would say."""

        def _get(session: Session) -> JobRecord | None:
            row = session.scalars(
                select(JobRow)
                .where(JobRow.organization == organization, or_(JobRow.id == job, JobRow.name == job))
                .order_by((JobRow.id == job).desc(), JobRow.update_time.desc())
                .limit(1)
            ).first()
            return _from_row(row) if row is not None else None

        return await self.db.run(_get)
