"""The jobs service's view of the datasets service: a gRPC call, with its errors turned into ours."""

from __future__ import annotations

import grpc
import grpc.aio
from tuneforge.v1 import dataset_pb2, dataset_service_pb2, dataset_service_pb2_grpc

from services.kit.errors import FieldViolation, InvalidArgument, NotFound, Unavailable


class DatasetLookup:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = dataset_service_pb2_grpc.DatasetServiceStub(channel)

    async def get(self, organization: str, ref: str, field: str) -> dataset_pb2.Dataset:
        try:
            response = await self._stub.GetDataset(
                dataset_service_pb2.GetDatasetRequest(organization=organization, dataset=ref), timeout=30)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(f"{field}: dataset '{ref}' was not found in organization '{organization}'",
                               metadata={"resource_type": "dataset", "resource": ref, "field": field},
                               violations=[FieldViolation(field, "no such dataset")]) from err
            if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidArgument(f"{field}: {err.details()}",
                                      violations=[FieldViolation(field, err.details() or "invalid")]) from err
            raise Unavailable(f"the datasets service could not be reached ({err.code().name})") from err
        return response.dataset
