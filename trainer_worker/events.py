"""The events file: the one channel from a training process to the agent that started it.

The recipe appends one JSON object per line and flushes each line, so the agent can tail the file while
training runs and a crash loses at most the line being written. Line types:

- ``{"type": "state", "state": "running" | "cancelled"}``
- ``{"type": "metric", "kind": "train" | "eval", "step": ..., ...}``
- ``{"type": "log", "level": "info" | "warning" | "error", "message": ...}``
- ``{"type": "result", "adapter_dir": ..., "merged_dir": ... | None, "final_metrics": {...}}``
- ``{"type": "error", "reason": <ErrorReason name without prefix>, "message": ...}``

Every line also carries ``time`` (unix seconds). Non-finite floats are written as null to keep the file
strict JSON.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
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


class EventSink:
    """Writes events for the agent; the recipe's only way to report anything."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = path.open("a", encoding="utf-8")

    def emit(self, type_: str, **fields: Any) -> None:
        line = {"type": type_, **_finite(fields), "time": time.time()}
        self._file.write(json.dumps(line, allow_nan=False) + "\n")
        self._file.flush()

    def state(self, state: str) -> None:
        self.emit("state", state=state)

    def metric(self, kind: str, step: int, **values: float | int | None) -> None:
        self.emit("metric", kind=kind, step=step, **values)

    def log(self, message: str, level: str = "info") -> None:
        self.emit("log", level=level, message=message)

    def result(self, adapter_dir: Path, merged_dir: Path | None, final_metrics: Mapping[str, float]) -> None:
        self.emit(
            "result",
            adapter_dir=str(adapter_dir),
            merged_dir=str(merged_dir) if merged_dir else None,
            final_metrics=dict(final_metrics),
        )

    def error(self, reason: Reason, message: str) -> None:
        self.emit("error", reason=reason, message=message)

    def close(self) -> None:
        self._file.close()


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
