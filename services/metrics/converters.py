"""Converters between the proto messages and the rows of the metrics service."""

from __future__ import annotations

from typing import Any

from tuneforge.v1 import metrics_pb2

from services.kit.protos import as_utc, from_timestamp, to_timestamp
from services.metrics.models import LogEntryRow, MetricPointRow

# The `optional double` fields of MetricPoint; each has a column of the same name.
OPTIONAL_VALUES = (
    "loss", "learning_rate", "grad_norm", "tokens_per_second", "samples_per_second", "eta_seconds",
    "eval_loss", "eval_token_accuracy", "gpu_utilization", "gpu_memory_bytes", "gpu_temperature_celsius",
    "cpu_percent", "memory_bytes",
)


def point_to_values(point: metrics_pb2.MetricPoint) -> dict[str, Any]:
    """Column values of a point, for an INSERT ... ON CONFLICT."""
    values: dict[str, Any] = {
        "job_id": point.job_id, "step": point.step, "kind": int(point.kind), "attempt": point.attempt,
        "total_steps": point.total_steps, "epoch": point.epoch,
        "time": from_timestamp(point.time) if point.HasField("time") else None,
        "values": dict(point.values),
    }
    present = {field.name for field, _ in point.ListFields()}
    for name in OPTIONAL_VALUES:
        values[name] = getattr(point, name) if name in present else None
    return values


def row_to_point(row: MetricPointRow) -> metrics_pb2.MetricPoint:
    point = metrics_pb2.MetricPoint(
        job_id=row.job_id, kind=metrics_pb2.MetricKind.ValueType(row.kind), step=row.step,
        total_steps=row.total_steps, epoch=row.epoch, attempt=row.attempt, values=row.extra_values or {},
    )
    if row.time is not None:
        point.time.CopyFrom(to_timestamp(as_utc(row.time)))
    for name in OPTIONAL_VALUES:
        value = getattr(row, name)
        if value is not None:
            setattr(point, name, value)
    return point


def entry_to_values(entry: metrics_pb2.LogEntry) -> dict[str, Any]:
    return {
        "job_id": entry.job_id, "attempt": entry.attempt, "sequence": entry.sequence,
        "time": from_timestamp(entry.time) if entry.HasField("time") else None,
        "level": int(entry.level), "source": int(entry.source), "message": entry.message,
    }


def row_to_entry(row: LogEntryRow) -> metrics_pb2.LogEntry:
    entry = metrics_pb2.LogEntry(
        job_id=row.job_id, sequence=row.sequence, level=metrics_pb2.LogLevel.ValueType(row.level),
        source=metrics_pb2.LogSource.ValueType(row.source), message=row.message, attempt=row.attempt,
    )
    if row.time is not None:
        entry.time.CopyFrom(to_timestamp(as_utc(row.time)))
    return entry
