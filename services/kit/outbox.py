"""Transactional outbox and inbox.

A state change and the event announcing it are written in one database transaction (`add_event`); the
relay publishes pending events to JetStream in order with Nats-Msg-Id = event id and marks them sent. A
crash after publishing but before marking re-publishes the same id, which JetStream drops as a duplicate.
Consumers record the ids they applied (`InboxMixin`) so a redelivered event has no effect.

A published row is never read again (the relay only reads unpublished ones), so the relay deletes rows
published more than `retention_s` ago (a day by default), a batch at a time, at most once a minute: the
table holds what is pending and the recent past, not every event the service ever sent.

With tracing on (tuneforge_core.tracing) a row keeps the W3C `traceparent` of the span that wrote it (the
CreateJob call, the worker update being applied), and the relay publishes it in a PRODUCER span that is that
span's child, whose context goes out in the message's headers: the consumers continue the same trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from datetime import UTC, datetime, timedelta

from google.protobuf.message import Message
from nats.js import JetStreamContext
from sqlalchemy import DateTime, Integer, LargeBinary, String, delete, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from services.kit.db import Database
from tuneforge_core import tracing
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
    # The W3C traceparent of the span that wrote the event (None while tracing is off).
    traceparent: Mapped[str | None] = mapped_column(String(64), nullable=True)


INBOX_KEY_CHARS = 128  # InboxMixin.event_id


class InboxMixin:
    event_id: Mapped[str] = mapped_column(String(INBOX_KEY_CHARS), primary_key=True)
    processed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


def add_event(session: Session, model: type[OutboxMixin], subject: str, message: Message,
              event_id: str, traceparent: str | None = None) -> None:
    """Adds the event to the transaction's outbox, in the trace of the current span, or of `traceparent`
    when given (an event decided now on behalf of an earlier call, such as a held job's assignment)."""
    row = model()
    row.event_id, row.subject, row.payload = event_id, subject, message.SerializeToString()
    row.traceparent = traceparent or tracing.current_traceparent()
    session.add(row)


def column_key(key: str, limit: int) -> str:
    """`key` as a column of `limit` characters keeps it: itself, or "sha256:<hex>" of it when longer (a
    key built from what another process sent: PostgreSQL refuses a longer value, on every redelivery,
    where SQLite would store it whole). Two keys stay distinct, and the same key maps to the same value."""
    if len(key) <= limit:
        return key
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def inbox_key(event_id: str) -> str:
    """The key an event id is recorded under in an inbox (`column_key`)."""
    return column_key(event_id, INBOX_KEY_CHARS)


def seen_before(session: Session, model: type[InboxMixin], event_id: str) -> bool:
    """Whether `event_id` was recorded as processed (`first_time`)."""
    return session.get(model, inbox_key(event_id)) is not None


def first_time(session: Session, model: type[InboxMixin], event_id: str) -> bool:
    """Records `event_id` as processed in this transaction; False if it was processed before."""
    if seen_before(session, model, event_id):
        return False
    row = model()
    row.event_id = inbox_key(event_id)
    session.add(row)
    return True


# How long published rows are kept, and how often the relay looks for older ones.
OUTBOX_RETENTION_S = 24 * 3600.0
PRUNE_INTERVAL_S = 60.0


class OutboxRelay:
    def __init__(self, db: Database, js: JetStreamContext, model: type[OutboxMixin],
                 poll_interval_s: float = 0.5, batch: int = 200,
                 retention_s: float = OUTBOX_RETENTION_S) -> None:
        self.db = db
        self.js = js
        self.model = model
        self.poll_interval_s = poll_interval_s
        self.batch = batch
        # 0 keeps published rows forever.
        self.retention_s = retention_s
        self._wake = asyncio.Event()
        self._pruned_at = 0.0

    def prune(self, session: Session, now: datetime | None = None, limit: int = 1000) -> int:
        """Deletes up to `limit` rows published more than `retention_s` before `now`; returns how many."""
        if self.retention_s <= 0:
            return 0
        cutoff = (now or utcnow()) - timedelta(seconds=self.retention_s)
        ids = list(session.scalars(select(self.model.id).where(self.model.published_at.is_not(None),
                                                               self.model.published_at < cutoff)
                                   .order_by(self.model.id).limit(limit)))
        if ids:
            session.execute(delete(self.model).where(self.model.id.in_(ids)))
        return len(ids)

    async def _prune_now_and_then(self) -> None:
        if time.monotonic() - self._pruned_at < PRUNE_INTERVAL_S:
            return
        self._pruned_at = time.monotonic()
        pruned = await self.db.run(self.prune)
        if pruned:
            log.info("outbox: deleted %d events published more than %.0f s ago", pruned, self.retention_s)

    def notify(self) -> None:
        """Call after committing events so they go out now rather than at the next poll."""
        self._wake.set()

    def _pending(self, session: Session) -> list[tuple[int, str, str, bytes, str | None]]:
        rows = session.execute(
            select(self.model.id, self.model.event_id, self.model.subject, self.model.payload,
                   self.model.traceparent)
            .where(self.model.published_at.is_(None)).order_by(self.model.id).limit(self.batch)
        ).all()
        return [tuple(r) for r in rows]  # type: ignore[misc]

    def _mark(self, session: Session, ids: list[int]) -> None:
        session.execute(update(self.model).where(self.model.id.in_(ids)).values(published_at=utcnow()))

    async def relay_once(self) -> int:
        rows = await self.db.run(self._pending)
        sent: list[int] = []
        try:
            for row_id, event_id, subject, payload, traceparent in rows:
                if traceparent:  # publish's headers carry this span's context
                    with tracing.span(f"outbox publish {subject}", parent=tracing.context_of(traceparent),
                                      kind=tracing.SpanKind.PRODUCER,
                                      attributes={"messaging.system": "nats",
                                                  "messaging.destination.name": subject,
                                                  "messaging.message.id": event_id}):
                        await publish(self.js, subject, payload, event_id)
                else:
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
                await self._prune_now_and_then()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("outbox relay failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval_s)
            self._wake.clear()
