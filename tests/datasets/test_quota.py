"""An organization keeps at most TUNEFORGE_MAX_DATASET_BYTES_PER_ORG of dataset files; past it an upload is
refused before anything is stored, and other organizations are not affected."""

from __future__ import annotations

import grpc
import grpc.aio
from tuneforge.v1 import dataset_service_pb2 as pb
from tuneforge.v1 import dataset_service_pb2_grpc

from services.datasets.settings import DatasetSettings
from tests.auth import service_credentials
from tests.datasets.helpers import ErrorDetails, chat_lines, jsonl, meta, serving, upload_requests

DATA = jsonl(chat_lines(120))


async def test_an_organization_past_its_dataset_bytes_is_refused(datasets_settings: DatasetSettings) -> None:
    settings = datasets_settings.model_copy(update={"max_dataset_bytes_per_org": len(DATA) * 3 // 2})
    async with serving(settings) as address, grpc.aio.insecure_channel(
            address, interceptors=service_credentials()) as channel:
        stub = dataset_service_pb2_grpc.DatasetServiceStub(channel)
        first = await stub.UploadDataset(upload_requests(meta(name="first"), DATA))  # type: ignore[arg-type]
        # The declared size is checked before a byte is read; the received size before anything is stored.
        for metadata in (meta(name="declared", size_bytes=len(DATA)), meta(name="undeclared")):
            try:
                await stub.UploadDataset(upload_requests(metadata, DATA))  # type: ignore[arg-type]
                raise AssertionError("the upload past the quota was accepted")
            except grpc.aio.AioRpcError as exc:
                err = ErrorDetails(exc)
                assert (err.code, err.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "QUOTA_EXCEEDED")
                assert "TUNEFORGE_MAX_DATASET_BYTES_PER_ORG" in err.message
        listed = await stub.ListDatasets(pb.ListDatasetsRequest(organization="acme"))
        assert [d.name for d in listed.datasets] == ["first"]
        # Another organization has its own allowance; freeing space lets acme upload again.
        await stub.UploadDataset(upload_requests(meta(organization="bravo", name="theirs"), DATA))  # type: ignore[arg-type]
        await stub.DeleteDataset(pb.DeleteDatasetRequest(organization="acme", dataset=first.dataset.id))
        again = await stub.UploadDataset(upload_requests(meta(name="second"), DATA))  # type: ignore[arg-type]
        assert again.dataset.name == "second"
