"""The NATS connection, the JetStream streams and consumers (created idempotently), and publishing.

Every message TuneForge publishes to JetStream carries a Nats-Msg-Id equal to its event id, so a publisher
that retries after a lost ack (or an outbox relay that crashed after publishing) never stores it twice.
"""

from __future__ import annotations

import asyncio
import logging

import nats
from google.protobuf.message import Message
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError

from tuneforge_core import subjects

log = logging.getLogger(__name__)

# Duplicate-detection window: a re-published event id inside it is dropped by the server.
DUPLICATE_WINDOW_S = 600.0


async def connect(url: str, name: str) -> NATS:
    async def _on_error(exc: Exception) -> None:
        log.warning("nats error: %s", exc)

    return await nats.connect(
        servers=[url], name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
        error_cb=_on_error,
    )


def stream_configs(max_deliver_age_s: float = 7 * 24 * 3600) -> list[StreamConfig]:
    return [
        StreamConfig(
            name=subjects.STREAM_WORK, subjects=[subjects.WORK_JOBS],
            retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE,
            duplicate_window=DUPLICATE_WINDOW_S,
        ),
        StreamConfig(
            name=subjects.STREAM_WORKER, subjects=["tuneforge.worker.jobs.>"],
            retention=RetentionPolicy.LIMITS, storage=StorageType.FILE, max_age=max_deliver_age_s,
            duplicate_window=DUPLICATE_WINDOW_S,
        ),
        StreamConfig(
            name=subjects.STREAM_ADVISORIES, subjects=[subjects.WORK_MAX_DELIVERIES],
            retention=RetentionPolicy.LIMITS, storage=StorageType.FILE, max_age=max_deliver_age_s,
        ),
        StreamConfig(
            name=subjects.STREAM_EVENTS, subjects=["tuneforge.events.>"],
            retention=RetentionPolicy.LIMITS, storage=StorageType.FILE, max_age=max_deliver_age_s,
            duplicate_window=DUPLICATE_WINDOW_S,
        ),
    ]


async def ensure_streams(js: JetStreamContext) -> None:
    """Creates the streams, or updates them to this config; safe to call from every process at start."""
    for config in stream_configs():
        assert config.name is not None
        try:
            await js.stream_info(config.name)
        except NotFoundError:
            try:
                await js.add_stream(config)
                continue
            except BadRequestError:
                pass  # another process created it between our two calls
        await js.update_stream(config)


async def ensure_pull_consumer(js: JetStreamContext, stream: str, durable: str, filter_subject: str, *,
                               ack_wait_s: float = 30.0, max_deliver: int = -1,
                               max_ack_pending: int = 1000) -> None:
    """Creates a durable pull consumer with explicit acks, or updates its tunables."""
    config = ConsumerConfig(
        durable_name=durable, ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
        filter_subject=filter_subject, ack_wait=ack_wait_s, max_deliver=max_deliver,
        max_ack_pending=max_ack_pending,
    )
    await js.add_consumer(stream, config)


async def publish(js: JetStreamContext, subject: str, message: Message | bytes, event_id: str, *,
                  attempts: int = 20, headers: dict[str, str] | None = None) -> None:
    """Publishes to JetStream with Nats-Msg-Id=event_id, retrying until the server acknowledges it."""
    payload = message if isinstance(message, bytes) else message.SerializeToString()
    all_headers = {"Nats-Msg-Id": event_id, **(headers or {})}
    delay = 0.1
    for attempt in range(1, attempts + 1):
        try:
            await js.publish(subject, payload, headers=all_headers, timeout=5)
            return
        except Exception as exc:
            if attempt == attempts:
                raise
            log.warning("publish to %s failed (attempt %d): %s", subject, attempt, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def ensure_trainers_consumer(js: JetStreamContext, ack_wait_s: float, max_deliver: int) -> None:
    """The work queue's one consumer, shared by every worker; the jobs service and workers both ensure it
    with the same settings (TUNEFORGE_WORK_ACK_WAIT_S, TUNEFORGE_WORK_MAX_DELIVER)."""
    await ensure_pull_consumer(js, subjects.STREAM_WORK, subjects.TRAINERS_CONSUMER, subjects.WORK_JOBS,
                               ack_wait_s=ack_wait_s, max_deliver=max_deliver)

