"""Converters between tuneforge.v1 protos and the datasets domain types. Enum values map by name."""

from __future__ import annotations

from collections.abc import Callable

from tuneforge.v1 import dataset_pb2, dataset_service_pb2

from services.datasets.domain import (
    DatasetFormat,
    DatasetOptions,
    DatasetRecord,
    DatasetState,
    Issue,
    Severity,
    SplitConfig,
    SplitKind,
    Statistics,
    TokenStats,
    UploadSpec,
    ValidationReport,
)
from services.kit.protos import to_timestamp
from tuneforge_core.errors import FieldViolation, InvalidArgument

UriFor = Callable[[str], str]
"""Maps an object key to the URI clients and workers read it by (ObjectStore.uri)."""


def state_to_proto(state: DatasetState) -> dataset_pb2.DatasetState.ValueType:
    return dataset_pb2.DatasetState.Value(f"DATASET_STATE_{state.value}")


def _unknown(field: str, value: int) -> InvalidArgument:
    return InvalidArgument(f"{field}: unknown value {value}",
                           violations=[FieldViolation(field, f"unknown value {value}")])


def state_from_proto(value: int, field: str = "state") -> DatasetState | None:
    """None for UNSPECIFIED (no filter); INVALID_ARGUMENT for numbers this server does not know."""
    if value == 0:
        return None
    try:
        name = dataset_pb2.DatasetState.Name(value)  # type: ignore[arg-type]
        return DatasetState(name.removeprefix("DATASET_STATE_"))
    except ValueError:
        raise _unknown(field, value) from None


def format_to_proto(fmt: DatasetFormat) -> dataset_pb2.DatasetFormat.ValueType:
    return dataset_pb2.DatasetFormat.Value(f"DATASET_FORMAT_{fmt.value}")


def format_from_proto(value: int, field: str = "format") -> DatasetFormat | None:
    """None for UNSPECIFIED (detect from content); INVALID_ARGUMENT for numbers this server does not know."""
    if value == 0:
        return None
    try:
        name = dataset_pb2.DatasetFormat.Name(value)  # type: ignore[arg-type]
        return DatasetFormat(name.removeprefix("DATASET_FORMAT_"))
    except ValueError:
        raise _unknown(field, value) from None


def split_kind_to_proto(kind: SplitKind) -> dataset_pb2.DatasetSplitKind.ValueType:
    return dataset_pb2.DatasetSplitKind.Value(f"DATASET_SPLIT_KIND_{kind.name}")


def tokens_to_proto(tokens: TokenStats) -> dataset_pb2.TokenStatistics:
    return dataset_pb2.TokenStatistics(
        tokenizer=tokens.tokenizer, min=tokens.min, median=tokens.median, p95=tokens.p95, max=tokens.max,
        total=tokens.total, truncated_count=tokens.truncated_count, max_length=tokens.max_length,
        train_tokens=tokens.train_tokens)


def tokens_from_proto(proto: dataset_pb2.TokenStatistics) -> TokenStats:
    return TokenStats(tokenizer=proto.tokenizer, min=proto.min, median=proto.median, p95=proto.p95,
                      max=proto.max, total=proto.total, truncated_count=proto.truncated_count,
                      max_length=proto.max_length, train_tokens=proto.train_tokens)


def statistics_to_proto(stats: Statistics) -> dataset_pb2.DatasetStatistics:
    # Without a tokenizer `tokens` stays unset, which estimation treats as "unknown" rather than zero.
    return dataset_pb2.DatasetStatistics(
        example_count=stats.example_count, mean_messages_per_example=stats.mean_messages_per_example,
        total_characters=stats.total_characters, duplicate_count=stats.duplicate_count,
        tokens=tokens_to_proto(stats.tokens) if stats.tokens else None,
        dropped_by_max_samples=stats.dropped_by_max_samples,
        longest_example_bytes=stats.longest_example_bytes)


def statistics_from_proto(proto: dataset_pb2.DatasetStatistics) -> Statistics:
    return Statistics(example_count=proto.example_count,
                      mean_messages_per_example=proto.mean_messages_per_example,
                      total_characters=proto.total_characters, duplicate_count=proto.duplicate_count,
                      tokens=tokens_from_proto(proto.tokens) if proto.HasField("tokens") else None,
                      dropped_by_max_samples=proto.dropped_by_max_samples,
                      longest_example_bytes=proto.longest_example_bytes)


def options_to_proto(options: DatasetOptions) -> dataset_pb2.DatasetOptions:
    return dataset_pb2.DatasetOptions(
        max_samples=options.max_samples, system_prompt=options.system_prompt,
        prompt_template=options.prompt_template, max_prompt_length=options.max_prompt_length,
        lazy_tokenize=options.lazy_tokenize, streaming=options.streaming)


def options_from_proto(proto: dataset_pb2.DatasetOptions) -> DatasetOptions:
    return DatasetOptions(
        max_samples=proto.max_samples if proto.HasField("max_samples") else None,
        system_prompt=proto.system_prompt, prompt_template=proto.prompt_template,
        max_prompt_length=proto.max_prompt_length, lazy_tokenize=proto.lazy_tokenize,
        streaming=proto.streaming)


def source_to_proto(descriptor: str) -> dataset_pb2.DatasetSource:
    """Dataset.source from the stored source_filename: an import's URI (s3://, gs://, hf://, as
    services.datasets.sources writes them) or an upload's file name."""
    if descriptor.startswith("s3://"):
        return dataset_pb2.DatasetSource(s3_uri=descriptor)
    if descriptor.startswith("gs://"):
        return dataset_pb2.DatasetSource(gcs_uri=descriptor)
    if descriptor.startswith("hf://"):
        return dataset_pb2.DatasetSource(huggingface_id=descriptor.removeprefix("hf://"))
    return dataset_pb2.DatasetSource(upload_filename=descriptor)


def dataset_to_proto(record: DatasetRecord, uri_for: UriFor) -> dataset_pb2.Dataset:
    return dataset_pb2.Dataset(
        id=record.id, organization=record.organization, name=record.name, description=record.description,
        state=state_to_proto(record.state),
        # An import's format is not known until it has read the content.
        format=(dataset_pb2.DATASET_FORMAT_UNSPECIFIED if record.state is DatasetState.PROCESSING
                else format_to_proto(record.format)),
        source=source_to_proto(record.source_filename),
        size_bytes=record.size_bytes, sha256=record.sha256,
        statistics=statistics_to_proto(record.statistics),
        splits=[dataset_pb2.DatasetSplit(kind=split_kind_to_proto(s.kind), example_count=s.example_count,
                                         uri=uri_for(s.key)) for s in record.splits],
        # Valid only once validated: not while PROCESSING, nor an import that failed before it validated.
        validation=dataset_pb2.ValidationSummary(valid=record.state is DatasetState.READY
                                                 and record.error_count == 0,
                                                 error_count=record.error_count,
                                                 warning_count=record.warning_count),
        failure_message=record.failure_message,
        create_time=to_timestamp(record.create_time), update_time=to_timestamp(record.update_time),
        options=options_to_proto(record.options), validation_dataset_id=record.validation_dataset_id,
    )


def issue_to_proto(issue: Issue) -> dataset_pb2.ValidationIssue:
    proto = dataset_pb2.ValidationIssue(
        severity=dataset_pb2.IssueSeverity.Value(f"ISSUE_SEVERITY_{issue.severity.value}"),
        code=issue.code, line=issue.line, field=issue.field, message=issue.message)
    if issue.message_index is not None:
        proto.message_index = issue.message_index
    return proto


def issue_from_proto(proto: dataset_pb2.ValidationIssue) -> Issue:
    severity = dataset_pb2.IssueSeverity.Name(proto.severity).removeprefix("ISSUE_SEVERITY_")
    return Issue(severity=Severity(severity), code=proto.code, line=proto.line, message=proto.message,
                 field=proto.field,
                 message_index=proto.message_index if proto.HasField("message_index") else None)


def report_to_proto(report: ValidationReport, dataset_id: str = "") -> dataset_pb2.ValidationReport:
    return dataset_pb2.ValidationReport(
        dataset_id=dataset_id, format=format_to_proto(report.format), valid=report.valid,
        examples_checked=report.examples_checked, error_count=report.error_count,
        warning_count=report.warning_count, issues=[issue_to_proto(i) for i in report.issues],
        issues_truncated=report.issues_truncated, statistics=statistics_to_proto(report.statistics),
        issue_limit=report.issue_limit)


def report_from_proto(proto: dataset_pb2.ValidationReport) -> ValidationReport:
    return ValidationReport(
        format=format_from_proto(proto.format) or DatasetFormat.OPENAI_CHAT,
        examples_checked=proto.examples_checked, error_count=proto.error_count,
        warning_count=proto.warning_count, issues=tuple(issue_from_proto(i) for i in proto.issues),
        issues_truncated=proto.issues_truncated, statistics=statistics_from_proto(proto.statistics),
        issue_limit=proto.issue_limit or 100)


def split_config_from_proto(proto: dataset_pb2.SplitConfig) -> SplitConfig:
    def opt(name: str) -> float | None:
        return getattr(proto, name) if proto.HasField(name) else None  # type: ignore[arg-type]

    return SplitConfig(train_fraction=opt("train_fraction"), validation_fraction=opt("validation_fraction"),
                       test_fraction=opt("test_fraction"),
                       seed=proto.seed if proto.HasField("seed") else None)


def upload_spec_from_proto(meta: dataset_service_pb2.UploadDatasetMetadata) -> UploadSpec:
    return UploadSpec(
        organization=meta.organization, name=meta.name, description=meta.description,
        format=format_from_proto(meta.format, "metadata.format"), filename=meta.filename,
        size_bytes=meta.size_bytes,
        sha256=meta.sha256, split=split_config_from_proto(meta.split), request_id=meta.request_id,
        min_examples=meta.min_examples if meta.HasField("min_examples") else None,
        tokenizer=meta.tokenizer, max_length=meta.max_length, options=options_from_proto(meta.options),
        column_mapping=dict(meta.column_mapping.columns),
        issue_limit=meta.issue_limit if meta.HasField("issue_limit") else None,
        validation_dataset=meta.validation_dataset)
