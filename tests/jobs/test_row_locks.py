"""A read `for_update` locks on SQLite too: there is no FOR UPDATE, and pysqlite would run the SELECT outside
any transaction, so a concurrent writer could change the row between the read and the write (CancelJob right
after a worker took the job collided on the job's next event sequence)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import select

from services.jobs.component import MIGRATIONS
from services.jobs.models import JobRow
from services.jobs.repository import JobRepository, locking
from services.kit.db import Database

WRITE = f"UPDATE {JobRow.__tablename__} SET state = state"


def test_a_locking_read_holds_the_write_lock_until_the_transaction_ends(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    db = Database(f"sqlite:///{path}", "jobs")
    db.migrate(MIGRATIONS)
    other = sqlite3.connect(path, timeout=0)
    try:
        with db.session() as session:
            assert JobRepository(session).get("job_x", for_update=True) is None
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute(WRITE)  # another writer waits for the commit
            session.scalars(locking(session, select(JobRow))).all()  # again in the same transaction: fine
        other.execute(WRITE)
        other.commit()
        with db.session() as session:  # a plain read takes no lock
            assert JobRepository(session).get("job_x") is None
            other.execute(WRITE)
            other.commit()
    finally:
        other.close()
        db.dispose()
