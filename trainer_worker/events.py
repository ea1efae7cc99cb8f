"""The events file: the one channel from a training process to the agent that started it.

The recipe appends one JSON object per line and flushes each line, so the agent can tail the file while
training runs and a crash loses at most the line being written. Every line is one of the typed events
below (msgspec structs tagged by ``type``); the writer can only write these, and the reader decodes each
line into exactly one of them or fails with :class:`MalformedEvent`, which the agent treats as our own bug:
the job fails at once with a reason, it is not retried on another worker.

- ``state``: the run started training (``running``) or stopped on a signal (``cancelled``)
- ``rank``: one per training process (rank, world size, pid, host, Ray node id under Ray)
- ``metric``: a ``train``, ``eval`` or ``system`` point of one step
- ``progress``: the optimizer step reached (about once a second, and once more when training ends), so the
  job's progress is exact even between logging steps
- ``log``: a log line of the training process (debug ... critical)
- ``checkpoint``: a staged checkpoint folder for the agent to upload
- ``phase``: what the run does now (``training``, ``evaluating``, ``uploading``)
- ``timeline``: an entry of the job's timeline the training process saw (an epoch ended, early stopping
  stopped training, the evaluation started or ended); the agent adds its own (downloads, checkpoints
  stored, uploading) and sends them all with its status updates
- ``result``: the output folders, the final metrics, the step whose weights were kept, why training stopped
  early (when it did), tokens trained and the evaluation report
- ``error``: why the run failed (a ``Reason`` of the worker's vocabulary) and a sentence for the user

Every line also carries ``time`` (unix seconds). Non-finite floats are written as null to keep the file
strict JSON. Under torchrun every rank opens the file, but only the main rank reports; the others write
their ``rank`` line and their errors only, so a job's metrics and result are written once.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Literal

import msgspec

from tuneforge_core.reasons import Reason

log = logging.getLogger(__name__)

LogLevel = Literal["debug", "info", "warning", "error", "critical"]
LEVELS: tuple[LogLevel, ...] = ("debug", "info", "warning", "error", "critical")
MetricKind = Literal["train", "eval", "system"]


class Event(msgspec.Struct, tag_field="type", kw_only=True, forbid_unknown_fields=True):
    time: float = 0.0


class StateEvent(Event, tag="state", kw_only=True):
    state: Literal["running", "cancelled"]


class RankEvent(Event, tag="rank", kw_only=True):
    rank: int
    world_size: int = 1
    local_rank: int = 0
    node_rank: int = 0
    host: str = ""
    pid: int = 0
    # The Ray node the rank ran on, when Ray Train started it (multi-node jobs); empty under torchrun.
    ray_node_id: str = ""


class MetricEvent(Event, tag="metric", kw_only=True):
    """One point; the named fields are MetricPoint's own, any other number goes to ``values``."""

    kind: MetricKind
    step: int
    total_steps: int = 0
    epoch: float = 0.0
    loss: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens_per_second: float | None = None
    samples_per_second: float | None = None
    eta_seconds: float | None = None
    eval_loss: float | None = None
    eval_token_accuracy: float | None = None
    gpu_utilization: float | None = None
    gpu_memory_bytes: float | None = None
    gpu_temperature_celsius: float | None = None
    cpu_percent: float | None = None
    memory_bytes: float | None = None
    values: dict[str, float | None] = {}


class ProgressEvent(Event, tag="progress", kw_only=True):
    """The optimizer step training has reached, whether or not it was a logging step."""

    step: int
    total_steps: int = 0
    epoch: float = 0.0
    # Non-padding tokens trained so far (the Trainer's num_input_tokens_seen; 0 when not counted).
    tokens_trained: int = 0


class LogEvent(Event, tag="log", kw_only=True):
    level: LogLevel = "info"
    message: str


class CheckpointEvent(Event, tag="checkpoint", kw_only=True):
    step: int
    dir: str
    # The step of the best checkpoint so far when the run tracks one (load_best_model_at_end), which
    # pruning to save_total_limit must keep; 0 when none.
    best_step: int = 0


Phase = Literal["training", "evaluating", "uploading"]
# JobEventType names (without the JOB_EVENT_TYPE_ prefix) the training process may report.
TimelineKind = Literal["TRAINING_STARTED", "EPOCH_COMPLETED", "EARLY_STOPPED", "EVALUATION_STARTED",
                       "EVALUATION_COMPLETED"]


class PhaseEvent(Event, tag="phase", kw_only=True):
    phase: Phase


class TimelineEvent(Event, tag="timeline", kw_only=True):
    """One JobEvent of the timeline; the fields are JobEvent's (duration in seconds)."""

    kind: TimelineKind
    message: str
    step: int = 0
    epoch: float = 0.0
    duration_s: float | None = None
    metrics: dict[str, float | None] = {}


class EarlyStopInfo(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """JobOutput.early_stop's fields."""

    stopped_step: int
    best_step: int
    metric: str
    best_value: float
    patience: int
    reason: str


class ResultEvent(Event, tag="result", kw_only=True):
    adapter_dir: str
    merged_dir: str | None = None
    final_metrics: dict[str, float | None] = {}
    # The step whose weights the adapter holds (JobOutput.kept_step); 0 when not known.
    kept_step: int = 0
    early_stop: EarlyStopInfo | None = None
    # Non-padding tokens trained (Job.usage.tokens_trained).
    tokens_trained: int = 0
    # The EvaluationReport in protobuf's JSON mapping (json_format.MessageToDict), or None when the
    # process ran no evaluation code at all (the agent then reports it SKIPPED).
    evaluation: dict[str, object] | None = None


class ErrorEvent(Event, tag="error", kw_only=True):
    reason: Reason
    message: str
    rank: int = 0


AnyEvent = (StateEvent | RankEvent | MetricEvent | ProgressEvent | LogEvent | CheckpointEvent | ResultEvent
            | ErrorEvent | PhaseEvent | TimelineEvent)
# MetricPoint's own fields among a metric's keyword arguments; the rest are method-specific values.
POINT_FIELDS = frozenset(MetricEvent.__struct_fields__) - {"kind", "step", "total_steps", "epoch", "values",
                                                           "time"}
# What a rank other than the main one still writes.
EVERY_RANK: tuple[type[Event], ...] = (RankEvent, ErrorEvent)

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(AnyEvent)


class MalformedEvent(Exception):
    """A complete line of the events file that is not one of the events above: a bug on our side."""


def decode(line: bytes) -> AnyEvent:
    try:
        return _decoder.decode(line)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MalformedEvent(f"{exc} in {line[:200]!r}") from exc


def encode(event: Event) -> bytes:
    return _encoder.encode(event)


def _number(value: float | int | None) -> float | None:
    return None if value is None else float(value)


class EventSink:
    """Writes events for the agent; the recipe's only way to report anything.

    ``sampler`` (see :mod:`trainer_worker.sysmetrics`) is read at every train point and written as a
    ``system`` point of the same step, so resource use lines up with the loss curve at no extra timer.
    """

    def __init__(
        self,
        path: Path,
        *,
        main: bool = True,
        rank: int = 0,
        sampler: Callable[[], Mapping[str, float]] | None = None,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_APPEND: lines of several ranks never overwrite each other.
        self._file: IO[bytes] = path.open("ab")
        self.main, self._rank, self._sampler = main, rank, sampler

    def emit(self, event: Event) -> None:
        if not self.main and not isinstance(event, EVERY_RANK):
            return
        event.time = time.time()
        self._file.write(encode(event) + b"\n")
        self._file.flush()

    def state(self, state: Literal["running", "cancelled"]) -> None:
        self.emit(StateEvent(state=state))

    def rank(self, **info: int | str) -> None:
        self.emit(msgspec.convert(info, RankEvent))

    def metric(
        self,
        kind: MetricKind,
        step: int,
        *,
        total_steps: int = 0,
        epoch: float | None = 0.0,
        **values: float | int | None,
    ) -> None:
        named = {k: _number(v) for k, v in values.items() if k in POINT_FIELDS}
        extra = {k: _number(v) for k, v in values.items() if k not in POINT_FIELDS}
        self.emit(MetricEvent(kind=kind, step=step, total_steps=total_steps or 0, epoch=float(epoch or 0.0),
                              values=extra, **named))  # type: ignore[arg-type]
        if kind == "train" and self._sampler is not None and self.main:
            self.metric("system", step, total_steps=total_steps, epoch=epoch, **self._sampler())

    def progress(self, step: int, *, total_steps: int = 0, epoch: float | None = 0.0,
                 tokens_trained: int = 0) -> None:
        self.emit(ProgressEvent(step=step, total_steps=total_steps or 0, epoch=float(epoch or 0.0),
                                tokens_trained=int(tokens_trained or 0)))

    def log(self, message: str, level: str = "info") -> None:
        known: LogLevel = next((name for name in LEVELS if name == level), "info")
        self.emit(LogEvent(level=known, message=message))

    def checkpoint(self, step: int, directory: Path, *, best_step: int = 0) -> None:
        self.emit(CheckpointEvent(step=step, dir=str(directory), best_step=best_step))

    def phase(self, phase: Phase) -> None:
        self.emit(PhaseEvent(phase=phase))

    def timeline(self, kind: TimelineKind, message: str, *, step: int = 0, epoch: float = 0.0,
                 duration_s: float | None = None, metrics: Mapping[str, float | int | None] | None = None
                 ) -> None:
        self.emit(TimelineEvent(kind=kind, message=message, step=step, epoch=epoch, duration_s=duration_s,
                                metrics={k: _number(v) for k, v in (metrics or {}).items()}))

    def result(self, adapter_dir: Path, merged_dir: Path | None, final_metrics: Mapping[str, float], *,
               kept_step: int = 0, early_stop: EarlyStopInfo | None = None, tokens_trained: int = 0,
               evaluation: Mapping[str, object] | None = None) -> None:
        self.emit(ResultEvent(
            adapter_dir=str(adapter_dir),
            merged_dir=str(merged_dir) if merged_dir else None,
            final_metrics={k: _number(v) for k, v in final_metrics.items()},
            kept_step=kept_step,
            early_stop=early_stop,
            tokens_trained=tokens_trained,
            evaluation=dict(evaluation) if evaluation is not None else None,
        ))

    def error(self, reason: Reason, message: str) -> None:
        self.emit(ErrorEvent(reason=reason, message=message, rank=self._rank))

    def close(self) -> None:
        self._file.close()


class EventLogHandler(logging.Handler):
    """Sends the training process's own log records (transformers, TRL, DeepSpeed...) to the job log."""

    def __init__(self, sink: EventSink, level: int = logging.WARNING) -> None:
        super().__init__(level)
        self._sink = sink
        self._pid = os.getpid()

    def emit(self, record: logging.LogRecord) -> None:
        if os.getpid() != self._pid:  # a forked dataloader worker must not write into the parent's file
            return
        try:
            message = f"{record.name}: {record.getMessage()}"
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            self._sink.log(message, record.levelname.lower())
        except Exception:
            self.handleError(record)


class EventTail:
    """Reads the complete lines appended to an events file since the last call, as typed events.

    A complete line that is not an event raises :class:`MalformedEvent` (after the events before it are
    kept for the next call), so the agent can fail the job with a clear reason instead of guessing.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = 0
        self._partial = b""
        self._pending: list[bytes] = []

    def read(self) -> list[AnyEvent]:
        if self._path.exists():
            with self._path.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read()
            self._offset += len(chunk)
            *lines, self._partial = (self._partial + chunk).split(b"\n")
            self._pending += [line for line in lines if line.strip()]
        events: list[AnyEvent] = []
        while self._pending:
            line = self._pending[0]
            try:
                event = decode(line)
            except MalformedEvent:
                if events:
                    return events  # hand over what came before; the bad line raises on the next call
                self._pending.pop(0)
                raise
            self._pending.pop(0)
            events.append(event)
        return events
