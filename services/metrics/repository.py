"""Persistence of metric points and log entries (synchronous; run through `Database.run`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Table, and_, delete, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from tuneforge.v1 import metrics_pb2

from services.metrics.converters import entry_to_values, point_to_values, row_to_entry, row_to_point
from services.metrics.models import DeletedJobRow, LogEntryRow, MetricPointRow

# Rows per INSERT statement: well under SQLite's bound-parameter limit with ~22 columns a row.
_CHUNK = 400


def _upsert(session: Session, table: Table, rows: list[dict[str, Any]], keys: Sequence[str]) -> None:
    """INSERT ... ON CONFLICT (keys) DO UPDATE, keeping a stored row a redelivery of an OLDER attempt would
    overwrite: the newest attempt of a job wins whatever order the messages arrive in."""
    dialect = session.get_bind().dialect.name
    if dialect not in ("sqlite", "postgresql"):
        raise NotImplementedError(f"upsert is not implemented for {dialect}")
    insert = sqlite.insert if dialect == "sqlite" else postgresql.insert
    for start in range(0, len(rows), _CHUNK):
        stmt = insert(table).values(rows[start:start + _CHUNK])
        updates = {c.name: stmt.excluded[c.name] for c in table.columns if c.name not in keys}
        stmt = stmt.on_conflict_do_update(index_elements=list(keys), set_=updates,
                                          where=table.c.attempt <= stmt.excluded.attempt)
        session.execute(stmt)


def _newest_per_key(rows: list[dict[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """One row per key (highest attempt, then the last reported): one INSERT may not touch a row twice."""
    by_key: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in rows:
        key = tuple(row[k] for k in keys)
        if key not in by_key or row["attempt"] >= by_key[key]["attempt"]:
            by_key[key] = row
    return list(by_key.values())


class MetricsRepository:
    POINT_KEY = ("job_id", "step", "kind")
    ENTRY_KEY = ("job_id", "attempt", "sequence")

    def upsert_points(self, session: Session, points: Sequence[metrics_pb2.MetricPoint]) -> None:
        rows = _newest_per_key([point_to_values(p) for p in points], self.POINT_KEY)
        if rows:
            _upsert(session, MetricPointRow.__table__, rows, self.POINT_KEY)  # type: ignore[arg-type]

    def list_points(self, session: Session, job_id: str, *, kinds: Sequence[int] = (), start_step: int = 0,
                    after: tuple[int, int] | None = None, limit: int = 500) -> list[metrics_pb2.MetricPoint]:
        """Points in (step, kind) order, strictly after the (step, kind) cursor `after` when given."""
        query = select(MetricPointRow).where(MetricPointRow.job_id == job_id)
        if kinds:
            query = query.where(MetricPointRow.kind.in_(list(kinds)))
        if start_step:
            query = query.where(MetricPointRow.step >= start_step)
        if after is not None:
            step, kind = after
            query = query.where(or_(MetricPointRow.step > step,
                                    and_(MetricPointRow.step == step, MetricPointRow.kind > kind)))
        query = query.order_by(MetricPointRow.step, MetricPointRow.kind).limit(limit)
        return [row_to_point(row) for row in session.scalars(query)]

    def upsert_entries(self, session: Session, entries: Sequence[metrics_pb2.LogEntry]) -> None:
        rows = _newest_per_key([entry_to_values(e) for e in entries], self.ENTRY_KEY)
        if rows:
            _upsert(session, LogEntryRow.__table__, rows, self.ENTRY_KEY)  # type: ignore[arg-type]

    def list_entries(self, session: Session, job_id: str, *, min_level: int = 0, sources: Sequence[int] = (),
                     after: tuple[int, int] | None = None, limit: int = 500) -> list[metrics_pb2.LogEntry]:
        """Entries in (attempt, sequence) order, strictly after the (attempt, sequence) cursor `after`."""
        query = select(LogEntryRow).where(LogEntryRow.job_id == job_id)
        if min_level:
            query = query.where(LogEntryRow.level >= min_level)
        if sources:
            query = query.where(LogEntryRow.source.in_(list(sources)))
        if after is not None:
            attempt, sequence = after
            query = query.where(or_(LogEntryRow.attempt > attempt,
                                    and_(LogEntryRow.attempt == attempt, LogEntryRow.sequence > sequence)))
        query = query.order_by(LogEntryRow.attempt, LogEntryRow.sequence).limit(limit)
        return [row_to_entry(row) for row in session.scalars(query)]

    # -- deleted jobs (DeleteJob) -----------------------------------------------------------------------

    def is_deleted(self, session: Session, job_id: str) -> bool:
        return session.get(DeletedJobRow, job_id) is not None

    def mark_deleted(self, session: Session, job_id: str) -> None:
        """Records the job as deleted (idempotent); ingest drops its points and entries from then on."""
        if session.get(DeletedJobRow, job_id) is None:
            session.add(DeletedJobRow(job_id=job_id))
            session.flush()

    def delete_job(self, session: Session, job_id: str) -> tuple[int, int]:
        """Deletes every point and log entry of the job; returns how many of each."""
        points = session.execute(delete(MetricPointRow).where(MetricPointRow.job_id == job_id))
        entries = session.execute(delete(LogEntryRow).where(LogEntryRow.job_id == job_id))
        return (int(getattr(points, "rowcount", 0) or 0), int(getattr(entries, "rowcount", 0) or 0))
