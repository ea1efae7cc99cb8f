"""NATS handlers: MetricsReported / LogsReported from TF_WORKER into the manager, a batch at a time.

The consumer (services.kit.consumer.consume_batches) hands over everything one fetch returned; the manager
has the batch decoded and checked off the event loop (services.metrics.prepare: on a thread, or a large
batch in a process of its own), then writes it in one transaction on a database thread. A message that
cannot be decoded, or names another job than its subject, can never succeed: it alone is terminated and
the rest of its batch is stored and acked. Anything else that fails (the database) naks the whole batch,
which is redelivered; storing is idempotent (a repeated key replaces, an older attempt never overwrites a
newer one).

One replica of the service ingests at a time: the one holding the "metrics-ingest" lease (`run_ingest`,
services.kit.lease); the others wait for it. Followers rely on a job's reports being stored, and announced,
in the order they were published (services.metrics.fanout); two replicas pulling from the same consumer
would store them in whatever order their batches commit, and a follower drops a point older than one it
already has. A replica that stops, or loses the lease, stores and acks what it fetched first. When the
holder dies, another takes over once its lease expires (`MetricsSettings.ingest_lease_s`). What the dead
one had fetched and not acked would come again only after the ack wait, behind what was published after
it, and a live follower would never get it: so a new holder first reads what the consumers handed out and
is not acked from the stream itself and stores it (`store_unsettled`), then consumes. When those messages
come again, they store nothing new.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Mapping, Sequence
from functools import partial
from typing import Any

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from services.kit.consumer import PermanentError, consume_batches, unsettled
from services.kit.lease import Lease, holder_name
from services.kit.tasks import cancel_and_wait
from services.metrics.manager import MetricsManager
from services.metrics.prepare import PreparingProcesses, default_processes
from services.metrics.settings import MetricsSettings
from tuneforge_core import subjects
from tuneforge_core.settings import KitSettings

log = logging.getLogger(__name__)

# The lease (services.kit.lease) that one replica of the metrics service at a time holds to ingest.
INGEST_LEASE = "metrics-ingest"
# How long a replica that stops ingesting (it stops, or lost the lease) may take to store and ack what it
# fetched before it cancels that (redelivered after the ack wait).
HANDOVER_S = 10.0


class IngestHandlers:
    def __init__(self, manager: MetricsManager) -> None:
        self.manager = manager

    async def on_metrics_batch(self, msgs: Sequence[Msg]) -> Mapping[int, PermanentError]:
        """Stores a batch of MetricsReported; returns the messages to terminate (by index in the batch)."""
        # Decoded off the event loop (services.metrics.prepare): only the subject and the bytes are read here.
        refused, _ = await self.manager.record_metrics_batch([(msg.subject, msg.data) for msg in msgs])
        return _permanent(refused, msgs)

    async def on_logs_batch(self, msgs: Sequence[Msg]) -> Mapping[int, PermanentError]:
        """Stores a batch of LogsReported; returns the messages to terminate (by index in the batch)."""
        refused, _ = await self.manager.record_logs_batch([(msg.subject, msg.data) for msg in msgs])
        return _permanent(refused, msgs)

    async def on_metrics(self, msg: Msg) -> None:
        """One MetricsReported (for `consume`): PermanentError when it can never be stored."""
        refused = await self.on_metrics_batch([msg])
        if refused:
            raise refused[0]

    async def on_logs(self, msg: Msg) -> None:
        """One LogsReported (for `consume`): PermanentError when it can never be stored."""
        refused = await self.on_logs_batch([msg])
        if refused:
            raise refused[0]


def preparing_processes(settings: MetricsSettings, kit: KitSettings) -> PreparingProcesses:
    """Where the ingest prepares large batches (services.metrics.prepare), as the settings say."""
    processes = settings.ingest_processes
    return PreparingProcesses(default_processes() if processes is None else processes,
                              settings.ingest_process_min_bytes, log_level=kit.log_level,
                              log_format=kit.log_format)


def consumers(js: JetStreamContext, settings: MetricsSettings, handlers: IngestHandlers,
              until: asyncio.Event | None = None) -> list[tuple[str, Coroutine[Any, Any, None]]]:
    """The two ingest consumers (worker metrics, worker logs) as (name, coroutine), to run as tasks; once
    `until` is set they fetch no more and end when what they fetched is stored and acked."""
    ingest = partial(consume_batches, js, stream=subjects.STREAM_WORKER, batch=settings.ingest_batch,
                     fetch_wait_s=settings.ingest_fetch_wait_s, nak_delay_s=settings.ingest_retry_delay_s,
                     in_flight=settings.ingest_in_flight, until=until)
    metrics = ingest(durable=subjects.METRICS_INGEST_CONSUMER, subject=subjects.ALL_WORKER_METRICS,
                     handler=handlers.on_metrics_batch)
    logs = ingest(durable=subjects.LOGS_INGEST_CONSUMER, subject=subjects.ALL_WORKER_LOGS,
                  handler=handlers.on_logs_batch)
    return [("metrics-ingest", metrics), ("logs-ingest", logs)]


async def run_ingest(js: JetStreamContext, settings: MetricsSettings, handlers: IngestHandlers,
                     stop: asyncio.Event, holder: str | None = None,
                     on_held: Callable[[], None] | None = None) -> None:
    """The ingest of this replica, while it holds the ingest lease (see the module doc), until `stop` is
    set: in the serving process or in the ingest's own (services.metrics.ingester). `on_held` is called
    each time the lease is taken, before anything is stored: the preparing processes start there, so a
    replica that only waits runs none. Raises when a consumer fails."""
    lease = Lease(js, INGEST_LEASE, holder or holder_name(), settings.ingest_lease_s)
    while await lease.acquire(stop):
        # Kept from the start: storing what a dead holder left may take longer than the lease's TTL.
        keeping = asyncio.create_task(lease.keep(), name="metrics-ingest-lease")
        stopping = asyncio.create_task(stop.wait())
        tasks: list[asyncio.Task[None]] = []
        try:
            if on_held is not None:
                on_held()
            await store_unsettled(js, handlers.manager, settings.ingest_batch)
            enough = asyncio.Event()
            tasks = [asyncio.create_task(consumer, name=name)
                     for name, consumer in consumers(js, settings, handlers, until=enough)]
            await asyncio.wait([keeping, stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:  # a consumer only ends on its own by failing
                if task.done() and not task.cancelled() and task.exception() is not None:
                    raise RuntimeError(f"{task.get_name()} failed") from task.exception()
            # Stopping, or the lease lost: what was fetched is stored and acked before another replica
            # takes over, so that reports stay stored in order across the handover.
            enough.set()
            await asyncio.wait(tasks, timeout=HANDOVER_S)
        finally:
            await cancel_and_wait([keeping, stopping, *tasks])
            await lease.release()


async def store_unsettled(js: JetStreamContext, manager: MetricsManager, batch: int) -> None:
    """Stores what the ingest consumers handed out and is not acked (services.kit.consumer.unsettled), in
    order, a batch at a time: run by a new holder of the ingest lease before it consumes (see the module
    doc). A report that can never be stored is left to the consumer, which keeps it as a dead letter when
    it comes again; a failure (the database) leaves the rest to come again after the ack wait."""
    for durable, subject, record in (
            (subjects.METRICS_INGEST_CONSUMER, subjects.ALL_WORKER_METRICS, manager.record_metrics_batch),
            (subjects.LOGS_INGEST_CONSUMER, subjects.ALL_WORKER_LOGS, manager.record_logs_batch)):
        try:
            reports = await unsettled(js, subjects.STREAM_WORKER, durable, subject)
            for start in range(0, len(reports), batch):
                await record(reports[start:start + batch])
        except Exception:
            log.warning("could not store what %s handed out and no one acked; it comes again after the ack "
                        "wait", durable, exc_info=True)
            continue
        if reports:
            log.info("stored %d reports that %s had handed out and no one had acked", len(reports), durable)


def _permanent(refused: Mapping[int, str], msgs: Sequence[Msg]) -> dict[int, PermanentError]:
    return {index: PermanentError(f"message on {msgs[index].subject}: {reason}")
            for index, reason in refused.items()}
