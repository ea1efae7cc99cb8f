"""Typed exceptions unpacked from google.rpc.Status details, so callers catch `NotFoundError` and read
`.reason` and `.violations` instead of matching message strings."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


@dataclass(frozen=True)
class Violation:
    field: str
    description: str


class TuneForgeError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "",
                 metadata: dict[str, str] | None = None, violations: list[Violation] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata = metadata or {}
        self.violations = violations or []

    def __str__(self) -> str:
        lines = [f"{self.code.name}: {self.message}"]
        lines += [f"  - {v.field}: {v.description}" for v in self.violations]
        return "\n".join(lines)


class InvalidArgumentError(TuneForgeError):
    pass


class NotFoundError(TuneForgeError):
    pass


class AlreadyExistsError(TuneForgeError):
    pass


class FailedPreconditionError(TuneForgeError):
    pass


class UnavailableError(TuneForgeError):
    pass


_BY_CODE: dict[grpc.StatusCode, type[TuneForgeError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
}


def from_rpc_error(err: grpc.RpcError) -> TuneForgeError:
    code: grpc.StatusCode = err.code()  # type: ignore[attr-defined]
    message: str = err.details() or code.name  # type: ignore[attr-defined]
    reason, metadata, violations = "", {}, []
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations = [Violation(v.field, v.description) for v in bad.field_violations]
    return _BY_CODE.get(code, TuneForgeError)(code, message, reason, metadata, violations)
