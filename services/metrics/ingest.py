"""NATS handlers: MetricsReported / LogsReported from TF_WORKER into the manager, a batch at a time.

The consumer (services.kit.consumer.consume_batches) hands over everything one fetch returned; the manager
has the batch decoded and checked off the event loop (services.metrics.prepare: on a thread, or a large
batch in a process of its own), then writes it in one transaction on a database thread. A message that
cannot be decoded, or names another job than its subject, can never succeed: it alone is terminated and
the rest of its batch is stored and acked. Anything else that fails (the database) naks the whole batch,
which is redelivered; storing is idempotent (a repeated key replaces, an older attempt never overwrites a
newer one).
"""

from __future__ import annotations

from collections.abc import Coroutine, Mapping, Sequence
from functools import partial
from typing import Any

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from services.kit.consumer import PermanentError, consume_batches
from services.metrics.manager import MetricsManager
from services.metrics.prepare import PreparingProcesses, default_processes
from services.metrics.settings import MetricsSettings
from tuneforge_core import subjects
from tuneforge_core.settings import KitSettings


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


def consumers(js: JetStreamContext, settings: MetricsSettings,
              handlers: IngestHandlers) -> list[tuple[str, Coroutine[Any, Any, None]]]:
    """The two ingest consumers (worker metrics, worker logs) as (name, coroutine), to run as tasks: in the
    serving process or in the ingest's own (services.metrics.ingester)."""
    ingest = partial(consume_batches, js, stream=subjects.STREAM_WORKER, batch=settings.ingest_batch,
                     fetch_wait_s=settings.ingest_fetch_wait_s, nak_delay_s=settings.ingest_retry_delay_s,
                     in_flight=settings.ingest_in_flight)
    metrics = ingest(durable=subjects.METRICS_INGEST_CONSUMER, subject=subjects.ALL_WORKER_METRICS,
                     handler=handlers.on_metrics_batch)
    logs = ingest(durable=subjects.LOGS_INGEST_CONSUMER, subject=subjects.ALL_WORKER_LOGS,
                  handler=handlers.on_logs_batch)
    return [("metrics-ingest", metrics), ("logs-ingest", logs)]


def _permanent(refused: Mapping[int, str], msgs: Sequence[Msg]) -> dict[int, PermanentError]:
    return {index: PermanentError(f"message on {msgs[index].subject}: {reason}")
            for index, reason in refused.items()}
