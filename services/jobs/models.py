"""Tables of the jobs service. Specs, errors, progress and outputs are stored as their proto bytes: the
proto is the schema of record, and columns exist only for what queries filter or sort on."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, DateTime, Index, Integer, LargeBinary, String, Text, UniqueConstraint
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


class JobOutbox(OutboxMixin, Base):
    __tablename__ = "jobs_outbox"


class JobInbox(InboxMixin, Base):
    """Worker updates already applied (by event id)."""

    __tablename__ = "jobs_inbox"
