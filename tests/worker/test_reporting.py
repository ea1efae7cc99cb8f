"""Events-file lines become the MetricPoints and JobProgress of events.proto."""

from __future__ import annotations

import json

from tuneforge.v1 import metrics_pb2

from trainer_worker.events import ProgressEvent, decode
from trainer_worker.reporting import JobReporter, advance_progress, log_sequence, metric_point, progress_of


def test_metric_line_becomes_a_point_with_extras_in_values() -> None:
    event = {
        "type": "metric",
        "kind": "train",
        "step": 7,
        "total_steps": 20,
        "epoch": 0.35,
        "loss": 1.25,
        "grad_norm": None,
        "values": {"token_accuracy": 0.5},
        "time": 1_700_000_000.5,
    }
    point = metric_point(decode(json.dumps(event).encode()), "job_1", 2)

    assert (point.job_id, point.attempt, point.kind) == ("job_1", 2, metrics_pb2.METRIC_KIND_TRAIN)
    assert (point.step, point.total_steps, point.epoch, point.loss) == (7, 20, 0.35, 1.25)
    assert not point.HasField("grad_norm"), "a null value stays unset, not 0"
    assert dict(point.values) == {"token_accuracy": 0.5}
    assert point.time.ToNanoseconds() == 1_700_000_000_500_000_000

    progress = progress_of(point)
    assert (progress.step, progress.total_steps, progress.loss) == (7, 20, 1.25)
    assert not progress.HasField("tokens_per_second")


def test_system_line_fills_the_resource_fields_of_a_system_point() -> None:
    event = {"type": "metric", "kind": "system", "step": 4, "cpu_percent": 180.0, "memory_bytes": 6.5e8}
    point = metric_point(decode(json.dumps(event).encode()), "job_1", 1)
    assert point.kind == metrics_pb2.METRIC_KIND_SYSTEM
    assert (point.cpu_percent, point.memory_bytes) == (180.0, 650_000_000) and not point.values
    assert type(point.memory_bytes) is int  # MetricPoint's byte counts are int64, though the line has a float
    assert not point.HasField("gpu_utilization")


def test_a_progress_line_moves_the_step_and_keeps_the_last_loss() -> None:
    train = decode(json.dumps({"type": "metric", "kind": "train", "step": 1, "total_steps": 5, "loss": 2.5,
                               "eta_seconds": 40.0}).encode())
    progress = progress_of(metric_point(train, "job_1", 1))  # type: ignore[arg-type]

    progress = advance_progress(progress, ProgressEvent(step=3, total_steps=5, epoch=0.6))
    assert (progress.step, progress.total_steps, progress.epoch, progress.loss) == (3, 5, 0.6, 2.5)
    assert progress.eta_seconds == 40.0
    progress = advance_progress(progress, ProgressEvent(step=5, total_steps=5, epoch=1.0))
    assert (progress.step, progress.total_steps, progress.eta_seconds) == (5, 5, 0.0), "5/5, nothing left"
    first = advance_progress(None, ProgressEvent(step=2, total_steps=5))
    assert (first.step, first.total_steps) == (2, 5) and not first.HasField("loss")


def test_log_sequences_increase_across_attempts() -> None:
    sequences = []
    for attempt in (1, 2, 3):
        reporter = JobReporter(None, "job_1", attempt, "w1")  # type: ignore[arg-type]  # log() sends nothing
        for n in range(3):
            reporter.log(f"line {n}")
        entries = reporter._entries
        assert {e.attempt for e in entries} == {attempt}
        sequences += [e.sequence for e in entries]
    assert sequences == sorted(sequences) and len(set(sequences)) == 9
    assert sequences[0] == log_sequence(1, 1) == (1 << 32) + 1 and sequences[3] == (2 << 32) + 1
