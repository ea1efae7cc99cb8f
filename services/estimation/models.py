"""Tables of the estimation service, filled from the JobChanged events it consumes (it never asks the jobs
service): one row per finished job measured, the evidence calibration rests on; and one row per job with what
EstimateCost(job_id) reads of it.

Both the measurement and the prior's prediction for the same job are stored, so a calibration factor is a
ratio of stored numbers and a later change of the formulas does not rewrite history silently.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Float, Index, Integer, LargeBinary, String
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from services.kit.outbox import utcnow


class Base(DeclarativeBase):
    pass


class CalibrationRow(Base):
    __tablename__ = "estimation_calibrations"
    __table_args__ = (Index("ix_estimation_calibrations_key", "family", "gpu_type", "recorded_at"),)

    # One measurement per job: a redelivered or repeated SUCCEEDED event changes nothing.
    job_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    family: Mapped[str] = mapped_column(String(63))
    gpu_type: Mapped[str] = mapped_column(String(63))
    gpu_count: Mapped[int] = mapped_column(Integer)
    adapter: Mapped[str] = mapped_column(String(32))
    method: Mapped[str] = mapped_column(String(32))
    base_model: Mapped[str] = mapped_column(String(255))
    measured_tokens_per_second: Mapped[float | None] = mapped_column(Float, nullable=True)
    predicted_tokens_per_second: Mapped[float | None] = mapped_column(Float, nullable=True)
    measured_peak_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    predicted_peak_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class JobRow(Base):
    """A job as its latest JobChanged event said it; spec and progress as their proto bytes (the proto is
    the schema of record, as in the jobs service's own table)."""

    __tablename__ = "estimation_jobs"
    __table_args__ = (Index("ix_estimation_jobs_org_name", "organization", "name"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    organization: Mapped[str] = mapped_column(String(63))
    name: Mapped[str] = mapped_column(String(63))
    spec: Mapped[bytes] = mapped_column(LargeBinary)
    state: Mapped[int] = mapped_column(Integer)
    start_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    end_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    progress: Mapped[bytes] = mapped_column(LargeBinary)
    # Job.revision of the event the row holds: an event with a lower or equal one changes nothing.
    revision: Mapped[int] = mapped_column(BigInteger)
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class DeletedJobRow(Base):
    """A job DeleteJob deleted (its JobChanged with `deleted`): its copy is gone, its calibration measurement
    kept under an anonymous id, and an older event of it delivered later is ignored (jobs.py)."""

    __tablename__ = "estimation_deleted_jobs"

    job_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    deleted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


def record_deleted(session: Session, job_id: str) -> None:
    """Records the job as deleted, once: a row already there (another handler of the same event, another
    replica, a redelivery) is kept as it is, its `deleted_at` the first. Both handlers of a deleting
    JobChanged (jobs.py `forget`, calibration.py `detach`) call this concurrently, so it is one INSERT that
    does nothing on a conflict, never a read and then an INSERT, which lost that race with an IntegrityError
    (and an ERROR logged before the consumer's retry)."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        session.execute(postgresql.insert(DeletedJobRow).values(job_id=job_id).on_conflict_do_nothing())
    elif dialect == "sqlite":
        session.execute(sqlite.insert(DeletedJobRow).values(job_id=job_id).on_conflict_do_nothing())
    else:
        raise NotImplementedError(f"recording a deleted job is not implemented for {dialect}")
