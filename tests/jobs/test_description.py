"""A job's description is free text that `tuneforge jobs get` and the console show as it is: CreateJob
refuses one holding control characters (a terminal escape sequence would be obeyed by the reader's
terminal), naming the field and the character, and keeps tabs and line breaks. Through the served jobs
component over gRPC, as a client calls it; the datasets service is a stand-in that returns a READY
dataset."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from tuneforge.v1 import dataset_pb2, job_pb2, job_service_pb2, job_service_pb2_grpc

from tests.auth import service_credentials
from tests.jobs.served import served_jobs
from tuneforge_core.settings import KitSettings

ORG = "acme"


class Datasets:
    """GetDataset as the jobs service sees it: one READY chat dataset."""

    async def get(self, organization: str, ref: str, field: str) -> dataset_pb2.Dataset:
        split = dataset_pb2.DatasetSplit(kind=dataset_pb2.DATASET_SPLIT_KIND_TRAIN, example_count=90,
                                         uri=f"file:///objects/datasets/{ORG}/{ref}/train.jsonl")
        return dataset_pb2.Dataset(id=f"ds_{ref}", name=ref, organization=ORG,
                                   state=dataset_pb2.DATASET_STATE_READY,
                                   format=dataset_pb2.DATASET_FORMAT_OPENAI_CHAT, splits=[split])


@pytest.fixture
async def stub(kit_settings: KitSettings) -> AsyncIterator[job_service_pb2_grpc.JobServiceStub]:
    async with served_jobs(kit_settings, "jobs-description-test") as (jobs, address):
        jobs.manager.datasets = Datasets()  # type: ignore[assignment]
        async with grpc.aio.insecure_channel(address, interceptors=service_credentials()) as channel:
            yield job_service_pb2_grpc.JobServiceStub(channel)


def request(description: str, *, validate_only: bool = True) -> job_service_pb2.CreateJobRequest:
    return job_service_pb2.CreateJobRequest(
        organization=ORG, description=description, validate_only=validate_only,
        spec=job_pb2.JobSpec(base_model="acme/tiny-model", dataset="chat"))


def violations(exc: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    status = rpc_status.from_call(exc)
    assert status is not None
    out: list[tuple[str, str]] = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            out += [(v.field, v.description) for v in bad.field_violations]
    return out


@pytest.mark.parametrize(("text", "found"), [
    ("nice run \x1b]0;pwned\x07", "U+001B at character 10"),  # sets the terminal's title
    ("\x1b[2J\x1b[Hcleared", "U+001B at character 1"),  # clears the reader's screen
    ("vertical\x0btab", "U+000B at character 9"),
    ("del\x7f", "U+007F at character 4"),
    ("bell\x07", "U+0007 at character 5"),
    ("c1 \x9b31m", "U+009B at character 4"),  # the one-character CSI
])
async def test_a_description_with_control_characters_is_refused(
    stub: job_service_pb2_grpc.JobServiceStub, text: str, found: str
) -> None:
    for validate_only in (True, False):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.CreateJob(request(text, validate_only=validate_only))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violations(caught.value) == [
            ("description", f"must not contain control characters other than tab and line breaks ({found})")]
    listed = await stub.ListJobs(job_service_pb2.ListJobsRequest(organization=ORG))
    assert list(listed.jobs) == [], "nothing was created"


async def test_a_description_keeps_tabs_and_line_breaks(stub: job_service_pb2_grpc.JobServiceStub) -> None:
    text = "Tuning run\n\tlr 2e-4\r\nsecond line é ✓"
    checked = await stub.CreateJob(request(text))
    assert checked.job.description == text
    created = await stub.CreateJob(request(text, validate_only=False))
    got = await stub.GetJob(job_service_pb2.GetJobRequest(organization=ORG, job=created.job.id))
    assert got.job.description == text


async def test_the_description_length_is_still_limited(stub: job_service_pb2_grpc.JobServiceStub) -> None:
    assert (await stub.CreateJob(request("x" * 1024))).job.description == "x" * 1024
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateJob(request("x" * 1025))
    assert violations(caught.value) == [("description", "must be at most 1024 characters")]
