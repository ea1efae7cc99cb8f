"""Credentials for tests: the service token the in-test service processes accept, and API keys made on a
running platform through its own ApiKeyService (so tests authenticate the way callers do)."""

from __future__ import annotations

import secrets
import uuid
from pathlib import Path

import grpc
import grpc.aio
from tuneforge.v1 import identity_pb2

from services.client import TuneForgeClient
from services.client.client import with_api_key
from services.kit.auth import bearer_interceptors
from services.kit.keyfiles import secret_file
from services.kit.runtime import SERVICE_TOKEN_FILE

# Given to every in-test service process through `kit_settings` (tests/conftest.py).
SERVICE_TOKEN = "tfs_tests_" + secrets.token_hex(16)
SERVICE_METADATA = (("authorization", f"Bearer {SERVICE_TOKEN}"),)
ROLES = {"viewer": identity_pb2.ROLE_VIEWER, "member": identity_pb2.ROLE_MEMBER,
         "admin": identity_pb2.ROLE_ADMIN}


def service_credentials() -> list[grpc.aio.ClientInterceptor]:
    """Interceptors for a grpc.aio channel to an in-test service process: calls run as the platform."""
    return bearer_interceptors(SERVICE_TOKEN)


def platform_token(data_dir: Path) -> str:
    """The service token a platform started by `Platform` generated in its data dir."""
    return secret_file(data_dir, SERVICE_TOKEN_FILE).read_text().strip()


def make_key(address: str, data_dir: Path, org: str, role: str = "admin") -> str:
    """A new API key of `org` with `role` on the platform at `address`; returns its secret."""
    with TuneForgeClient(address, org, api_key=platform_token(data_dir)) as service:
        return service.create_api_key(f"tests-{uuid.uuid4().hex[:10]}", ROLES[role]).secret


def org_client(address: str, data_dir: Path, org: str, role: str = "admin",
               **kwargs: object) -> TuneForgeClient:
    """A client holding a fresh `role` key of `org` (close it, or use it in a with block)."""
    return TuneForgeClient(address, api_key=make_key(address, data_dir, org, role), **kwargs)  # type: ignore[arg-type]


def keyed_channel(channel: grpc.Channel, api_key: str) -> grpc.Channel:
    """`channel` with every call carrying `api_key`."""
    return with_api_key(channel, api_key)
