"""Rules of the metrics service: what a stored point or entry is, and how a stream replays then follows.

No gRPC here: the job lookup and the live feed come in as small interfaces (`JobLookup`, `LiveFeed`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, Protocol, TypeVar

from google.protobuf.message import DecodeError
from sqlalchemy.orm import Session
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import job_pb2, metrics_pb2

from services.kit.db import Database
from services.kit.paging import decode_token, encode_token, page_size
from services.kit.validation import check_organization
from services.metrics.live import LiveMessage
from services.metrics.repository import MetricsRepository
from services.metrics.settings import MetricsSettings
from tuneforge_core import states, subjects
from tuneforge_core.errors import InvalidArgument, Unavailable, Violations

log = logging.getLogger(__name__)

T = TypeVar("T")

METRIC_KINDS = frozenset(v for v in metrics_pb2.MetricKind.values() if v)
LOG_LEVELS = frozenset(metrics_pb2.LogLevel.values())
LOG_SOURCES = frozenset(v for v in metrics_pb2.LogSource.values() if v)
LIST_DEFAULT_PAGE, LIST_MAX_PAGE = 1000, 10_000


class JobLookup(Protocol):
    async def get_job(self, organization: str, job: str) -> job_pb2.Job:
        """The job by id or name in the organization; NotFound / InvalidArgument as the jobs service says."""


class LiveFeed(Protocol):
    async def publish(self, subject: str, payload: bytes) -> None: ...

    def subscribe(self, subjects: Sequence[str]) -> AbstractAsyncContextManager[asyncio.Queue[LiveMessage]]:
        ...


@dataclass(frozen=True)
class _Feed(Generic[T]):
    """What differs between following metrics and following logs."""

    live_subject: Callable[[str], str]
    # (session, job_id, cursor after which to read, limit) -> items in cursor order, filters applied.
    read_page: Callable[[Session, str, Any, int], list[T]]
    cursor: Callable[[T], Any]
    decode_live: Callable[[bytes], Sequence[T]]
    matches: Callable[[T], bool]
    # Dedupe: True when the item was not sent yet (and records it as sent).
    fresh: Callable[[T], bool]


def _is_final(state: int) -> bool:
    return states.is_final(state)


class MetricsManager:
    def __init__(self, db: Database, jobs: JobLookup, live: LiveFeed, settings: MetricsSettings,
                 repository: MetricsRepository | None = None) -> None:
        self.db = db
        self.jobs = jobs
        self.live = live
        self.settings = settings
        self.repo = repository or MetricsRepository()

    # ---- ingest -------------------------------------------------------------------------------------

    async def record_metrics(self, job_id: str, points: Sequence[metrics_pb2.MetricPoint]) -> int:
        """Stores a worker's points (a repeat of a key replaces it), then announces them to followers."""
        accepted: list[metrics_pb2.MetricPoint] = []
        for point in points:
            if point.job_id and point.job_id != job_id:
                raise InvalidArgument(f"a point of job '{point.job_id}' was reported on the subject of "
                                      f"job '{job_id}'")
            if point.kind not in METRIC_KINDS or point.step < 0:
                log.warning("skipping a point of job %s with kind %s and step %s", job_id, point.kind,
                            point.step)
                continue
            stored = metrics_pb2.MetricPoint()
            stored.CopyFrom(point)
            stored.job_id = job_id
            accepted.append(stored)
        if accepted:
            if not await self._store(job_id, partial(self.repo.upsert_points, points=accepted)):
                return 0
            payload = events_pb2.MetricsStored(points=accepted).SerializeToString()
            await self.live.publish(subjects.live_metrics(job_id), payload)
        return len(accepted)

    async def record_logs(self, job_id: str, entries: Sequence[metrics_pb2.LogEntry]) -> int:
        accepted: list[metrics_pb2.LogEntry] = []
        for entry in entries:
            if entry.job_id and entry.job_id != job_id:
                raise InvalidArgument(f"a log entry of job '{entry.job_id}' was reported on the subject of "
                                      f"job '{job_id}'")
            stored = metrics_pb2.LogEntry()
            stored.CopyFrom(entry)
            stored.job_id = job_id
            accepted.append(stored)
        if accepted:
            if not await self._store(job_id, partial(self.repo.upsert_entries, entries=accepted)):
                return 0
            payload = events_pb2.LogsStored(entries=accepted).SerializeToString()
            await self.live.publish(subjects.live_logs(job_id), payload)
        return len(accepted)

    async def _store(self, job_id: str, write: Callable[[Session], None]) -> bool:
        """Runs `write` unless the job was deleted (DeleteJob); False when it was, and nothing is kept."""

        def apply(session: Session) -> bool:
            if self.repo.is_deleted(session, job_id):
                return False
            write(session)
            return True

        if await self.db.run(apply) and not await self.db.run(partial(self.repo.is_deleted, job_id=job_id)):
            return True
        # The job is deleted; if its deletion committed while this was written, what this wrote goes too
        # (`delete_job` marks first and deletes after, so one of the two sees the other).
        await self.db.run(partial(self.repo.delete_job, job_id=job_id))
        log.info("dropped points or log entries of deleted job %s", job_id)
        return False

    async def delete_job(self, job_id: str) -> tuple[int, int]:
        """Forgets a job DeleteJob deleted: marks it deleted (ingest drops it from then on), then deletes its
        points and log entries; returns how many of each. Idempotent."""
        await self.db.run(partial(self.repo.mark_deleted, job_id=job_id))
        return await self.db.run(partial(self.repo.delete_job, job_id=job_id))

    # ---- reads --------------------------------------------------------------------------------------

    async def list_metrics(self, organization: str, job: str, kinds: Sequence[int], size: int,
                           token: str) -> tuple[list[metrics_pb2.MetricPoint], str]:
        v = Violations()
        _check_job_ref(v, organization, job)
        _check_kinds(v, kinds)
        v.raise_if_any("Invalid ListMetrics request")
        limit = page_size(size, default=LIST_DEFAULT_PAGE, maximum=LIST_MAX_PAGE)
        job_id = (await self.jobs.get_job(organization, job)).id
        query = {"organization": organization, "job": job_id, "kinds": sorted(set(kinds))}
        after = decode_token(token, query, cursor_type=tuple[int, int])  # (step, kind) of the last point
        points = await self.db.run(partial(self.repo.list_points, job_id=job_id, kinds=sorted(set(kinds)),
                                           after=after, limit=limit + 1))
        if len(points) <= limit:
            return points, ""
        last = points[limit - 1]
        return points[:limit], encode_token([last.step, int(last.kind)], query)

    def stream_metrics(self, organization: str, job: str, kinds: Sequence[int], start_step: int,
                       follow: bool) -> AsyncIterator[metrics_pb2.MetricPoint]:
        """Stored points in (step, kind) order, then (with `follow`) new ones until the job is final; each
        kind's steps only increase (a resumed attempt's repeated steps are stored, not streamed again)."""
        v = Violations()
        _check_job_ref(v, organization, job)
        _check_kinds(v, kinds)
        v.check(start_step >= 0, "start_step", "must not be negative")
        v.raise_if_any("Invalid StreamMetrics request")
        wanted = frozenset(kinds)
        # Highest step sent per kind (series): each series only moves forward. The replay sends the stored
        # points (the newest attempt's, per key) in step order; what follows is sent only past that step.
        # A resumed attempt repeating steps up to where an earlier attempt got (401..567 after 567), a
        # redelivered report, or a point both the replay and the live feed hold, is not sent again: it is
        # stored (the newest attempt replaces the older point, see MetricPoint) and ListMetrics and a new
        # stream show it, but a follower's series never goes backwards.
        last_step: dict[int, int] = {}

        def fresh(point: metrics_pb2.MetricPoint) -> bool:
            kind = int(point.kind)
            if kind in last_step and point.step <= last_step[kind]:
                return False
            last_step[kind] = point.step
            return True

        feed: _Feed[metrics_pb2.MetricPoint] = _Feed(
            live_subject=subjects.live_metrics,
            read_page=lambda s, job_id, after, limit: self.repo.list_points(
                s, job_id, kinds=sorted(wanted), start_step=start_step, after=after, limit=limit),
            cursor=lambda p: (p.step, int(p.kind)),
            decode_live=lambda data: events_pb2.MetricsStored.FromString(data).points,
            matches=lambda p: (not wanted or p.kind in wanted) and p.step >= start_step,
            fresh=fresh,
        )
        return self._stream(organization, job, follow, feed)

    def stream_logs(self, organization: str, job: str, min_level: int, sources: Sequence[int],
                    follow: bool) -> AsyncIterator[metrics_pb2.LogEntry]:
        """Stored entries in (attempt, sequence) order, then (with `follow`) new ones until the job ends."""
        v = Violations()
        _check_job_ref(v, organization, job)
        v.check(min_level in LOG_LEVELS, "min_level", "is not a LogLevel")
        for i, source in enumerate(sources):
            v.check(source in LOG_SOURCES, f"sources[{i}]", "is not a LogSource")
        v.raise_if_any("Invalid StreamLogs request")
        wanted = frozenset(sources)
        sent: set[tuple[int, int]] = set()

        def fresh(entry: metrics_pb2.LogEntry) -> bool:
            key = (entry.attempt, entry.sequence)
            if key in sent:
                return False
            sent.add(key)
            return True

        feed: _Feed[metrics_pb2.LogEntry] = _Feed(
            live_subject=subjects.live_logs,
            read_page=lambda s, job_id, after, limit: self.repo.list_entries(
                s, job_id, min_level=min_level, sources=sorted(wanted), after=after, limit=limit),
            cursor=lambda e: (e.attempt, e.sequence),
            decode_live=lambda data: events_pb2.LogsStored.FromString(data).entries,
            matches=lambda e: e.level >= min_level and (not wanted or e.source in wanted),
            fresh=fresh,
        )
        return self._stream(organization, job, follow, feed)

    # ---- replay, then follow ------------------------------------------------------------------------

    async def _stream(self, organization: str, job_ref: str, follow: bool,
                      feed: _Feed[T]) -> AsyncIterator[T]:
        job = await self.jobs.get_job(organization, job_ref)
        if not follow:
            async for item in self._replay(job.id, feed):
                yield item
            return
        # Subscribe BEFORE reading the database: whatever is committed after the read is then announced
        # to us, and whatever the read and the announcements both hold is dropped by `fresh`.
        events_subject = subjects.job_events(job.id)
        async with self.live.subscribe([feed.live_subject(job.id), events_subject]) as queue:
            if not _is_final(job.state):
                # The job may have ended between the first lookup and the subscription.
                job = await self.jobs.get_job(organization, job.id)
            async for item in self._replay(job.id, feed):
                if feed.fresh(item):
                    yield item
            async for item in self._follow(organization, job, queue, events_subject, feed):
                yield item

    async def _replay(self, job_id: str, feed: _Feed[T]) -> AsyncIterator[T]:
        after: Any = None
        batch = self.settings.replay_batch
        while True:
            page = await self.db.run(partial(_call_read, feed.read_page, job_id, after, batch))
            for item in page:
                yield item
            if len(page) < batch:
                return
            after = feed.cursor(page[-1])

    async def _follow(self, organization: str, job: job_pb2.Job, queue: asyncio.Queue[LiveMessage],
                      events_subject: str, feed: _Feed[T]) -> AsyncIterator[T]:
        loop = asyncio.get_running_loop()
        grace = self.settings.follow_grace_s
        deadline = self._end_deadline(job, loop.time()) if _is_final(job.state) else None
        next_poll = loop.time() + self.settings.job_poll_interval_s

        def handle(subject: str, data: bytes) -> list[T]:
            nonlocal deadline
            try:
                if subject == events_subject:
                    changed = events_pb2.JobChanged.FromString(data)
                    if _is_final(changed.job.state) and deadline is None:
                        deadline = loop.time() + grace
                    return []
                return [item for item in feed.decode_live(data) if feed.matches(item) and feed.fresh(item)]
            except DecodeError:
                log.warning("ignoring an undecodable message on %s", subject)
                return []

        while True:
            now = loop.time()
            if deadline is None and now >= next_poll:  # even while points keep arriving
                next_poll = now + self.settings.job_poll_interval_s
                state = await self._poll_state(organization, job.id)
                if state is not None and _is_final(state):
                    deadline = loop.time() + grace
                continue
            if deadline is not None and now >= deadline:
                while not queue.empty():  # what already arrived still goes out
                    for item in handle(*queue.get_nowait()):
                        yield item
                return
            wake = deadline if deadline is not None else next_poll
            try:
                subject, data = await asyncio.wait_for(queue.get(), timeout=max(wake - now, 0.001))
            except TimeoutError:
                continue
            for item in handle(subject, data):
                yield item

    def _end_deadline(self, job: job_pb2.Job, now: float) -> float:
        """When a stream of an already final job ends: at once if it ended longer ago than the grace."""
        if job.HasField("end_time") and time.time() - job.end_time.ToSeconds() > self.settings.follow_grace_s:
            return now
        return now + self.settings.follow_grace_s

    async def _poll_state(self, organization: str, job_id: str) -> int | None:
        try:
            return (await self.jobs.get_job(organization, job_id)).state
        except Unavailable:
            log.warning("jobs service unavailable while following job %s; still following", job_id)
            return None


def _call_read(read_page: Callable[[Session, str, Any, int], list[T]], job_id: str, after: Any,
               limit: int, session: Session) -> list[T]:
    return read_page(session, job_id, after, limit)


def _check_job_ref(v: Violations, organization: str, job: str) -> None:
    check_organization(v, organization)
    v.check(bool(job), "job_id", "is required")


def _check_kinds(v: Violations, kinds: Sequence[int]) -> None:
    for i, kind in enumerate(kinds):
        v.check(kind in METRIC_KINDS, f"kinds[{i}]", "is not a MetricKind")


