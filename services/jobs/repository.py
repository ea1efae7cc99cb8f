"""Persistence of jobs (SQLAlchemy); callers own the transaction.

Writes go through the ORM (`JobRepository`, in the caller's session). GetJob and ListJobs, the reads every
client polls, go through `JobReader` instead: SQLAlchemy Core statements built once at import, of the
columns a Job message is made of (`JOB_COLUMNS`), run on a plain connection and answered as read-only rows,
without a session, an identity map or ORM objects (which cost eight times the query itself). Each read sees
every write committed before it began, as a session's would.

GetJob's lookups are also grouped (`JobLookups`): the lookups that arrive while one group is being read
wait for the next group, which reads them all with one query on one database thread. Under load the hop to
the database thread and back, which costs more than the query, is paid once per group instead of once per
call; a lookup alone is read at once. A group is read only after every lookup in it arrived, so it too sees
every write committed before its caller asked.
"""

from __future__ import annotations

import asyncio
import builtins
import weakref
from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any, TypeAlias

from sqlalchemy import Connection, Row, Select, bindparam, delete, func, select, text, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from tuneforge.v1 import job_pb2

from services.jobs.models import JobRow, OrganizationLock, WorkerRow
from services.jobs.quotas import SLOT_STATES
from services.kit.db import Database
from services.kit.protos import as_utc

QUEUED = job_pb2.JOB_STATE_QUEUED
# The fair scheduler's lock row among the organizations' (a "#" is in no organization's name).
SCHEDULER_LOCK = "#scheduler"
# A row of `JOB_COLUMNS`: read-only, its attributes named as JobRow's.
JobRecord: TypeAlias = Row[*tuple[Any, ...]]

# What `services.jobs.converters.job_to_proto` reads of a job: a Row of these has the attributes it needs.
JOB_COLUMNS = (
    JobRow.id, JobRow.organization, JobRow.name, JobRow.description, JobRow.spec, JobRow.state, JobRow.error,
    JobRow.progress, JobRow.output, JobRow.attempt, JobRow.worker_id, JobRow.revision, JobRow.labels,
    JobRow.create_time, JobRow.start_time, JobRow.end_time, JobRow.update_time, JobRow.status_message,
    JobRow.phase, JobRow.usage_hardware, JobRow.usage_gpu_count, JobRow.usage_hourly_usd,
    JobRow.usage_run_seconds, JobRow.usage_cost_usd, JobRow.usage_running_since, JobRow.usage_tokens,
    JobRow.estimated_cost_usd, JobRow.estimated_seconds, JobRow.priority,
)
_JOBS = select(*JOB_COLUMNS).where(JobRow.organization == bindparam("organization"))
_BY_ID = _JOBS.where(JobRow.id == bindparam("ref"))
_BY_NAME = _JOBS.where(JobRow.name == bindparam("ref"))
# Grouped lookups (JobLookups): ids are unique across organizations, names within one.
_BY_IDS = select(*JOB_COLUMNS).where(JobRow.id.in_(bindparam("ids", expanding=True)))
_BY_NAMES = select(*JOB_COLUMNS).where(
    tuple_(JobRow.organization, JobRow.name).in_(bindparam("names", expanding=True)))
# ListJobs, one statement per combination of its filters; newest first.
_STATES = JobRow.state.in_(bindparam("states", expanding=True))
_BEFORE = JobRow.id < bindparam("before_id")
_PAGES = {
    (states, before): _JOBS.where(*([_STATES] if states else []), *([_BEFORE] if before else []))
    .order_by(JobRow.id.desc()).limit(bindparam("limit"))
    for states in (False, True) for before in (False, True)
}


def locking(session: Session, query: Select[Any]) -> Select[Any]:
    """`query`, locking what it reads until the transaction ends.

    SQLite has no FOR UPDATE, and pysqlite runs a SELECT that comes before a transaction's first write
    outside any transaction: a read-modify-write (a job's next event sequence, its state) could then be
    made on a row another writer changed in between, and lose or collide with that change (CancelJob right
    after a worker took the job: UNIQUE constraint failed on jobs_events). There the transaction starts
    with a write that changes nothing (SQLite takes its write lock at a write statement, whether rows
    match or not), so the read sees every earlier commit and no other writer can come in between; others
    wait for the commit (busy_timeout), as they would for PostgreSQL's row lock."""
    if session.get_bind().dialect.name == "sqlite":
        session.execute(_SQLITE_WRITE_LOCK)
    return query.with_for_update()


_SQLITE_WRITE_LOCK = text(f"UPDATE {JobRow.__tablename__} SET id = id WHERE 0")


class JobRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def find(self, organization: str, ref: str, *, for_update: bool = False) -> JobRow | None:
        """By id, else by name, always within the organization."""
        query = select(JobRow).where(JobRow.organization == organization)
        by_id = query.where(JobRow.id == ref)
        if for_update:
            by_id = locking(self.session, by_id)
        row = self.session.scalars(by_id).first()
        if row is None:
            by_name = query.where(JobRow.name == ref)
            if for_update:
                by_name = by_name.with_for_update()  # the write lock is held already
            row = self.session.scalars(by_name).first()
        return row

    def get(self, job_id: str, *, for_update: bool = False) -> JobRow | None:
        """By id; with `for_update`, locked and read again even if this session read it before."""
        query = select(JobRow).where(JobRow.id == job_id)
        if for_update:
            query = locking(self.session, query).execution_options(populate_existing=True)
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
            query = locking(self.session, query)
        return list(self.session.scalars(query.order_by(JobRow.id)))

    # -- quotas (services.jobs.quotas) -----------------------------------------------------------

    def lock_organization(self, organization: str) -> None:
        """Locks the organization's quota row (created on first use) until the transaction ends: the
        decisions that count its jobs (CreateJob, dispatching a held job) then take turns. Done first in a
        transaction, this is its first write too, so SQLite serializes it the same way."""
        self._lock(organization)

    def lock_scheduler(self) -> None:
        """Locks the fair scheduler's row (`OrganizationLock`, "#scheduler") until the transaction ends:
        its passes take turns, across replicas too. Taken after an organization's lock, never before one."""
        self._lock(SCHEDULER_LOCK)

    def _lock(self, key: str) -> None:
        dialect = self.session.get_bind().dialect.name
        values = {"organization": key}
        if dialect == "postgresql":
            self.session.execute(postgresql.insert(OrganizationLock).values(values).on_conflict_do_nothing())
        elif dialect == "sqlite":
            self.session.execute(sqlite.insert(OrganizationLock).values(values).on_conflict_do_nothing())
        elif self.session.get(OrganizationLock, key) is None:
            self.session.add(OrganizationLock(organization=key))
            self.session.flush()
        self.session.scalars(select(OrganizationLock).where(OrganizationLock.organization == key)
                             .with_for_update()).first()

    def active_by_organization(self) -> dict[str, int]:
        """Each organization's jobs that hold a running slot (dispatched and not ended: `SLOT_STATES`)."""
        query = (select(JobRow.organization, func.count()).where(
            JobRow.dispatched.is_(True), JobRow.state.in_(list(SLOT_STATES))).group_by(JobRow.organization))
        return {org: int(n) for org, n in self.session.execute(query)}

    def last_dispatch_by_organization(self, organizations: Collection[str]) -> dict[str, datetime]:
        """When each of `organizations` last had a job dispatched (those that never did are left out)."""
        query = (select(JobRow.organization, func.max(JobRow.dispatch_time))
                 .where(JobRow.organization.in_(list(organizations)), JobRow.dispatch_time.is_not(None))
                 .group_by(JobRow.organization))
        return {org: as_utc(at) for org, at in self.session.execute(query) if at is not None}

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
            query = locking(self.session, query).execution_options(populate_existing=True)
        return list(self.session.scalars(query))


class JobReader:
    """GetJob's and ListJobs' reads (see the module): rows of `JOB_COLUMNS`, organization-scoped as
    `JobRepository.find` and `JobRepository.list` are, with the same answers."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def find(self, organization: str, ref: str) -> JobRecord | None:
        """By id, else by name, always within the organization."""
        params = {"organization": organization, "ref": ref}
        row = self.connection.execute(_BY_ID, params).first()
        if row is None:
            row = self.connection.execute(_BY_NAME, params).first()
        return row

    def list(self, organization: str, states: Sequence[int], before_id: str | None,
             limit: int) -> list[JobRecord]:
        """Newest first; ids are time-ordered, so the last id of a page is the cursor of the next."""
        params: dict[str, Any] = {"organization": organization, "limit": limit}
        if states:
            params["states"] = list(states)
        if before_id:
            params["before_id"] = before_id
        return list(self.connection.execute(_PAGES[bool(states), bool(before_id)], params))


    def find_many(self, wanted: Sequence[tuple[str, str]]) -> builtins.list[JobRecord | None]:
        """`find` of each (organization, ref), with two queries for them all (by id, then by name for the
        refs that are not an id of their organization's)."""
        ids = list({ref for _, ref in wanted})
        by_id = {row.id: row for row in self.connection.execute(_BY_IDS, {"ids": ids})}
        found: builtins.list[JobRecord | None] = []
        for organization, ref in wanted:
            row = by_id.get(ref)
            found.append(row if row is not None and row.organization == organization else None)
        names = list({(organization, ref) for (organization, ref), row in zip(wanted, found, strict=True)
                      if row is None})
        if names:
            by_name = {(row.organization, row.name): row
                       for row in self.connection.execute(_BY_NAMES, {"names": names})}
            found = [row if row is not None else by_name.get(key)
                     for key, row in zip(wanted, found, strict=True)]
        return found


# Lookups read together at most (a group beyond it waits for the next read).
MAX_GROUP = 128


class JobLookups:
    """GetJob's lookups of one database, grouped as the module says. One per database and event loop:
    `JobLookups.of(db)`."""

    _instances: weakref.WeakKeyDictionary[Database, JobLookups] = weakref.WeakKeyDictionary()

    def __init__(self, db: Database, loop: asyncio.AbstractEventLoop) -> None:
        self.db = db
        self.loop = loop
        self._pending: list[tuple[str, str, asyncio.Future[JobRecord | None]]] = []
        self._reading = False
        self._task: asyncio.Task[None] | None = None  # held: the loop keeps only weak references

    @classmethod
    def of(cls, db: Database) -> JobLookups:
        loop = asyncio.get_running_loop()
        lookups = cls._instances.get(db)
        if lookups is None or lookups.loop is not loop:
            lookups = cls._instances[db] = cls(db, loop)
        return lookups

    async def find(self, organization: str, ref: str) -> JobRecord | None:
        """`JobReader.find`, read with the other lookups waiting."""
        answer: asyncio.Future[JobRecord | None] = self.loop.create_future()
        self._pending.append((organization, ref, answer))
        if not self._reading:
            self._reading = True
            self._task = self.loop.create_task(self._read_groups())
        return await answer

    async def _read_groups(self) -> None:
        group: list[tuple[str, str, asyncio.Future[JobRecord | None]]] = []
        try:
            while self._pending:
                group, self._pending = self._pending[:MAX_GROUP], self._pending[MAX_GROUP:]
                wanted = [(organization, ref) for organization, ref, _ in group]
                try:
                    rows = await self.db.pool.run(self._read, wanted)
                except Exception as exc:
                    for _, _, answer in group:
                        if not answer.done():
                            answer.set_exception(exc)
                    continue
                for (_, _, answer), row in zip(group, rows, strict=True):
                    if not answer.done():  # its caller may have gone
                        answer.set_result(row)
        finally:
            self._reading = False
            # Cancelled (the loop is closing): no lookup is left waiting for an answer that will not come.
            for _, _, answer in [*group, *self._pending]:
                if not answer.done():
                    answer.cancel()
            self._pending = []

    def _read(self, wanted: list[tuple[str, str]]) -> list[JobRecord | None]:
        with self.db.engine.connect() as connection:
            if len(wanted) == 1:
                return [JobReader(connection).find(*wanted[0])]
            return JobReader(connection).find_many(wanted)


class WorkerRepository:
    """The latest heartbeat of each worker."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, worker_id: str, *, for_update: bool = False) -> WorkerRow | None:
        query = select(WorkerRow).where(WorkerRow.id == worker_id)
        if for_update:
            query = locking(self.session, query)
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
