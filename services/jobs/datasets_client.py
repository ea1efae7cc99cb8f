"""The jobs service's view of the datasets service: a gRPC call, with its errors turned into ours."""

from __future__ import annotations

import grpc.aio
from tuneforge.v1 import dataset_pb2, dataset_service_pb2, dataset_service_pb2_grpc

from tuneforge_core.errors import error_from_rpc_error


class DatasetLookup:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = dataset_service_pb2_grpc.DatasetServiceStub(channel)

    async def get(self, organization: str, ref: str, field: str) -> dataset_pb2.Dataset:
        """The dataset, or the datasets service's error with its field renamed to ours (`spec.dataset`)."""
        try:
            response = await self._stub.GetDataset(
                dataset_service_pb2.GetDatasetRequest(organization=organization, dataset=ref), timeout=30)
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc_error(err, service="datasets", field_map={"dataset": field}) from err
        return response.dataset
