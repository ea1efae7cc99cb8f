"""Tables of the serving service (prefix `serving_`). The self-check and the error are stored as their
proto bytes; columns exist for what queries filter or sort on."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, DateTime, Index, Integer, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.kit.outbox import utcnow


class Base(DeclarativeBase):
    pass


class DeploymentRow(Base):
    __tablename__ = "serving_deployments"
    __table_args__ = (
        UniqueConstraint("organization", "name", name="uq_serving_org_name"),
        UniqueConstraint("organization", "request_id", name="uq_serving_org_request_id"),
        Index("ix_serving_org_job", "organization", "job_id"),
    )

    # "dep_" + 26 characters; ids sort by creation, so "newest first" is id descending.
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    organization: Mapped[str] = mapped_column(String(63))
    name: Mapped[str] = mapped_column(String(63))
    job_id: Mapped[str] = mapped_column(String(40))
    target: Mapped[int] = mapped_column(Integer)
    merged: Mapped[bool] = mapped_column(Boolean, default=False)
    state: Mapped[int] = mapped_column(Integer)
    # google.rpc.Status bytes, when FAILED.
    error: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    endpoint: Mapped[str] = mapped_column(Text, default="")
    # tuneforge.v1.DeploymentCheck bytes, once the self-check ran.
    check: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    manifest: Mapped[str] = mapped_column(Text, default="")
    # What the model process loads (services.serving.runner's config), fixed at creation so a restarted
    # platform loads the same model again.
    source: Mapped[str] = mapped_column(Text, default="{}")
    request_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # SHA-256 of the CreateDeploymentRequest that made it (services.serving.manager.request_hash), so a
    # retry under its request_id is told apart from another request; "" for rows made before it was kept.
    request_hash: Mapped[str] = mapped_column(String(64), default="")
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class DeletedDeploymentRow(Base):
    """A deleted deployment, so that deleting it again (by id or name) answers already_deleted rather than
    NOT_FOUND; its name is free for a new deployment, its request_id is not (as with a deleted job)."""

    __tablename__ = "serving_deleted_deployments"
    __table_args__ = (Index("ix_serving_deleted_org_name", "organization", "name"),
                      Index("ix_serving_deleted_org_request_id", "organization", "request_id"))

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    organization: Mapped[str] = mapped_column(String(63))
    name: Mapped[str] = mapped_column(String(63))
    # The CreateDeployment request_id (and request hash) that made the deployment: a create retried with it
    # after the deletion is told so, instead of making the deployment again (DeploymentManager._replay).
    # NULL: none, or deleted before these were kept.
    request_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    request_hash: Mapped[str] = mapped_column(String(64), default="")
    deleted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class OrganizationLock(Base):
    """One row per organization that created a deployment: CreateDeployment locks it before counting the
    organization's live deployments, so two concurrent creates never both take its last place. One more
    row, "#platform" (no organization's name has a "#"), is locked after it when the platform-wide limit
    on model processes is on."""

    __tablename__ = "serving_org_locks"

    organization: Mapped[str] = mapped_column(String(63), primary_key=True)
