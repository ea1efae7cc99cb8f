"""The jobs service as the metrics service sees it: one lookup, over gRPC.

A job's NOT_FOUND or INVALID_ARGUMENT is the caller's problem, so it is re-raised as the same kit error
(same code, reason and field violations); an unreachable or failing jobs service is DEPENDENCY_UNAVAILABLE.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import grpc
import grpc.aio
from google.rpc import error_details_pb2, status_pb2
from tuneforge.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc

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
# Codes about the caller's request or identity: passed on as they are, not blamed on the dependency.
_PASSED_ON = {*_PROPAGATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
              grpc.StatusCode.OUT_OF_RANGE}


def _rich_status(exc: grpc.aio.AioRpcError) -> status_pb2.Status | None:
    for key, value in exc.trailing_metadata() or ():
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    return None


def error_from_rpc_error(exc: grpc.aio.AioRpcError, *, service: str,
                         field_map: Mapping[str, str] | None = None) -> TuneForgeError:
    """The kit error equivalent to another service's error status (kept here until the kit has one).

    `field_map` renames violation fields from the callee's request to ours ("job" -> "job_id").
    """
    code = exc.code()
    if code not in _PASSED_ON:
        return Unavailable(f"The {service} service is unavailable ({code.name}); retry later.",
                           metadata={"service": service, "code": code.name})
    reason, metadata, violations = "", {}, []
    rich = _rich_status(exc)
    for detail in rich.details if rich else ():
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


class GrpcJobLookup:
    """`JobLookup` over JobService.GetJob; the channel is resolved per call (the own server's address is
    only known once it listens)."""

    def __init__(self, channel: Callable[[], grpc.aio.Channel], timeout_s: float = 10.0) -> None:
        self._channel = channel
        self._timeout_s = timeout_s

    async def get_job(self, organization: str, job: str) -> job_pb2.Job:
        stub = job_service_pb2_grpc.JobServiceStub(self._channel())
        try:
            response = await stub.GetJob(job_service_pb2.GetJobRequest(organization=organization, job=job),
                                         timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc_error(exc, service="jobs", field_map={"job": "job_id"}) from exc
        return response.job
