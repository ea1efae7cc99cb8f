"""NATS handlers: MetricsReported / LogsReported from TF_WORKER into the manager.

A message that cannot be decoded, or names another job than its subject, can never succeed: it is
terminated (PermanentError). Anything else that fails (the database) is retried by the consumer loop.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from tuneforge.events.v1 import events_pb2

from services.kit.consumer import PermanentError
from services.metrics.manager import MetricsManager
from tuneforge_core.errors import InvalidArgument


def job_id_of(subject: str, suffix: str) -> str:
    """`tuneforge.worker.jobs.<job_id>.<suffix>` -> job_id."""
    parts = subject.split(".")
    if len(parts) != 5 or parts[:3] != ["tuneforge", "worker", "jobs"] or parts[4] != suffix or not parts[3]:
        raise PermanentError(f"unexpected subject {subject}")
    return parts[3]


class IngestHandlers:
    def __init__(self, manager: MetricsManager) -> None:
        self.manager = manager

    async def on_metrics(self, msg: Msg) -> None:
        job_id = job_id_of(msg.subject, "metrics")
        try:
            event = events_pb2.MetricsReported.FromString(msg.data)
        except DecodeError as exc:
            raise PermanentError(f"undecodable MetricsReported on {msg.subject}: {exc}") from exc
        try:
            await self.manager.record_metrics(job_id, event.points)
        except InvalidArgument as exc:
            raise PermanentError(f"event {event.event_id}: {exc.message}") from exc

    async def on_logs(self, msg: Msg) -> None:
        job_id = job_id_of(msg.subject, "logs")
        try:
            event = events_pb2.LogsReported.FromString(msg.data)
        except DecodeError as exc:
            raise PermanentError(f"undecodable LogsReported on {msg.subject}: {exc}") from exc
        try:
            await self.manager.record_logs(job_id, event.entries)
        except InvalidArgument as exc:
            raise PermanentError(f"event {event.event_id}: {exc.message}") from exc
