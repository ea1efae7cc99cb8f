"""services.kit.db.DriverConnection.after_commit on both databases: what was written is committed before
the block runs, and the connection is transactional again afterwards (never back in the pool in
autocommit)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from services.kit.db import Database


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
