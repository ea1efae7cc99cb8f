"""Batched ingest: many worker reports decoded, checked and written in one transaction, announced once a
job.

The storage part runs on SQLite and on PostgreSQL (real migrations applied); the consumer part on a real
nats-server. The live feed and the jobs lookup are the manager's ports, played by small in-memory fakes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import pickle
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import job_pb2, metrics_pb2

from services.kit.consumer import DEAD_CAUSE, DEAD_REASON, DEAD_SUBJECT, PermanentError, consume_batches
from services.kit.db import Database, DriverConnection
from services.metrics import manager as manager_module
from services.metrics import prepare as prepare_module
from services.metrics import repository
from services.metrics.component import MIGRATIONS_DIR
from services.metrics.ingest import IngestHandlers
from services.metrics.live import Deliver, LiveMessage
from services.metrics.manager import MetricsManager
from services.metrics.prepare import ANNOUNCEMENT_BYTES, PreparingProcesses, decode_logs, decode_metrics
from services.metrics.repository import MetricsRepository, StorageForm
from services.metrics.settings import MetricsSettings
from tests.metrics.conftest import EVAL, TRAIN, point
from tuneforge_core import subjects
from tuneforge_core.errors import not_found
from tuneforge_core.ids import new_id
from tuneforge_core.nats import connect, ensure_streams, publish

Report = tuple[str, bytes]  # (subject, data) of one message on TF_WORKER


class RecordingFeed:
    """The live feed: records what is announced."""

    def __init__(self) -> None:
        self.published: list[LiveMessage] = []

    async def publish(self, subject: str, payload: bytes) -> None:
        self.published.append((subject, payload))

    @contextlib.asynccontextmanager
    async def subscribe(self, subjects: Sequence[str]) -> AsyncIterator[asyncio.Queue[LiveMessage]]:
        yield asyncio.Queue()

    @contextlib.asynccontextmanager
    async def listen(self, subjects: Sequence[str], deliver: Deliver) -> AsyncIterator[None]:
        yield

    def metrics_announced(self) -> dict[str, list[list[tuple[int, int]]]]:
        """Per job, the (step, kind) keys of each MetricsStored announced for it."""
        out: dict[str, list[list[tuple[int, int]]]] = {}
        for subject, payload in self.published:
            stored = events_pb2.MetricsStored.FromString(payload)
            job_id = subject.rsplit(".", 1)[-1]
            assert subject == subjects.live_metrics(job_id)
            assert all(p.job_id == job_id for p in stored.points)
            out.setdefault(job_id, []).append([(p.step, int(p.kind)) for p in stored.points])
        return out


class NoJobs:
    async def get_job(self, organization: str, job: str) -> job_pb2.Job:
        raise not_found("job", job, organization)


# "postgresql-copy": every batch through the COPY path (repository.COPY_MIN_ROWS), not only large ones.
@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres),
                        pytest.param("postgresql-copy", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Database]:
    url = (f"sqlite:///{tmp_path / 'metrics.db'}" if request.param == "sqlite"
           else request.getfixturevalue("postgres_url"))
    if request.param == "postgresql-copy":
        monkeypatch.setattr(repository, "COPY_MIN_ROWS", 1)
    database = Database(url, "metrics")
    database.migrate(MIGRATIONS_DIR)
    yield database
    database.dispose()


def make_manager(db: Database, feed: RecordingFeed,
                 repository: MetricsRepository | None = None) -> MetricsManager:
    return MetricsManager(db, NoJobs(), feed, MetricsSettings(), repository)


def metrics_message(job_id: str, points: Sequence[metrics_pb2.MetricPoint]) -> Report:
    event = events_pb2.MetricsReported(event_id=new_id("evt"), points=points)
    return subjects.worker_metrics(job_id), event.SerializeToString()


def logs_message(job_id: str, entries: Sequence[metrics_pb2.LogEntry]) -> Report:
    event = events_pb2.LogsReported(event_id=new_id("evt"), entries=entries)
    return subjects.worker_logs(job_id), event.SerializeToString()


async def ingest_metrics(manager: MetricsManager, messages: Sequence[Report]) -> tuple[dict[int, str], int]:
    return await manager.record_metrics_batch([partial(decode_metrics, s, d) for s, d in messages])


async def ingest_logs(manager: MetricsManager, messages: Sequence[Report]) -> tuple[dict[int, str], int]:
    return await manager.record_logs_batch([partial(decode_logs, s, d) for s, d in messages])


def stored_points(db: Database, job_id: str) -> list[tuple[int, int, float, int]]:
    def read(session: Session) -> list[tuple[int, int, float, int]]:
        return [(p.step, int(p.kind), p.loss, p.attempt)
                for p in MetricsRepository().list_points(session, job_id, limit=100_000)]

    with db.session() as s:
        return read(s)


def stored_entries(db: Database, job_id: str) -> list[tuple[int, int, str]]:
    with db.session() as s:
        return [(e.attempt, e.sequence, e.message)
                for e in MetricsRepository().list_entries(s, job_id, limit=100_000)]


def interleaved_reports(jobs: Sequence[str], messages_per_job: int, points_per_message: int,
                        attempt: int = 1, loss: float = 1.0) -> list[Report]:
    """Messages of every job, interleaved; job j's message m holds steps m*ppm .. (m+1)*ppm - 1."""
    out: list[Report] = []
    for m in range(messages_per_job):
        for job_id in jobs:
            points = [point(m * points_per_message + i, TRAIN if i % 4 else EVAL, loss=loss, attempt=attempt)
                      for i in range(points_per_message)]
            out.append(metrics_message(job_id, points))
    return out


async def test_a_batch_across_jobs_stores_every_point_once_and_announces_each_job_once(db: Database) -> None:
    feed = RecordingFeed()
    manager = make_manager(db, feed)
    jobs = ["job_a", "job_b", "job_c"]
    batch = interleaved_reports(jobs, messages_per_job=10, points_per_message=20)
    batch.append(batch[4])  # a redelivery inside the batch itself
    refused, stored = await ingest_metrics(manager, batch)
    assert refused == {}
    assert stored == 3 * 10 * 20 + 20
    expected = [(step, TRAIN if step % 20 % 4 else EVAL, 1.0, 1) for step in range(200)]
    for job_id in jobs:
        assert stored_points(db, job_id) == expected
    # One announcement per job, after the commit, holding that job's points in the order reported.
    announced = feed.metrics_announced()
    assert sorted(announced) == jobs
    for job_id in jobs:
        assert len(announced[job_id]) == 1
        keys = announced[job_id][0]
        assert sorted(set(keys)) == sorted((step, kind) for step, kind, _, _ in expected)
    assert [step for step, _ in announced["job_c"][0][:40]] == list(range(20)) + list(range(20, 40))

    # The whole batch delivered again (a nak, or an ack lost before the server got it): nothing changes.
    assert await ingest_metrics(manager, batch) == ({}, 3 * 10 * 20 + 20)
    for job_id in jobs:
        assert stored_points(db, job_id) == expected


async def test_a_batch_too_big_for_one_nats_message_is_announced_in_several(db: Database) -> None:
    """50 reports of 8 KB points: the announcement is cut under NATS' 1 MiB max_payload, in order, and
    together the parts hold every point once."""
    feed = RecordingFeed()
    manager = make_manager(db, feed)
    reports = []
    for m in range(50):
        big = point(m)
        big.values.update({f"layer_{i:03d}.grad_norm": float(i) for i in range(300)})  # ~8 KB
        reports.append(metrics_message("job_big", [big]))
    assert await ingest_metrics(manager, reports) == ({}, 50)
    sizes = [len(payload) for _, payload in feed.published]
    assert len(sizes) > 1 and max(sizes) <= ANNOUNCEMENT_BYTES < 1024 * 1024
    parts = feed.metrics_announced()["job_big"]
    assert [key for part in parts for key in part] == [(m, TRAIN) for m in range(50)]


async def test_a_report_stored_as_it_came_is_announced_in_its_own_bytes_and_a_changed_one_as_stored(
        db: Database) -> None:
    """A worker's message whose points are all stored unchanged is announced with the message's own bytes of
    them; one with points stamped with the job id, or a point skipped, is announced as stored."""
    feed = RecordingFeed()
    manager = make_manager(db, feed)
    job = "job_wire"

    def named(p: metrics_pb2.MetricPoint) -> metrics_pb2.MetricPoint:
        p.job_id = job
        return p

    as_sent = [named(point(step)) for step in range(3)]
    unnamed = [point(step) for step in range(3, 5)]  # no job id: stamped
    skipped = metrics_pb2.MetricPoint(job_id=job, step=6)  # no kind: skipped
    reports = [metrics_message(job, as_sent), metrics_message(job, unnamed),
               metrics_message(job, [named(point(5)), skipped])]
    # As the consumer hands them over: (subject, payload).
    assert await manager.record_metrics_batch(reports) == ({}, 6)
    ((subject, payload),) = feed.published
    assert subject == subjects.live_metrics(job)
    assert payload.startswith(events_pb2.MetricsStored(points=as_sent).SerializeToString())
    assert [(p.job_id, p.step) for p in events_pb2.MetricsStored.FromString(payload).points] == [
        (job, step) for step in range(6)]
    assert [step for step, *_ in stored_points(db, job)] == list(range(6))


def test_a_chunk_prepared_in_a_process_sends_back_rows_not_the_reports_it_announces_as_they_came() -> None:
    """What a preparing process sends back for a chunk: the rows, and for a report stored as it came its
    index, not its bytes again (the writing process holds them); made into the same batch as `prepare`'s."""
    job = "job_wire"
    as_sent = [metrics_pb2.MetricPoint(job_id=job, kind=TRAIN, step=step, loss=1.0) for step in range(40)]
    reports = [metrics_message(job, as_sent[:20]), metrics_message(job, [point(99)]),
               metrics_message(job, as_sent[20:])]
    form = StorageForm("sqlite", "pysqlite", "qmark")
    refused, packed = prepare_module._prepare_packed("metrics", form, reports)
    ((rows, pieces),) = pickle.loads(packed).values()
    assert refused == {} and len(rows) == 41
    assert pieces[0] == 0 and pieces[-1] == 2 and isinstance(pieces[1], bytes)  # the unnamed point: framed
    assert not any(data[-200:] in packed for _, data in (reports[0], reports[2]))
    (made,) = prepare_module.announced((refused, pickle.loads(packed)), reports)[1].values()
    (whole,) = prepare_module.prepare("metrics", form, reports)[1].values()
    assert made.payloads == whole.payloads and made.count == whole.count == 41
    assert [row[:-1] for row in made.rows] == [row[:-1] for row in whole.rows]  # all but stored_at


async def test_log_entries_rewritten_for_storage_are_announced_as_stored(db: Database) -> None:
    feed = RecordingFeed()
    manager = make_manager(db, feed)
    info = metrics_pb2.LOG_LEVEL_INFO
    clean = metrics_pb2.LogEntry(job_id="job_l", attempt=1, sequence=1, level=info, message="clean")
    with_nul = metrics_pb2.LogEntry(job_id="job_l", attempt=1, sequence=2, level=info, message="a\x00b")
    unnamed = metrics_pb2.LogEntry(attempt=1, sequence=3, level=info, message="unnamed")
    reports = [logs_message("job_l", [clean]), logs_message("job_l", [with_nul]),
               logs_message("job_l", [unnamed])]
    assert await manager.record_logs_batch(reports) == ({}, 3)
    ((_, payload),) = feed.published
    assert [(e.job_id, e.message) for e in events_pb2.LogsStored.FromString(payload).entries] == [
        ("job_l", "clean"), ("job_l", "a\ufffdb"), ("job_l", "unnamed")]


async def test_the_newest_attempt_wins_whatever_order_batches_arrive_in(db: Database) -> None:
    manager = make_manager(db, RecordingFeed())
    first = interleaved_reports(["job_a", "job_b"], messages_per_job=3, points_per_message=5, attempt=1,
                                loss=1.0)
    resumed = interleaved_reports(["job_a"], messages_per_job=2, points_per_message=5, attempt=2, loss=2.0)
    await ingest_metrics(manager, first)
    await ingest_metrics(manager, resumed)
    after_resume = stored_points(db, "job_a")
    assert [(step, loss, attempt) for step, _, loss, attempt in after_resume] == (
        [(step, 2.0, 2) for step in range(10)] + [(step, 1.0, 1) for step in range(10, 15)])
    # The older attempt redelivered, alone and inside a batch with the newer one after it and before it.
    await ingest_metrics(manager, first)
    await ingest_metrics(manager, [*resumed, *first])
    await ingest_metrics(manager, [*first, *resumed, *first])
    assert stored_points(db, "job_a") == after_resume
    assert [attempt for *_, attempt in stored_points(db, "job_b")] == [1] * 15


async def test_batches_in_flight_together_are_written_in_the_order_they_arrived(db: Database) -> None:
    """Ingest prepares the next batch while the last is written; a later batch whose preparation finishes
    first still waits for the earlier one's write and announcement, so the same key (same attempt) ends as
    the later says and followers hear them in order."""
    feed = RecordingFeed()
    manager = make_manager(db, feed)
    first = metrics_message("job_a", [point(1, loss=1.0), point(2, loss=1.0)])
    second = metrics_message("job_a", [point(2, loss=2.0)])

    def slowly(subject: str, data: bytes) -> tuple[str, Sequence[metrics_pb2.MetricPoint]]:
        time.sleep(0.3)  # its thread decodes it after the second batch is long ready
        return decode_metrics(subject, data)

    earlier = asyncio.ensure_future(manager.record_metrics_batch([partial(slowly, *first)]))
    await asyncio.sleep(0)  # the first batch takes its turn before the second arrives
    later = asyncio.ensure_future(ingest_metrics(manager, [second]))
    assert (await earlier)[1] == 2 and (await later)[1] == 1
    assert stored_points(db, "job_a") == [(1, TRAIN, 1.0, 1), (2, TRAIN, 2.0, 1)]
    # Announced in the same order: a follower past the later batch would take the earlier for old news.
    assert feed.metrics_announced() == {"job_a": [[(1, TRAIN), (2, TRAIN)], [(2, TRAIN)]]}


class HeldFeed(RecordingFeed):
    """Holds the first announcement until `release` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.holding, self.release = asyncio.Event(), asyncio.Event()

    async def publish(self, subject: str, payload: bytes) -> None:
        if not self.holding.is_set():
            self.holding.set()
            await self.release.wait()
        await super().publish(subject, payload)


async def test_the_next_batch_writes_while_one_is_announced_and_is_announced_after_it(db: Database) -> None:
    """A batch lets the next one write as soon as its own write is committed, not only once its followers
    have been told; the next one's announcement still waits for it."""
    feed = HeldFeed()
    manager = make_manager(db, feed)
    earlier = asyncio.ensure_future(ingest_metrics(manager, [metrics_message("job_a", [point(1)])]))
    await asyncio.wait_for(feed.holding.wait(), 10)
    later = asyncio.ensure_future(ingest_metrics(manager, [metrics_message("job_a", [point(2)])]))
    for _ in range(500):  # stored while the earlier batch's announcement is still held
        if len(stored_points(db, "job_a")) == 2:
            break
        await asyncio.sleep(0.01)
    assert [key[:2] for key in stored_points(db, "job_a")] == [(1, TRAIN), (2, TRAIN)]
    assert not later.done() and feed.published == []
    feed.release.set()
    assert (await earlier)[1] == 1 and (await later)[1] == 1
    assert feed.metrics_announced() == {"job_a": [[(1, TRAIN)], [(2, TRAIN)]]}


async def test_a_bad_message_in_a_batch_is_refused_alone(db: Database) -> None:
    feed = RecordingFeed()
    manager = make_manager(db, feed)
    stray = point(7)
    stray.job_id = "job_x"
    batch = [
        metrics_message("job_a", [point(1), point(2)]),
        (subjects.worker_metrics("job_b"), b"\xff\xffnot a protobuf"),
        metrics_message("job_a", [point(3), stray]),  # a point of another job than the subject's
        ("tuneforge.worker.jobs.metrics", metrics_message("job_a", [point(4)])[1]),  # no job id
        metrics_message("job_b", [point(5), point(6, kind=0), point(-1)]),  # the last two skipped
    ]
    refused, stored = await ingest_metrics(manager, batch)
    assert sorted(refused) == [1, 2, 3]
    assert "undecodable MetricsReported" in refused[1]
    assert "job_x" in refused[2]
    assert "unexpected subject" in refused[3]
    assert stored == 3
    assert [step for step, *_ in stored_points(db, "job_a")] == [1, 2]
    assert [step for step, *_ in stored_points(db, "job_b")] == [5]
    assert {job: [sorted(keys) for keys in lists] for job, lists in feed.metrics_announced().items()} == {
        "job_a": [[(1, TRAIN), (2, TRAIN)]], "job_b": [[(5, TRAIN)]]}


async def test_a_report_with_a_time_that_cannot_be_stored_is_refused_alone(db: Database) -> None:
    """A time past year 9999, before year 1 or with nanos outside a second would fail the batch's write
    (and every redelivery of it): the report holding it is refused, the rest of the batch is stored."""
    from google.protobuf.timestamp_pb2 import Timestamp

    manager = make_manager(db, RecordingFeed())

    def at(step: int, seconds: int, nanos: int = 0) -> metrics_pb2.MetricPoint:
        p = point(step)
        p.time.CopyFrom(Timestamp(seconds=seconds, nanos=nanos))
        return p

    batch = [
        metrics_message("job_a", [point(1)]),
        metrics_message("job_a", [point(2), at(3, 10**15)]),
        metrics_message("job_a", [at(4, -62_135_596_801)]),
        metrics_message("job_a", [at(5, 1_790_000_000, -1)]),
        metrics_message("job_a", [at(6, 1_790_000_000, 10**9)]),
        metrics_message("job_a", [at(7, 253_402_300_799, 999_999_999)]),  # the last storable instant
    ]
    refused, stored = await ingest_metrics(manager, batch)
    assert sorted(refused) == [1, 2, 3, 4]
    assert all("outside years 1 to 9999" in why for why in refused.values())
    assert stored == 2 and [step for step, *_ in stored_points(db, "job_a")] == [1, 7]

    info = metrics_pb2.LOG_LEVEL_INFO
    late = metrics_pb2.LogEntry(attempt=1, sequence=2, level=info, message="late")
    late.time.CopyFrom(Timestamp(seconds=10**15))
    refused, stored = await ingest_logs(manager, [
        logs_message("job_a", [metrics_pb2.LogEntry(attempt=1, sequence=1, level=info, message="ok")]),
        logs_message("job_a", [late])])
    assert list(refused) == [1] and stored == 1


async def test_values_json_cannot_hold_are_stored_and_read_back(db: Database) -> None:
    """A custom value that is NaN or infinite (a diverged run) is stored on both databases (PostgreSQL's
    JSON refuses the NaN token: the whole batch failed on every redelivery) and read back as the number."""
    import math

    manager = make_manager(db, RecordingFeed())
    p = point(1)
    p.values.update({"nan": math.nan, "up": math.inf, "down": -math.inf, "plain": 1.5})
    refused, stored = await ingest_metrics(manager, [metrics_message("job_a", [p]),
                                                     metrics_message("job_a", [point(2)])])
    assert refused == {} and stored == 2
    with db.session() as session:
        first, second = MetricsRepository().list_points(session, "job_a")
    assert math.isnan(first.values["nan"]) and first.values["up"] == math.inf
    assert first.values["down"] == -math.inf and first.values["plain"] == 1.5
    assert dict(second.values) == dict(point(2).values)


async def test_what_a_column_cannot_hold_never_fails_a_batch(db: Database) -> None:
    """On both databases as PostgreSQL's columns require: a job id past 64 characters refuses its report, a
    log level or source past SMALLINT skips its entry, a NUL in a message is stored as U+FFFD. Before, each
    failed the whole batch's write on PostgreSQL, on every redelivery."""
    manager = make_manager(db, RecordingFeed())
    refused, stored = await ingest_metrics(manager, [metrics_message("j" * 65, [point(1)]),
                                                     metrics_message("job_a", [point(2)])])
    assert list(refused) == [0] and "65 characters" in refused[0] and stored == 1

    info = metrics_pb2.LOG_LEVEL_INFO
    loud = metrics_pb2.LogEntry(attempt=1, sequence=1, message="loud")
    loud.level = 40000  # type: ignore[assignment]
    odd = metrics_pb2.LogEntry(attempt=1, sequence=2, level=info, message="odd")
    odd.source = -40000  # type: ignore[assignment]
    nul = metrics_pb2.LogEntry(attempt=1, sequence=3, level=info, message="a\x00b")
    refused, stored = await ingest_logs(manager, [logs_message("job_a", [loud, odd, nul]),
                                                  logs_message("j" * 65, [nul])])
    assert list(refused) == [1] and stored == 1
    with db.session() as session:
        (kept,) = MetricsRepository().list_entries(session, "job_a")
    assert (kept.sequence, kept.message) == (3, "a\ufffdb")


async def test_a_deleted_jobs_points_in_a_batch_are_dropped(db: Database) -> None:
    feed = RecordingFeed()
    manager = make_manager(db, feed)
    await ingest_metrics(manager, [metrics_message("job_b", [point(1)])])
    assert await manager.delete_job("job_b") == (1, 0)
    feed.published.clear()
    refused, stored = await ingest_metrics(manager, interleaved_reports(["job_a", "job_b"], 2, 3))
    assert (refused, stored) == ({}, 6)
    assert len(stored_points(db, "job_a")) == 6
    assert stored_points(db, "job_b") == []
    assert list(feed.metrics_announced()) == ["job_a"]
    refused, stored = await ingest_logs(manager, [logs_message("job_b", [metrics_pb2.LogEntry(sequence=1)])])
    assert (refused, stored, stored_entries(db, "job_b")) == ({}, 0, [])


class DeletedWhileWriting(MetricsRepository):
    """A DeleteJob of job_b that commits while the batch is being written: its cleanup ran before the
    batch's rows were there, so only the batch's own check after its commit can remove them."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.checks = 0

    def write_point_rows(self, conn: DriverConnection, parts: Iterable[list[list[Any]]]) -> None:
        with self.db.session() as session:
            self.mark_deleted(session, "job_b")
        with self.db.session() as session:
            self.delete_job(session, "job_b")
        super().write_point_rows(conn, parts)

    def ask_deleted_among(self, conn: DriverConnection, job_ids: Sequence[str]) -> Callable[[], set[str]]:
        self.checks += 1
        return super().ask_deleted_among(conn, job_ids)


async def test_points_written_while_their_job_is_deleted_are_removed_after_the_commit(db: Database) -> None:
    feed = RecordingFeed()
    repository = DeletedWhileWriting(db)
    manager = make_manager(db, feed, repository)
    refused, stored = await ingest_metrics(manager, interleaved_reports(["job_a", "job_b"], 2, 3))
    assert (refused, stored) == ({}, 6)
    assert repository.checks == 1  # one query for the whole batch, after its commit: not one per message
    assert len(stored_points(db, "job_a")) == 6
    assert stored_points(db, "job_b") == []
    assert list(feed.metrics_announced()) == ["job_a"]


async def test_log_entries_are_batched_idempotently(db: Database) -> None:
    feed = RecordingFeed()
    manager = make_manager(db, feed)
    info = metrics_pb2.LOG_LEVEL_INFO

    def entries(attempt: int, first: int, text: str) -> list[metrics_pb2.LogEntry]:
        return [metrics_pb2.LogEntry(attempt=attempt, sequence=q, level=info, message=f"{text} {q}")
                for q in range(first, first + 5)]

    batch = [logs_message("job_a", entries(1, 1, "a")), logs_message("job_b", entries(1, 1, "b")),
             (subjects.worker_logs("job_a"), b"\xff\xff"), logs_message("job_a", entries(1, 6, "a")),
             logs_message("job_a", entries(2, 1, "a2"))]
    refused, stored = await ingest_logs(manager, batch)
    assert sorted(refused) == [2] and stored == 20
    expected_a = ([(1, q, f"a {q}") for q in range(1, 11)] + [(2, q, f"a2 {q}") for q in range(1, 6)])
    assert stored_entries(db, "job_a") == expected_a
    assert [(s, len(events_pb2.LogsStored.FromString(p).entries)) for s, p in feed.published] == [
        (subjects.live_logs("job_a"), 15), (subjects.live_logs("job_b"), 5)]
    assert (await ingest_logs(manager, batch))[1] == 20  # redelivered: the same rows, replaced
    assert stored_entries(db, "job_a") == expected_a
    assert len(stored_entries(db, "job_b")) == 5


# ---- through a real nats-server ------------------------------------------------------------------------

DURABLE = "test-metrics-ingest"


class FailingOnce(MetricsRepository):
    """The database fails the first write (e.g. it was unreachable), then works."""

    def __init__(self) -> None:
        self.failed = False

    def write_point_rows(self, conn: DriverConnection, parts: Iterable[list[list[Any]]]) -> None:
        if not self.failed:
            self.failed = True
            raise OperationalError("INSERT", {}, Exception("database is unreachable"))
        super().write_point_rows(conn, parts)


async def settled(js: JetStreamContext, published: int) -> tuple[int, int]:
    """Waits until the consumer has been delivered every message and none awaits an ack; returns how many
    deliveries it made (redeliveries included) and its ack floor."""
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        with contextlib.suppress(NotFoundError):
            info = await js.consumer_info(subjects.STREAM_WORKER, DURABLE)
            if (info.delivered.stream_seq >= published and info.num_ack_pending == 0
                    and info.num_pending == 0):
                return int(info.delivered.consumer_seq or 0), int(info.ack_floor.stream_seq or 0)
        assert asyncio.get_running_loop().time() < deadline, "the consumer did not settle in time"
        await asyncio.sleep(0.05)


async def run_consumer(js: JetStreamContext, handlers: IngestHandlers,
                       batches: list[int]) -> asyncio.Task[None]:
    async def recording(msgs: Sequence[Msg]) -> Mapping[int, PermanentError]:
        batches.append(len(msgs))
        return await handlers.on_metrics_batch(msgs)

    handler: Callable[[Sequence[Msg]], Awaitable[Mapping[int, PermanentError]]] = recording
    return asyncio.create_task(consume_batches(
        js, stream=subjects.STREAM_WORKER, durable=DURABLE, subject=subjects.ALL_WORKER_METRICS,
        handler=handler, batch=100, fetch_wait_s=0.2, nak_delay_s=0.05))


async def test_the_consumer_acks_a_batch_after_its_commit_and_terminates_a_bad_message_alone(
        nats_url: str, tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'metrics.db'}", "metrics")
    db.migrate(MIGRATIONS_DIR)
    feed = RecordingFeed()
    nc = await connect(nats_url, "test-ingest")
    js = nc.jetstream()
    await ensure_streams(js)
    task: asyncio.Task[None] | None = None
    try:
        messages = interleaved_reports(["job_a", "job_b", "job_c"], messages_per_job=10,
                                       points_per_message=10)
        messages.insert(15, (subjects.worker_metrics("job_b"), b"\xff\xffnot a protobuf"))
        for subject, data in messages:  # all pending before the consumer's first fetch: one batch
            await publish(js, subject, data, new_id("evt"))
        batches: list[int] = []
        task = await run_consumer(js, IngestHandlers(make_manager(db, feed)), batches)
        deliveries, ack_floor = await settled(js, len(messages))
        assert batches == [len(messages)]
        assert deliveries == len(messages)  # acked or terminated at the first delivery: none naked
        assert ack_floor == len(messages)
        # The bad message is kept as it came, saying why, where an operator finds it.
        dead = await js.get_last_msg(subjects.STREAM_DEAD_LETTERS,
                                     subjects.dead_letters(subjects.STREAM_WORKER, DURABLE))
        assert dead.data == b"\xff\xffnot a protobuf"
        assert dead.headers is not None
        assert dead.headers[DEAD_CAUSE] == "permanent"
        assert dead.headers[DEAD_SUBJECT] == subjects.worker_metrics("job_b")
        assert "undecodable MetricsReported" in dead.headers[DEAD_REASON]
        for job_id in ("job_a", "job_b", "job_c"):
            assert [step for step, *_ in stored_points(db, job_id)] == list(range(100))
        assert sorted(feed.metrics_announced()) == ["job_a", "job_b", "job_c"]
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await nc.drain()
        db.dispose()


async def test_a_database_failure_naks_the_whole_batch_for_redelivery(nats_url: str, tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'metrics.db'}", "metrics")
    db.migrate(MIGRATIONS_DIR)
    feed = RecordingFeed()
    nc = await connect(nats_url, "test-ingest")
    js = nc.jetstream()
    await ensure_streams(js)
    task: asyncio.Task[None] | None = None
    try:
        messages = interleaved_reports(["job_a", "job_b"], messages_per_job=5, points_per_message=4)
        for subject, data in messages:
            await publish(js, subject, data, new_id("evt"))
        batches: list[int] = []
        repository = FailingOnce()
        task = await run_consumer(js, IngestHandlers(make_manager(db, feed, repository)), batches)
        deliveries, _ = await settled(js, len(messages))
        assert repository.failed
        assert deliveries == 2 * len(messages)  # every message of the failed batch came back once
        assert sum(batches) == 2 * len(messages)
        for job_id in ("job_a", "job_b"):
            assert [step for step, *_ in stored_points(db, job_id)] == list(range(20))
        # Nothing was announced for the failed write: each point once, from the retry (which may come back
        # in more than one fetch, so in more than one announcement a job).
        announced = feed.metrics_announced()
        assert sorted(announced) == ["job_a", "job_b"]
        for job_id, lists in announced.items():
            assert sorted(step for keys in lists for step, _ in keys) == list(range(20)), job_id
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await nc.drain()
        db.dispose()


async def test_nan_and_infinite_numbers_are_stored_and_read_back(db: Database) -> None:
    """A diverged run reports a NaN loss (or grad norm, or epoch): stored and read back as NaN on both
    databases, as a live follower sees it. SQLite turns a bound NaN into NULL: the loss read back was
    missing, and a NaN epoch (a NOT NULL column) failed the whole batch on every redelivery."""
    import math

    manager = make_manager(db, RecordingFeed())
    diverged = point(1)
    diverged.loss, diverged.grad_norm, diverged.epoch = math.nan, math.inf, math.nan
    diverged.eval_loss = -math.inf
    refused, stored = await ingest_metrics(manager, [metrics_message("job_a", [diverged]),
                                                     metrics_message("job_a", [point(2)])])
    assert refused == {} and stored == 2
    with db.session() as session:
        first, second = MetricsRepository().list_points(session, "job_a")
    assert math.isnan(first.loss) and math.isnan(first.epoch)
    assert first.grad_norm == math.inf and first.eval_loss == -math.inf
    assert second.loss == point(2).loss and second.epoch == point(2).epoch


async def test_the_largest_byte_counts_are_read_back(db: Database) -> None:
    """gpu_memory_bytes and memory_bytes are int64 kept in float columns: the largest int64 came back as 2^63,
    which the field cannot take, and every read of the job's points failed. Read back clamped, on both
    databases; a NUL or a line separator in a custom value's name is stored too."""
    manager = make_manager(db, RecordingFeed())
    huge = point(1)
    huge.gpu_memory_bytes, huge.memory_bytes = 2**63 - 1, -(2**63)
    huge.values.update({"a\x00b": 1.0, "\u2028": 2.0})
    refused, stored = await ingest_metrics(manager, [metrics_message("job_a", [huge])])
    assert (refused, stored) == ({}, 1)
    with db.session() as session:
        (back,) = MetricsRepository().list_points(session, "job_a")
    assert (back.gpu_memory_bytes, back.memory_bytes) == (2**63 - 1, -(2**63))
    assert dict(back.values) == {"a\x00b": 1.0, "\u2028": 2.0}


# ---- large batches, prepared in a process of their own -----------------------------------------------------

@pytest.fixture(scope="module")
def processes() -> Iterator[PreparingProcesses]:
    """One preparing process for the module (its start takes a second or two); chunks of 1 KB."""
    preparing = PreparingProcesses(1, min_bytes=1024)
    yield preparing
    preparing.close()


async def started(preparing: PreparingProcesses, db: Database) -> PreparingProcesses:
    preparing.start(StorageForm.of(db.engine.dialect))
    deadline = time.monotonic() + 60
    while not preparing.ready:
        assert time.monotonic() < deadline, "the preparing process did not start"
        await asyncio.sleep(0.05)
    return preparing


def only_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """Preparing a batch in this process fails from now on: what is stored was prepared in another."""
    def here(*_args: Any) -> Any:
        raise AssertionError("a batch was prepared in the test's own process")

    monkeypatch.setattr(manager_module, "prepare", here)
    monkeypatch.setattr(prepare_module, "prepare", here)


def varied_batch() -> list[Report]:
    """Two jobs' reports over several 1 KB chunks, with times, extra values and a NaN loss, and in later
    chunks an undecodable message and one naming another job (both refused alone)."""
    batch = interleaved_reports(["job_a", "job_b"], messages_per_job=10, points_per_message=20)
    special = point(500, TRAIN, loss=float("nan"))
    special.time.FromSeconds(1_790_000_000)
    special.values.update({"reward": 0.5, "kl": float("inf")})
    batch.insert(3, metrics_message("job_a", [special]))
    foreign = point(501)
    foreign.job_id = "job_z"
    batch.insert(13, (subjects.worker_metrics("job_a"), b"\xff\xff"))
    batch.insert(17, metrics_message("job_b", [foreign]))
    return batch


def stored_protos(db: Database, job_id: str) -> list[metrics_pb2.MetricPoint]:
    with db.session() as s:
        return MetricsRepository().list_points(s, job_id, limit=100_000)


async def test_a_large_batch_prepared_in_a_process_of_its_own_is_stored_and_announced_as_on_a_thread(
        db: Database, processes: PreparingProcesses, monkeypatch: pytest.MonkeyPatch) -> None:
    batch = varied_batch()
    assert sum(len(data) for _, data in batch) > 4 * 1024  # several chunks
    here = RecordingFeed()
    outcome = await make_manager(db, here).record_metrics_batch(batch)
    assert sorted(outcome[0]) == [13, 17] and outcome[1] == 10 * 20 * 2 + 1
    rows = {job_id: stored_protos(db, job_id) for job_id in ("job_a", "job_b")}
    for job_id in rows:
        with db.session() as s:
            MetricsRepository().delete_job(s, job_id)

    await started(processes, db)
    only_elsewhere(monkeypatch)
    there = RecordingFeed()
    manager = MetricsManager(db, NoJobs(), there, MetricsSettings(), preparing=processes)
    assert await manager.record_metrics_batch(batch) == outcome
    assert {job_id: stored_protos(db, job_id) for job_id in rows} == rows
    # Each job's points announced in order, in as many messages (its chunks' announcements joined).
    assert there.metrics_announced() == here.metrics_announced()
    # Redelivered: the same rows, replaced.
    assert await manager.record_metrics_batch(batch) == outcome
    assert {job_id: stored_protos(db, job_id) for job_id in rows} == rows


async def test_log_entries_are_prepared_in_a_process_of_its_own_too(
        db: Database, processes: PreparingProcesses, monkeypatch: pytest.MonkeyPatch) -> None:
    await started(processes, db)
    only_elsewhere(monkeypatch)
    manager = MetricsManager(db, NoJobs(), RecordingFeed(), MetricsSettings(), preparing=processes)
    info = metrics_pb2.LOG_LEVEL_INFO
    batch = [logs_message("job_a", [metrics_pb2.LogEntry(attempt=1, sequence=m * 50 + q, level=info,
                                                         message=f"line {m * 50 + q} " + "x" * 40)
                                    for q in range(50)]) for m in range(8)]
    assert await manager.record_logs_batch(batch) == ({}, 400)
    assert stored_entries(db, "job_a") == [(1, q, f"line {q} " + "x" * 40) for q in range(400)]


@pytest.mark.parametrize("noticed", [False, True], ids=["died-meanwhile", "died-before"])
async def test_a_batch_whose_preparing_process_died_is_stored_and_new_processes_take_over(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, noticed: bool) -> None:
    """The process killed while the batch is handed over (its chunks fail), or long enough before for the
    pool to know it is broken (handing the chunks over fails): either way the batch is prepared here."""
    db = Database(f"sqlite:///{tmp_path / 'metrics.db'}", "metrics")
    db.migrate(MIGRATIONS_DIR)
    preparing = PreparingProcesses(1, min_bytes=1024)
    try:
        await started(preparing, db)
        manager = MetricsManager(db, NoJobs(), RecordingFeed(), MetricsSettings(), preparing=preparing)
        first = list(preparing._pool._processes.values())  # type: ignore[union-attr]
        for process in first:
            process.kill()
        if noticed:
            for process in first:
                process.join(10)
            await asyncio.sleep(0.5)
        batch = interleaved_reports(["job_a"], messages_per_job=10, points_per_message=20)
        assert await manager.record_metrics_batch(batch) == ({}, 200)
        assert len(stored_points(db, "job_a")) == 200
        # The next large batch starts new processes (prepared on a thread meanwhile).
        later = interleaved_reports(["job_b"], messages_per_job=10, points_per_message=20)
        assert await manager.record_metrics_batch(later) == ({}, 200)
        await started(preparing, db)
        assert not set(preparing._pool._processes.values()) & set(first)  # type: ignore[union-attr]
        only_elsewhere(monkeypatch)
        assert await manager.record_metrics_batch(interleaved_reports(["job_c"], 10, 20)) == ({}, 200)
        assert len(stored_points(db, "job_c")) == 200
    finally:
        preparing.close()
        db.dispose()


async def test_a_preparing_process_logs_as_the_service_does(tmp_path: Path,
                                                           capfd: pytest.CaptureFixture[str]) -> None:
    """Its log lines (here: a point of no kind, skipped) in the service's format and at its level."""
    db = Database(f"sqlite:///{tmp_path / 'metrics.db'}", "metrics")
    db.migrate(MIGRATIONS_DIR)
    preparing = PreparingProcesses(1, min_bytes=1024, log_level="WARNING", log_format="json")
    try:
        await started(preparing, db)
        manager = MetricsManager(db, NoJobs(), RecordingFeed(), MetricsSettings(), preparing=preparing)
        batch = interleaved_reports(["job_a"], messages_per_job=10, points_per_message=20)
        batch.append(metrics_message("job_a", [point(900, kind=0)]))
        assert await manager.record_metrics_batch(batch) == ({}, 200)
    finally:
        preparing.close()
        db.dispose()
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines() if "skipping a point" in line]
    assert len(lines) == 1 and lines[0]["level"] == "WARNING" and "job_a" in lines[0]["message"]
