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
