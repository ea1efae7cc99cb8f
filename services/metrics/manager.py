"""Rules of the metrics service: what a stored point or entry is, and how a stream replays then follows.

No gRPC here: the job lookup and the live feed come in as small interfaces (`JobLookup`, `LiveFeed`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, aclosing
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Any, Generic, Protocol, TypeVar, cast

from google.protobuf.message import Message
from sqlalchemy.orm import Session
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import job_pb2, metrics_pb2

from services.kit.db import Database, DriverConnection
from services.kit.paging import decode_token, encode_token, page_size
from services.kit.telemetry import INGESTED_POINTS
from services.kit.validation import check_organization
from services.metrics.fanout import (
    Chunk,
    Cursor,
    EarlyFeed,
    FanoutHub,
    Key,
    LiveItem,
    end_deadline,
    live_item,
)
from services.metrics.live import Deliver, LiveMessage
from services.metrics.prepare import (
    ANNOUNCEMENT_BYTES,
    METRIC_KINDS,
    Batch,
    Kind,
    Prepared,
    PreparingProcesses,
    Report,
    prepare,
    stored_items,
)
from services.metrics.repository import MetricsRepository, StorageForm
from services.metrics.settings import MetricsSettings
from tuneforge_core import states, subjects
from tuneforge_core.errors import InvalidArgument, Violations

log = logging.getLogger(__name__)

T = TypeVar("T")

LOG_LEVELS = frozenset(metrics_pb2.LogLevel.values())
LOG_SOURCES = frozenset(v for v in metrics_pb2.LogSource.values() if v)
LIST_DEFAULT_PAGE, LIST_MAX_PAGE = 1000, 10_000


class JobLookup(Protocol):
    async def get_job(self, organization: str, job: str) -> job_pb2.Job:
        """The job by id or name in the organization; NotFound / InvalidArgument as the jobs service says."""


class LiveFeed(Protocol):
    """Where stored items are announced, and followed. The manager subscribes once per followed job and
    subject in a process (services.metrics.fanout), however many streams follow it."""

    async def publish(self, subject: str, payload: bytes) -> None: ...

    def subscribe(self, subjects: Sequence[str]) -> AbstractAsyncContextManager[asyncio.Queue[LiveMessage]]:
        ...

    def listen(self, subjects: Sequence[str], deliver: Deliver) -> AbstractAsyncContextManager[None]: ...


@dataclass(frozen=True, slots=True)
class _Turn:
    """A batch's place in the order of ingest: `wait` returns once every batch that arrived before it has
    written (or failed), `free` says whether that is so already; `wait_announced` returns once they have
    also been announced. `written` lets the next batch write (its own announcement still waits for this
    one's)."""

    before: asyncio.Future[None] | None
    announced_before: asyncio.Future[None] | None
    mine: asyncio.Future[None]

    def free(self) -> bool:
        return self.before is None or self.before.done()

    async def wait(self) -> None:
        await _after(self.before)

    async def wait_announced(self) -> None:
        await _after(self.announced_before)

    def written(self) -> None:
        if not self.mine.done():
            self.mine.set_result(None)


async def _after(before: asyncio.Future[None] | None) -> None:
    if before is not None and not before.done():
        await asyncio.shield(before)


@dataclass(frozen=True)
class _Feed(Generic[T]):
    """What differs between following metrics and following logs."""

    live_subject: Callable[[str], str]
    # (session, job_id, cursor after which to read, limit) -> items in cursor order, filters applied.
    read_page: Callable[[Session, str, Any, int], list[T]]
    # What the rest read of an item, read once (services.metrics.fanout.Key).
    key: Callable[[T], Key]
    # The item's place in the order of storage, from its key.
    cursor: Callable[[Key], Cursor]
    decode_live: Callable[[bytes], Sequence[T]]
    # The job's reports, to hand their items out before they are stored (None: only once stored).
    early: Callable[[str], EarlyFeed[T]] | None
    # Whether the stream asked for the item, from its key.
    matches: Callable[[Key], bool]
    # Dedupe, from the key: True when the item was not sent yet (and records it as sent).
    fresh: Callable[[Key], bool]


def _is_final(state: int) -> bool:
    return states.is_final(state)


class MetricsManager:
    def __init__(self, db: Database, jobs: JobLookup, live: LiveFeed, settings: MetricsSettings,
                 repository: MetricsRepository | None = None, preparing: PreparingProcesses | None = None
                 ) -> None:
        self.db = db
        self.jobs = jobs
        self.live = live
        self.settings = settings
        self.repo = repository or MetricsRepository()
        # Where large batches of worker messages are prepared (None: always on a thread).
        self.preparing = preparing
        self._form = StorageForm.of(db.engine.dialect)
        # The write, and the announcement, of the latest batch handed to ingest, which the next one waits
        # for before its own (`_write_turn`).
        self._last_write: asyncio.Future[None] | None = None
        self._last_announced: asyncio.Future[None] | None = None

    # ---- ingest -------------------------------------------------------------------------------------
    # The ingest consumer hands over a batch of reports at a time (services.metrics.prepare.Report: a worker
    # message as (subject, payload), or a function returning (job id, points or entries)). All the per-item
    # work (decoding, checks, rows, the announcement's bytes) runs on a thread or in a process of its own,
    # never on the event loop; a batch is written in one transaction, then announced once per job
    # (see `_ingest`).

    async def record_metrics(self, job_id: str, points: Sequence[metrics_pb2.MetricPoint]) -> int:
        """Stores a worker's points (a repeat of a key replaces it), then announces them to followers."""

        def report() -> tuple[str, list[metrics_pb2.MetricPoint]]:
            copies = [metrics_pb2.MetricPoint() for _ in points]
            for copy, point in zip(copies, points, strict=True):
                copy.CopyFrom(point)
            return job_id, copies

        refused, stored = await self.record_metrics_batch([report])
        if refused:
            raise InvalidArgument(refused[0])
        return stored

    async def record_logs(self, job_id: str, entries: Sequence[metrics_pb2.LogEntry]) -> int:
        def report() -> tuple[str, list[metrics_pb2.LogEntry]]:
            copies = [metrics_pb2.LogEntry() for _ in entries]
            for copy, entry in zip(copies, entries, strict=True):
                copy.CopyFrom(entry)
            return job_id, copies

        refused, stored = await self.record_logs_batch([report])
        if refused:
            raise InvalidArgument(refused[0])
        return stored

    async def record_metrics_batch(self, reports: Sequence[Report]) -> tuple[dict[int, str], int]:
        """Stores the points of many reports in one transaction (a repeat of a key replaces it unless it is of
        an older attempt), then announces each job's points once. Returns {index of a report that can never
        be stored: why} and how many points were stored; raises (nothing kept) when the database fails."""
        refused, stored = await self._ingest("metrics", reports, self.repo.write_point_rows,
                                             subjects.live_metrics)
        INGESTED_POINTS.inc(stored)
        return refused, stored

    async def record_logs_batch(self, reports: Sequence[Report]) -> tuple[dict[int, str], int]:
        """`record_metrics_batch` for log entries."""
        return await self._ingest("logs", reports, self.repo.write_entry_rows, subjects.live_logs)

    async def _ingest(self, kind: Kind, reports: Sequence[Report],
                      write_rows: Callable[[DriverConnection, Iterable[list[list[Any]]]], None],
                      live_subject: Callable[[str], str]) -> tuple[dict[int, str], int]:
        """Two stages, so that consecutive batches overlap (the consumer keeps two in flight): the per-item
        Python work (services.metrics.prepare: decoding, checks, rows, the announcement's bytes) on a thread
        of its own, or for a large batch of worker messages in a process of its own (`preparing`), then the
        write on a database thread, where SQLite and PostgreSQL mostly run outside the GIL. Writes and their
        announcements keep the order the batches were handed over in (`_write_turn`), so a repeated key ends
        as applying them in order would, and followers get each job's items in order."""
        form = self._form

        def prepare_here() -> Batch:
            return prepare(kind, form, reports)

        def write_then_recheck(parts: Iterable[Batch]) -> tuple[dict[int, str], dict[str, Prepared]]:
            """Writes the parts of a batch in one transaction, as they come; the refused reports and what
            was stored of each job."""
            refused: dict[int, str] = {}
            shares: dict[str, list[Prepared]] = {}
            gone: set[str] = set()

            def rows_of_parts() -> Iterator[list[list[Any]]]:
                for part_refused, prepared in parts:
                    refused.update(part_refused)
                    for job_id, p in prepared.items():
                        shares.setdefault(job_id, []).append(p)
                    yield [row for p in prepared.values() for row in p.rows]

            # On the driver's connection, not an ORM session: for a small batch the session's own work was
            # most of the time spent here, all of it holding the GIL the event loop's streams wait for.
            with self.db.driver_connection() as conn:
                # A job deleted before or while this batch was written: what the batch wrote of it goes
                # (`delete_job` marks first and deletes after, so one of the two sees the other). Asked once,
                # after the commit, on the same connection. On PostgreSQL each round trip of an ingest batch
                # waits for the GIL while the event loop writes the streams: a small batch sends its rows,
                # the commit and the question in one (`pipelined`), where they took three.
                parts_now: Iterable[list[list[Any]]] = rows_of_parts()
                if conn.dialect.name == "postgresql":
                    parts_now = [[row for part in parts_now for row in part]]
                    if shares and self.repo.pipelines(conn, len(parts_now[0])):
                        with conn.pipelined() as commit:
                            write_rows(conn, parts_now)
                            commit()
                            answer = self.repo.ask_deleted_among(conn, list(shares))
                        parts_now = []
                        gone = answer()
                if parts_now:
                    write_rows(conn, parts_now)
                    if shares:
                        with conn.after_commit():
                            gone = self.repo.deleted_among(conn, list(shares))
            for job_id in sorted(gone):
                with self.db.session() as session:
                    self.repo.delete_job(session, job_id)
                log.info("dropped points or log entries of deleted job %s", job_id)
                del shares[job_id]
            return refused, {job_id: _merged(ps) for job_id, ps in shares.items()}

        def write_part(part: Batch) -> tuple[dict[int, str], dict[str, Prepared]]:
            refused, prepared = part
            # Nothing to store (every report refused): the database is not asked, and need not be up.
            return write_then_recheck([part]) if prepared else (refused, {})

        async with self._write_turn() as turn:
            submitted = None
            if self.preparing is not None and all(isinstance(report, tuple) for report in reports):
                submitted = self.preparing.submit(kind, form, cast(Sequence[tuple[str, bytes]], reports))
            if submitted is not None:
                # Prepared in processes of their own, a chunk at a time, written as they come.
                try:
                    await turn.wait()
                    refused, stored = await self.db.pool.run(lambda: write_then_recheck(submitted.parts()))
                finally:
                    submitted.cancel()
            elif turn.free():
                # No batch before this one is still writing: one trip to a database thread does it all
                # (under load, each trip is a turn of a busy event loop for the followers waiting on it).
                refused, stored = await self.db.pool.run(lambda: write_part(prepare_here()))
            else:
                part = await asyncio.to_thread(prepare_here)
                await turn.wait()
                refused, stored = await self.db.pool.run(partial(write_part, part))
            # The next batch may write while this one is announced; announcements keep the order of the
            # writes too: followers see each job's items in the order they were stored (a stream that
            # followed a later batch first would take an earlier one for old news).
            turn.written()
            await turn.wait_announced()
            for job_id, p in stored.items():
                for payload in p.payloads:
                    await self.live.publish(live_subject(job_id), payload)
        return refused, sum(p.count for p in stored.values())

    @contextlib.asynccontextmanager
    async def _write_turn(self) -> AsyncIterator[_Turn]:
        """A place in the order of writes and announcements, taken when a batch arrives (see _Turn): the
        next batch may write once this one says it has `written` (or exits), and announce once this one
        exits."""
        loop = asyncio.get_running_loop()
        turn = _Turn(self._last_write, self._last_announced, loop.create_future())
        announced = loop.create_future()
        self._last_write, self._last_announced = turn.mine, announced
        try:
            yield turn
        finally:
            turn.written()
            announced.set_result(None)
            if self._last_announced is announced:
                self._last_write = self._last_announced = None

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
        return _items(self.stream_metric_chunks(organization, job, kinds, start_step, follow))

    def stream_metric_chunks(self, organization: str, job: str, kinds: Sequence[int], start_step: int,
                             follow: bool) -> AsyncGenerator[Chunk[metrics_pb2.MetricPoint], None]:
        """`stream_metrics` as the servicer sends it: chunks of points with their bytes (a live point's
        bytes are shared by every stream it goes to), and a mark after catching up from storage."""
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

        def fresh(key: Key) -> bool:  # (step, kind)
            step, kind = key
            if kind in last_step and step <= last_step[kind]:
                return False
            last_step[kind] = step
            return True

        feed: _Feed[metrics_pb2.MetricPoint] = _Feed(
            live_subject=subjects.live_metrics,
            read_page=lambda s, job_id, after, limit: self.repo.list_points(
                s, job_id, kinds=sorted(wanted), start_step=start_step, after=after, limit=limit),
            key=_point_key,
            cursor=_point_cursor,
            decode_live=lambda data: events_pb2.MetricsStored.FromString(data).points,
            early=self._early("metrics", subjects.worker_metrics),
            matches=(lambda key: key[0] >= start_step) if not wanted else
            (lambda key: key[1] in wanted and key[0] >= start_step),
            fresh=fresh,
        )
        return self._stream(organization, job, follow, feed)

    def stream_logs(self, organization: str, job: str, min_level: int, sources: Sequence[int],
                    follow: bool) -> AsyncIterator[metrics_pb2.LogEntry]:
        """Stored entries in (attempt, sequence) order, then (with `follow`) new ones until the job ends."""
        return _items(self.stream_log_chunks(organization, job, min_level, sources, follow))

    def stream_log_chunks(self, organization: str, job: str, min_level: int, sources: Sequence[int],
                          follow: bool) -> AsyncGenerator[Chunk[metrics_pb2.LogEntry], None]:
        """`stream_logs` in chunks, as `stream_metric_chunks`."""
        v = Violations()
        _check_job_ref(v, organization, job)
        v.check(min_level in LOG_LEVELS, "min_level", "is not a LogLevel")
        for i, source in enumerate(sources):
            v.check(source in LOG_SOURCES, f"sources[{i}]", "is not a LogSource")
        v.raise_if_any("Invalid StreamLogs request")
        wanted = frozenset(sources)
        sent: set[Cursor] = set()

        def fresh(key: Key) -> bool:  # (attempt, sequence, level, source)
            cursor = _entry_cursor(key)
            if cursor in sent:
                return False
            sent.add(cursor)
            return True

        feed: _Feed[metrics_pb2.LogEntry] = _Feed(
            live_subject=subjects.live_logs,
            read_page=lambda s, job_id, after, limit: self.repo.list_entries(
                s, job_id, min_level=min_level, sources=sorted(wanted), after=after, limit=limit),
            key=_entry_key,
            cursor=_entry_cursor,
            decode_live=lambda data: events_pb2.LogsStored.FromString(data).entries,
            early=self._early("logs", subjects.worker_logs),
            matches=lambda key: key[2] >= min_level and (not wanted or key[3] in wanted),
            fresh=fresh,
        )
        return self._stream(organization, job, follow, feed)

    # ---- replay, then follow ------------------------------------------------------------------------

    def _early(self, kind: Kind, reports: Callable[[str], str]) -> Callable[[str], EarlyFeed[Any]] | None:
        """A job's worker reports of `kind`, read as the ingest would store them (`live_from_reports`)."""
        if not self.settings.live_from_reports:
            return None
        decode = partial(stored_items, kind, self._form)
        return lambda job_id: EarlyFeed(reports(job_id), decode)

    @cached_property
    def hub(self) -> FanoutHub:
        """The live feed shared by all the streams of this process (one subscription per followed job)."""
        return FanoutHub(self.live, self.jobs.get_job, grace_s=self.settings.follow_grace_s,
                         poll_interval_s=self.settings.job_poll_interval_s,
                         capacity=self.settings.follower_buffer)

    async def _stream(self, organization: str, job_ref: str, follow: bool,
                      feed: _Feed[T]) -> AsyncGenerator[Chunk[T], None]:
        job = await self.jobs.get_job(organization, job_ref)
        if not follow:
            async for page in self._replay(job.id, feed, None):
                yield Chunk([_shared(item, feed.key(item)) for item in page])
            return
        # Join the live feed BEFORE reading the database: whatever is committed after the read is then
        # announced to us, and whatever the read and the announcements both hold is dropped by `fresh`.
        # The hub's job watch says when the job ended (it looks the job up once as it subscribes: the job
        # may have ended between our lookup and the subscription).
        early = feed.early(job.id) if feed.early is not None else None
        async with self.hub.follow(organization, job.id, feed.live_subject(job.id), feed.decode_live,
                                   feed.key, feed.matches, feed.cursor, early) as (follower, watch):
            loop = asyncio.get_running_loop()
            own_deadline = None
            if _is_final(job.state):
                own_deadline = end_deadline(job, loop.time(), self.settings.follow_grace_s)
                loop.call_at(own_deadline, follower.wake)
            replay, after, resumed = True, cast(Any, None), False
            fresh, buffer = feed.fresh, follower.buffer
            while True:
                error = follower.error or watch.error
                if error is not None:
                    raise error
                if replay:
                    replay = False
                    async for page in self._replay(job.id, feed, after):
                        keyed = ((item, feed.key(item)) for item in page)
                        sent = [_shared(item, key) for item, key in keyed if fresh(key)]
                        if sent:
                            yield Chunk(sent, resumed)
                            resumed = False
                    continue
                if follower.lagged:
                    # The client fell too far behind and the follower dropped what it held. Take the live
                    # feed again first, then catch up from storage from the lowest cursor dropped: what
                    # was committed before is read, what comes after is buffered, `fresh` drops repeats.
                    low = follower.rejoin()
                    after = (low[0], low[1] - 1) if low is not None else None  # cursors are int pairs
                    replay = resumed = True
                    continue
                if buffer:
                    sent = [shared for shared in follower.take() if fresh(shared.key)]
                    if sent:
                        yield Chunk(sent, resumed)
                        resumed = False
                    continue
                # Nothing waiting: end if the job ended more than the grace ago, else wait for more.
                if own_deadline is not None or watch.deadline is not None:
                    deadline = min(d for d in (own_deadline, watch.deadline) if d is not None)
                    if loop.time() >= deadline:
                        return
                await follower.wait()

    async def _replay(self, job_id: str, feed: _Feed[T], after: Any) -> AsyncIterator[list[T]]:
        """Stored items strictly after the cursor `after` (all when None), a page at a time."""
        batch = self.settings.replay_batch
        while True:
            page = await self.db.run(partial(_call_read, feed.read_page, job_id, after, batch))
            if page:
                yield page
            if len(page) < batch:
                return
            after = feed.cursor(feed.key(page[-1]))


def _shared(item: T, key: Key) -> LiveItem[T]:
    return cast(LiveItem[T], live_item(cast(Message, item), key))


def _point_key(point: metrics_pb2.MetricPoint) -> Key:
    return point.step, int(point.kind)


def _point_cursor(key: Key) -> Cursor:
    return key[0], key[1]


def _entry_key(entry: metrics_pb2.LogEntry) -> Key:
    return entry.attempt, entry.sequence, int(entry.level), int(entry.source)


def _entry_cursor(key: Key) -> Cursor:
    return key[0], key[1]


async def _items(chunks: AsyncGenerator[Chunk[T], None]) -> AsyncIterator[T]:
    async with aclosing(chunks):
        async for chunk in chunks:
            for shared in chunk.items:
                yield shared.item


def _call_read(read_page: Callable[[Session, str, Any, int], list[T]], job_id: str, after: Any,
               limit: int, session: Session) -> list[T]:
    return read_page(session, job_id, after, limit)


def _check_job_ref(v: Violations, organization: str, job: str) -> None:
    check_organization(v, organization)
    v.check(bool(job), "job_id", "is required")


def _check_kinds(v: Violations, kinds: Sequence[int]) -> None:
    for i, kind in enumerate(kinds):
        v.check(kind in METRIC_KINDS, f"kinds[{i}]", "is not a MetricKind")


def _merged(shares: Sequence[Prepared]) -> Prepared:
    """One job's shares of a batch's parts as one (its rows already written: not kept), their announcements
    joined up to ANNOUNCEMENT_BYTES a message (each is its items' framed bytes, so joined they announce the
    items of both): a batch prepared in parts is announced in as few messages as one prepared whole."""
    if len(shares) == 1:
        return shares[0]
    groups: list[list[bytes]] = []
    size = 0
    for payload in (payload for share in shares for payload in share.payloads):
        if groups and size + len(payload) <= ANNOUNCEMENT_BYTES:
            groups[-1].append(payload)
            size += len(payload)
        else:
            groups.append([payload])
            size = len(payload)
    return Prepared(sum(p.count for p in shares), [], [b"".join(group) for group in groups])
