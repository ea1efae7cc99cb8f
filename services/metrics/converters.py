"""Converters between the proto messages and the rows of the metrics service."""

from __future__ import annotations

from collections.abc import Callable
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


# Column order of the rows `point_to_row` and `entry_to_row` build (the repository's upserts bind by it).
POINT_COLUMNS = ("job_id", "step", "kind", "attempt", "total_steps", "epoch", "time", *OPTIONAL_VALUES,
                 "values")
ENTRY_COLUMNS = ("job_id", "attempt", "sequence", "time", "level", "source", "message")


def point_to_row(point: metrics_pb2.MetricPoint) -> tuple[Any, ...]:
    """Column values of a point in POINT_COLUMNS order, for the ingest upsert (called once per stored point:
    kept to plain attribute reads)."""
    has: Callable[[str], bool] = point.HasField  # type: ignore[assignment]
    return (
        point.job_id, point.step, int(point.kind), point.attempt, point.total_steps, point.epoch,
        from_timestamp(point.time) if has("time") else None,
        *[getattr(point, name) if has(name) else None for name in OPTIONAL_VALUES],
        dict(point.values),
    )


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


def entry_to_row(entry: metrics_pb2.LogEntry) -> tuple[Any, ...]:
    """Column values of a log entry in ENTRY_COLUMNS order, for the ingest upsert."""
    return (
        entry.job_id, entry.attempt, entry.sequence,
        from_timestamp(entry.time) if entry.HasField("time") else None,
        int(entry.level), int(entry.source), entry.message,
    )


def row_to_entry(row: LogEntryRow) -> metrics_pb2.LogEntry:
    entry = metrics_pb2.LogEntry(
        job_id=row.job_id, sequence=row.sequence, level=metrics_pb2.LogLevel.ValueType(row.level),
        source=metrics_pb2.LogSource.ValueType(row.source), message=row.message, attempt=row.attempt,
    )
    if row.time is not None:
        entry.time.CopyFrom(to_timestamp(as_utc(row.time)))
    return entry
