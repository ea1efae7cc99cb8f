"""The events file: typed lines, strict JSON, a tail that never returns half a line, and a malformed line
that is reported instead of skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer_worker.events import (
    ErrorEvent,
    EventSink,
    EventTail,
    LogEvent,
    MalformedEvent,
    MetricEvent,
    StateEvent,
)
from tuneforge_core.reasons import Reason


def test_tail_returns_only_complete_lines(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    tail = EventTail(path)
    assert tail.read() == []

    sink = EventSink(path)
    sink.state("running")
    with path.open("a") as f:
        f.write('{"type": "log", "lev')
    (state,) = tail.read()
    assert isinstance(state, StateEvent) and state.state == "running"
    with path.open("a") as f:
        f.write('el": "info", "message": "hi"}\n')
    assert tail.read() == [LogEvent(level="info", message="hi")]
    sink.metric("train", 3, loss=1.5, rewards_mean=0.25)
    (point,) = tail.read()
    assert isinstance(point, MetricEvent)
    assert (point.step, point.loss, point.values) == (3, 1.5, {"rewards_mean": 0.25})


def test_non_finite_values_become_null(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = EventSink(path)
    sink.metric("train", 1, loss=float("nan"), grad_norm=float("inf"))
    sink.result(tmp_path / "adapter", None, {"train_loss": float("nan"), "epoch": 1.0})
    sink.close()

    metric, result = (json.loads(line) for line in path.read_text().splitlines())
    assert metric["loss"] is None and metric["grad_norm"] is None
    assert result["final_metrics"] == {"train_loss": None, "epoch": 1.0}
    assert result.get("merged_dir") is None


@pytest.mark.parametrize(
    "line",
    [
        b'{"type": "metric", "kind": "train"}',  # no step
        b'{"type": "metric", "kind": "train", "step": "three"}',
        b'{"type": "error", "reason": "NOT_A_REASON", "message": "x"}',
        b'{"type": "result"}',
        b'{"type": "teleport", "to": "mars"}',
        b'{"type": "log", "message": "hi", "colour": "red"}',  # a field no event has
        b"[1, 2, 3]",
        b"not json at all",
    ],
)
def test_a_line_that_is_no_event_is_reported_after_the_good_ones(tmp_path: Path, line: bytes) -> None:
    path = tmp_path / "events.jsonl"
    sink = EventSink(path)
    sink.log("before")
    with path.open("ab") as f:
        f.write(line + b"\n")
    sink.error(Reason.BAD_TRAINING_DATA, "after")
    tail = EventTail(path)

    assert tail.read() == [LogEvent(level="info", message="before", time=tail_time(path, 0))]
    with pytest.raises(MalformedEvent):
        tail.read()
    (after,) = tail.read()
    assert isinstance(after, ErrorEvent) and after.reason is Reason.BAD_TRAINING_DATA


def tail_time(path: Path, index: int) -> float:
    return float(json.loads(path.read_text().splitlines()[index])["time"])
