"""Error reasons: the Python face of `tuneforge.v1.ErrorReason` (errors.proto).

Every reason TuneForge puts into an ErrorInfo, a Job.error or a worker's failure is a member of `Reason`;
its value is the proto value's name, which is exactly what travels in `ErrorInfo.reason` (the enum's values
carry no `ERROR_REASON_` prefix, as google.api.ErrorReason's do, so the name is the reason in every
language). `tests/core/test_domain_core.py` fails when this list and the proto enum disagree, so a new
reason is added to errors.proto first.
"""

from __future__ import annotations

from enum import StrEnum

from tuneforge.v1 import errors_pb2


class Reason(StrEnum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    DATASET_INVALID = "DATASET_INVALID"
    DATASET_NOT_READY = "DATASET_NOT_READY"
    CHECKSUM_MISMATCH = "CHECKSUM_MISMATCH"
    UPLOAD_TOO_LARGE = "UPLOAD_TOO_LARGE"
    JOB_STATE_CONFLICT = "JOB_STATE_CONFLICT"
    REQUEST_ID_REUSED = "REQUEST_ID_REUSED"
    INVALID_PAGE_TOKEN = "INVALID_PAGE_TOKEN"
    NOT_IMPLEMENTED = "NOT_IMPLEMENTED"
    DEPENDENCY_UNAVAILABLE = "DEPENDENCY_UNAVAILABLE"
    INTERNAL = "INTERNAL"
    SOURCE_ACCESS_DENIED = "SOURCE_ACCESS_DENIED"
    INSUFFICIENT_HARDWARE = "INSUFFICIENT_HARDWARE"
    DATASET_IN_USE = "DATASET_IN_USE"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    QUOTA_EXCEEDED = "QUOTA_EXCEEDED"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    BAD_TRAINING_DATA = "BAD_TRAINING_DATA"
    LOSS_DIVERGED = "LOSS_DIVERGED"
    DEPENDENCY_ERROR = "DEPENDENCY_ERROR"
    CANCELLED = "CANCELLED"
    WORKER_LOST = "WORKER_LOST"
    TRAINING_FAILED = "TRAINING_FAILED"

    @property
    def proto_value(self) -> int:
        """The number of this reason in `tuneforge.v1.ErrorReason`."""
        return errors_pb2.ErrorReason.Value(self.value)


# Reasons a training run can end FAILED with (the worker's vocabulary).
TRAINING_FAILURES = frozenset({
    Reason.OUT_OF_MEMORY,
    Reason.MODEL_NOT_FOUND,
    Reason.BAD_TRAINING_DATA,
    Reason.LOSS_DIVERGED,
    Reason.DEPENDENCY_ERROR,
    Reason.TRAINING_FAILED,
})
