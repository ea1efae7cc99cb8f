"""services.kit.db.DriverConnection.after_commit on both databases: what was written is committed before
the block runs, and the connection is transactional again afterwards (never back in the pool in
autocommit). DriverConnection.pipelined on PostgreSQL: the block's statements are committed where it asks,
all or none, and the connection is as before afterwards, after a failure too."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text

from services.kit.db import Database, DriverConnection


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    url = (f"sqlite:///{tmp_path / 'kit.db'}" if request.param == "sqlite"
           else request.getfixturevalue("postgres_url"))
    database = Database(url, "kit")
    with database.session() as session:
        session.execute(text("drop table if exists kit_after_commit"))
        session.execute(text("create table kit_after_commit (k integer primary key)"))
    yield database
    with database.session() as session:
        session.execute(text("drop table if exists kit_after_commit"))
    database.dispose()


def stored(db: Database) -> list[int]:
    with db.session() as session:
        return list(session.scalars(text("select k from kit_after_commit order by k")))


def test_the_write_is_committed_before_the_block_and_the_connection_is_transactional_after(
        db: Database) -> None:
    with db.driver_connection() as conn:
        cursor = conn.dbapi.cursor()
        cursor.execute("insert into kit_after_commit (k) values (1)")
        with conn.after_commit():
            assert stored(db) == [1]  # seen from another connection: committed
            cursor.execute("select count(*) from kit_after_commit")
            assert cursor.fetchall()[0][0] == 1
        cursor.execute("insert into kit_after_commit (k) values (2)")
        conn.dbapi.rollback()  # transactional again: the second row is not kept
        cursor.close()
    assert stored(db) == [1]
    for _ in range(3):  # every pooled connection, the one used above included, still takes a rollback
        with pytest.raises(RuntimeError), db.driver_connection() as conn:
            conn.dbapi.cursor().execute("insert into kit_after_commit (k) values (3)")
            raise RuntimeError("rolled back")
    assert stored(db) == [1]


def insert(conn: DriverConnection, *keys: int) -> None:
    cursor = conn.dbapi.cursor()
    cursor.executemany("insert into kit_after_commit (k) values (%s)", [(k,) for k in keys])


@pytest.mark.postgres
def test_a_pipelined_block_commits_where_it_asks_and_reads_its_answers_after(postgres_url: str) -> None:
    db = fresh(postgres_url)
    try:
        with db.driver_connection() as conn:
            with conn.pipelined() as commit:
                insert(conn, 1, 2)
                commit()
                cursor = conn.dbapi.cursor()
                cursor.execute("select count(*) from kit_after_commit")
            assert cursor.fetchall() == [(2,)]
            assert stored(db) == [1, 2]  # seen from another connection: committed
            insert(conn, 3)
            conn.dbapi.rollback()  # transactional again: the third row is not kept
        assert stored(db) == [1, 2]
    finally:
        drop(db)


@pytest.mark.postgres
def test_a_failing_pipelined_block_keeps_nothing_and_leaves_the_connection_usable(postgres_url: str) -> None:
    db = fresh(postgres_url)
    try:
        with db.driver_connection() as conn:
            insert(conn, 1)
        with pytest.raises(psycopg.errors.UniqueViolation), db.driver_connection() as conn:
            with conn.pipelined() as commit:
                insert(conn, 5)
                insert(conn, 1)  # already there: the block fails, 5 with it
                commit()
        assert stored(db) == [1]
        for k in (6, 7, 8):  # every pooled connection, the one that failed included, writes and commits
            with db.driver_connection() as conn:
                with conn.pipelined() as commit:
                    insert(conn, k)
                    commit()
        assert stored(db) == [1, 6, 7, 8]
    finally:
        drop(db)


def fresh(url: str) -> Database:
    database = Database(url, "kit")
    with database.session() as session:
        session.execute(text("drop table if exists kit_after_commit"))
        session.execute(text("create table kit_after_commit (k integer primary key)"))
    return database


def drop(database: Database) -> None:
    with database.session() as session:
        session.execute(text("drop table if exists kit_after_commit"))
    database.dispose()
