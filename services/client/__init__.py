"""The TuneForge Python client: typed calls over the gRPC stubs, typed exceptions from status details."""

from services.client.client import TuneForgeClient
from services.client.downloads import ChecksumMismatch, DownloadError, LinkRefused
from services.client.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Reason,
    ResourceExhausted,
    TuneForgeError,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "AlreadyExists", "ChecksumMismatch", "DownloadError", "FailedPrecondition", "InvalidArgument",
    "LinkRefused", "NotFound", "PermissionDenied", "Reason", "ResourceExhausted", "TuneForgeClient",
    "TuneForgeError", "Unauthenticated", "Unavailable",
]
