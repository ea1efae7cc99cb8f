"""Hostile uploads the corpus cannot express (it is about files): prompt templates that would amplify the
examples, and a request_id reused for another upload. The hostile files themselves are in the corpus."""

from __future__ import annotations

import grpc
import grpc.aio
import pytest
from tuneforge.v1 import dataset_pb2
from tuneforge.v1 import dataset_service_pb2 as pb
from tuneforge.v1.dataset_service_pb2_grpc import DatasetServiceStub

from services.datasets.options import template_problems
from tests.datasets.helpers import ErrorDetails, chat_lines, jsonl, meta, upload_requests, validate_requests

TEMPLATE_FIELD = "metadata.options.prompt_template"


async def _failure(call: object) -> ErrorDetails:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return ErrorDetails(caught.value)


@pytest.mark.parametrize("template", [
    "{prompt:>50000000}", "{prompt!r}", "{prompt!s:^9}", "{system_prompt:{prompt}}", "{prompt.real}",
    "{prompt[0]}", "{prompt}{prompt}", "{0}", "{}", "{prompt", "no placeholder",
])
def test_only_plain_placeholders_make_a_template(template: str) -> None:
    assert template_problems(template), template


@pytest.mark.parametrize("template", ["{prompt}", "Q: {prompt}", "<s>{system_prompt}</s> {prompt} {{x}}"])
def test_plain_templates_are_accepted(template: str) -> None:
    assert template_problems(template) == []


async def test_a_template_with_a_format_spec_is_refused_before_reading(stub: DatasetServiceStub) -> None:
    """A 5-row upload with "{prompt:>50000000}" once stored hundreds of MB; now the metadata is refused,
    naming the options field, before a byte of the file is read."""
    data = jsonl(chat_lines(5))
    metadata = meta(min_examples=1, options=dataset_pb2.DatasetOptions(prompt_template="{prompt:>50000000}"))
    for call in (stub.UploadDataset(upload_requests(metadata, data)),  # type: ignore[arg-type]
                 stub.ValidateDataset(validate_requests(metadata, data))):  # type: ignore[arg-type]
        err = await _failure(call)
        assert (err.code, err.reason, err.fields) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT",
                                                      [TEMPLATE_FIELD])
        assert "format spec" in err.bad_request.field_violations[0].description


async def test_a_reused_request_id_with_other_bytes_is_refused(stub: DatasetServiceStub) -> None:
    """Without metadata.sha256 the content's checksum is only known once it is read: a retry's bytes are
    hashed and compared, and other bytes (or other metadata) under the same request_id are
    REQUEST_ID_REUSED, not the first dataset."""
    data, other = jsonl(chat_lines(100)), jsonl(chat_lines(100, start=1000))
    first = await stub.UploadDataset(upload_requests(meta(request_id="r-1"), data))  # type: ignore[arg-type]
    again = await stub.UploadDataset(upload_requests(meta(request_id="r-1"), data))  # type: ignore[arg-type]
    assert again.dataset == first.dataset
    for metadata, content in ((meta(request_id="r-1"), other),
                              (meta(request_id="r-1", description="another"), data),
                              (meta(name="another-name", request_id="r-1"), data)):
        err = await _failure(stub.UploadDataset(upload_requests(metadata, content)))  # type: ignore[arg-type]
        assert (err.code, err.reason, err.fields) == (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED",
                                                      ["metadata.request_id"])
    listed = await stub.ListDatasets(pb.ListDatasetsRequest(organization="acme"))
    assert [d.id for d in listed.datasets] == [first.dataset.id]


async def test_a_column_mapped_to_two_fields_is_refused_not_half_applied(stub: DatasetServiceStub) -> None:
    """Mapped columns are renamed by column: {"messages": "conv", "prompt": "conv"} renamed conv to prompt
    only, and the upload went on as PROMPT_ONLY with the messages mapping silently dropped."""
    mapping = dataset_pb2.ColumnMapping(columns={"messages": "conv", "prompt": "conv"})
    metadata = meta(min_examples=1, column_mapping=mapping)
    for call in (stub.UploadDataset(upload_requests(metadata, jsonl(chat_lines(5)))),  # type: ignore[arg-type]
                 stub.ValidateDataset(validate_requests(metadata, jsonl(chat_lines(5))))):  # type: ignore[arg-type]
        err = await _failure(call)
        assert (err.code, err.fields) == (grpc.StatusCode.INVALID_ARGUMENT,
                                          ["metadata.column_mapping.columns[prompt]"]), err.message
        assert "column 'conv' is mapped to 2 fields (messages, prompt)" in err.message


@pytest.mark.parametrize(("columns", "field", "why"), [
    ({f"f{i}": f"c{i}" for i in range(65)}, "metadata.column_mapping.columns", "at most 64 fields"),
    ({"prompt": "q" * 257}, "metadata.column_mapping.columns[prompt]", "at most 256 characters"),
    ({"p" * 100_000: "q"}, "metadata.column_mapping.columns[" + "p" * 256 + "]", "at most 256 characters"),
])
async def test_an_oversized_column_mapping_is_refused_before_reading(
        stub: DatasetServiceStub, columns: dict[str, str], field: str, why: str) -> None:
    """20,000 mappings, or 100 KB names, were taken, and every one was listed in the report's message."""
    metadata = meta(min_examples=1, column_mapping=dataset_pb2.ColumnMapping(columns=columns))
    err = await _failure(stub.ValidateDataset(validate_requests(metadata, jsonl(chat_lines(5)))))  # type: ignore[arg-type]
    assert (err.code, err.fields) == (grpc.StatusCode.INVALID_ARGUMENT, [field]), err.message
    assert why in err.bad_request.field_violations[0].description


async def test_a_dataset_reference_longer_than_any_id_or_name_is_refused(stub: DatasetServiceStub) -> None:
    """A 100 KB `dataset` was looked up in the database (and echoed, cut, in a NOT_FOUND)."""
    ref = "x" * 100_000
    for call in (stub.GetDataset(pb.GetDatasetRequest(organization="acme", dataset=ref)),
                 stub.DeleteDataset(pb.DeleteDatasetRequest(organization="acme", dataset=ref)),
                 stub.UpdateDataset(pb.UpdateDatasetRequest(organization="acme", dataset=ref)),
                 stub.SplitDataset(pb.SplitDatasetRequest(organization="acme", dataset=ref)),
                 stub.GetValidationReport(pb.GetValidationReportRequest(organization="acme", dataset=ref))):
        err = await _failure(call)
        assert (err.code, err.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["dataset"]), err.message
    metadata = meta(min_examples=1, validation_dataset=ref)
    err = await _failure(stub.UploadDataset(upload_requests(metadata, jsonl(chat_lines(5)))))  # type: ignore[arg-type]
    assert (err.code, err.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["metadata.validation_dataset"])
    assert "at most 63 characters" in err.bad_request.field_violations[0].description  # before any read
    # 63 characters, the longest name, is still looked up.
    err = await _failure(stub.GetDataset(pb.GetDatasetRequest(organization="acme", dataset="n" * 63)))
    assert err.code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(("field", "value", "where"), [
    ("description", "nice data\x1b[2J\x1b]0;pwned\x07", "U+001B at character 10"),
    ("description", "a\x00b", "U+0000"),  # refused by the call pipeline, before the service
    ("description", "ok\u009bc", "U+009B at character 3"),
    ("filename", "chat\x1b[31m.jsonl", "U+001B at character 5"),
    ("filename", "two\nlines.jsonl", "U+000A at character 4"),
])
async def test_free_text_with_control_characters_is_refused(stub: DatasetServiceStub, field: str, value: str,
                                                            where: str) -> None:
    """A description or file name another user reads with the CLI must not carry terminal control sequences
    (clear the screen, set the title...): refused naming the field and the character, nothing stored.
    Descriptions keep their tabs and line breaks."""
    data = jsonl(chat_lines(5))
    err = await _failure(stub.UploadDataset(upload_requests(  # type: ignore[arg-type]
        meta(min_examples=1, **{field: value}), data)))
    assert (err.code, err.fields) == (grpc.StatusCode.INVALID_ARGUMENT, [f"metadata.{field}"])
    assert where in err.bad_request.field_violations[0].description
    assert not (await stub.ListDatasets(pb.ListDatasetsRequest(organization="acme"))).datasets


async def test_a_description_keeps_tabs_and_line_breaks_and_updates_are_checked_too(
        stub: DatasetServiceStub) -> None:
    data = jsonl(chat_lines(5))
    created = await stub.UploadDataset(upload_requests(  # type: ignore[arg-type]
        meta(min_examples=1, description="line one\n\tline two\r\n"), data))
    assert created.dataset.description == "line one\n\tline two\r\n"
    err = await _failure(stub.UpdateDataset(pb.UpdateDatasetRequest(
        organization="acme", dataset=created.dataset.id, description="x\x1b[2J")))
    assert (err.code, err.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["description"])
