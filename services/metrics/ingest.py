"""NATS handlers: MetricsReported / LogsReported from TF_WORKER into the manager, a batch at a time.

The consumer (services.kit.consumer.consume_batches) hands over everything one fetch returned; the manager
decodes, checks and writes the whole batch in one transaction on a database thread. A message that cannot
be decoded, or names another job than its subject, can never succeed: it alone is terminated and the rest of
its batch is stored and acked. Anything else that fails (the database) naks the whole batch, which is
redelivered; storing is idempotent (a repeated key replaces, an older attempt never overwrites a newer one).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import TypeVar

from google.protobuf.message import DecodeError, Message
from nats.aio.msg import Msg
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import metrics_pb2

from services.kit.consumer import PermanentError
from services.metrics.manager import MetricsManager
from tuneforge_core.errors import InvalidArgument

E = TypeVar("E", bound=Message)


def job_id_of(subject: str, suffix: str) -> str:
    """`tuneforge.worker.jobs.<job_id>.<suffix>` -> job_id."""
    parts = subject.split(".")
    if len(parts) != 5 or parts[:3] != ["tuneforge", "worker", "jobs"] or parts[4] != suffix or not parts[3]:
        raise PermanentError(f"unexpected subject {subject}")
    return parts[3]


def decode_metrics(subject: str, data: bytes) -> tuple[str, Sequence[metrics_pb2.MetricPoint]]:
    """(job id, points) of a MetricsReported message; InvalidArgument when it can never be stored."""
    job_id, event = _decode(subject, data, "metrics", events_pb2.MetricsReported)
    return job_id, event.points


def decode_logs(subject: str, data: bytes) -> tuple[str, Sequence[metrics_pb2.LogEntry]]:
    """(job id, entries) of a LogsReported message; InvalidArgument when it can never be stored."""
    job_id, event = _decode(subject, data, "logs", events_pb2.LogsReported)
    return job_id, event.entries


def _decode(subject: str, data: bytes, suffix: str, message_type: type[E]) -> tuple[str, E]:
    try:
        job_id = job_id_of(subject, suffix)
    except PermanentError as exc:
        raise InvalidArgument(str(exc)) from exc
    try:
        return job_id, message_type.FromString(data)
    except DecodeError as exc:
        raise InvalidArgument(f"undecodable {message_type.DESCRIPTOR.name} on {subject}: {exc}") from exc


class IngestHandlers:
    def __init__(self, manager: MetricsManager) -> None:
        self.manager = manager

    async def on_metrics_batch(self, msgs: Sequence[Msg]) -> Mapping[int, PermanentError]:
        """Stores a batch of MetricsReported; returns the messages to terminate (by index in the batch)."""
        # Decoding waits for the database thread: only the subject and the bytes are read on the event loop.
        reports = [partial(decode_metrics, msg.subject, msg.data) for msg in msgs]
        refused, _ = await self.manager.record_metrics_batch(reports)
        return _permanent(refused, msgs)

    async def on_logs_batch(self, msgs: Sequence[Msg]) -> Mapping[int, PermanentError]:
        """Stores a batch of LogsReported; returns the messages to terminate (by index in the batch)."""
        reports = [partial(decode_logs, msg.subject, msg.data) for msg in msgs]
        refused, _ = await self.manager.record_logs_batch(reports)
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
