"""The events file: the one channel from a training process to the agent that started it.

The recipe appends one JSON object per line and flushes each line, so the agent can tail the file while
training runs and a crash loses at most the line being written. Line types:

- ``{"type": "state", "state": "running" | "cancelled"}``
- ``{"type": "rank", "rank": ..., "world_size": ..., "pid": ..., "host": ...}`` (one per training process)
- ``{"type": "metric", "kind": "train" | "eval" | "system", "step": ..., ...}``
- ``{"type": "log", "level": "debug" | "info" | "warning" | "error" | "critical", "message": ...}``
- ``{"type": "checkpoint", "step": ..., "dir": ...}`` (a staged checkpoint for the agent to upload)
- ``{"type": "result", "adapter_dir": ..., "merged_dir": ... | None, "final_metrics": {...}}``
- ``{"type": "error", "reason": <ErrorReason name without prefix>, "message": ..., "rank": ...}``

Every line also carries ``time`` (unix seconds). Non-finite floats are written as null to keep the file
strict JSON. Under torchrun every rank opens the file, but only the main rank reports; the others write
their ``rank`` line and their errors only, so a job's metrics and result are written once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from trainer_worker.errors import Reason

log = logging.getLogger(__name__)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    return value


LEVELS = ("debug", "info", "warning", "error", "critical")
# What a rank other than the main one still writes.
EVERY_RANK = frozenset({"rank", "error"})


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
        self._file: IO[str] = path.open("a", encoding="utf-8")
        self.main, self._rank, self._sampler = main, rank, sampler

    def emit(self, type_: str, **fields: Any) -> None:
        if not self.main and type_ not in EVERY_RANK:
            return
        line = {"type": type_, **_finite(fields), "time": time.time()}
        self._file.write(json.dumps(line, allow_nan=False) + "\n")
        self._file.flush()

    def state(self, state: str) -> None:
        self.emit("state", state=state)

    def rank(self, **info: Any) -> None:
        self.emit("rank", **info)

    def metric(self, kind: str, step: int, **values: float | int | None) -> None:
        self.emit("metric", kind=kind, step=step, **values)
        if kind == "train" and self._sampler is not None and self.main:
            self.emit("metric", kind="system", step=step, **self._sampler())

    def log(self, message: str, level: str = "info") -> None:
        self.emit("log", level=level if level in LEVELS else "info", message=message)

    def checkpoint(self, step: int, directory: Path) -> None:
        self.emit("checkpoint", step=step, dir=str(directory))

    def result(self, adapter_dir: Path, merged_dir: Path | None, final_metrics: Mapping[str, float]) -> None:
        self.emit(
            "result",
            adapter_dir=str(adapter_dir),
            merged_dir=str(merged_dir) if merged_dir else None,
            final_metrics=dict(final_metrics),
        )

    def error(self, reason: Reason, message: str) -> None:
        self.emit("error", reason=reason, message=message, rank=self._rank)

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
    """Reads the complete lines appended to an events file since the last call."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = 0
        self._partial = b""

    def read(self) -> list[dict[str, Any]]:
        if not self._path.exists():
            return []
        with self._path.open("rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        self._offset += len(chunk)
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        events = []
        for line in filter(bytes.strip, lines):
            try:
                events.append(json.loads(line))
            except ValueError:
                log.warning("skipping an unreadable line of %s: %r", self._path, line[:200])
        return events
