"""The datasets service as the estimation service sees it: one lookup, over gRPC.

The dataset's NOT_FOUND or INVALID_ARGUMENT is the caller's problem and keeps its code and details (field
`dataset` becomes `spec.dataset`); an unreachable datasets service is DEPENDENCY_UNAVAILABLE.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
import grpc.aio
from tuneforge.v1 import dataset_pb2, dataset_service_pb2, dataset_service_pb2_grpc

from tuneforge_core.errors import error_from_rpc_error


class GrpcDatasetLookup:
    """`DatasetLookup` over DatasetService.GetDataset; the channel is resolved per call."""

    def __init__(self, channel: Callable[[], grpc.aio.Channel], timeout_s: float = 10.0) -> None:
        self._channel = channel
        self._timeout_s = timeout_s

    async def get_dataset(self, organization: str, dataset: str) -> dataset_pb2.Dataset:
        stub = dataset_service_pb2_grpc.DatasetServiceStub(self._channel())
        request = dataset_service_pb2.GetDatasetRequest(organization=organization, dataset=dataset)
        try:
            response = await stub.GetDataset(request, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc_error(
                exc, service="datasets", field_map={"dataset": "spec.dataset"}
            ) from exc
        return response.dataset
