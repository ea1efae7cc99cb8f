"""Tables of the datasets service (all prefixed `datasets_`). The full validation report is stored as its
proto bytes; columns exist for what is queried, listed or shown on every Get."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from services.kit.outbox import OutboxMixin, utcnow

# Named constraints, so migrations (and SQLite's batch mode) can refer to them.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class DatasetRow(Base):
    __tablename__ = "datasets_datasets"
    __table_args__ = (
        UniqueConstraint("organization", "name", name="uq_datasets_datasets_org_name"),
        # NULL request ids never collide, on SQLite and PostgreSQL alike.
        UniqueConstraint("organization", "request_id", name="uq_datasets_datasets_org_request_id"),
        Index("ix_datasets_datasets_org_created", "organization", "create_time", "id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    organization: Mapped[str] = mapped_column(String(63))
    name: Mapped[str] = mapped_column(String(63))
    description: Mapped[str] = mapped_column(Text, default="")
    state: Mapped[str] = mapped_column(String(16))
    format: Mapped[str] = mapped_column(String(32))
    source_filename: Mapped[str] = mapped_column(Text, default="")
    source_key: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    example_count: Mapped[int] = mapped_column(BigInteger, default=0)
    mean_messages_per_example: Mapped[float] = mapped_column(Float, default=0.0)
    total_characters: Mapped[int] = mapped_column(BigInteger, default=0)
    duplicate_count: Mapped[int] = mapped_column(BigInteger, default=0)
    dropped_by_max_samples: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    longest_example_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # tuneforge.v1.TokenStatistics, when a tokenizer was given.
    token_statistics: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    # tuneforge.v1.DatasetOptions
    options: Mapped[bytes] = mapped_column(LargeBinary, default=b"", server_default="")
    validation_dataset_id: Mapped[str] = mapped_column(String(40), default="", server_default="")
    error_count: Mapped[int] = mapped_column(Integer, default=0)
    warning_count: Mapped[int] = mapped_column(Integer, default=0)
    # tuneforge.v1.ValidationReport
    validation_report: Mapped[bytes] = mapped_column(LargeBinary)
    # The split in force; the seed is text because a uint64 does not fit a signed BIGINT.
    train_fraction: Mapped[float] = mapped_column(Float)
    validation_fraction: Mapped[float] = mapped_column(Float)
    test_fraction: Mapped[float] = mapped_column(Float)
    split_seed: Mapped[str] = mapped_column(String(20))
    failure_message: Mapped[str] = mapped_column(Text, default="")
    request_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # SHA-256 of the metadata the request_id was first used with (uploads.request_fingerprint); "" for
    # rows from before it was kept, and without a request_id.
    request_fingerprint: Mapped[str] = mapped_column(String(64), default="", server_default="")
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    splits: Mapped[list[SplitRow]] = relationship(back_populates="dataset", cascade="all, delete-orphan",
                                                  lazy="selectin", passive_deletes=True)


class SplitRow(Base):
    __tablename__ = "datasets_splits"

    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets_datasets.id", ondelete="CASCADE"),
                                            primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    example_count: Mapped[int] = mapped_column(BigInteger)
    object_key: Mapped[str] = mapped_column(Text)

    dataset: Mapped[DatasetRow] = relationship(back_populates="splits")


class DatasetOutbox(OutboxMixin, Base):
    """DatasetChanged events waiting for the relay."""

    __tablename__ = "datasets_outbox"


class JobUsageRow(Base):
    """What the datasets service knows of a job, from its JobChanged events (job_usage.py): the datasets
    it trains and validates on, and whether it has ended. Rows of ended jobs stay, so that an older event
    delivered late cannot bring the job back (its revision is lower than the row's)."""

    __tablename__ = "datasets_job_usage"
    __table_args__ = (
        Index("ix_datasets_job_usage_org_dataset", "organization", "dataset_id"),
        Index("ix_datasets_job_usage_org_validation_dataset", "organization", "validation_dataset_id"),
    )

    job_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    organization: Mapped[str] = mapped_column(String(63))
    dataset_id: Mapped[str] = mapped_column(String(40))
    validation_dataset_id: Mapped[str] = mapped_column(String(40), default="")
    ended: Mapped[bool] = mapped_column(Boolean)
    # Job.revision of the event the row was last written from.
    revision: Mapped[int] = mapped_column(BigInteger)
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class DeletedJobRow(Base):
    """A job DeleteJob deleted (its JobChanged with `deleted`): its usage row is gone, and an older event of
    it delivered later does not bring it back (job_usage.py)."""

    __tablename__ = "datasets_deleted_jobs"

    job_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    deleted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
