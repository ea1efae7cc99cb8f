"""The TuneForge Python client: typed calls over the gRPC stubs, typed exceptions from status details."""

from services.client.client import TuneForgeClient
from services.client.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    TuneForgeError,
    UnavailableError,
)

__all__ = [
    "AlreadyExistsError", "FailedPreconditionError", "InvalidArgumentError", "NotFoundError",
    "TuneForgeClient", "TuneForgeError", "UnavailableError",
]
