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

from collections.abc import Mapping, Sequence

from nats.aio.msg import Msg

from services.kit.consumer import PermanentError
from services.metrics.manager import MetricsManager


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


def _permanent(refused: Mapping[int, str], msgs: Sequence[Msg]) -> dict[int, PermanentError]:
    return {index: PermanentError(f"message on {msgs[index].subject}: {reason}")
            for index, reason in refused.items()}
