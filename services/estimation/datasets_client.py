"""The datasets service as the estimation service sees it: one lookup, over gRPC.

The dataset's NOT_FOUND or INVALID_ARGUMENT is the caller's problem and keeps its code and details (field
`dataset` becomes `spec.dataset`); an unreachable datasets service is DEPENDENCY_UNAVAILABLE.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import grpc
import grpc.aio
from google.rpc import error_details_pb2, status_pb2
from tuneforge.v1 import dataset_pb2, dataset_service_pb2, dataset_service_pb2_grpc

from services.kit.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    TuneForgeError,
    Unavailable,
)

_STATUS_DETAILS_KEY = "grpc-status-details-bin"
_PROPAGATED: dict[grpc.StatusCode, type[TuneForgeError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
}
_PASSED_ON = {*_PROPAGATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
              grpc.StatusCode.OUT_OF_RANGE}


def error_from_rpc_error(exc: grpc.aio.AioRpcError, *, service: str,
                         field_map: Mapping[str, str] | None = None) -> TuneForgeError:
    """The kit error equivalent to another service's error status (the same helper as the metrics
    service's; both go once the kit has one)."""
    code = exc.code()
    if code not in _PASSED_ON:
        return Unavailable(f"The {service} service is unavailable ({code.name}); retry later.",
                           metadata={"service": service, "code": code.name})
    reason, metadata, violations = "", {}, []
    for key, value in exc.trailing_metadata() or ():
        if key != _STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        for detail in status_pb2.Status.FromString(value).details:
            info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
            if detail.Unpack(info):
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Unpack(bad):
                violations = [FieldViolation((field_map or {}).get(v.field, v.field), v.description)
                              for v in bad.field_violations]
    cls = _PROPAGATED.get(code, TuneForgeError)
    error = cls(exc.details() or code.name, reason=reason or None, violations=violations, metadata=metadata)
    if cls is TuneForgeError:
        error.code = code
        error.reason = reason or code.name
    return error


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
            raise error_from_rpc_error(exc, service="datasets",
                                       field_map={"dataset": "spec.dataset"}) from exc
        return response.dataset
