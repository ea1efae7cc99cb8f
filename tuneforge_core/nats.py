"""The NATS connection, the JetStream streams and consumers (created idempotently), and publishing.

Every message TuneForge publishes to JetStream carries a Nats-Msg-Id equal to its event id, so a publisher
that retries after a lost ack (or an outbox relay that crashed after publishing) never stores it twice.

Credentials: `connect` sends TUNEFORGE_NATS_USER / TUNEFORGE_NATS_PASSWORD when set (callers pass only the
URL), and then uses the inbox prefix "_INBOX.<user>", so a user's subscribe permission can be limited to its
own replies. The embedded nats-server of `tuneforge up` (services.kit.embedded) has two users: "services",
allowed everything, and "worker", allowed exactly what a trainer worker does (`worker_permissions`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from urllib.parse import urlsplit, urlunsplit

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
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from tuneforge.events.v1 import events_pb2

from tuneforge_core import subjects, tracing
from tuneforge_core.settings import KitSettings

log = logging.getLogger(__name__)

# How often a NATS error that keeps coming (a server that cannot be reached) is logged again.
REPEAT_LOG_S = 30.0

# Duplicate-detection window: a re-published event id inside it is dropped by the server.
DUPLICATE_WINDOW_S = 600.0
DEAD_LETTERS_MAX_BYTES = 1 << 30


class StreamSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNEFORGE_NATS_", env_file=None, extra="ignore")

    # TUNEFORGE_NATS_STREAM_REPLICAS: copies JetStream keeps of each stream (3 on a 3-node NATS cluster in
    # production, deploy/k8s/overlays/production). 0: streams are created with the server's default (1)
    # and an existing stream's replicas are left as they are, so a process without this setting (or
    # without the right to update streams, the "worker" user) never asks to change them.
    stream_replicas: int = Field(default=0, ge=0, le=5)


# The embedded nats-server's users (services.kit.embedded.NatsAuth generates their passwords).
SERVICES_USER = "services"
WORKER_USER = "worker"


def inbox_prefix(user: str) -> str:
    """The reply-subject prefix of a connection as `user`: "_INBOX.<user>" for a user name that is one
    plain subject token, else nats-py's default "_INBOX"."""
    return f"_INBOX.{user}" if re.fullmatch(r"[A-Za-z0-9_-]+", user) else "_INBOX"


def worker_permissions() -> dict[str, dict[str, list[str]]]:
    """What the "worker" user may publish and subscribe to: pull its jobs from TF_WORK (and ack them),
    publish its updates, metrics, logs and heartbeats, follow its job's JobChanged events in TF_EVENTS
    through JetStream (cancellation), and read its own replies. Nothing else: no core subscription to any
    tuneforge.* subject, no stream created, updated or deleted, no other stream's consumers."""
    work, events = subjects.STREAM_WORK, subjects.STREAM_EVENTS
    return {
        "publish": {"allow": [
            # ensure_streams reads each stream's config (and changes none that already matches).
            *(f"$JS.API.STREAM.INFO.{config.name}" for config in stream_configs()),
            # The work queue: the trainers-<route> consumers (routes "<gpu type>", "<gpu type>.x<N>",
            # "any", and each with a pool's "pool-<pool>." before it), their pulls and acks
            # (ack/nak/progress/term).
            f"$JS.API.CONSUMER.DURABLE.CREATE.{work}.*",
            f"$JS.API.CONSUMER.CREATE.{work}.*.{subjects.ALL_WORK_JOBS}",
            f"$JS.API.CONSUMER.CREATE.{work}.*.{subjects.ALL_MULTI_GPU_WORK_JOBS}",
            f"$JS.API.CONSUMER.CREATE.{work}.*.{subjects.ALL_POOLED_MULTI_GPU_WORK_JOBS}",
            f"$JS.API.CONSUMER.INFO.{work}.*",
            f"$JS.API.CONSUMER.MSG.NEXT.{work}.*",
            f"$JS.ACK.{work}.>",
            # A job's latest JobChanged, and an ordered consumer on it (with its flow-control replies).
            f"$JS.API.STREAM.MSG.GET.{events}",
            f"$JS.API.CONSUMER.CREATE.{events}",
            f"$JS.FC.{events}.>",
            # What a worker reports.
            subjects.ALL_WORKER_STATUS,
            subjects.ALL_WORKER_METRICS,
            subjects.ALL_WORKER_LOGS,
            subjects.WORKER_HEARTBEATS,
            # Its job's tracker secrets (a request; the reply comes to its inbox).
            subjects.ALL_TRACKER_SECRETS,
        ]},
        "subscribe": {"allow": [f"{inbox_prefix(WORKER_USER)}.>"]},
    }


async def connect(url: str, name: str, *, user: str | None = None, password: str | None = None) -> NATS:
    """A connection that reconnects forever. `user`/`password` default to TUNEFORGE_NATS_USER and
    TUNEFORGE_NATS_PASSWORD; with neither, it connects without credentials (or with those in `url`)."""
    if user is None and password is None:
        settings = KitSettings()
        user, password = settings.nats_user, settings.nats_password

    shown = _redacted(url)
    said: dict[str, float] = {}  # each error's text: when it was last logged
    repeats: dict[str, int] = {}

    async def _on_error(exc: Exception) -> None:
        # Reconnecting every half second repeats one error: it is logged once, then every REPEAT_LOG_S
        # with how often it came meanwhile.
        text, now = str(exc) or type(exc).__name__, time.monotonic()
        last = said.get(text)
        if last is not None and now - last < REPEAT_LOG_S:
            repeats[text] = repeats.get(text, 0) + 1
            return
        again = repeats.pop(text, 0)
        said[text] = now
        log.warning("nats error (%s): %s%s", shown, text,
                    f" ({again} more times in the last {now - last:.0f} s)" if again and last else "")

    credentials: dict[str, str] = {}
    if user:
        credentials = {"user": user, "password": password or "", "inbox_prefix": inbox_prefix(user)}
    return await nats.connect(
        servers=[url], name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
        error_cb=_on_error, **credentials,
    )


def _redacted(url: str) -> str:
    """`url` without the password it may carry."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def stream_configs(max_deliver_age_s: float = 7 * 24 * 3600, replicas: int = 0) -> list[StreamConfig]:
    """The streams; `replicas` 0 leaves the replica count to the server (TUNEFORGE_NATS_STREAM_REPLICAS)."""
    configs = [
        StreamConfig(
            # The legacy subject stays so that what an older version queued there can be moved on.
            name=subjects.STREAM_WORK,
            subjects=[subjects.ALL_WORK_JOBS, subjects.ALL_MULTI_GPU_WORK_JOBS,
                      subjects.ALL_POOLED_MULTI_GPU_WORK_JOBS, subjects.LEGACY_WORK_JOBS],
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
        # Kept twice as long as what they came from, and bounded in size (the oldest go first): a flood of
        # bad messages cannot fill the server's disk.
        StreamConfig(
            name=subjects.STREAM_DEAD_LETTERS, subjects=[subjects.ALL_DEAD_LETTERS],
            retention=RetentionPolicy.LIMITS, storage=StorageType.FILE, max_age=2 * max_deliver_age_s,
            max_bytes=DEAD_LETTERS_MAX_BYTES, duplicate_window=DUPLICATE_WINDOW_S,
        ),
    ]
    for config in configs:
        config.num_replicas = replicas or None
    return configs


def _stream_differs(want: StreamConfig, have: StreamConfig) -> bool:
    """Whether a stream's config lacks something `want` sets (the fields stream_configs sets)."""
    for name in ("retention", "storage", "max_age", "duplicate_window"):
        wanted, found = getattr(want, name), getattr(have, name)
        if wanted is None or (name == "duplicate_window" and not wanted):  # unset: the server's default
            continue
        if isinstance(wanted, (int, float)) and isinstance(found, (int, float)):
            if abs(wanted - found) > 1e-3:
                return True
        elif wanted != found:
            return True
    if want.num_replicas and want.num_replicas != (have.num_replicas or 1):
        return True
    return sorted(want.subjects or []) != sorted(have.subjects or [])


async def ensure_streams(js: JetStreamContext, replicas: int | None = None) -> None:
    """Creates the streams, or updates them to this config; safe to call from every process at start.

    A stream whose config already matches is left alone, so a process without the right to create or
    update streams (the "worker" user) only reads them. `replicas`: None reads
    TUNEFORGE_NATS_STREAM_REPLICAS (StreamSettings)."""
    if replicas is None:
        replicas = StreamSettings().stream_replicas
    for config in stream_configs(replicas=replicas):
        assert config.name is not None
        try:
            info = await js.stream_info(config.name)
            if not _stream_differs(config, info.config):
                continue
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
    """Publishes to JetStream with Nats-Msg-Id=event_id, retrying until the server acknowledges it. The
    headers carry the current span's W3C traceparent when tracing is on and `headers` name none
    (tuneforge_core.tracing), so the consumer's span continues the trace."""
    payload = message if isinstance(message, bytes) else message.SerializeToString()
    all_headers = tracing.inject({"Nats-Msg-Id": event_id, **(headers or {})})
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


async def ensure_route_consumer(js: JetStreamContext, route: str, ack_wait_s: float, max_deliver: int) -> str:
    """The consumer that hands out the jobs of `route` (`subjects.work_route`): "trainers-<route>", filtered
    on that route's subject alone, as a work-queue stream requires; returns its name. The jobs service and
    the workers ensure them with the same settings (TUNEFORGE_WORK_ACK_WAIT_S, TUNEFORGE_WORK_MAX_DELIVER)."""
    durable = subjects.route_consumer(route)
    await ensure_pull_consumer(js, subjects.STREAM_WORK, durable, subjects.route_subject(route),
                               ack_wait_s=ack_wait_s, max_deliver=max_deliver)
    return durable


async def ensure_trainers_consumer(js: JetStreamContext, gpu_type: str, ack_wait_s: float,
                                   max_deliver: int, gpu_count: int = 1) -> str:
    """The consumer that hands out the jobs asking for `gpu_count` GPUs of `gpu_type`
    (`ensure_route_consumer`); returns its name."""
    return await ensure_route_consumer(js, subjects.work_route(gpu_type, gpu_count), ack_wait_s, max_deliver)


async def queued_routes(js: JetStreamContext) -> list[str]:
    """The routes that have jobs waiting in the work queue (delivered or not), from the stream's
    per-subject counts: "any", "<gpu type>", "<gpu type>.x<N>", each also after "pool-<pool>."."""
    info = await js.stream_info(subjects.STREAM_WORK, subjects_filter=subjects.EVERY_WORK_ROUTE)
    prefix = subjects.WORK_JOBS_PREFIX + "."
    return sorted(subject.removeprefix(prefix) for subject, count in (info.state.subjects or {}).items()
                  if count and subject.startswith(prefix))


async def reroute_legacy_work(js: JetStreamContext) -> int:
    """Moves what older versions queued where no worker of this version looks for it; returns how many
    moved. Two kinds:

    - Assignments on the one shared subject of the version before routing ("tuneforge.work.jobs",
      consumer "trainers"): each to its route (GPU type and count), then that consumer is deleted.
    - Assignments for several GPUs on their GPU type's one-GPU route (the version that routed by type
      alone put them there): each to its "<gpu type>.x<N>" route (`reroute_multi_gpu_work`).

    Each is published under a new Nats-Msg-Id (the old one may still be inside the duplicate window) before
    the old copy is acked or deleted, so a crash in between leaves a duplicate, never a lost job: a worker
    drops a delivery of a job that has already ended. Delivery counts start again on the new subject.
    """
    return await _reroute_shared_subject(js) + await reroute_multi_gpu_work(js)


def _route_of(assignment: events_pb2.JobAssignment) -> str:
    """The route the assignment belongs on: its pool's, when it names one (which no move may leave)."""
    hardware = assignment.spec.hardware
    return subjects.pooled_route(hardware.pool, hardware.gpu_type, hardware.gpu_count)


async def _reroute_shared_subject(js: JetStreamContext) -> int:
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
                await publish(js, subjects.route_subject(_route_of(assignment)), msg.data,
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


async def reroute_multi_gpu_work(js: JetStreamContext) -> int:
    """Moves each assignment for several GPUs that waits on its GPU type's one-GPU route to its
    "<gpu type>.x<N>" route; returns how many moved. Read and deleted by stream sequence (a work-queue
    stream allows no second consumer on a subject), skipping any that a worker may hold now: one already
    delivered while the route's consumer has deliveries out. A worker of this version that is handed such
    a job refuses it (`trainer_worker.agent.WorkerHardware.refusal`); a later start moves it if it is still
    queued there. Each start reads every assignment queued on a one-GPU route once."""
    moved = 0
    for route in await queued_routes(js):
        if route == subjects.ANY_ROUTE or subjects.route_gpu_count(route) != 1:
            continue
        held_up_to = 0
        try:
            consumer = await js.consumer_info(subjects.STREAM_WORK, subjects.route_consumer(route))
            if consumer.num_ack_pending:
                held_up_to = consumer.delivered.stream_seq or 0
        except NotFoundError:
            pass
        subject, seq = subjects.route_subject(route), 1
        while True:
            try:
                raw = await js.get_msg(subjects.STREAM_WORK, seq=seq, subject=subject, next=True)
            except NotFoundError:
                break
            if raw.seq is None:
                break
            seq = raw.seq + 1
            if raw.seq <= held_up_to:
                continue
            try:
                assignment = events_pb2.JobAssignment.FromString(raw.data or b"")
            except Exception:
                continue  # a worker terms it
            target = _route_of(assignment)
            if target == route:
                continue
            await publish(js, subjects.route_subject(target), raw.data or b"",
                          f"{assignment.event_id or assignment.job_id}.routed-{target}")
            await js.delete_msg(subjects.STREAM_WORK, raw.seq)
            moved += 1
    if moved:
        log.info("moved %d queued job(s) for several GPUs to their GPU count's subject", moved)
    return moved
