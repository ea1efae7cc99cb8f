"""Persistence of jobs (SQLAlchemy); callers own the transaction."""

from __future__ import annotations

import builtins
from collections.abc import Collection, Sequence
from datetime import datetime

from sqlalchemy import delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from tuneforge.v1 import job_pb2

from services.jobs.models import JobRow, OrganizationLock, WorkerRow

QUEUED = job_pb2.JOB_STATE_QUEUED


class JobRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def find(self, organization: str, ref: str, *, for_update: bool = False) -> JobRow | None:
        """By id, else by name, always within the organization."""
        query = select(JobRow).where(JobRow.organization == organization)
        by_id = query.where(JobRow.id == ref)
        if for_update:
            by_id = by_id.with_for_update()
        row = self.session.scalars(by_id).first()
        if row is None:
            by_name = query.where(JobRow.name == ref)
            if for_update:
                by_name = by_name.with_for_update()
            row = self.session.scalars(by_name).first()
        return row

    def get(self, job_id: str, *, for_update: bool = False) -> JobRow | None:
        """By id; with `for_update`, locked and read again even if this session read it before."""
        query = select(JobRow).where(JobRow.id == job_id)
        if for_update:
            query = query.with_for_update().execution_options(populate_existing=True)
        return self.session.scalars(query).first()

    def by_request_id(self, organization: str, request_id: str) -> JobRow | None:
        return self.session.scalars(select(JobRow).where(
            JobRow.organization == organization, JobRow.request_id == request_id)).first()

    def name_taken(self, organization: str, name: str) -> bool:
        return self.session.scalars(select(JobRow.id).where(
            JobRow.organization == organization, JobRow.name == name)).first() is not None

    def add(self, row: JobRow) -> None:
        self.session.add(row)
        self.session.flush()

    def list(self, organization: str, states: Sequence[int], before_id: str | None,
             limit: int) -> list[JobRow]:
        """Newest first; ids are time-ordered, so the last id of a page is the cursor of the next."""
        query = select(JobRow).where(JobRow.organization == organization)
        if states:
            query = query.where(JobRow.state.in_(list(states)))
        if before_id:
            query = query.where(JobRow.id < before_id)
        return list(self.session.scalars(query.order_by(JobRow.id.desc()).limit(limit)))

    def in_states(self, states: Collection[int], *, worker_id: str | None = None,
                  for_update: bool = False) -> builtins.list[JobRow]:
        """Jobs in `states` (of every organization), oldest first; only those of `worker_id` when given."""
        query = select(JobRow).where(JobRow.state.in_(list(states)))
        if worker_id is not None:
            query = query.where(JobRow.worker_id == worker_id)
        if for_update:
            query = query.with_for_update()
        return list(self.session.scalars(query.order_by(JobRow.id)))

    # -- quotas (services.jobs.quotas) -----------------------------------------------------------

    def lock_organization(self, organization: str) -> None:
        """Locks the organization's quota row (created on first use) until the transaction ends: the
        decisions that count its jobs (CreateJob, dispatching a held job) then take turns. Done first in a
        transaction, this is its first write too, so SQLite serializes it the same way."""
        dialect = self.session.get_bind().dialect.name
        values = {"organization": organization}
        if dialect == "postgresql":
            self.session.execute(postgresql.insert(OrganizationLock).values(values).on_conflict_do_nothing())
        elif dialect == "sqlite":
            self.session.execute(sqlite.insert(OrganizationLock).values(values).on_conflict_do_nothing())
        elif self.session.get(OrganizationLock, organization) is None:
            self.session.add(OrganizationLock(organization=organization))
            self.session.flush()
        self.session.scalars(select(OrganizationLock).where(OrganizationLock.organization == organization)
                             .with_for_update()).first()

    def count(self, organization: str, states: Collection[int], *, dispatched: bool | None = None) -> int:
        query = select(func.count()).select_from(JobRow).where(
            JobRow.organization == organization, JobRow.state.in_(list(states)))
        if dispatched is not None:
            query = query.where(JobRow.dispatched.is_(dispatched))
        return int(self.session.scalar(query) or 0)

    def held(self, organization: str | None = None, *, limit: int | None = None,
             for_update: bool = False) -> builtins.list[JobRow]:
        """QUEUED jobs whose assignment waits for a running slot, oldest first (of one organization when
        given); with `for_update`, locked and read again."""
        query = select(JobRow).where(JobRow.dispatched.is_(False), JobRow.state == QUEUED)
        if organization is not None:
            query = query.where(JobRow.organization == organization)
        query = query.order_by(JobRow.create_time, JobRow.id)
        if limit is not None:
            query = query.limit(limit)
        if for_update:
            query = query.with_for_update().execution_options(populate_existing=True)
        return list(self.session.scalars(query))


class WorkerRepository:
    """The latest heartbeat of each worker."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, worker_id: str, *, for_update: bool = False) -> WorkerRow | None:
        query = select(WorkerRow).where(WorkerRow.id == worker_id)
        if for_update:
            query = query.with_for_update()
        return self.session.scalars(query).first()

    def add(self, row: WorkerRow) -> None:
        self.session.add(row)
        self.session.flush()

    def all(self) -> list[WorkerRow]:
        return list(self.session.scalars(select(WorkerRow).order_by(WorkerRow.id)))

    def list(self, after_id: str | None, limit: int) -> list[WorkerRow]:
        """By id; the last id of a page is the cursor of the next."""
        query = select(WorkerRow)
        if after_id:
            query = query.where(WorkerRow.id > after_id)
        return list(self.session.scalars(query.order_by(WorkerRow.id).limit(limit)))

    def forget_before(self, cutoff: datetime) -> int:
        """Deletes the workers last heard from before `cutoff`; returns how many."""
        result = self.session.execute(delete(WorkerRow).where(WorkerRow.last_heartbeat < cutoff))
        return int(getattr(result, "rowcount", 0) or 0)
