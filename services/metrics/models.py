"""Tables of the metrics service (prefix `metrics_`).

Metric values get a column each so dashboards and the estimator's later calibration can query them in SQL;
the natural keys are the primary keys, which is what makes ingest an idempotent upsert.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Float, Integer, SmallInteger, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.kit.outbox import utcnow


class Base(DeclarativeBase):
    pass


class MetricPointRow(Base):
    """One point; (job_id, step, kind) orders replays by step without a separate index."""

    __tablename__ = "metrics_points"

    job_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    step: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    kind: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(BigInteger, default=0)
    epoch: Mapped[float] = mapped_column(Float, default=0.0)
    time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    learning_rate: Mapped[float | None] = mapped_column(Float, nullable=True)
    grad_norm: Mapped[float | None] = mapped_column(Float, nullable=True)
    tokens_per_second: Mapped[float | None] = mapped_column(Float, nullable=True)
    samples_per_second: Mapped[float | None] = mapped_column(Float, nullable=True)
    eta_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    eval_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    eval_token_accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    gpu_utilization: Mapped[float | None] = mapped_column(Float, nullable=True)
    gpu_memory_bytes: Mapped[float | None] = mapped_column(Float, nullable=True)
    gpu_temperature_celsius: Mapped[float | None] = mapped_column(Float, nullable=True)
    cpu_percent: Mapped[float | None] = mapped_column(Float, nullable=True)
    memory_bytes: Mapped[float | None] = mapped_column(Float, nullable=True)
    extra_values: Mapped[dict[str, Any]] = mapped_column("values", JSON, default=dict)
    stored_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class LogEntryRow(Base):
    """One log line; a job's log reads in (attempt, sequence) order."""

    __tablename__ = "metrics_log_entries"

    job_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    sequence: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    level: Mapped[int] = mapped_column(SmallInteger, default=0)
    source: Mapped[int] = mapped_column(SmallInteger, default=0)
    message: Mapped[str] = mapped_column(Text, default="")
    stored_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class DeletedJobRow(Base):
    """A job DeleteJob deleted (its JobChanged with `deleted`): its points and entries are gone, and points or
    entries of it that a worker's message delivers later are dropped, not stored."""

    __tablename__ = "metrics_deleted_jobs"

    job_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    deleted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
