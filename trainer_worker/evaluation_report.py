"""The EvaluationReport between the training process and the agent; no torch, the agent imports it.

The training process writes the report (``trainer_worker.evaluation``) into its ``result`` line as
protobuf's JSON mapping; the agent reads it back with :func:`from_result`, sends it with SUCCEEDED and
stores it as JSON at ``<output_prefix>/evaluation/evaluation.json`` (:data:`OBJECT_NAME`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from tuneforge.v1 import evaluation_pb2

E = evaluation_pb2.EvaluationReport
#: Where the report lies under the job's output prefix.
OBJECT_NAME = "evaluation/evaluation.json"
SPLIT = "test"
DISABLED = "evaluation disabled (spec.evaluation.enabled=false)"
NO_TEST_SPLIT = "the dataset has no test split"
NOT_REPORTED = "the training process reported no evaluation"


def timestamp(seconds: float | None = None) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int((time.time() if seconds is None else seconds) * 1e9))
    return stamp


def skipped(message: str) -> evaluation_pb2.EvaluationReport:
    now = timestamp()
    return E(
        status=evaluation_pb2.EVALUATION_STATUS_SKIPPED,
        message=message,
        split=SPLIT,
        start_time=now,
        end_time=now,
    )


def failed(message: str, started: float | None = None) -> evaluation_pb2.EvaluationReport:
    return E(
        status=evaluation_pb2.EVALUATION_STATUS_FAILED,
        message=message,
        split=SPLIT,
        start_time=timestamp(started),
        end_time=timestamp(),
    )


def to_dict(report: evaluation_pb2.EvaluationReport) -> dict[str, object]:
    """The JSON mapping that travels in the result line (ResultEvent.evaluation)."""
    return json_format.MessageToDict(report)


def from_result(evaluation: Mapping[str, object] | None) -> evaluation_pb2.EvaluationReport:
    """The report of a result line: SKIPPED when there is none, FAILED when it cannot be read."""
    if evaluation is None:
        return skipped(NOT_REPORTED)
    try:
        return json_format.ParseDict(dict(evaluation), E(), ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        return failed(f"The worker could not read the evaluation report: {exc}.")


def to_json(report: evaluation_pb2.EvaluationReport) -> bytes:
    """evaluation.json: the report in protobuf's JSON mapping (camelCase names, enum value names)."""
    return json_format.MessageToJson(report, indent=2).encode("utf-8")
