"""Events-file lines become the MetricPoints and JobProgress of events.proto."""

from __future__ import annotations

import json

from tuneforge.v1 import metrics_pb2

from trainer_worker.events import decode
from trainer_worker.reporting import metric_point, progress_of


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
    assert (point.cpu_percent, point.memory_bytes) == (180.0, 6.5e8) and not point.values
    assert not point.HasField("gpu_utilization")
