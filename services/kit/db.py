"""SQLAlchemy engine and sessions, and the migrations every service applies at start.

Services keep domain code synchronous and run it in a worker thread (`Database.run`), so the event loop
never blocks on the database, whichever one it is: a SQLite file by default, PostgreSQL in production.
Those threads are the database's own (`workers` of them, TUNEFORGE_DB_WORKERS; more calls wait for one),
never the event loop's default executor: slow work a caller can influence (an import reading a source that
never answers) runs in pools of its own (services.kit.pools) and cannot hold up database calls.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

from services.kit.pools import BoundedPool

log = logging.getLogger(__name__)
T = TypeVar("T")
# Threads of a Database when its owner does not say (KitSettings.db_workers has the same default).
DEFAULT_DB_WORKERS = 8


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    engine = create_engine(url, pool_size=10, max_overflow=10)
    _ping_when_idle(engine)
    return engine


# A pooled connection idle for longer than this is pinged before it is handed out; one used moments ago is
# not (see _ping_when_idle).
PING_AFTER_IDLE_S = 1.0


def _ping_when_idle(engine: Engine) -> None:
    """The pool's pre-ping (`pool_pre_ping` pings before every checkout), only for a connection that
    waited in the pool longer than PING_AFTER_IDLE_S: a server restarted or a connection cut while it
    waited is still found before a caller uses it, and a connection in steady use (metric ingest batches
    many times a second) costs no round trip more per checkout: one of the six a one-message ingest batch
    made on PostgreSQL, each of which waits for the GIL while the event loop writes to many streams. A
    failed ping discards the connection and the pool opens a new one (SQLAlchemy's DisconnectionError)."""
    dialect = engine.dialect

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since <= PING_AFTER_IDLE_S:
            return
        try:
            dialect.do_ping(dbapi_conn)
        except Exception as exc:
            raise DisconnectionError(f"a pooled connection failed its ping: {exc}") from exc


@dataclass(frozen=True)
class DriverConnection:
    """A connection of the database's own driver (DBAPI), and the dialect its statements are written in:
    for the few hot paths whose statements are compiled once (services.metrics.repository), where an ORM
    session's own bookkeeping would cost more than the statements."""

    dbapi: Any
    dialect: Dialect

    @classmethod
    def of(cls, session: Session) -> DriverConnection:
        """The driver connection under `session`, in the session's transaction."""
        connection = session.connection()
        return cls(connection.connection, connection.dialect)

    @contextmanager
    def after_commit(self) -> Iterator[None]:
        """Commits what the connection wrote, then runs the block outside a transaction where the driver
        has no implicit one (PostgreSQL in autocommit: a read there costs no BEGIN and COMMIT round trips;
        SQLite's driver begins one only before a write). The connection is as before afterwards, or, when
        it cannot be put back so, invalidated (never returned to the pool in autocommit)."""
        self.dbapi.commit()
        if self.dialect.name != "postgresql":
            yield
            return
        raw = getattr(self.dbapi, "dbapi_connection", self.dbapi)
        raw.autocommit = True
        try:
            yield
        finally:
            try:
                raw.autocommit = False
            except Exception:
                self.dbapi.invalidate()

    @contextmanager
    def pipelined(self) -> Iterator[Callable[[], None]]:
        """PostgreSQL (psycopg): everything the block sends goes to the server in one pipeline, one round
        trip for all of it at the block's end; the block reads its results after. It runs in a transaction
        of its own, which the block commits by calling what it gets: what it sends after that runs outside
        a transaction (in autocommit). An error rolls the transaction back and is raised. The connection is
        as before afterwards, or, when it cannot be put back so, invalidated."""
        raw = getattr(self.dbapi, "dbapi_connection", self.dbapi)
        raw.autocommit = True
        try:
            with raw.pipeline():
                raw.execute("BEGIN")
                yield lambda: raw.execute("COMMIT")
        except BaseException:
            try:
                raw.rollback()  # the transaction the failed statement left open, if any
            except Exception:
                self.dbapi.invalidate()
            raise
        finally:
            try:
                raw.autocommit = False
            except Exception:
                self.dbapi.invalidate()


class Database:
    """One service's database: its engine, a session factory, its migrations, and `workers` threads of
    its own on which `run` calls it (calls beyond them wait for a thread; none is refused)."""

    def __init__(self, url: str, service: str, workers: int = DEFAULT_DB_WORKERS) -> None:
        self.url = url
        self.service = service
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.pool = BoundedPool(f"{service} database calls", workers, None, setting="TUNEFORGE_DB_WORKERS")

    @property
    def sessions(self) -> sessionmaker[Session]:
        """The session factory `session` uses (for session events, e.g. after_flush)."""
        return self._sessions

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work: commits when the block ends normally, rolls back on any error."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    @contextmanager
    def driver_connection(self) -> Iterator[DriverConnection]:
        """`session`, for statements written for the driver (see DriverConnection): a connection from the
        engine's pool, in a transaction committed when the block ends normally, rolled back on any error."""
        dbapi = self.engine.raw_connection()
        try:
            yield DriverConnection(dbapi, self.engine.dialect)
            dbapi.commit()
        except BaseException:
            try:
                dbapi.rollback()
            except Exception:
                # Lost (the server restarted, the connection was cut): it never goes back to the pool,
                # where the next caller would get it without a ping (see _ping_when_idle).
                dbapi.invalidate()
            raise
        finally:
            dbapi.close()

    async def run(self, fn: Callable[[Session], T]) -> T:
        """Runs `fn` in one transaction on one of the database's own threads."""

        def _call() -> T:
            with self.session() as s:
                return fn(s)

        return await self.pool.run(_call)

    def migrate(self, migrations_dir: Path) -> None:
        """Applies the service's Alembic migrations up to head (idempotent; safe on every start)."""
        cfg = Config()
        cfg.set_main_option("script_location", str(migrations_dir))
        cfg.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))
        cfg.attributes["version_table"] = f"alembic_version_{self.service}"
        with self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def dispose(self) -> None:
        """Closes the connections and lets the threads end (a later call opens and starts new ones)."""
        self.engine.dispose()
        self.pool.shutdown()


def run_migration_env(target_metadata: Any) -> None:
    """Body of every service's migrations/env.py: online migrations on the connection the caller passes."""
    from alembic import context

    config = context.config
    version_table = config.attributes.get("version_table", "alembic_version")
    connection = config.attributes.get("connection")
    if connection is None:
        engine = make_engine(config.get_main_option("sqlalchemy.url") or "")
        with engine.begin() as conn:
            _configure(context, conn, target_metadata, version_table)
        return
    _configure(context, connection, target_metadata, version_table)


def _configure(context: Any, connection: Any, target_metadata: Any, version_table: str) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, version_table=version_table,
                      render_as_batch=connection.dialect.name == "sqlite", compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


def autogenerate_revision(url: str, service: str, migrations_dir: Path, message: str) -> None:
    """Writes a new migration from the difference between the models and a database at head."""
    db = Database(url, service)
    db.migrate(migrations_dir)
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir))
    cfg.attributes["version_table"] = f"alembic_version_{service}"
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.revision(cfg, message=message, autogenerate=True)
