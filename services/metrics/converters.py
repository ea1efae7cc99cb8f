"""Converters between the proto messages and the rows of the metrics service."""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tuneforge.v1 import metrics_pb2

from services.kit.protos import as_utc, to_timestamp
from services.metrics.models import LogEntryRow, MetricPointRow

# The `optional` number fields of MetricPoint (doubles, and the int64 byte counts gpu_memory_bytes and
# memory_bytes); each has a column of the same name (a float column: bytes are exact in it up to 2^53).
OPTIONAL_VALUES = (
    "loss", "learning_rate", "grad_norm", "tokens_per_second", "samples_per_second", "eta_seconds",
    "eval_loss", "eval_token_accuracy", "gpu_utilization", "gpu_memory_bytes", "gpu_temperature_celsius",
    "cpu_percent", "memory_bytes",
)


# Column order of the rows `point_to_row` and `entry_to_row` build (the repository's upserts bind by it).
POINT_COLUMNS = ("job_id", "step", "kind", "attempt", "total_steps", "epoch", "time", *OPTIONAL_VALUES,
                 "values")
ENTRY_COLUMNS = ("job_id", "attempt", "sequence", "time", "level", "source", "message")


@dataclass(frozen=True)
class _RowLayout:
    """How `_to_row` builds a message's row: every column's field read in one call (`read`), then the fields
    with presence put right: a message field (a Timestamp) left unset, or a scalar one unset (it reads as
    its zero value, so only a falsy value is asked about), becomes None; the map field becomes a dict."""

    read: Callable[[Any], tuple[Any, ...]]
    messages: tuple[tuple[int, str], ...]  # (column index, field name) of the message fields
    scalars: tuple[tuple[int, str], ...]  # (column index, field name) of the scalar fields with presence
    map_index: int  # column index of the map field, or -1

    @staticmethod
    def of(descriptor: Any, columns: Sequence[str]) -> _RowLayout:
        fields = {f.name: f for f in descriptor.fields}
        if set(fields) != set(columns):
            raise ValueError(f"the columns {columns} are not the fields of {descriptor.full_name}")
        messages: list[tuple[int, str]] = []
        scalars: list[tuple[int, str]] = []
        map_index = -1
        for index, name in enumerate(columns):
            field = fields[name]
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                map_index = index
            elif field.message_type is not None:
                messages.append((index, name))
            elif field.has_presence:
                scalars.append((index, name))
        return _RowLayout(operator.attrgetter(*columns), tuple(messages), tuple(scalars), map_index)


# The `values` of a point that has none: one shared object, never changed (the repository converts it once).
_NO_VALUES: dict[str, float] = {}


def _to_row(message: Any, layout: _RowLayout) -> list[Any]:
    """The message's column values in its columns' order (this runs once per stored point: one call into the
    protobuf runtime reads every field, and presence is asked of the runtime only for the fields that read as
    unset). A Timestamp stays a Timestamp: the repository converts it to its database's form."""
    row = list(layout.read(message))
    has = message.HasField
    for index, name in layout.messages:
        if not has(name):
            row[index] = None
    for index, name in layout.scalars:
        if not row[index] and not has(name):
            row[index] = None
    if layout.map_index >= 0:
        values = row[layout.map_index]
        row[layout.map_index] = dict(values) if values else _NO_VALUES  # dict() of an empty map costs 0.7 us
    return row


_POINT_LAYOUT = _RowLayout.of(metrics_pb2.MetricPoint.DESCRIPTOR, POINT_COLUMNS)
_ENTRY_LAYOUT = _RowLayout.of(metrics_pb2.LogEntry.DESCRIPTOR, ENTRY_COLUMNS)


def point_to_row(point: metrics_pb2.MetricPoint) -> list[Any]:
    """Column values of a point in POINT_COLUMNS order, for the ingest upsert; `time` as a Timestamp (or None
    when unset) and `values` as a dict."""
    return _to_row(point, _POINT_LAYOUT)


def row_to_point(row: MetricPointRow) -> metrics_pb2.MetricPoint:
    point = metrics_pb2.MetricPoint(
        job_id=row.job_id, kind=metrics_pb2.MetricKind.ValueType(row.kind), step=row.step,
        # float(): on SQLite, ingest stores a NaN as the text "NaN" (repository._Upsert.nan_columns), and
        # in `values` what JSON cannot hold (NaN, infinities) as its name.
        total_steps=row.total_steps, epoch=float(row.epoch), attempt=row.attempt,
        values={name: float(value) for name, value in (row.extra_values or {}).items()},
    )
    if row.time is not None:
        point.time.CopyFrom(to_timestamp(as_utc(row.time)))
    for name in OPTIONAL_VALUES:
        value = getattr(row, name)
        if value is not None:
            setattr(point, name, _int64(value) if name in _INTEGER_VALUES else float(value))
    return point


# Those of OPTIONAL_VALUES that MetricPoint declares int64: their float column's value is rounded back.
_INTEGER_VALUES = frozenset(
    name for name in OPTIONAL_VALUES
    if metrics_pb2.MetricPoint.DESCRIPTOR.fields_by_name[name].cpp_type
    == metrics_pb2.MetricPoint.DESCRIPTOR.fields_by_name[name].CPPTYPE_INT64
)


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _int64(value: float) -> int:
    """An int64 field's value back from its float column. A float holds it exactly up to 2^53; above, the
    float nearest 2^63 - 1 is 2^63, which the field cannot take (every read of the job failed): clamped."""
    return min(max(round(value), _INT64_MIN), _INT64_MAX)


def entry_to_row(entry: metrics_pb2.LogEntry) -> list[Any]:
    """Column values of a log entry in ENTRY_COLUMNS order, for the ingest upsert; `time` as a Timestamp (or
    None when unset)."""
    return _to_row(entry, _ENTRY_LAYOUT)


def row_to_entry(row: LogEntryRow) -> metrics_pb2.LogEntry:
    entry = metrics_pb2.LogEntry(
        job_id=row.job_id, sequence=row.sequence, level=metrics_pb2.LogLevel.ValueType(row.level),
        source=metrics_pb2.LogSource.ValueType(row.source), message=row.message, attempt=row.attempt,
    )
    if row.time is not None:
        entry.time.CopyFrom(to_timestamp(as_utc(row.time)))
    return entry
