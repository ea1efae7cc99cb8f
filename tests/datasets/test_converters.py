"""Converters between protos and domain values, and the bounded DATASET_INVALID violations."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest
from tuneforge.v1 import dataset_pb2
from tuneforge.v1 import dataset_service_pb2 as pb

from services.datasets import converters as c
from services.datasets.domain import (
    DatasetFormat,
    DatasetRecord,
    DatasetState,
    Issue,
    Severity,
    SplitConfig,
    SplitFile,
    SplitKind,
    SplitPlan,
    Statistics,
    ValidationReport,
)
from services.datasets.uploads import bounded_violations
from tuneforge_core.errors import InvalidArgument

NOW = datetime(2025, 5, 1, 12, 30, tzinfo=UTC)


def _record() -> DatasetRecord:
    return DatasetRecord(
        id="ds_1", organization="acme", name="chats", description="d", state=DatasetState.READY,
        format=DatasetFormat.OPENAI_CHAT, source_filename="chats.jsonl",
        source_key="datasets/acme/ds_1/source.jsonl", size_bytes=123, sha256="ab" * 32,
        statistics=Statistics(10, 2.5, 400, 1),
        splits=(SplitFile(SplitKind.TRAIN, 8, "datasets/acme/ds_1/train.jsonl"),
                SplitFile(SplitKind.TEST, 2, "datasets/acme/ds_1/test.jsonl")),
        error_count=0, warning_count=1, split_plan=SplitPlan((0.8, 0.0, 0.2), 3),
        create_time=NOW, update_time=NOW)


def test_dataset_to_proto() -> None:
    proto = c.dataset_to_proto(_record(), lambda key: f"s3://bucket/{key}")
    assert proto.state == dataset_pb2.DATASET_STATE_READY
    assert proto.format == dataset_pb2.DATASET_FORMAT_OPENAI_CHAT
    assert proto.source.WhichOneof("source") == "upload_filename"
    assert [(s.kind, s.example_count, s.uri) for s in proto.splits] == [
        (dataset_pb2.DATASET_SPLIT_KIND_TRAIN, 8, "s3://bucket/datasets/acme/ds_1/train.jsonl"),
        (dataset_pb2.DATASET_SPLIT_KIND_TEST, 2, "s3://bucket/datasets/acme/ds_1/test.jsonl")]
    assert proto.statistics.total_characters == 400 and not proto.statistics.HasField("tokens")
    assert (proto.validation.valid, proto.validation.warning_count) == (True, 1)
    assert proto.create_time.ToDatetime(tzinfo=UTC) == NOW
    # Valid only once validated: neither while PROCESSING nor after failing before validation.
    for state in (c.DatasetState.PROCESSING, c.DatasetState.FAILED):
        assert not c.dataset_to_proto(replace(_record(), state=state), str).validation.valid


def test_every_domain_enum_has_a_proto_value() -> None:
    for fmt in DatasetFormat:
        assert c.format_from_proto(c.format_to_proto(fmt)) is fmt
    for state in DatasetState:
        assert c.state_from_proto(c.state_to_proto(state)) is state
    for kind in SplitKind:
        assert c.split_kind_to_proto(kind)


def test_unspecified_and_unknown_enum_values() -> None:
    assert c.format_from_proto(0) is None and c.state_from_proto(0) is None
    with pytest.raises(InvalidArgument) as caught:
        c.state_from_proto(42)
    assert caught.value.violations[0].field == "state"
    with pytest.raises(InvalidArgument) as caught:
        c.upload_spec_from_proto(pb.UploadDatasetMetadata(organization="acme", format=99))  # type: ignore[arg-type]
    assert caught.value.violations[0].field == "metadata.format"


def test_report_round_trip() -> None:
    report = ValidationReport(
        format=DatasetFormat.OPENAI_CHAT, examples_checked=10, error_count=2, warning_count=1,
        issues=(Issue(Severity.ERROR, "INVALID_ROLE", 3, "bad role.", "messages[1].role", 1),
                Issue(Severity.ERROR, "INVALID_JSON", 4, "bad json."),
                Issue(Severity.WARNING, "DUPLICATE_EXAMPLES", 0, "dupes.")),
        issues_truncated=False, statistics=Statistics(8, 2.0, 50, 2))
    proto = c.report_to_proto(report, "ds_1")
    assert proto.dataset_id == "ds_1" and not proto.valid
    assert proto.issues[0].HasField("message_index") and not proto.issues[1].HasField("message_index")
    assert c.report_from_proto(dataset_pb2.ValidationReport.FromString(proto.SerializeToString())) == report


def test_optional_fields_distinguish_unset_from_zero() -> None:
    config = c.split_config_from_proto(dataset_pb2.SplitConfig(test_fraction=0.0, seed=0))
    assert config == SplitConfig(None, None, 0.0, 0)
    spec = c.upload_spec_from_proto(pb.UploadDatasetMetadata(organization="acme", name="n", min_examples=5,
                                                             format=dataset_pb2.DATASET_FORMAT_OPENAI_CHAT))
    assert (spec.min_examples, spec.format) == (5, DatasetFormat.OPENAI_CHAT)
    assert c.upload_spec_from_proto(pb.UploadDatasetMetadata()).min_examples is None


def test_violations_fit_the_budget_full_sentences_first() -> None:
    errors = [Issue(Severity.ERROR, "INVALID_ROLE", n, "Message 1 has role \"bot\"; use one of system, user, "
                    "assistant, tool.", "messages[1].role", 1) for n in range(1, 251)]
    violations = bounded_violations(errors[:100])
    assert len(violations) == 100
    assert violations[0].field == "line 1: messages[1].role"
    assert violations[0].description.startswith("INVALID_ROLE: Message 1")
    assert violations[-1].description == "INVALID_ROLE"
    assert sum(len(v.field) + len(v.description) + 8 for v in violations) <= 5000
    few = bounded_violations(errors[:3])
    assert all(v.description.startswith("INVALID_ROLE: ") for v in few)
    assert len(bounded_violations(errors, budget=500)) < 20
