"""Tables of the jobs service. Specs, errors, progress and outputs are stored as their proto bytes: the
proto is the schema of record, and columns exist only for what queries filter or sort on."""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.kit.outbox import InboxMixin, OutboxMixin, utcnow


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    __tablename__ = "jobs_jobs"
    __table_args__ = (
        UniqueConstraint("organization", "name", name="uq_jobs_org_name"),
        UniqueConstraint("organization", "request_id", name="uq_jobs_org_request_id"),
        Index("ix_jobs_org_created", "organization", "create_time", "id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    organization: Mapped[str] = mapped_column(String(63))
    name: Mapped[str] = mapped_column(String(63))
    description: Mapped[str] = mapped_column(Text, default="")
    spec: Mapped[bytes] = mapped_column(LargeBinary)
    state: Mapped[int] = mapped_column(Integer, index=True)
    error: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    progress: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    output: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    worker_id: Mapped[str] = mapped_column(String(255), default="")
    revision: Mapped[int] = mapped_column(Integer, default=1)
    labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    request_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    request_hash: Mapped[str] = mapped_column(String(64), default="")
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    start_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    end_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Job.status_message: why a QUEUED job is still waiting (requeue_note, then what the worker check found).
    status_message: Mapped[str] = mapped_column(Text, default="")
    # Set when the job went back to QUEUED because its worker was lost; cleared when a worker takes it.
    requeue_note: Mapped[str] = mapped_column(Text, default="")
    # The delivery (attempt) whose worker was drained and handed the job back to the queue (its hand-back
    # update: services.jobs.timeline.is_hand_back), and that worker; 0 and "" when the latest delivery that
    # held the job did not end so. The next delivery's RESTARTED event reads it: drained, not WORKER_LOST.
    handed_back_attempt: Mapped[int] = mapped_column(Integer, default=0)
    handed_back_by: Mapped[str] = mapped_column(String(255), default="")
    # Whether its JobAssignment went to the work queue. A job beyond its organization's running limit
    # waits QUEUED without (services.jobs.quotas); its assignment is kept here until a slot frees.
    dispatched: Mapped[bool] = mapped_column(Boolean, default=True)
    assignment: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    # When its assignment went to the work queue (the latest of an organization's is its place in the fair
    # scheduler's round: services.jobs.scheduler); NULL while held, and for jobs from before it was kept.
    dispatch_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # While held: the trace context of the CreateJob that queued it, so that its assignment, published
    # later by whatever freed a worker, still continues the job's own trace (NULL with tracing off).
    assignment_traceparent: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # When checkpoint retention (services.jobs.checkpoints) finished with the ended job: the resume-only
    # state of its non-final checkpoints pruned, or kept as the spec asked. NULL: still to do.
    retention_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # What the worker is doing (JobPhase) while it holds the job.
    phase: Mapped[int] = mapped_column(Integer, default=0)
    # The EvaluationReport (proto bytes) the worker sent with SUCCEEDED; NULL until then.
    evaluation: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    # Usage (Job.usage): the hardware the current or last attempt ran on and its hourly price, the seconds
    # of attempts that ended, when the current attempt took a worker (NULL when none holds the job),
    # tokens trained, and the admission estimate.
    usage_hardware: Mapped[str] = mapped_column(String(63), default="")
    usage_gpu_count: Mapped[int] = mapped_column(Integer, default=0)
    usage_hourly_usd: Mapped[float] = mapped_column(Float, default=0.0)
    usage_run_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    usage_cost_usd: Mapped[float] = mapped_column(Float, default=0.0)
    usage_running_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    usage_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    estimated_cost_usd: Mapped[float] = mapped_column(Float, default=0.0)
    estimated_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    # The last timeline sequence number given out (JobEventRow.sequence).
    event_sequence: Mapped[int] = mapped_column(Integer, default=0)
    # Job.priority (tuneforge.v1.JobPriority, never UNSPECIFIED: that is stored as NORMAL): its place among
    # its organization's held jobs (services.jobs.scheduler).
    priority: Mapped[int] = mapped_column(Integer, default=2)


class JobEventRow(Base):
    """One entry of a job's timeline (JobEvent); `payload` is the JobEvent's proto bytes, sequence included.
    `source` makes a worker's event idempotent: "<update event id>/<index>" (NULL for the service's own)."""

    __tablename__ = "jobs_events"
    __table_args__ = (UniqueConstraint("job_id", "source", name="uq_jobs_events_source"),)

    job_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    sequence: Mapped[int] = mapped_column(Integer, primary_key=True)
    organization: Mapped[str] = mapped_column(String(63))
    time: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    type: Mapped[int] = mapped_column(Integer)
    source: Mapped[str | None] = mapped_column(String(128), nullable=True)
    payload: Mapped[bytes] = mapped_column(LargeBinary)


class WorkerRow(Base):
    """A trainer worker as its latest heartbeat described it (services.jobs.workers has the rules)."""

    __tablename__ = "jobs_workers"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255), default="")
    gpu_type: Mapped[str] = mapped_column(String(63), default="")
    gpu_count: Mapped[int] = mapped_column(Integer, default=0)
    # tuneforge.v1.WorkerState
    state: Mapped[int] = mapped_column(Integer, default=0)
    job_id: Mapped[str] = mapped_column(String(40), default="")
    # The organization of job_id, so ListWorkers shows a job only to its own organization.
    job_organization: Mapped[str] = mapped_column(String(63), default="")
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    # When the worker process started: it tells one process from the next under the same id.
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # When the jobs service received the latest heartbeat (its own clock, not the worker's).
    last_heartbeat: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    # Seconds after last_heartbeat at which the worker counts as gone.
    lost_after_s: Mapped[float] = mapped_column(Float, default=60.0)
    # Whether it runs jobs on several nodes (WorkerHeartbeat.multi_node): only such a worker takes one.
    multi_node: Mapped[bool] = mapped_column(Boolean, default=False)
    # The pool it serves ("default" when its heartbeat names none), each GPU's memory and the GPUs' model
    # as NVML reports them (0 and "" on a CPU worker, or when unknown).
    pool: Mapped[str] = mapped_column(String(40), default="default")
    gpu_memory_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    gpu_name: Mapped[str] = mapped_column(String(255), default="")


class OrganizationLock(Base):
    """One row per organization that created a job: CreateJob and the dispatch of waiting jobs lock it, so
    two transactions never both take an organization's last queued or running slot. One more row, named
    "#scheduler" (no organization's name has a "#"), is the fair scheduler's: each of its passes locks it,
    so two jobs-service replicas never both hand out the same free worker."""

    __tablename__ = "jobs_org_locks"

    organization: Mapped[str] = mapped_column(String(63), primary_key=True)


class JobDeletionRow(Base):
    """A deleted job's tombstone (DeleteJob; services.jobs.deletion has the rules): no data of the job, only
    what finishing its deletion and answering a repeated DeleteJob need. `purged_at` is set once its
    objects and leftover rows are gone; until then the sweep finishes what a crash interrupted."""

    __tablename__ = "jobs_deletions"
    __table_args__ = (Index("ix_jobs_deletions_org_name", "organization", "name"),
                      Index("ix_jobs_deletions_org_request_id", "organization", "request_id"),
                      Index("ix_jobs_deletions_org_end_time", "organization", "end_time"))

    job_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    organization: Mapped[str] = mapped_column(String(63))
    # So that deleting again by name is OK too (while no newer job took the name).
    name: Mapped[str] = mapped_column(String(63))
    # The CreateJob request_id (and request hash) that made the job: a create retried with it after the
    # deletion is told so, instead of making the job again (JobManager._replay). NULL: none, or deleted
    # before these were kept.
    request_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    request_hash: Mapped[str] = mapped_column(String(64), default="")
    deleted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    purged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True, index=True)
    # What the job used, as its row had it (it had ended: nothing more comes), so that GetUsage keeps
    # counting it (services.jobs.usage). NULL state: deleted before these were kept, not counted.
    state: Mapped[int | None] = mapped_column(Integer, nullable=True)
    create_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    end_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    usage_gpu_count: Mapped[int] = mapped_column(Integer, default=0)
    usage_run_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    usage_cost_usd: Mapped[float] = mapped_column(Float, default=0.0)
    usage_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    # As JobRow has them, for the same arithmetic (services.jobs.usage.totals): an ended job runs no more.
    usage_running_since: ClassVar[datetime | None] = None
    usage_hourly_usd: ClassVar[float] = 0.0


class JobOutbox(OutboxMixin, Base):
    __tablename__ = "jobs_outbox"


class JobInbox(InboxMixin, Base):
    """Worker updates already applied (by event id)."""

    __tablename__ = "jobs_inbox"
