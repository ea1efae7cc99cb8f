"""The outbox keeps what is pending and the recent past: published rows older than the retention go."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sqlalchemy import select
from tuneforge.v1 import job_pb2

from services.jobs.component import MIGRATIONS
from services.jobs.models import JobOutbox
from services.kit.db import Database
from services.kit.outbox import OutboxRelay, add_event, column_key, utcnow


def test_published_rows_older_than_the_retention_are_deleted_and_pending_ones_never(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'jobs.db'}", "jobs")
    db.migrate(MIGRATIONS)
    now = utcnow()
    with db.session() as session:
        for i in range(5):
            add_event(session, JobOutbox, "tuneforge.events.jobs.x", job_pb2.Job(id=f"job_{i}"), f"e{i}")
    with db.session() as session:
        rows = session.scalars(select(JobOutbox).order_by(JobOutbox.id)).all()
        rows[0].published_at = now - timedelta(days=3)  # old: goes
        rows[1].published_at = now - timedelta(hours=25)  # old: goes
        rows[2].published_at = now - timedelta(hours=1)  # recent: stays
        rows[3].published_at = None  # pending, however old: stays
        rows[3].created_at = now - timedelta(days=30)
    relay = OutboxRelay(db, None, JobOutbox)  # type: ignore[arg-type]  # prune reads no JetStream
    with db.session() as session:
        assert relay.prune(session, now) == 2
    with db.session() as session:
        assert sorted(session.scalars(select(JobOutbox.event_id))) == ["e2", "e3", "e4"]
    keep_all = OutboxRelay(db, None, JobOutbox, retention_s=0)  # type: ignore[arg-type]
    with db.session() as session:
        assert keep_all.prune(session, now + timedelta(days=365)) == 0
    db.dispose()


def test_a_key_longer_than_its_column_is_kept_as_its_sha256() -> None:
    assert column_key("e" * 128, 128) == "e" * 128
    long_a, long_b = column_key("e" * 129, 128), column_key("e" * 128 + "f", 128)
    assert long_a.startswith("sha256:") and len(long_a) == 71 <= 128
    assert long_a != long_b and long_a == column_key("e" * 129, 128)
