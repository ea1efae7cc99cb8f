"""The NATS connection, the JetStream streams and consumers (created idempotently), and publishing.

Every message TuneForge publishes to JetStream carries a Nats-Msg-Id equal to its event id, so a publisher
that retries after a lost ack (or an outbox relay that crashed after publishing) never stores it twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats
from google.protobuf.message import Message
from nats.aio.client import Client as NATS
from nats.errors import TimeoutError as NatsTimeoutError
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
from tuneforge.events.v1 import events_pb2

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
            # The legacy subject stays so that what an older version queued there can be moved on.
            name=subjects.STREAM_WORK, subjects=[subjects.ALL_WORK_JOBS, subjects.LEGACY_WORK_JOBS],
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


async def ensure_trainers_consumer(js: JetStreamContext, gpu_type: str, ack_wait_s: float,
                                   max_deliver: int) -> str:
    """The consumer that hands out the jobs asking for `gpu_type` ("trainers-<route>", filtered on that
    route's subject alone, as a work-queue stream requires); returns its name. The jobs service and the
    workers ensure them with the same settings (TUNEFORGE_WORK_ACK_WAIT_S, TUNEFORGE_WORK_MAX_DELIVER)."""
    durable = subjects.trainers_consumer(gpu_type)
    await ensure_pull_consumer(js, subjects.STREAM_WORK, durable, subjects.work_jobs(gpu_type),
                               ack_wait_s=ack_wait_s, max_deliver=max_deliver)
    return durable


async def queued_routes(js: JetStreamContext) -> list[str]:
    """The routes that have jobs waiting in the work queue (delivered or not), from the stream's
    per-subject counts."""
    info = await js.stream_info(subjects.STREAM_WORK, subjects_filter=subjects.ALL_WORK_JOBS)
    prefix = subjects.WORK_JOBS_PREFIX + "."
    return sorted(subject.removeprefix(prefix) for subject, count in (info.state.subjects or {}).items()
                  if count and subject.startswith(prefix))


async def reroute_legacy_work(js: JetStreamContext) -> int:
    """Moves the assignments an older version queued on the one shared subject ("tuneforge.work.jobs",
    consumer "trainers") to their GPU type's subject, then deletes that consumer; returns how many moved.

    Each is published under a new Nats-Msg-Id (the old one may still be inside the duplicate window) before
    the old copy is acked, so a crash in between leaves a duplicate, never a lost job: a worker drops a
    delivery of a job that has already ended. Delivery counts start again on the new subject.
    """
    try:
        await js.consumer_info(subjects.STREAM_WORK, subjects.LEGACY_TRAINERS_CONSUMER)
    except NotFoundError:
        return 0
    sub = await js.pull_subscribe(subjects.LEGACY_WORK_JOBS, durable=subjects.LEGACY_TRAINERS_CONSUMER,
                                  stream=subjects.STREAM_WORK)
    moved = 0
    try:
        while True:
            try:
                messages = await sub.fetch(100, timeout=1.0)
            except (TimeoutError, NatsTimeoutError):
                break
            for msg in messages:
                try:
                    assignment = events_pb2.JobAssignment.FromString(msg.data)
                except Exception:
                    log.error("dropping an undecodable assignment from the legacy work subject")
                    await msg.term()
                    continue
                await publish(js, subjects.work_jobs(assignment.spec.hardware.gpu_type), msg.data,
                              f"{assignment.event_id or assignment.job_id}.routed")
                await msg.ack_sync()
                moved += 1
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    await js.delete_consumer(subjects.STREAM_WORK, subjects.LEGACY_TRAINERS_CONSUMER)
    if moved:
        log.info("moved %d queued job(s) from %s to their GPU type's subject", moved,
                 subjects.LEGACY_WORK_JOBS)
    return moved
