"""What a worker tells the platform about one job attempt, as the NATS events of events.proto.

Status updates go out at once, each with an event id that is also its Nats-Msg-Id (fixed per delivery for
the transitions, so a retried publish is dropped as a duplicate; a random part drawn per delivery keeps
it unguessable, so nobody can publish a forged update under it first and have the genuine one dropped).
The jobs service accepts them only from the delivery that holds the job (services.jobs.manager). Metric
points and log lines are batched and sent at least once a second, so a chatty run costs a few messages a
second, not one per line.

A stopping worker does not wait on an unreachable NATS for long: once the agent sets the reporter's
``give_up`` event (TUNEFORGE_WORKER_STOP_GRACE_S after it began to hand its job back), a publish under way
and every later one raise :class:`~trainer_worker.errors.Transient` at once instead of retrying for minutes.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import TYPE_CHECKING

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import status_pb2
from nats.js import JetStreamContext
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import evaluation_pb2, job_pb2, metrics_pb2

from trainer_worker.errors import Transient
from trainer_worker.events import POINT_FIELDS, MetricEvent, ProgressEvent
from tuneforge_core import subjects
from tuneforge_core.errors import error_status
from tuneforge_core.ids import new_id
from tuneforge_core.nats import publish
from tuneforge_core.reasons import Reason

if TYPE_CHECKING:
    from trainer_worker.story import AttemptStory

U = events_pb2.WorkerUpdateKind

# Canonical codes of the reasons a training process reports; the reason itself is what clients branch on.
REASON_CODES: dict[Reason, grpc.StatusCode] = {
    Reason.OUT_OF_MEMORY: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.MODEL_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Reason.BAD_TRAINING_DATA: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.LOSS_DIVERGED: grpc.StatusCode.ABORTED,
    Reason.DEPENDENCY_ERROR: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.INSUFFICIENT_HARDWARE: grpc.StatusCode.FAILED_PRECONDITION,  # a Ray cluster that cannot place it
    Reason.TRAINING_FAILED: grpc.StatusCode.INTERNAL,
}
LOG_LEVELS = {
    "debug": metrics_pb2.LOG_LEVEL_DEBUG,
    "info": metrics_pb2.LOG_LEVEL_INFO,
    "warning": metrics_pb2.LOG_LEVEL_WARNING,
    "error": metrics_pb2.LOG_LEVEL_ERROR,
    "critical": metrics_pb2.LOG_LEVEL_CRITICAL,
}
METRIC_KINDS = {
    "train": metrics_pb2.METRIC_KIND_TRAIN,
    "eval": metrics_pb2.METRIC_KIND_EVAL,
    "system": metrics_pb2.METRIC_KIND_SYSTEM,
}
# LogEntry.sequence is (attempt << SEQUENCE_BITS) + n, n = 1, 2, ... within the attempt: one number that
# increases across the attempts of a job, so a job's log reads in sequence order whatever attempt wrote it.
SEQUENCE_BITS = 32
# MetricPoint's integer fields among POINT_FIELDS (its byte counts): the events file carries every number
# as a float, and an int64 field takes only ints.
INTEGER_POINT_FIELDS = frozenset(
    f.name for f in metrics_pb2.MetricPoint.DESCRIPTOR.fields if f.name in POINT_FIELDS
    and f.cpp_type in (f.CPPTYPE_INT64, f.CPPTYPE_INT32, f.CPPTYPE_UINT64, f.CPPTYPE_UINT32)
)


def timestamp(unix_seconds: float | None = None) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int((time.time() if unix_seconds is None else unix_seconds) * 1e9))
    return ts


def failure_status(reason: Reason, message: str) -> status_pb2.Status:
    return error_status(REASON_CODES.get(reason, grpc.StatusCode.INTERNAL), message, reason)


def hand_back_status(worker_id: str, why: str) -> status_pb2.Status:
    """The `error` of a hand-back update: a PROGRESS carrying it is the last update of a delivery whose
    worker was drained and handed the job back to the queue (services.jobs.timeline.is_hand_back). No
    ErrorInfo: the job did not fail, and the next delivery resumes it."""
    return status_pb2.Status(code=grpc.StatusCode.UNAVAILABLE.value[0],
                             message=f"{why}: worker {worker_id} was drained and handed the job back to the "
                                     "queue.")


def metric_point(event: MetricEvent, job_id: str, attempt: int) -> metrics_pb2.MetricPoint:
    """A MetricPoint from a ``metric`` event of the events file (null values are left unset)."""
    point = metrics_pb2.MetricPoint(
        job_id=job_id,
        kind=METRIC_KINDS[event.kind],
        step=event.step,
        total_steps=event.total_steps,
        epoch=event.epoch,
        time=timestamp(event.time or None),
        attempt=attempt,
    )
    for name in POINT_FIELDS:
        value = getattr(event, name)
        if value is not None:
            setattr(point, name, round(value) if name in INTEGER_POINT_FIELDS else value)
    for name, value in event.values.items():
        if value is not None:
            point.values[name] = value
    return point


def progress_of(point: metrics_pb2.MetricPoint) -> job_pb2.JobProgress:
    progress = job_pb2.JobProgress(step=point.step, total_steps=point.total_steps, epoch=point.epoch)
    for name in ("loss", "learning_rate", "tokens_per_second", "eta_seconds"):
        if point.HasField(name):
            setattr(progress, name, getattr(point, name))
    return progress


def advance_progress(progress: job_pb2.JobProgress | None, event: ProgressEvent) -> job_pb2.JobProgress:
    """`progress` moved to the step of a ``progress`` event; loss, learning rate and throughput stay those
    of the last train point, and the ETA is 0 once the last step ran."""
    moved = job_pb2.JobProgress()
    if progress is not None:
        moved.CopyFrom(progress)
    moved.step, moved.total_steps, moved.epoch = event.step, event.total_steps, event.epoch
    if event.total_steps and event.step >= event.total_steps:
        moved.eta_seconds = 0.0
    return moved


def log_sequence(attempt: int, n: int) -> int:
    """The sequence of the n-th line (from 1) an attempt logs: increasing across attempts."""
    return (max(attempt, 0) << SEQUENCE_BITS) + n


class JobReporter:
    """Publishes the updates, metric points and log lines of one attempt of one job."""

    def __init__(
        self,
        js: JetStreamContext,
        job_id: str,
        attempt: int,
        worker_id: str,
        *,
        flush_interval_s: float = 1.0,
        give_up: asyncio.Event | None = None,
    ) -> None:
        self._js = js
        # Set by a stopping agent: stop retrying publishes (see the module's docstring).
        self.give_up = give_up
        self.job_id, self.attempt, self.worker_id = job_id, attempt, worker_id
        self._flush_interval_s = flush_interval_s
        self._points: list[metrics_pb2.MetricPoint] = []
        self._entries: list[metrics_pb2.LogEntry] = []
        self._sequence = 0
        self._last_flush = time.monotonic()
        self._delivery_key = secrets.token_hex(8)
        # The attempt's phase, timeline and log (trainer_worker.story): every update carries the events
        # waiting, and every log line is kept for the training log artifact.
        self.story: AttemptStory | None = None

    async def status(
        self,
        kind: events_pb2.WorkerUpdateKind.ValueType,
        *,
        progress: job_pb2.JobProgress | None = None,
        output: job_pb2.JobOutput | None = None,
        error: status_pb2.Status | None = None,
        evaluation: evaluation_pb2.EvaluationReport | None = None,
    ) -> None:
        """Sends one WorkerJobUpdate, after the metrics and logs buffered before it."""
        await self.flush(force=True)
        name = U.Name(kind).removeprefix("WORKER_UPDATE_KIND_").lower()
        event_id = (
            new_id("evt") if kind == U.WORKER_UPDATE_KIND_PROGRESS
            else f"{self.job_id}:{self.attempt}:{self._delivery_key}:{name}"
        )
        update = events_pb2.WorkerJobUpdate(
            event_id=event_id,
            time=timestamp(),
            job_id=self.job_id,
            worker_id=self.worker_id,
            attempt=self.attempt,
            kind=kind,
            progress=progress,
            output=output,
            error=error,
            evaluation=evaluation,
        )
        if self.story is not None:
            self.story.fill(update)
        await self._publish(subjects.worker_status(self.job_id), update, event_id)

    async def _publish(self, subject: str, message: events_pb2.WorkerJobUpdate | events_pb2.MetricsReported
                       | events_pb2.LogsReported, event_id: str) -> None:
        """`tuneforge_core.nats.publish` (retried until the server acknowledges it), unless `give_up` is
        set before it succeeds: then it raises Transient at once."""
        if self.give_up is None:
            await publish(self._js, subject, message, event_id)
            return
        if self.give_up.is_set():
            raise Transient(f"the worker is stopping and gave up publishing to {subject}")
        sending = asyncio.ensure_future(publish(self._js, subject, message, event_id))
        stopping = asyncio.ensure_future(self.give_up.wait())
        try:
            await asyncio.wait({sending, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            gave_up = not sending.done()
            if gave_up:
                sending.cancel()
        if gave_up:
            raise Transient(f"the worker is stopping and gave up publishing to {subject}: NATS did not "
                            "acknowledge it in time")
        sending.result()

    def metric(self, point: metrics_pb2.MetricPoint) -> None:
        self._points.append(point)

    def log(
        self,
        message: str,
        level: str = "info",
        source: metrics_pb2.LogSource.ValueType = metrics_pb2.LOG_SOURCE_WORKER,
        unix_seconds: float | None = None,
    ) -> None:
        self._sequence += 1
        self._entries.append(
            entry := metrics_pb2.LogEntry(
                job_id=self.job_id,
                sequence=log_sequence(self.attempt, self._sequence),
                time=timestamp(unix_seconds),
                level=LOG_LEVELS.get(level, metrics_pb2.LOG_LEVEL_INFO),
                source=source,
                message=message,
                attempt=self.attempt,
            )
        )
        if self.story is not None:
            self.story.record_log(entry)

    async def flush(self, *, force: bool = False) -> None:
        """Sends the buffered points and lines once a second (or now, with ``force``)."""
        if not force and time.monotonic() - self._last_flush < self._flush_interval_s:
            return
        self._last_flush = time.monotonic()
        if self._points:
            points, self._points = self._points, []
            event_id = new_id("evt")
            message = events_pb2.MetricsReported(event_id=event_id, points=points)
            await self._publish(subjects.worker_metrics(self.job_id), message, event_id)
        if self._entries:
            entries, self._entries = self._entries, []
            event_id = new_id("evt")
            logs = events_pb2.LogsReported(event_id=event_id, entries=entries)
            await self._publish(subjects.worker_logs(self.job_id), logs, event_id)
