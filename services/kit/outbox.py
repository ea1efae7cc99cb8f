"""Transactional outbox and inbox.

A state change and the event announcing it are written in one database transaction (`add_event`); the
relay publishes pending events to JetStream in order with Nats-Msg-Id = event id and marks them sent. A
crash after publishing but before marking re-publishes the same id, which JetStream drops as a duplicate.
Consumers record the ids they applied (`InboxMixin`) so a redelivered event has no effect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime

from google.protobuf.message import Message
from nats.js import JetStreamContext
from sqlalchemy import DateTime, Integer, LargeBinary, String, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from services.kit.db import Database
from tuneforge_core.nats import publish

log = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(UTC)


class OutboxMixin:
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(64), unique=True)
    subject: Mapped[str] = mapped_column(String(255))
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True,
                                                          nullable=True)


class InboxMixin:
    event_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    processed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


def add_event(session: Session, model: type[OutboxMixin], subject: str, message: Message,
              event_id: str) -> None:
    row = model()
    row.event_id, row.subject, row.payload = event_id, subject, message.SerializeToString()
    session.add(row)


def first_time(session: Session, model: type[InboxMixin], event_id: str) -> bool:
    """Records `event_id` as processed in this transaction; False if it was processed before."""
    if session.get(model, event_id) is not None:
        return False
    row = model()
    row.event_id = event_id
    session.add(row)
    return True


class OutboxRelay:
    def __init__(self, db: Database, js: JetStreamContext, model: type[OutboxMixin],
                 poll_interval_s: float = 0.5, batch: int = 200) -> None:
        self.db = db
        self.js = js
        self.model = model
        self.poll_interval_s = poll_interval_s
        self.batch = batch
        self._wake = asyncio.Event()

    def notify(self) -> None:
        """Call after committing events so they go out now rather than at the next poll."""
        self._wake.set()

    def _pending(self, session: Session) -> list[tuple[int, str, str, bytes]]:
        rows = session.execute(
            select(self.model.id, self.model.event_id, self.model.subject, self.model.payload)
            .where(self.model.published_at.is_(None)).order_by(self.model.id).limit(self.batch)
        ).all()
        return [tuple(r) for r in rows]  # type: ignore[misc]

    def _mark(self, session: Session, ids: list[int]) -> None:
        session.execute(update(self.model).where(self.model.id.in_(ids)).values(published_at=utcnow()))

    async def relay_once(self) -> int:
        rows = await self.db.run(self._pending)
        sent: list[int] = []
        try:
            for row_id, event_id, subject, payload in rows:
                await publish(self.js, subject, payload, event_id)
                sent.append(row_id)
        finally:
            if sent:
                await self.db.run(lambda s: self._mark(s, sent))
        return len(sent)

    async def run(self) -> None:
        while True:
            try:
                while await self.relay_once() == self.batch:
                    pass
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("outbox relay failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval_s)
            self._wake.clear()
