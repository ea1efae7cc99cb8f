"""DatasetService over gRPC: unpacks requests, calls the manager, packs responses. No rules here; errors
are raised as kit errors and mapped to statuses by the kit's interceptor."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc.aio
from tuneforge.v1 import dataset_service_pb2 as pb
from tuneforge.v1 import dataset_service_pb2_grpc

from services.datasets.converters import (
    dataset_to_proto,
    report_to_proto,
    split_config_from_proto,
    state_from_proto,
    upload_spec_from_proto,
)
from services.datasets.manager import DatasetManager
from services.datasets.sources import import_request_from_proto
from tuneforge_core.errors import FieldViolation, InvalidArgument

Context: TypeAlias = grpc.aio.ServicerContext


async def _open_upload(requests: AsyncIterator[Any]) -> tuple[pb.UploadDatasetMetadata, AsyncIterator[bytes]]:
    """The metadata of an upload stream, and an iterator over the chunks that follow it."""
    stream = aiter(requests)
    first = await anext(stream, None)
    if first is None or first.WhichOneof("payload") != "metadata":
        raise InvalidArgument("The first message of the stream must carry metadata; chunks follow it.",
                              violations=[FieldViolation("metadata", "must be set in the first message")])

    async def chunks() -> AsyncIterator[bytes]:
        async for message in stream:
            if message.WhichOneof("payload") == "metadata":
                raise InvalidArgument("Only the first message of the stream may carry metadata.",
                                      violations=[FieldViolation("metadata", "sent twice")])
            yield message.chunk

    return first.metadata, chunks()


class DatasetServicer(dataset_service_pb2_grpc.DatasetServiceServicer):
    def __init__(self, manager: DatasetManager) -> None:
        self.manager = manager

    def _dataset(self, record: Any) -> Any:
        return dataset_to_proto(record, self.manager.store.uri)

    async def UploadDataset(self, request_iterator: AsyncIterator[pb.UploadDatasetRequest],
                            context: Context) -> pb.UploadDatasetResponse:
        metadata, chunks = await _open_upload(request_iterator)
        record, report = await self.manager.uploads.upload(upload_spec_from_proto(metadata), chunks)
        return pb.UploadDatasetResponse(dataset=self._dataset(record),
                                        report=report_to_proto(report, record.id))

    async def ValidateDataset(self, request_iterator: AsyncIterator[pb.ValidateDatasetRequest],
                              context: Context) -> pb.ValidateDatasetResponse:
        metadata, chunks = await _open_upload(request_iterator)
        report = await self.manager.uploads.validate(upload_spec_from_proto(metadata), chunks)
        return pb.ValidateDatasetResponse(report=report_to_proto(report))

    async def CreateDataset(self, request: pb.CreateDatasetRequest,
                            context: Context) -> pb.CreateDatasetResponse:
        # The request as sent, credentials included, is kept only sealed (the manager encrypts it), so an
        # interrupted import can resume; no response carries it.
        record = await self.manager.imports.create(import_request_from_proto(request),
                                                   request.SerializeToString())
        return pb.CreateDatasetResponse(dataset=self._dataset(record))

    async def GetDataset(self, request: pb.GetDatasetRequest, context: Context) -> pb.GetDatasetResponse:
        record = await self.manager.get(request.organization, request.dataset)
        return pb.GetDatasetResponse(dataset=self._dataset(record))

    async def ListDatasets(self, request: pb.ListDatasetsRequest,
                           context: Context) -> pb.ListDatasetsResponse:
        records, token = await self.manager.list(request.organization, request.page_size, request.page_token,
                                                 state_from_proto(request.state))
        return pb.ListDatasetsResponse(datasets=[self._dataset(r) for r in records], next_page_token=token)

    async def UpdateDataset(self, request: pb.UpdateDatasetRequest,
                            context: Context) -> pb.UpdateDatasetResponse:
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        record = await self.manager.update(request.organization, request.dataset, request.description, paths)
        return pb.UpdateDatasetResponse(dataset=self._dataset(record))

    async def DeleteDataset(self, request: pb.DeleteDatasetRequest,
                            context: Context) -> pb.DeleteDatasetResponse:
        await self.manager.delete(request.organization, request.dataset)
        return pb.DeleteDatasetResponse()

    async def SplitDataset(self, request: pb.SplitDatasetRequest,
                           context: Context) -> pb.SplitDatasetResponse:
        record = await self.manager.split(request.organization, request.dataset,
                                          split_config_from_proto(request.split))
        return pb.SplitDatasetResponse(dataset=self._dataset(record))

    async def GetValidationReport(self, request: pb.GetValidationReportRequest,
                                  context: Context) -> pb.GetValidationReportResponse:
        record, report = await self.manager.validation_report(request.organization, request.dataset)
        return pb.GetValidationReportResponse(report=report_to_proto(report, record.id))
