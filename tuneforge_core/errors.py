"""The one error hierarchy of TuneForge, on both sides of the wire.

Domain code raises these (it knows nothing of gRPC servers); the kit's call pipeline (services.kit.pipeline)
turns them into a google.rpc.Status with an ErrorInfo (domain "tuneforge.dev", reason a `Reason`) and, for
invalid input, a BadRequest listing every field violation. A full disk or database (ENOSPC, EDQUOT,
SQLITE_FULL, PostgreSQL's disk_full) becomes RESOURCE_EXHAUSTED saying so, for the caller to retry later.
Anything else becomes INTERNAL with a generic message: internals never leak to callers, and the traceback
goes to the log with an incident id.

The way back is the same classes: `error_from_status` rebuilds the typed error from an RPC's status, so the
Python client raises `NotFound` with `.reason`, `.violations` and `.retry_after_s`, and a service calling
another one re-raises the callee's error as its own (`error_from_rpc_error`).
"""

from __future__ import annotations

import errno
import logging
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from tuneforge_core.ids import new_id
from tuneforge_core.reasons import Reason

log = logging.getLogger(__name__)

ERROR_DOMAIN = "tuneforge.dev"


@dataclass(frozen=True)
class FieldViolation:
    """One bad field, line or example: `field` is a request path ("spec.lora.rank") or "line 7"."""

    field: str
    description: str


class TuneForgeError(Exception):
    """Base of every TuneForge error; subclasses fix the gRPC code and the default reason.

    `reason` is a `Reason` for errors this code raises; an error rebuilt from another server's status keeps
    that server's reason string as it came (`Reason(...)` when it is one of ours).
    """

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason: Reason = Reason.INTERNAL

    def __init__(
        self,
        message: str,
        *,
        reason: Reason | None = None,
        violations: list[FieldViolation] | None = None,
        metadata: Mapping[str, str] | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason: Reason | str = reason or self.default_reason
        self.violations = list(violations or [])
        self.metadata = dict(metadata or {})
        # When retrying makes sense, and after how long: a google.rpc.RetryInfo on the wire (the REST
        # gateway's Retry-After header). None: the server does not say.
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        lines = [f"{self.code.name}: {self.message}"]
        lines += [f"  - {v.field}: {v.description}" for v in self.violations]
        return "\n".join(lines)


class InvalidArgument(TuneForgeError):
    code, default_reason = grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_ARGUMENT


class NotFound(TuneForgeError):
    code, default_reason = grpc.StatusCode.NOT_FOUND, Reason.NOT_FOUND


class AlreadyExists(TuneForgeError):
    code, default_reason = grpc.StatusCode.ALREADY_EXISTS, Reason.ALREADY_EXISTS


class FailedPrecondition(TuneForgeError):
    code, default_reason = grpc.StatusCode.FAILED_PRECONDITION, Reason.JOB_STATE_CONFLICT


class ResourceExhausted(TuneForgeError):
    code, default_reason = grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.UPLOAD_TOO_LARGE


class DataLoss(TuneForgeError):
    code, default_reason = grpc.StatusCode.DATA_LOSS, Reason.CHECKSUM_MISMATCH


class Unimplemented(TuneForgeError):
    code, default_reason = grpc.StatusCode.UNIMPLEMENTED, Reason.NOT_IMPLEMENTED


class Unavailable(TuneForgeError):
    code, default_reason = grpc.StatusCode.UNAVAILABLE, Reason.DEPENDENCY_UNAVAILABLE


class PermissionDenied(TuneForgeError):
    code, default_reason = grpc.StatusCode.PERMISSION_DENIED, Reason.SOURCE_ACCESS_DENIED


class Unauthenticated(TuneForgeError):
    code, default_reason = grpc.StatusCode.UNAUTHENTICATED, Reason.SOURCE_ACCESS_DENIED


# Every class above, by the code it stands for (the way back from a status).
ERROR_CLASSES: dict[grpc.StatusCode, type[TuneForgeError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument, NotFound, AlreadyExists, FailedPrecondition, ResourceExhausted, DataLoss,
        Unimplemented, Unavailable, PermissionDenied, Unauthenticated,
    )
}


def not_found(kind: str, ident: str, organization: str = "") -> NotFound:
    where = f" in organization '{organization}'" if organization else ""
    return NotFound(f"{kind} '{ident}' was not found{where}.",
                    metadata={"resource_type": kind, "resource": ident, "organization": organization})


def invalid(field: str, description: str, summary: str = "request is invalid") -> InvalidArgument:
    """INVALID_ARGUMENT with one field violation."""
    return InvalidArgument(f"{summary}: {field}: {description}",
                           violations=[FieldViolation(field, description)])


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

    def raise_if_any(self, summary: str, reason: Reason = Reason.INVALID_ARGUMENT) -> None:
        if self.items:
            first = self.items[0]
            more = f" (and {len(self.items) - 1} more)" if len(self.items) > 1 else ""
            raise InvalidArgument(f"{summary}: {first.field}: {first.description}{more}",
                                  reason=reason, violations=self.items)


def error_status(code: grpc.StatusCode, message: str, reason: Reason | str,
                 metadata: Mapping[str, str] | None = None,
                 violations: list[FieldViolation] | None = None,
                 retry_after_s: float | None = None) -> status_pb2.Status:
    """Builds the google.rpc.Status that both RPC errors and Job.error use: an ErrorInfo, a BadRequest
    with the violations, a RetryInfo with `retry_after_s`."""
    details = []
    info = error_details_pb2.ErrorInfo(reason=str(reason), domain=ERROR_DOMAIN,
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
    if retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(max(0, round(retry_after_s * 1e9)))
        packed_retry = any_pb2.Any()
        packed_retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(packed_retry)
    return status_pb2.Status(code=code.value[0], message=message, details=details)


# errno values of a full disk, and SQLSTATE disk_full (PostgreSQL).
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_PG_DISK_FULL = "53100"


def full_storage(exc: BaseException) -> str | None:
    """What is full when `exc` (or an error it wraps, SQLAlchemy's `.orig` or a cause) says space ran out:
    "disk" for an OSError ENOSPC/EDQUOT, "database" for SQLite's "database or disk is full" (SQLITE_FULL)
    or PostgreSQL's disk_full; None for anything else."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _FULL_ERRNOS:
            return "disk"
        if isinstance(current, sqlite3.Error) and (
                getattr(current, "sqlite_errorcode", -1) & 0xFF == sqlite3.SQLITE_FULL
                or "database or disk is full" in str(current)):
            return "database"
        if _PG_DISK_FULL in (getattr(current, "sqlstate", None), getattr(current, "pgcode", None)):
            return "database"
        orig = getattr(current, "orig", None)  # sqlalchemy.exc.DBAPIError wraps the driver's error
        todo += [orig if isinstance(orig, BaseException) else None, current.__cause__,
                 None if current.__suppress_context__ else current.__context__]
    return None


def status_from_exception(exc: BaseException) -> status_pb2.Status:
    """The status an RPC that raised `exc` answers: a TuneForgeError's own; RESOURCE_EXHAUSTED
    (QUOTA_EXCEEDED, metadata "resource": disk or database) when the server's disk or database is full
    (`full_storage`), so the caller retries later; INTERNAL with an incident id for anything else. The
    last two are logged with their incident id and traceback."""
    if isinstance(exc, TuneForgeError):
        return error_status(exc.code, exc.message, exc.reason, exc.metadata, exc.violations,
                            exc.retry_after_s)
    incident = new_id("err")
    full = full_storage(exc)
    if full is not None:
        log.error("the server's %s is full (incident %s)", full, incident, exc_info=exc)
        what = "disk" if full == "disk" else "database (its disk)"
        return error_status(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"The server's {what} is full, so the request could not be completed; retry "
                            f"later (incident {incident}).",
                            Reason.QUOTA_EXCEEDED, {"resource": full, "incident": incident})
    log.error("unhandled error (incident %s)", incident, exc_info=exc)
    return error_status(grpc.StatusCode.INTERNAL,
                        f"Internal error; the server logged it as incident {incident}.",
                        Reason.INTERNAL, {"incident": incident})


# -- the way back: a status into the same typed errors ------------------------------------------------

def _reason(value: str) -> Reason | str:
    try:
        return Reason(value)
    except ValueError:
        return value  # a newer server's reason: kept as it came


def error_from_status(code: grpc.StatusCode, message: str, status: status_pb2.Status | None,
                      field_map: Mapping[str, str] | None = None) -> TuneForgeError:
    """The typed error for an RPC's code and rich status (ErrorInfo and BadRequest details unpacked).

    `field_map` renames violation fields from the callee's request to the caller's ("job" -> "job_id").
    """
    reason: Reason | str = ""
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    retry_after_s: float | None = None
    for detail in status.details if status is not None else ():
        info, bad, retry = (error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest(),
                            error_details_pb2.RetryInfo())
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR) and detail.Unpack(info):
            reason, metadata = _reason(info.reason), dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR) and detail.Unpack(bad):
            violations = [FieldViolation((field_map or {}).get(v.field, v.field), v.description)
                          for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR) and detail.Unpack(retry):
            retry_after_s = retry.retry_delay.ToNanoseconds() / 1e9
    cls = ERROR_CLASSES.get(code, TuneForgeError)
    error = cls(message or code.name, violations=violations, metadata=metadata, retry_after_s=retry_after_s)
    if reason:
        error.reason = reason
    if cls is TuneForgeError:  # a code without a class of its own (CANCELLED, DEADLINE_EXCEEDED, ...)
        error.code = code
        error.reason = reason or code.name
    return error


def from_rpc_error(err: grpc.RpcError) -> TuneForgeError:
    """The typed error of a failed call, with the server's code kept (what the Python client raises)."""
    code: grpc.StatusCode = err.code()
    message: str = err.details() or code.name
    return error_from_status(code, message, rpc_status.from_call(err))


# Codes about the caller's request or identity: passed on as they are, not blamed on the dependency.
_PASSED_ON = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.OUT_OF_RANGE,
})


def error_from_rpc_error(exc: grpc.aio.AioRpcError, *, service: str,
                         field_map: Mapping[str, str] | None = None) -> TuneForgeError:
    """Another service's error as ours, for services calling each other: the caller's own mistakes pass on
    with their code, reason and fields; anything else is that dependency being unavailable."""
    code = exc.code()
    if code not in _PASSED_ON:
        return Unavailable(f"The {service} service is unavailable ({code.name}); retry later.",
                           metadata={"service": service, "code": code.name})
    rich = None
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            rich = status_pb2.Status.FromString(value)
    return error_from_status(code, exc.details() or code.name, rich, field_map)


__all__ = [
    "ERROR_CLASSES", "ERROR_DOMAIN", "AlreadyExists", "DataLoss", "FailedPrecondition", "FieldViolation",
    "InvalidArgument", "NotFound", "PermissionDenied", "ResourceExhausted", "TuneForgeError",
    "Unauthenticated", "Unavailable", "Unimplemented", "Violations", "error_from_rpc_error",
    "error_from_status", "error_status", "from_rpc_error", "full_storage", "invalid", "not_found",
    "status_from_exception",
]
