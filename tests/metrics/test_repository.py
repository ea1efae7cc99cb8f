"""The repository's upserts and keyset reads, on SQLite and on PostgreSQL with the real migrations applied."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from tuneforge.v1 import metrics_pb2

from services.kit.db import Database
from services.metrics import repository
from services.metrics.component import MIGRATIONS_DIR
from services.metrics.repository import MetricsRepository, StorageForm
from tests.metrics.conftest import EVAL, TRAIN, point


# "postgresql-copy": every batch through the COPY path (repository.COPY_MIN_ROWS), not only large ones.
@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres),
                        pytest.param("postgresql-copy", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Database]:
    if request.param == "postgresql-copy":
        monkeypatch.setattr(repository, "COPY_MIN_ROWS", 1)
    if request.param == "sqlite":
        database = Database(f"sqlite:///{tmp_path / 'metrics.db'}", "metrics")
        database.migrate(MIGRATIONS_DIR)
        yield database
        database.dispose()
        return
    database = Database(request.getfixturevalue("postgres_url"), "metrics")
    database.migrate(MIGRATIONS_DIR)
    database.migrate(MIGRATIONS_DIR)  # idempotent: every process start applies them
    yield database
    database.dispose()


def test_points_upsert_by_key_and_newest_attempt_wins(db: Database) -> None:
    repo = MetricsRepository()
    job = "job_a"

    def stamped(p: metrics_pb2.MetricPoint) -> metrics_pb2.MetricPoint:
        p.job_id = job
        p.time.FromSeconds(1_700_000_000 + p.step)
        p.values["custom"] = p.step * 10.0
        return p

    with db.session() as s:
        repo.upsert_points(s, [stamped(point(1)), stamped(point(2)), stamped(point(2, EVAL, loss=0.2))])
    with db.session() as s:
        # Same key again (replaced), a newer attempt (replaces), an older attempt (ignored), twice in a batch.
        repo.upsert_points(s, [stamped(point(1, loss=7.0)), stamped(point(2, loss=8.0, attempt=2)),
                               stamped(point(2, loss=9.0, attempt=1)), stamped(point(3, loss=3.0)),
                               stamped(point(3, loss=3.5))])
    with db.session() as s:
        repo.upsert_points(s, [stamped(point(2, loss=1.0, attempt=1))])
        stored = repo.list_points(s, job)
    assert [(p.step, p.kind, p.loss, p.attempt) for p in stored] == [
        (1, TRAIN, 7.0, 1), (2, TRAIN, 8.0, 2), (2, EVAL, 0.2, 1), (3, TRAIN, 3.5, 1)]
    assert stored[0].time.seconds == 1_700_000_001 and stored[0].values["custom"] == 10.0
    assert not stored[0].HasField("grad_norm")

    with db.session() as s:
        assert [p.step for p in repo.list_points(s, job, after=(2, TRAIN), limit=2)] == [2, 3]
        assert [p.step for p in repo.list_points(s, job, kinds=[EVAL])] == [2]
        assert [p.step for p in repo.list_points(s, job, start_step=3)] == [3]
        assert repo.list_points(s, "job_other") == []


def test_a_write_of_many_rows_leaves_what_writing_them_one_by_one_would(db: Database) -> None:
    """More rows than one of SQLite's many-row statements takes, keys repeated within a statement and
    across statements, attempts out of order: the newest attempt of each key, then the last reported."""
    repo = MetricsRepository()
    count = 3 * repository.ROWS_PER_STATEMENT + 7
    points = []
    for i in range(count):
        p = point(i % 23, TRAIN if i % 3 else EVAL, loss=float(i), attempt=(7 * i) % 4)
        p.job_id = "job_many"
        points.append(p)
    expected: dict[tuple[int, int], tuple[float, int]] = {}
    for p in points:
        key = (p.step, int(p.kind))
        if key not in expected or expected[key][1] <= p.attempt:
            expected[key] = (p.loss, p.attempt)
    with db.session() as s:
        repo.upsert_points(s, points)
    with db.session() as s:
        stored = repo.list_points(s, "job_many", limit=1000)
    assert {(p.step, int(p.kind)): (p.loss, p.attempt) for p in stored} == expected
    assert len(stored) == len(expected)


# Optional fields a point may or may not hold (each a nullable column of its own).
OPTIONAL_FIELDS = ("loss", "learning_rate", "grad_norm", "eval_loss", "gpu_utilization", "cpu_percent")


def test_a_point_replaced_by_one_holding_other_fields_keeps_only_the_new_ones(db: Database) -> None:
    """SQLite's statements name only the columns their rows hold a value in; a field the newer point does
    not hold is gone after it replaces the older one, whichever statement each came in and whatever the
    rows beside it hold."""
    repo = MetricsRepository()
    rng = random.Random(7)
    count = 3 * repository.ROWS_PER_STATEMENT + 11
    points = []
    for i in range(count):
        p = metrics_pb2.MetricPoint(job_id="job_fields", step=i % 29, kind=TRAIN if i % 2 else EVAL,
                                    attempt=rng.randrange(3))
        p.time.FromSeconds(1_700_000_000 + i)
        # Runs of rows holding the same fields (whole statements of them), and rows holding any.
        fields = OPTIONAL_FIELDS[:2] if i < repository.ROWS_PER_STATEMENT else [
            name for name in OPTIONAL_FIELDS if rng.random() < 0.4]
        for name in fields:
            setattr(p, name, float(i))
        points.append(p)
    expected: dict[tuple[int, int], metrics_pb2.MetricPoint] = {}
    for p in points:
        key = (p.step, int(p.kind))
        if key not in expected or expected[key].attempt <= p.attempt:
            expected[key] = p
    half = len(points) // 2
    with db.session() as s:
        repo.upsert_points(s, points[:half])
    with db.session() as s:
        repo.upsert_points(s, points[half:])
    with db.session() as s:
        stored = {(p.step, int(p.kind)): p for p in repo.list_points(s, "job_fields", limit=1000)}
    assert stored.keys() == expected.keys()

    def held(p: metrics_pb2.MetricPoint) -> list[tuple[str, float | bool]]:
        return [(name, p.HasField(name) and getattr(p, name)) for name in OPTIONAL_FIELDS]

    for key, p in expected.items():
        assert held(stored[key]) == held(p), key
        assert (stored[key].attempt, stored[key].time.seconds) == (p.attempt, p.time.seconds), key


def test_byte_counts_come_back_as_the_exact_int64_they_were(db: Database) -> None:
    system = metrics_pb2.MetricPoint(job_id="job_b", kind=metrics_pb2.METRIC_KIND_SYSTEM, step=1,
                                     memory_bytes=2**40 + 3, gpu_memory_bytes=81_920 * 2**20 - 1,
                                     cpu_percent=12.5)
    repo = MetricsRepository()
    with db.session() as s:
        repo.upsert_points(s, [system])
    with db.session() as s:
        (stored,) = repo.list_points(s, "job_b")
    assert (stored.memory_bytes, stored.gpu_memory_bytes, stored.cpu_percent) == (
        2**40 + 3, 81_920 * 2**20 - 1, 12.5)
    assert not stored.HasField("gpu_utilization")


def test_log_entries_upsert_and_filters(db: Database) -> None:
    repo = MetricsRepository()
    info, error = metrics_pb2.LOG_LEVEL_INFO, metrics_pb2.LOG_LEVEL_ERROR
    worker, training = metrics_pb2.LOG_SOURCE_WORKER, metrics_pb2.LOG_SOURCE_TRAINING
    entries = [metrics_pb2.LogEntry(job_id="job_a", attempt=a, sequence=q, level=lvl, source=src, message=m)
               for a, q, lvl, src, m in [(1, 1, info, worker, "claimed"), (1, 2, error, training, "boom"),
                                         (2, 1, info, training, "again"), (1, 2, error, training, "boom!")]]
    with db.session() as s:
        repo.upsert_entries(s, entries)
    with db.session() as s:
        stored = repo.list_entries(s, "job_a")
        assert [(e.attempt, e.sequence, e.message) for e in stored] == [
            (1, 1, "claimed"), (1, 2, "boom!"), (2, 1, "again")]
        assert [e.sequence for e in repo.list_entries(s, "job_a", min_level=error)] == [2]
        assert [e.attempt for e in repo.list_entries(s, "job_a", sources=[training])] == [1, 2]
        assert [e.attempt for e in repo.list_entries(s, "job_a", after=(1, 2))] == [2]


@pytest.mark.parametrize("dialect_name", ["sqlite", "postgresql"])
def test_point_times_are_bound_as_sqlalchemy_would_bind_them(dialect_name: str) -> None:
    """Ingest converts Timestamps itself (cached text on SQLite): the same value SQLAlchemy's DateTime would
    bind for the same instant, so the ORM reads back what ingest wrote."""
    from datetime import UTC, datetime

    from google.protobuf.timestamp_pb2 import Timestamp
    from sqlalchemy.dialects import postgresql, sqlite

    from services.metrics.models import MetricPointRow
    from services.metrics.repository import _time_converter

    dialect = sqlite.dialect() if dialect_name == "sqlite" else postgresql.dialect()
    column_type = MetricPointRow.__table__.c.time.type  # type: ignore[attr-defined]
    processor = column_type.dialect_impl(dialect).bind_processor(dialect)
    convert = _time_converter(dialect, processor)
    assert convert(None) is None
    for seconds, nanos in [(0, 0), (1_700_000_000, 123_456_789), (1_709_164_799, 999_999_999),  # a leap day
                           (1_709_164_800, 1_000), (1_796_300_000, 500), (-86_401, 250_000_000),
                           (-30_610_224_000, 0), (253_402_300_799, 999_999_000),  # years 1000 and 9999
                           (-62_135_596_800, 0), (-30_641_760_001, 7_000)]:  # years 1 and 999: four digits
        ts = Timestamp(seconds=seconds, nanos=nanos)
        instant = datetime.fromtimestamp(seconds, UTC).replace(microsecond=nanos // 1000)
        expected = processor(instant) if processor is not None else instant
        for _ in range(2):  # the day from the cache
            assert convert(ts) == expected
    # Past what a datetime holds (SQLAlchemy could not bind it either): refused the same way on both.
    for seconds in (253_402_300_800, -62_135_596_801, 10**15):
        with pytest.raises(OverflowError):
            convert(Timestamp(seconds=seconds))


@pytest.mark.postgres
def test_a_copy_that_failed_leaves_the_next_batch_on_its_connection_stored(
        postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The COPY's temporary table is made inside the batch's transaction: a batch that fails on a fresh
    connection takes it back with its rollback, and the next batch on that connection makes it again."""
    monkeypatch.setattr(repository, "COPY_MIN_ROWS", 1)
    db = Database(postgres_url, "metrics")
    db.migrate(MIGRATIONS_DIR)
    repo = MetricsRepository()
    try:
        too_long = point(1)
        too_long.job_id = "j" * 65  # over the column's 64 characters: PostgreSQL refuses the COPY
        with pytest.raises(Exception, match="too long"), db.driver_connection() as conn:
            repo.write_point_rows(conn, [repo.point_rows(StorageForm.of(conn.dialect), [too_long])])
        good = [point(step) for step in range(3)]
        for p in good:
            p.job_id = "job_a"
        with db.driver_connection() as conn:
            repo.write_point_rows(conn, [repo.point_rows(StorageForm.of(conn.dialect), good)])
        with db.session() as s:
            assert [p.step for p in repo.list_points(s, "job_a")] == [0, 1, 2]
    finally:
        db.dispose()
