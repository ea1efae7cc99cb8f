"""Persistence of metric points and log entries (synchronous; run through `Database.run`).

Ingest writes through one upsert statement per table and database dialect, compiled once and executed for
many rows (the driver's executemany) on the driver's own connection: no SQL is built or compiled per
message or per batch, and no ORM session is made for it. On SQLite that statement holds ROWS_PER_STATEMENT
rows in its VALUES, and names only the columns its rows hold a value in (one statement compiled per set
of columns, once: see `_Upsert.omittable`); on PostgreSQL a batch of COPY_MIN_ROWS rows or more is copied
into a temporary table instead (COPY) and upserted from there in one statement (`_Copy`).
Rows are made apart from the write (`point_rows`, `entry_rows`), in a `StorageForm` alone, so that ingest
can make them in another process (services.metrics.prepare).
"""

from __future__ import annotations

import itertools
import json
import math
import operator
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, NamedTuple

from sqlalchemy import DateTime, Float, Table, and_, delete, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.orm import Session
from sqlalchemy.types import JSON
from tuneforge.v1 import metrics_pb2

from services.kit.db import DriverConnection
from services.kit.outbox import utcnow
from services.metrics.converters import (
    ENTRY_COLUMNS,
    POINT_COLUMNS,
    entry_to_row,
    point_to_row,
    row_to_entry,
    row_to_point,
)
from services.metrics.models import DeletedJobRow, LogEntryRow, MetricPointRow


@dataclass(frozen=True)
class _Upsert:
    """`INSERT ... ON CONFLICT (keys) DO UPDATE ... WHERE stored.attempt <= new.attempt` of one table on one
    dialect, compiled once: a stored row is kept when a redelivery of an OLDER attempt would overwrite it,
    so the newest attempt of a job wins whatever order the messages arrive in.

    Rows come as lists in the converter's column order (`columns`), their times as protobuf Timestamps;
    `convert_rows` completes them into the dialect's storage form (`stored_at` appended, times as
    `_time_converter` writes them, JSON as the dialect's), and `parameters` makes the driver's parameters of
    them (reordered to the statement's positions, or named for pyformat drivers). Numbers and strings from
    the protos are already what the driver takes.

    Executemany runs the statement once per row, in order, so a batch that repeats a key leaves what
    applying its rows one by one would: the newest attempt, then the last reported.
    """

    sql: str
    columns: tuple[str, ...]  # the row's columns, then stored_at
    # Row index of each of the statement's positional parameters; None when it takes named parameters.
    positions: tuple[int, ...] | None
    convert: tuple[tuple[int, Callable[[Any], Any]], ...]  # (row index, the dialect's conversion)
    convert_stored_at: Callable[[Any], Any] | None
    # Row indexes of the float columns whose NaN is stored as the text "NaN" (SQLite only: it binds a NaN
    # as NULL, which lost a diverged run's loss and failed a NaN epoch's NOT NULL on every redelivery).
    # A REAL column keeps that text as text; SQLAlchemy's Float reads it back as float("NaN").
    nan_columns: tuple[int, ...] = ()
    # SQLite: the statement with `rows_per_statement` rows in its VALUES, its parameters the rows' values one
    # row after the other, naming every column (`write_many` makes those naming fewer, and with fewer rows,
    # alike: `_statement`); "" elsewhere.
    sql_many: str = ""
    rows_per_statement: int = 1
    # SQLite: row indexes of the columns a statement leaves out when each of its rows holds None there
    # (nullable, no default: the row stored, and what the conflict's `excluded` row holds, is the same).
    # CPython's sqlite3 binds a None in 0.37 us where a number takes 0.10 (it looks for an adapter and a
    # __conform__ first): statements of 50 training points, 9 of whose 22 columns are None, stored them in
    # 4.3 us a row naming every column and in 2.1 naming their 13.
    omittable: tuple[int, ...] = ()
    # SQLite: the one-row statement naming only these columns (in `columns` order); `_statement` caches.
    compile_named: Callable[[tuple[str, ...]], str] | None = field(default=None, compare=False)
    _statements: dict[tuple[tuple[int, ...], int], str] = field(default_factory=dict, compare=False)

    @staticmethod
    def build(dialect: Dialect, table: Table, columns: Sequence[str], keys: Sequence[str]) -> _Upsert:
        if dialect.name not in ("sqlite", "postgresql"):
            raise NotImplementedError(f"upsert is not implemented for {dialect.name}")
        insert = sqlite.insert if dialect.name == "sqlite" else postgresql.insert
        all_columns = (*columns, "stored_at")
        if set(all_columns) != {c.name for c in table.columns}:
            raise ValueError(f"the row columns {all_columns} are not those of {table.name}")
        stmt = insert(table)
        stmt = stmt.on_conflict_do_update(
            index_elements=list(keys),
            set_={c.name: stmt.excluded[c.name] for c in table.columns if c.name not in keys},
            where=table.c.attempt <= stmt.excluded.attempt)
        compiled = stmt.compile(dialect=dialect, column_keys=list(all_columns))
        convert: dict[str, Callable[[Any], Any]] = {}
        for name in all_columns:
            column_type = table.c[name].type
            processor = column_type.dialect_impl(dialect).bind_processor(dialect)
            if isinstance(column_type, DateTime) and name != "stored_at":
                convert[name] = _time_converter(dialect, processor)
            elif isinstance(column_type, DateTime | JSON) and processor is not None:
                convert[name] = _json_values(processor) if isinstance(column_type, JSON) else processor
        positions = None
        if compiled.positional:
            positions = tuple(all_columns.index(name) for name in compiled.positiontup or ())
        nan_columns: tuple[int, ...] = ()
        sql_many, rows_per_statement = "", 1
        omittable: tuple[int, ...] = ()
        compile_named = None
        if dialect.name == "sqlite":
            nan_columns = tuple(i for i, name in enumerate(columns) if isinstance(table.c[name].type, Float))
            if positions == tuple(range(len(all_columns))):
                sql_many, rows_per_statement = _many_rows(compiled.string, len(all_columns))
                omittable = tuple(i for i, name in enumerate(all_columns) if name not in keys
                                  and table.c[name].nullable and table.c[name].default is None
                                  and table.c[name].server_default is None)

                def compile_named(names: tuple[str, ...]) -> str:
                    named = stmt.compile(dialect=dialect, column_keys=list(names))
                    if tuple(named.positiontup or ()) != names:
                        raise ValueError(f"{table.name}: a statement naming {names} takes "
                                         f"{named.positiontup}")
                    return named.string

        return _Upsert(compiled.string, all_columns, positions,
                       tuple((i, convert[name]) for i, name in enumerate(columns) if name in convert),
                       convert.get("stored_at"), nan_columns, sql_many, rows_per_statement, omittable,
                       compile_named)

    def parameters(self, rows: Sequence[list[Any]]) -> Sequence[Any]:
        """The driver's parameters for rows `convert_rows` completed: the rows themselves when the statement
        takes them in their order (SQLite), else reordered or named."""
        positions = self.positions
        if positions == tuple(range(len(self.columns))):
            return rows
        if positions is None:
            return [dict(zip(self.columns, row, strict=True)) for row in rows]
        return [tuple([row[i] for i in positions]) for row in rows]

    def write_many(self, cursor: Any, rows: Sequence[list[Any]]) -> None:
        """Executes the upsert for rows `convert_rows` completed, in their order: on SQLite, as statements of
        up to `rows_per_statement` rows each (SQLite applies a statement's rows one by one, so a repeated key
        ends as with one statement a row), each naming the columns its rows hold a value in (`omittable`);
        elsewhere one statement a row."""
        if not self.sql_many:
            cursor.executemany(self.sql, self.parameters(rows))
            return
        per, omittable, every = self.rows_per_statement, self.omittable, tuple(range(len(self.columns)))
        sql = ""
        statements: list[list[Any]] = []
        for start in range(0, len(rows), per):
            group = rows[start:start + per]
            named, values = every, []
            if omittable:
                columns = list(zip(*group, strict=True))  # in C: 0.3 us a row, with what follows
                left_out = [i for i in omittable if columns[i].count(None) == len(group)]
                if left_out:
                    named = tuple(i for i in every if i not in left_out)
                    kept = [columns[i] for i in named]
                    values = list(itertools.chain.from_iterable(zip(*kept, strict=True)))
            if named is every:
                for row in group:
                    values += row  # half the time of chaining the rows
            group_sql = self._statement(named, len(group))
            if group_sql is not sql:
                if statements:
                    cursor.executemany(sql, statements)
                sql, statements = group_sql, []
            statements.append(values)
        if statements:
            cursor.executemany(sql, statements)

    def _statement(self, named: tuple[int, ...], rows: int) -> str:
        """SQLite: the upsert of `rows` rows naming the columns at `named` (compiled once per process)."""
        if rows == self.rows_per_statement and len(named) == len(self.columns):
            return self.sql_many
        key = (named, rows)
        sql = self._statements.get(key)
        if sql is None:
            if len(named) == len(self.columns):
                one = self.sql
            else:
                assert self.compile_named is not None
                one = self.compile_named(tuple(self.columns[i] for i in named))
            if len(self._statements) >= _STATEMENTS_KEPT:
                self._statements.clear()  # rows of ever new shapes: never more than this many kept
            sql = self._statements[key] = _many_rows(one, len(named), rows)[0]
        return sql

    def convert_rows(self, rows: Sequence[list[Any]]) -> None:
        """Each row completed in place into `columns` order and the dialect's storage forms: `stored_at`
        (now) appended, times, JSON and (SQLite) NaNs converted. Pure Python on the rows alone, so ingest
        may run it in another process (services.metrics.prepare)."""
        stored_at: Any = utcnow()
        if self.convert_stored_at is not None:
            stored_at = self.convert_stored_at(stored_at)
        convert, nan_columns = self.convert, self.nan_columns
        for row in rows:
            row.append(stored_at)
            for index, processor in convert:
                row[index] = processor(row[index])
        if nan_columns:
            _nan_as_text(rows, nan_columns)


# Rows in one statement of SQLite's upserts (`_many_rows`): a statement of 50 rows of metrics_points stored
# 20,000 points in 86 ms where executemany of one row a statement took 110 (the rows' values are bound in C
# by one call per 50 rows; statements of 10 rows took 94 ms, of 100 rows 92).
ROWS_PER_STATEMENT = 50
# SQLite: statements of an upsert kept compiled (`_Upsert._statement`), one per set of columns named and
# number of rows (a few sets of columns, and up to ROWS_PER_STATEMENT numbers of rows, in practice).
_STATEMENTS_KEPT = 512
# SQLite's limit on the parameters of one statement (SQLITE_MAX_VARIABLE_NUMBER): 32,766 since 3.32, 999
# before; a statement with more fails to prepare.
_SQLITE_MAX_PARAMETERS = 32_766 if sqlite3.sqlite_version_info >= (3, 32) else 999


def _many_rows(sql: str, columns: int, rows: int | None = None) -> tuple[str, int]:
    """(`sql`, a SQLite INSERT of one row of `columns` qmark parameters, with `rows` rows in its VALUES, or
    as many as fit ROWS_PER_STATEMENT and SQLite's limit on parameters; that number)."""
    one_row = "(" + ", ".join(["?"] * columns) + ")"
    if sql.count(one_row) != 1 or sql.count("?") != columns:
        raise ValueError(f"not an INSERT of one row of {columns} parameters: {sql}")
    if rows is None:
        rows = max(1, min(ROWS_PER_STATEMENT, _SQLITE_MAX_PARAMETERS // columns))
    return sql.replace(one_row, ", ".join([one_row] * rows)), rows


def _nan_as_text(rows: Sequence[list[Any]], columns: tuple[int, ...]) -> None:
    """Each NaN in `columns` of the rows replaced by the text "NaN" (see _Upsert.nan_columns). Whether there
    is one at all is asked of the sum of every number in those columns, in C (the sum is NaN when one is,
    or when an infinity meets its opposite): the rows are looked at one by one only then."""
    values = operator.itemgetter(*columns) if len(columns) > 1 else lambda row: (row[columns[0]],)
    total = sum(filter(None, itertools.chain.from_iterable(map(values, rows))))
    if total == total:
        return
    for row in rows:
        for index in columns:
            value = row[index]
            if value != value:  # NaN only
                row[index] = "NaN"


def _time_converter(dialect: Dialect, processor: Callable[[Any], Any] | None) -> Callable[[Any], Any]:
    """Timestamp (or None) -> what the driver stores for a DateTime column of `dialect`. On SQLite that is
    SQLAlchemy's own text form ("2026-12-01 10:00:00.123456", what its DateTime reads back): the day's text
    from a small cache (the C library's gmtime), the time of day from tables of every minute
    and second (half the time that gmtime and strftime for every distinct second took); elsewhere a
    UTC datetime, built without protobuf's slower ToDatetime. A time outside what a datetime holds (years 1
    to 9999) raises OverflowError on both."""
    if dialect.name == "sqlite":
        if processor is None or processor(EPOCH) != "1970-01-01 00:00:00.000000":
            raise NotImplementedError("SQLite stores DateTime in a form this converter does not write")

        @lru_cache(maxsize=64)
        def day_text(day: int) -> str:
            if not _FIRST_SECOND <= day * 86_400 <= _LAST_SECOND:
                raise OverflowError(f"day {day} from 1970 is outside years 1 to 9999")
            date = time.gmtime(day * 86_400)
            return f"{date.tm_year:04d}-{date.tm_mon:02d}-{date.tm_mday:02d} "  # strftime's %Y: "1" for 0001

        def sqlite_text(ts: Any) -> Any:
            if ts is None:
                return None
            day, second = divmod(ts.seconds, 86_400)
            # %-formatting: 0.58 us a time where an f-string with a second divmod took 0.65
            return "%s%s%s%06d" % (day_text(day), _MINUTES[second // 60], _SECONDS[second % 60],  # noqa: UP031
                                   ts.nanos // 1000)

        return sqlite_text

    def utc_datetime(ts: Any) -> Any:
        if ts is None:
            return None
        value = EPOCH + timedelta(seconds=ts.seconds, microseconds=ts.nanos // 1000)
        return processor(value) if processor is not None else value

    return utc_datetime


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# 0001-01-01 00:00:00 and 9999-12-31 23:59:59 UTC, in seconds from EPOCH.
_FIRST_SECOND = int((datetime(1, 1, 1, tzinfo=UTC) - EPOCH).total_seconds())
_LAST_SECOND = int((datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC) - EPOCH).total_seconds())
# "HH:MM:" of each minute of a day, and "SS." of each second of a minute (`_time_converter`).
_MINUTES = tuple(f"{hour:02d}:{minute:02d}:" for hour in range(24) for minute in range(60))
_SECONDS = tuple(f"{second:02d}." for second in range(60))


def storable_time(ts: Any) -> bool:
    """Whether a Timestamp can be stored (and read back): within years 1 to 9999, nanos within a second."""
    return _FIRST_SECOND <= ts.seconds <= _LAST_SECOND and 0 <= ts.nanos < 1_000_000_000


def _json_values(processor: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """The JSON conversion of a point's `values`: the common empty value converted once, and a value JSON
    cannot hold (NaN, infinities: PostgreSQL refuses the document) stored as its name ("nan", "inf",
    "-inf"), which `row_to_point` reads back as the number."""
    empty = processor({})

    def convert(value: Any) -> Any:
        if value == {}:
            return empty
        if not all(map(math.isfinite, value.values())):
            value = {k: v if math.isfinite(v) else repr(v) for k, v in value.items()}
        return processor(value)

    return convert


class StorageForm(NamedTuple):
    """What the rows of a database are converted for: its dialect, driver and parameter style. Picklable,
    so rows can be made in another process than the one that writes them (`dialect_of` there)."""

    dialect: str
    driver: str
    paramstyle: str

    @staticmethod
    def of(dialect: Dialect) -> StorageForm:
        return StorageForm(dialect.name, dialect.driver, dialect.paramstyle)


def dialect_of(form: StorageForm) -> Dialect:
    """A dialect of `form` without an engine (what `_Upsert.build` needs of one, in a process with none)."""
    dialect_class: Any = make_url(f"{form.dialect}+{form.driver}://").get_dialect()
    dialect: Dialect = dialect_class(paramstyle=form.paramstyle)
    return dialect


_UPSERTS: dict[tuple[StorageForm, str], _Upsert] = {}
_UPSERTS_LOCK = threading.Lock()


def _upsert_of(form: StorageForm, table: Table, columns: Sequence[str], keys: Sequence[str],
               dialect: Dialect | None = None) -> _Upsert:
    """The upsert of `table` for `form` (built once per process: `dialect`, or one made for `form`).
    Per form: SQLite and PostgreSQL may both be open in one process."""
    cache_key = (form, table.name)
    upsert = _UPSERTS.get(cache_key)
    if upsert is None:
        with _UPSERTS_LOCK:
            upsert = _UPSERTS.get(cache_key)
            if upsert is None:
                upsert = _Upsert.build(dialect or dialect_of(form), table, columns, keys)
                _UPSERTS[cache_key] = upsert
    return upsert


def _write(conn: DriverConnection, table: Table, columns: Sequence[str], keys: Sequence[str],
           parts: Iterable[list[list[Any]]]) -> None:
    """Upserts rows `_Upsert.convert_rows` completed for this connection's form, in parts taken as they come
    (ingest writes a batch's first parts while its last ones are being made). SQLite writes each part as it
    comes; PostgreSQL takes them all, then writes them in one COPY (or one executemany when few)."""
    dialect = conn.dialect
    upsert = _upsert_of(StorageForm.of(dialect), table, columns, keys, dialect)
    if dialect.name == "postgresql":
        parts = [[row for part in parts for row in part]]
        if len(parts[0]) >= COPY_MIN_ROWS:
            _Copy.of(table, upsert.columns, tuple(keys)).write(conn, parts[0])
            return
    cursor = conn.dbapi.cursor()
    try:
        for rows in parts:
            if rows:
                upsert.write_many(cursor, rows)
    finally:
        cursor.close()


# PostgreSQL: a batch of at least this many rows is COPYed (`_Copy`), a smaller one executemany'd. The
# COPY takes more round trips (the temporary table's CREATE IF NOT EXISTS, the COPY, the INSERT ... SELECT
# where executemany takes one pipeline) and less than half the client CPU a row (4.2 against 8-10 us, 20,000
# rows of metrics_points in batches of 2,000: 118,000 against 69,000-78,000 rows/s).
COPY_MIN_ROWS = 500


@dataclass(frozen=True)
class _Copy:
    """A batch upserted through a temporary table: COPY into it (the driver's fastest way in), then one
    statement that empties it into the table: `INSERT ... SELECT DISTINCT ON (keys) ... ON CONFLICT (keys)
    DO UPDATE ... WHERE stored.attempt <= new.attempt`. Of a batch's rows with the same key, the one with
    the highest attempt, the last of those, is the one inserted: what executemany leaves applying them one
    by one (one statement may not touch a row twice). The temporary table lives as long as its connection
    (`CREATE ... IF NOT EXISTS` in each batch's transaction) and holds rows only inside the transaction that
    copies them."""

    create: str
    copy: str
    insert: str

    @staticmethod
    @lru_cache(maxsize=8)
    def of(table: Table, columns: tuple[str, ...], keys: tuple[str, ...]) -> _Copy:
        quote = postgresql.dialect().identifier_preparer.quote
        name, temp = quote(table.name), quote(f"tf_incoming_{table.name}")
        listed = ", ".join(quote(c) for c in columns)
        key_list = ", ".join(quote(k) for k in keys)
        updates = ", ".join(f"{quote(c)} = excluded.{quote(c)}" for c in columns if c not in keys)
        attempt = quote("attempt")
        return _Copy(
            create=f"CREATE TEMPORARY TABLE IF NOT EXISTS {temp} (LIKE {name}, tf_order BIGINT NOT NULL) "
                   "ON COMMIT DELETE ROWS",
            copy=f"COPY {temp} ({listed}, tf_order) FROM STDIN",
            insert=f"WITH batch AS (DELETE FROM {temp} RETURNING *) "
                   f"INSERT INTO {name} ({listed}) SELECT DISTINCT ON ({key_list}) {listed} FROM batch "
                   f"ORDER BY {key_list}, {attempt} DESC, tf_order DESC "
                   f"ON CONFLICT ({key_list}) DO UPDATE SET {updates} "
                   f"WHERE {name}.{attempt} <= excluded.{attempt}")

    def write(self, conn: DriverConnection, rows: Sequence[list[Any]]) -> None:
        """Rows `_Upsert.convert_rows` completed (in the columns order `of` was given)."""
        cursor = conn.dbapi.cursor()
        try:
            # In every batch's transaction (a round trip more, for 500 rows or more): made in a transaction
            # that then failed, the table went with its rollback.
            cursor.execute(self.create)
            with cursor.copy(self.copy) as copy:
                for order, row in enumerate(rows):
                    row.append(order)
                    copy.write_row(row)
            cursor.execute(self.insert)
        finally:
            cursor.close()


@lru_cache(maxsize=8)
def _deleted_among_sql(dialect_name: str, driver: str, paramstyle: str) -> str:
    """`SELECT job_id FROM metrics_deleted_jobs` of the ids bound as ONE parameter (whatever their number,
    one statement text, so the driver's statement cache keeps it): a JSON array on SQLite, an array on
    PostgreSQL."""
    table = _DELETED_JOBS
    if dialect_name == "sqlite" and paramstyle == "qmark":
        return f"SELECT job_id FROM {table.name} WHERE job_id IN (SELECT value FROM json_each(?))"
    if dialect_name == "postgresql" and paramstyle == "pyformat":
        return f"SELECT job_id FROM {table.name} WHERE job_id = ANY(%(job_ids)s::VARCHAR[])"
    raise NotImplementedError(f"no deleted-jobs query for {dialect_name} ({driver}, {paramstyle})")


class MetricsRepository:
    POINT_KEY = ("job_id", "step", "kind")
    ENTRY_KEY = ("job_id", "attempt", "sequence")

    def upsert_points(self, session: Session, points: Sequence[metrics_pb2.MetricPoint]) -> None:
        """Stores points (a repeat of a key replaces it unless it is of an older attempt) in one statement
        executed for every row."""
        conn = DriverConnection.of(session)
        self.write_point_rows(conn, [self.point_rows(StorageForm.of(conn.dialect), points)])

    @staticmethod
    def point_rows(form: StorageForm, points: Sequence[metrics_pb2.MetricPoint]) -> list[list[Any]]:
        """The rows `write_point_rows` stores, in the storage form of `form`'s databases (made apart from
        the write: ingest makes them off the database thread, or in another process)."""
        rows = [point_to_row(p) for p in points]
        MetricsRepository.convert_point_rows(form, rows)
        return rows

    @staticmethod
    def convert_point_rows(form: StorageForm, rows: Sequence[list[Any]]) -> None:
        """Rows of `converters.point_to_row` completed in place into the storage form of `form`'s
        databases."""
        if rows:
            _upsert_of(form, _POINTS, POINT_COLUMNS, MetricsRepository.POINT_KEY).convert_rows(rows)

    def write_point_rows(self, conn: DriverConnection, parts: Iterable[list[list[Any]]]) -> None:
        """Upserts rows from `point_rows`, in parts taken as they come, on the driver's connection (ingest:
        no ORM session)."""
        _write(conn, _POINTS, POINT_COLUMNS, self.POINT_KEY, parts)

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
        """Stores log entries (a repeat of a key replaces it) in one statement executed for every row."""
        conn = DriverConnection.of(session)
        self.write_entry_rows(conn, [self.entry_rows(StorageForm.of(conn.dialect), entries)])

    @staticmethod
    def entry_rows(form: StorageForm, entries: Sequence[metrics_pb2.LogEntry]) -> list[list[Any]]:
        """The rows `write_entry_rows` stores (see `point_rows`)."""
        rows = [entry_to_row(e) for e in entries]
        if rows:
            _upsert_of(form, _ENTRIES, ENTRY_COLUMNS, MetricsRepository.ENTRY_KEY).convert_rows(rows)
        return rows

    def write_entry_rows(self, conn: DriverConnection, parts: Iterable[list[list[Any]]]) -> None:
        """Upserts rows from `entry_rows`, in parts taken as they come."""
        _write(conn, _ENTRIES, ENTRY_COLUMNS, self.ENTRY_KEY, parts)

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

    def deleted_among(self, conn: DriverConnection, job_ids: Sequence[str]) -> set[str]:
        """Which of the jobs were deleted (one query for a whole ingest batch)."""
        return self.ask_deleted_among(conn, job_ids)()

    def ask_deleted_among(self, conn: DriverConnection, job_ids: Sequence[str]) -> Callable[[], set[str]]:
        """Sends `deleted_among`'s query; what it returns reads the answer (in a pipeline: once the pipeline
        has sent it, see DriverConnection.pipelined)."""
        if not job_ids:
            return set
        dialect = conn.dialect
        sql = _deleted_among_sql(dialect.name, dialect.driver, dialect.paramstyle)
        ids = sorted(set(job_ids))
        params: Any = (json.dumps(ids),) if dialect.name == "sqlite" else {"job_ids": ids}
        cursor = conn.dbapi.cursor()
        try:
            cursor.execute(sql, params)
        except BaseException:
            cursor.close()
            raise

        def answer() -> set[str]:
            try:
                return {job_id for (job_id,) in cursor.fetchall()}
            finally:
                cursor.close()

        return answer

    @staticmethod
    def pipelines(conn: DriverConnection, rows: int) -> bool:
        """Whether a batch of `rows` rows is written in one pipeline with its commit and the check that
        follows (DriverConnection.pipelined): on PostgreSQL, a batch small enough for executemany (COPY
        cannot be pipelined)."""
        return conn.dialect.name == "postgresql" and 0 < rows < COPY_MIN_ROWS

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


_DELETED_JOBS: Table = DeletedJobRow.__table__  # type: ignore[assignment]
_POINTS: Table = MetricPointRow.__table__  # type: ignore[assignment]
_ENTRIES: Table = LogEntryRow.__table__  # type: ignore[assignment]
