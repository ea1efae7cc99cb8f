"""Domain errors and their one mapping to gRPC statuses.

Domain code raises these (it knows nothing of gRPC); `ErrorMappingInterceptor` turns them into a
google.rpc.Status with an ErrorInfo (domain "tuneforge.dev", reason from tuneforge.v1.ErrorReason) and, for
invalid input, a BadRequest listing every field violation. Anything else becomes INTERNAL with a generic
message: internals never leak to callers, and the traceback goes to the log with a correlation id.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.kit.ids import new_id

log = logging.getLogger(__name__)

ERROR_DOMAIN = "tuneforge.dev"


@dataclass(frozen=True)
class FieldViolation:
    """One bad field, line or example: `field` is a request path ("spec.lora.rank") or "line 7"."""

    field: str
    description: str


class TuneForgeError(Exception):
    """Base of the domain errors; subclasses fix the gRPC code and the default ErrorReason."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason: str = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None,
                 violations: list[FieldViolation] | None = None,
                 metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.violations = list(violations or [])
        self.metadata = dict(metadata or {})


class InvalidArgument(TuneForgeError):
    code, default_reason = grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"


class NotFound(TuneForgeError):
    code, default_reason = grpc.StatusCode.NOT_FOUND, "NOT_FOUND"


class AlreadyExists(TuneForgeError):
    code, default_reason = grpc.StatusCode.ALREADY_EXISTS, "ALREADY_EXISTS"


class FailedPrecondition(TuneForgeError):
    code, default_reason = grpc.StatusCode.FAILED_PRECONDITION, "JOB_STATE_CONFLICT"


class ResourceExhausted(TuneForgeError):
    code, default_reason = grpc.StatusCode.RESOURCE_EXHAUSTED, "UPLOAD_TOO_LARGE"


class DataLoss(TuneForgeError):
    code, default_reason = grpc.StatusCode.DATA_LOSS, "CHECKSUM_MISMATCH"


class Unimplemented(TuneForgeError):
    code, default_reason = grpc.StatusCode.UNIMPLEMENTED, "NOT_IMPLEMENTED"


class Unavailable(TuneForgeError):
    code, default_reason = grpc.StatusCode.UNAVAILABLE, "DEPENDENCY_UNAVAILABLE"


def not_found(kind: str, ident: str, organization: str = "") -> NotFound:
    where = f" in organization '{organization}'" if organization else ""
    return NotFound(f"{kind} '{ident}' was not found{where}.",
                    metadata={"resource_type": kind, "resource": ident, "organization": organization})


class Violations:
    """Collects every problem of a request so the caller learns them all at once, not one per retry."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field_path: str, description: str) -> None:
        self.items.append(FieldViolation(field_path, description))

    def check(self, ok: bool, field_path: str, description: str) -> bool:
        if not ok:
            self.add(field_path, description)
        return ok

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self, summary: str, reason: str = "INVALID_ARGUMENT") -> None:
        if self.items:
            first = self.items[0]
            more = f" (and {len(self.items) - 1} more)" if len(self.items) > 1 else ""
            raise InvalidArgument(f"{summary}: {first.field}: {first.description}{more}",
                                  reason=reason, violations=self.items)


def error_status(code: grpc.StatusCode, message: str, reason: str,
                 metadata: Mapping[str, str] | None = None,
                 violations: list[FieldViolation] | None = None) -> status_pb2.Status:
    """Builds the google.rpc.Status that both RPC errors and Job.error use."""
    details = []
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN,
                                       metadata={k: str(v) for k, v in (metadata or {}).items() if v})
    packed = any_pb2.Any()
    packed.Pack(info)
    details.append(packed)
    if violations:
        bad = error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in violations
        ])
        packed_bad = any_pb2.Any()
        packed_bad.Pack(bad)
        details.append(packed_bad)
    return status_pb2.Status(code=code.value[0], message=message, details=details)


def status_from_exception(exc: BaseException) -> status_pb2.Status:
    if isinstance(exc, TuneForgeError):
        return error_status(exc.code, exc.message, exc.reason, exc.metadata, exc.violations)
    incident = new_id("err")
    log.error("unhandled error (incident %s)", incident, exc_info=exc)
    return error_status(grpc.StatusCode.INTERNAL,
                        f"Internal error; the server logged it as incident {incident}.",
                        "INTERNAL", {"incident": incident})


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    status = status_from_exception(exc)
    await context.abort_with_status(rpc_status.to_status(status))


def _wrap_unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc)

    return wrapper


def _wrap_stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in behavior(request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc)

    return wrapper


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """The one place where exceptions become gRPC statuses, for every RPC shape."""

    async def intercept_service(self, continuation: Callable[..., Any],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary), handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(handler.stream_unary), handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream), handler.request_deserializer,
                handler.response_serializer)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                _wrap_stream(handler.stream_stream), handler.request_deserializer,
                handler.response_serializer)
        return handler


# -- errors of other services ----------------------------------------------------------------------

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
    """The kit error equivalent to another service's error status, for services calling each other.

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


__all__ = [
    "ERROR_DOMAIN", "AlreadyExists", "DataLoss", "ErrorMappingInterceptor", "FailedPrecondition",
    "FieldViolation", "InvalidArgument", "NotFound", "ResourceExhausted", "TuneForgeError", "Unavailable",
    "Unimplemented", "Violations", "error_from_rpc_error", "error_status", "not_found",
    "status_from_exception",
]
