"""gRPC status -> HTTP status and google.rpc.Status JSON, in one place.

The HTTP status follows grpc-gateway's table, so HTTP clients see what they would from any gateway of a
Google-style API; the body is the google.rpc.Status the service sent (with its ErrorInfo and BadRequest
details), or one the gateway builds for input it refused before calling a service.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import grpc
from google.protobuf import any_pb2, json_format
from google.rpc import code_pb2, error_details_pb2, status_pb2

from tuneforge_core.errors import ERROR_DOMAIN
from tuneforge_core.reasons import Reason

log = logging.getLogger(__name__)

DOMAIN = ERROR_DOMAIN

HTTP_STATUS: dict[int, int] = {
    code_pb2.OK: 200,
    code_pb2.CANCELLED: 499,
    code_pb2.UNKNOWN: 500,
    code_pb2.INVALID_ARGUMENT: 400,
    code_pb2.DEADLINE_EXCEEDED: 504,
    code_pb2.NOT_FOUND: 404,
    code_pb2.ALREADY_EXISTS: 409,
    code_pb2.PERMISSION_DENIED: 403,
    code_pb2.RESOURCE_EXHAUSTED: 429,
    code_pb2.FAILED_PRECONDITION: 400,
    code_pb2.ABORTED: 409,
    code_pb2.OUT_OF_RANGE: 400,
    code_pb2.UNIMPLEMENTED: 501,
    code_pb2.INTERNAL: 500,
    code_pb2.UNAVAILABLE: 503,
    code_pb2.DATA_LOSS: 500,
    code_pb2.UNAUTHENTICATED: 401,
}

_DETAILS_KEY = "grpc-status-details-bin"


def http_status(code: int) -> int:
    return HTTP_STATUS.get(code, 500)


def status_of(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    """The google.rpc.Status a failed call carried (from its trailers), or one made of its code and
    message when it carried none (e.g. UNAVAILABLE from the channel itself)."""
    code = error.code()
    for key, value in error.trailing_metadata() or ():
        if key == _DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status()
            try:
                status.ParseFromString(value)
            except Exception:  # a malformed trailer: fall back to code and message
                break
            if status.code == code.value[0]:
                return status
            break
    message = error.details() or ""
    status = status_pb2.Status(code=code.value[0], message=message)
    if code == grpc.StatusCode.UNAVAILABLE:
        info = error_details_pb2.ErrorInfo(reason=Reason.DEPENDENCY_UNAVAILABLE, domain=DOMAIN,
                                           metadata={"service": "tuneforge gRPC services"})
        status.message = f"the TuneForge services cannot be reached right now: {message}"
        status.details.add().Pack(info)
    return status


def retry_after(status: status_pb2.Status) -> str | None:
    """The Retry-After header (whole seconds, at least 1) of a status whose RetryInfo says when to retry
    (RESOURCE_EXHAUSTED over the calls per second); None when it says nothing."""
    retry = error_details_pb2.RetryInfo()
    for detail in status.details:
        if detail.Is(retry.DESCRIPTOR) and detail.Unpack(retry):
            return str(max(1, math.ceil(retry.retry_delay.ToNanoseconds() / 1e9)))
    return None


def status_json(status: status_pb2.Status) -> bytes:
    """The Status as JSON; details of a type this process does not know are dropped, not fatal."""
    try:
        return json_format.MessageToJson(status, indent=None, ensure_ascii=False).encode()
    except (TypeError, KeyError, json_format.Error):
        known = status_pb2.Status(code=status.code, message=status.message)
        for detail in status.details:
            try:
                json_format.MessageToJson(detail)
            except (TypeError, KeyError, json_format.Error):
                log.warning("dropping a status detail of unknown type %s", detail.type_url)
                continue
            known.details.append(detail)
        return json_format.MessageToJson(known, indent=None, ensure_ascii=False).encode()


def bad_request(violations: list[tuple[str, str]], *,
                reason: Reason = Reason.INVALID_ARGUMENT) -> status_pb2.Status:
    """INVALID_ARGUMENT with an ErrorInfo and a BadRequest naming each field."""
    message = "; ".join(f"{f}: {d}" if f else d for f, d in violations)
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message)
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN)
    if violations and violations[0][0]:
        info.metadata["field"] = violations[0][0]
    details = error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in violations])
    for detail in (info, details):
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    return status


def simple(code: int, message: str, reason: Reason, **metadata: str) -> status_pb2.Status:
    """A status with one ErrorInfo."""
    status = status_pb2.Status(code=code, message=message)
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata))
    return status


def sse_error(status: status_pb2.Status) -> bytes:
    return b"event: error\ndata: " + status_json(status) + b"\n\n"


def as_dict(status: status_pb2.Status) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(status_json(status))
    return parsed
