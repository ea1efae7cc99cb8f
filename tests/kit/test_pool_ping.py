"""services.kit.db pings a pooled PostgreSQL connection before handing it out only when it waited in the
pool longer than PING_AFTER_IDLE_S; one cut while it waited is replaced before anyone uses it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text

from services.kit import db as kit_db
from services.kit.db import Database

pytestmark = pytest.mark.postgres


@pytest.fixture
def database(postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Database, list[Any]]]:
    database = Database(postgres_url, "kit")
    pings: list[Any] = []
    ping = database.engine.dialect.do_ping

    def counted(dbapi_connection: Any) -> bool:
        pings.append(dbapi_connection)
        return ping(dbapi_connection)

    monkeypatch.setattr(database.engine.dialect, "do_ping", counted)
    yield database, pings
    database.dispose()


def backend_pid(database: Database) -> int:
    with database.session() as session:
        return int(session.execute(text("select pg_backend_pid()")).scalar_one())


def test_a_connection_used_moments_ago_is_handed_out_without_a_ping(
        database: tuple[Database, list[Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    db, pings = database
    monkeypatch.setattr(kit_db, "PING_AFTER_IDLE_S", 60.0)
    first = backend_pid(db)
    for _ in range(5):
        assert backend_pid(db) == first  # the same pooled connection each time
        with db.driver_connection() as conn:
            conn.dbapi.cursor().execute("select 1")
    assert pings == []


def test_a_connection_cut_while_idle_is_replaced_before_it_is_used(
        database: tuple[Database, list[Any]], postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    db, pings = database
    first = backend_pid(db)
    other = Database(postgres_url, "kit-admin")
    try:
        with other.session() as session:
            assert session.execute(text("select pg_terminate_backend(:pid)"), {"pid": first}).scalar_one()
    finally:
        other.dispose()
    monkeypatch.setattr(kit_db, "PING_AFTER_IDLE_S", 0.0)  # it has waited long enough
    second = backend_pid(db)  # no error reaches the caller: the ping failed, the pool connected anew
    assert second != first and len(pings) == 1


def test_a_driver_connection_lost_while_in_use_never_goes_back_to_the_pool(
        database: tuple[Database, list[Any]], postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    db, pings = database
    monkeypatch.setattr(kit_db, "PING_AFTER_IDLE_S", 60.0)  # no ping would find it
    other = Database(postgres_url, "kit-admin")
    try:
        with pytest.raises(Exception, match="terminat"), db.driver_connection() as conn:
            cursor = conn.dbapi.cursor()
            cursor.execute("select pg_backend_pid()")
            with other.session() as session:
                session.execute(text("select pg_terminate_backend(:pid)"), {"pid": cursor.fetchone()[0]})
            cursor.execute("select 1")
    finally:
        other.dispose()
    with db.driver_connection() as conn:  # a new connection, not the lost one
        cursor = conn.dbapi.cursor()
        cursor.execute("select 1")
        assert cursor.fetchone() == (1,)
    assert pings == []
