"""Persistence of jobs (SQLAlchemy); callers own the transaction."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.jobs.models import JobRow


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
        query = select(JobRow).where(JobRow.id == job_id)
        if for_update:
            query = query.with_for_update()
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
