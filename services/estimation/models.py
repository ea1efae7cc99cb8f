"""Tables of the estimation service: one row per finished job measured, the evidence calibration rests on.

Both the measurement and the prior's prediction for the same job are stored, so a calibration factor is a
ratio of stored numbers and a later change of the formulas does not rewrite history silently.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Float, Index, Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

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
