"""The events file stays strict JSON and a tail never returns half a line."""

from __future__ import annotations

import json
from pathlib import Path

from trainer_worker.events import EventSink, EventTail


def test_tail_returns_only_complete_lines(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    tail = EventTail(path)
    assert tail.read() == []

    sink = EventSink(path)
    sink.state("running")
    with path.open("a") as f:
        f.write('{"type": "log", "lev')
    assert [e["type"] for e in tail.read()] == ["state"]
    with path.open("a") as f:
        f.write('el": "info", "message": "hi"}\n')
    assert tail.read() == [{"type": "log", "level": "info", "message": "hi"}]
    sink.metric("train", 3, loss=1.5)
    assert tail.read()[0]["step"] == 3


def test_non_finite_values_become_null(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = EventSink(path)
    sink.metric("train", 1, loss=float("nan"), grad_norm=float("inf"))
    sink.result(tmp_path / "adapter", None, {"train_loss": float("nan"), "epoch": 1.0})
    sink.close()

    metric, result = (json.loads(line) for line in path.read_text().splitlines())
    assert metric["loss"] is None and metric["grad_norm"] is None
    assert result["final_metrics"] == {"train_loss": None, "epoch": 1.0}
    assert result["merged_dir"] is None
