"""The job's story as one attempt tells it: the phase, the timeline events, tokens trained and the log.

The agent (no torch here) keeps one :class:`AttemptStory` per delivery. It gathers the timeline events the
agent sees itself (model and data downloaded, checkpoints stored, outputs uploaded, a restart) and those
the training process writes (``timeline`` lines: training started, epochs, early stop, evaluation), in the
order they happened, and hands them to the next WorkerJobUpdate the reporter sends (``fill``), together
with the phase and the tokens trained. None is lost when an attempt ends: the final update (SUCCEEDED,
FAILED or CANCELLED) carries whatever is still waiting.

It also keeps every log line of the attempt, so the agent can store them as the job's training log
(``logs/training.log`` under the output prefix, the attempts one after another: :func:`store_training_log`).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import job_pb2, metrics_pb2

from trainer_worker.events import (
    AnyEvent,
    MetricEvent,
    PhaseEvent,
    ProgressEvent,
    ResultEvent,
    StateEvent,
    TimelineEvent,
)
from trainer_worker.reporting import timestamp
from tuneforge_core.storage import ObjectStore

log = logging.getLogger(__name__)

P = job_pb2.JobPhase
E = job_pb2.JobEventType
U = events_pb2.WorkerUpdateKind
TRAINING_LOG = "logs/training.log"
PHASES = {"training": P.JOB_PHASE_TRAINING, "evaluating": P.JOB_PHASE_EVALUATING,
          "uploading": P.JOB_PHASE_UPLOADING}
# The updates that say what the job is doing now (WorkerJobUpdate.phase).
PHASE_KINDS = (U.WORKER_UPDATE_KIND_PREPARING, U.WORKER_UPDATE_KIND_RUNNING, U.WORKER_UPDATE_KIND_PROGRESS)


def size_of(paths: Iterable[Path | str | None]) -> int:
    """Bytes of the files under these paths (files or folders; missing ones count 0)."""
    total = 0
    for path in paths:
        if path is None:
            continue
        p = Path(path)
        if p.is_file():
            total += p.stat().st_size
        elif p.is_dir():
            for folder, _, files in os.walk(p):
                total += sum(os.path.getsize(os.path.join(folder, name)) for name in files)
    return total


def log_line(entry: metrics_pb2.LogEntry) -> str:
    """"<ISO time> <LEVEL> <message>"; a message's further lines are indented, so each entry starts a line."""
    when = entry.time.ToDatetime(tzinfo=dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    level = metrics_pb2.LogLevel.Name(entry.level).removeprefix("LOG_LEVEL_")
    message = entry.message.rstrip("\n").replace("\n", "\n    ")
    return f"{when} {level} {message}"


class AttemptStory:
    """Phase, timeline, tokens trained and log lines of one attempt of one job."""

    def __init__(self, attempt: int, worker_id: str) -> None:
        self.attempt, self.worker_id = attempt, worker_id
        self.started = time.time()
        self.phase: job_pb2.JobPhase.ValueType = P.JOB_PHASE_DOWNLOADING
        self._phase_sent: job_pb2.JobPhase.ValueType = P.JOB_PHASE_UNSPECIFIED
        self.tokens_trained = 0
        self._events: list[job_pb2.JobEvent] = []
        self._evaluations: dict[int, dict[str, float]] = {}
        self.log_lines: list[str] = []

    # -- what happened -----------------------------------------------------------------------------------

    def add(self, kind: str, message: str, *, at: float | None = None, step: int = 0, epoch: float = 0.0,
            size_bytes: int = 0, duration_s: float | None = None,
            metrics: Mapping[str, float | None] | None = None, worker_id: str = "", reason: str = "",
            first: bool = False) -> job_pb2.JobEvent:
        """Queue one JobEvent (``kind`` a JobEventType name without its prefix) for the next update.

        A message does not state the size or the duration: they travel in the event's own fields, which
        whoever shows the timeline writes beside the message (`tuneforge jobs events`: "Fetched the data.
        (36.5 KiB, 0.4 s)"; the console likewise), so a message that said them too said them twice."""
        event = job_pb2.JobEvent(
            time=timestamp(at), type=E.Value(f"JOB_EVENT_TYPE_{kind}"), attempt=self.attempt, message=message,
            step=step, epoch=epoch, size_bytes=size_bytes, worker_id=worker_id, reason=reason,
        )
        if duration_s is not None:
            event.duration.FromNanoseconds(int(duration_s * 1e9))
        for key, value in (metrics or {}).items():
            if value is not None:
                event.metrics[key] = float(value)
        if first:
            self._events.insert(0, event)
        else:
            self._events.append(event)
        return event

    def restarted(self, resumed_step: int | None) -> None:
        """RESTARTED, first among this attempt's events (with its start time): another delivery began."""
        step = resumed_step or 0
        where = f"from the checkpoint of step {step}" if step else "from scratch (no complete checkpoint)"
        self.add("RESTARTED", f"Attempt {self.attempt} started on worker {self.worker_id}, resuming {where}.",
                 at=self.started, step=step, worker_id=self.worker_id, first=True)

    def downloaded(self, kind: str, what: str, size_bytes: int, duration_s: float, *, how: str = "") -> None:
        """MODEL_DOWNLOADED or DATA_DOWNLOADED."""
        how = how or f"Fetched {what}."
        self.add(kind, how, size_bytes=size_bytes, duration_s=duration_s)

    def model_ready(self, ref: str, path: str, duration_s: float) -> None:
        """MODEL_DOWNLOADED: the base model fetched (or found in the cache or in place); a hub id is fetched
        by the training process itself, so its size is not known here."""
        if not Path(path).exists():
            self.add("MODEL_DOWNLOADED", f"The base model {ref} is loaded from the hub by the training "
                     "process.", duration_s=duration_s)
            return
        size = size_of([path])
        self.add("MODEL_DOWNLOADED", f"The base model {ref} is ready.", size_bytes=size,
                 duration_s=duration_s)

    def result(self, output: job_pb2.JobOutput, result: ResultEvent) -> None:
        """The SUCCEEDED update's share of the result: kept step, early stop, tokens trained."""
        fill_output(output, result)
        self.tokens_trained = max(self.tokens_trained, result.tokens_trained)

    def checkpoint_saved(self, step: int, size_bytes: int, uri: str) -> None:
        evaluation = self.evaluation_at(step)
        loss = evaluation.get("eval_loss")
        tail = f"; eval_loss {loss:.4f}" if loss is not None else ""
        self.add("CHECKPOINT_SAVED", f"Stored the checkpoint of step {step} at {uri}{tail}.", step=step,
                 size_bytes=size_bytes, metrics=evaluation)

    def uploaded(self, size_bytes: int, duration_s: float, uris: list[str]) -> None:
        self.add("UPLOADING", f"Stored the outputs: {', '.join(uris)}.", size_bytes=size_bytes,
                 duration_s=duration_s)

    def observe(self, event: AnyEvent) -> None:
        """What an event of the training process adds to the story."""
        match event:
            case TimelineEvent():
                self.add(event.kind, event.message, at=event.time or None, step=event.step, epoch=event.epoch,
                         duration_s=event.duration_s, metrics=event.metrics)
            case PhaseEvent():
                self.phase = PHASES[event.phase]
            case StateEvent(state="running"):
                self.phase = P.JOB_PHASE_TRAINING
            case ProgressEvent():
                self.tokens_trained = max(self.tokens_trained, event.tokens_trained)
            case MetricEvent(kind="eval"):
                values = {"eval_loss": event.eval_loss, "eval_token_accuracy": event.eval_token_accuracy,
                          **{f"eval_{k}" if not k.startswith("eval_") else k: v
                             for k, v in event.values.items()}}
                self._evaluations[event.step] = {k: v for k, v in values.items() if v is not None}

    def evaluation_at(self, step: int) -> dict[str, float]:
        return dict(self._evaluations.get(step, {}))

    # -- what goes out -----------------------------------------------------------------------------------

    @property
    def phase_changed(self) -> bool:
        return self.phase != self._phase_sent

    @property
    def has_news(self) -> bool:
        """Whether a PROGRESS update is owed even without a new step: a phase change or events waiting."""
        return self.phase_changed or bool(self._events)

    def fill(self, update: events_pb2.WorkerJobUpdate) -> None:
        """Put the waiting events (all of them, in order), the phase and the tokens trained on ``update``."""
        update.events.extend(self._events)
        self._events = []
        if update.kind in PHASE_KINDS:
            update.phase = self.phase
            self._phase_sent = self.phase
        if update.kind in (U.WORKER_UPDATE_KIND_PROGRESS, U.WORKER_UPDATE_KIND_SUCCEEDED):
            update.tokens_trained = self.tokens_trained

    def record_log(self, entry: metrics_pb2.LogEntry) -> None:
        self.log_lines.append(log_line(entry))


def store_training_log(store: ObjectStore, prefix: str, lines: list[str]) -> str:
    """Append an attempt's lines to ``<prefix>/logs/training.log`` (earlier attempts' lines stay first);
    returns the object's URI."""
    key = f"{prefix.rstrip('/')}/{TRAINING_LOG}"
    try:
        earlier = store.get_bytes(key)
    except FileNotFoundError:
        earlier = b""
    if earlier and not earlier.endswith(b"\n"):
        earlier += b"\n"
    body = "".join(f"{line}\n" for line in lines).encode()
    return store.put_bytes(key, earlier + body)


def fill_output(output: job_pb2.JobOutput, result: ResultEvent) -> None:
    """JobOutput.kept_step and early_stop from the training process's result."""
    output.kept_step = result.kept_step
    stop = result.early_stop
    if stop is not None:
        output.early_stop.CopyFrom(job_pb2.EarlyStop(
            stopped_step=stop.stopped_step, best_step=stop.best_step, metric=stop.metric,
            best_value=stop.best_value, patience=stop.patience, reason=stop.reason))
