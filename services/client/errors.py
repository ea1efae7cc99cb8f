"""The errors the Python client raises: TuneForge's one error hierarchy (`tuneforge_core.errors`), rebuilt
from each failed call's google.rpc.Status, so callers catch `NotFound` and read `.reason` (a `Reason`) and
`.violations` instead of matching message strings."""

from __future__ import annotations

from tuneforge_core.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    TuneForgeError,
    Unauthenticated,
    Unavailable,
    from_rpc_error,
)
from tuneforge_core.reasons import Reason

__all__ = [
    "AlreadyExists", "FailedPrecondition", "FieldViolation", "InvalidArgument", "NotFound",
    "PermissionDenied", "Reason", "ResourceExhausted", "TuneForgeError", "Unauthenticated", "Unavailable",
    "from_rpc_error",
]
