"""Rows of points and log entries as ingest stores them: every field in its column, a field with presence that
was never set as NULL, one set to its zero value as that value."""

from __future__ import annotations

import math
import random
from typing import Any

from google.protobuf.message import Message
from tuneforge.v1 import metrics_pb2

from services.metrics.converters import (
    ENTRY_COLUMNS,
    OPTIONAL_VALUES,
    POINT_COLUMNS,
    entry_to_row,
    point_to_row,
)


def expected_row(message: Message, columns: tuple[str, ...]) -> list[Any]:
    """The row read field by field: the value of each field set, None for a field with presence left unset,
    the zero value of one without; a map as a dict."""
    set_fields = {field.name: value for field, value in message.ListFields()}
    row: list[Any] = []
    for name in columns:
        field = message.DESCRIPTOR.fields_by_name[name]
        is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
        if name in set_fields:
            row.append(dict(set_fields[name]) if is_map else set_fields[name])
        elif is_map:
            row.append({})
        elif field.message_type is not None or field.has_presence:
            row.append(None)
        else:
            row.append(getattr(message, name))
    return row


def test_a_value_set_to_zero_is_kept_and_one_never_set_is_null() -> None:
    p = metrics_pb2.MetricPoint(job_id="job_z", kind=metrics_pb2.METRIC_KIND_SYSTEM, step=0, loss=0.0,
                                gpu_utilization=-0.0, memory_bytes=0)
    row = dict(zip(POINT_COLUMNS, point_to_row(p), strict=True))
    assert (row["loss"], row["memory_bytes"]) == (0.0, 0)
    assert math.copysign(1.0, row["gpu_utilization"]) == -1.0
    assert row["learning_rate"] is None and row["gpu_memory_bytes"] is None and row["time"] is None
    assert (row["job_id"], row["step"], row["kind"], row["epoch"], row["values"]) == (
        "job_z", 0, metrics_pb2.METRIC_KIND_SYSTEM, 0.0, {})


def test_rows_hold_what_each_field_holds_over_many_points_and_entries() -> None:
    rnd = random.Random(13)
    for _ in range(2000):
        p = metrics_pb2.MetricPoint(job_id=rnd.choice(["", "job_r"]), step=rnd.choice([0, 7]),
                                    kind=rnd.choice([0, 1, 3]), attempt=rnd.choice([0, 2]),
                                    total_steps=rnd.choice([0, 9]), epoch=rnd.choice([0.0, 1.5]))
        for name in OPTIONAL_VALUES:
            roll = rnd.random()
            integer = name.endswith("_bytes")
            if roll < 0.3:
                setattr(p, name, 0 if integer else rnd.choice([0.0, -0.0]))
            elif roll < 0.6:
                setattr(p, name, 2**40 + 1 if integer else rnd.choice([0.5, math.inf, math.nan]))
        if rnd.random() < 0.5:
            p.time.FromSeconds(rnd.choice([0, 1_790_000_000]))
        if rnd.random() < 0.3:
            p.values["custom"] = rnd.choice([0.0, 2.5])
        assert repr(point_to_row(p)) == repr(expected_row(p, POINT_COLUMNS))

        e = metrics_pb2.LogEntry(job_id="job_r", attempt=rnd.choice([0, 1]), sequence=rnd.choice([0, 5]),
                                 level=rnd.choice([0, 3]), source=rnd.choice([0, 2]),
                                 message=rnd.choice(["", "line"]))
        if rnd.random() < 0.5:
            e.time.FromSeconds(5)
        assert repr(entry_to_row(e)) == repr(expected_row(e, ENTRY_COLUMNS))
