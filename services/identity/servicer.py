"""ApiKeyService and AuditService over gRPC.

The kit's auth interceptor has already authenticated the caller, checked that its role is admin (the
RPCs' access option) and filled `organization` with the caller's organization; these servicers validate
the rest and call the identity store (services.kit.identity) in a worker thread.
"""

from __future__ import annotations

import re
from datetime import timedelta

import grpc.aio
from tuneforge.v1 import (
    api_key_service_pb2,
    api_key_service_pb2_grpc,
    audit_service_pb2,
    audit_service_pb2_grpc,
    identity_pb2,
)

from services.kit import paging
from services.kit.auth import current_principal
from services.kit.identity import ROLE_NAMES, IdentityStore
from services.kit.validation import ID_LIKE_NAME, ID_LIKE_RE, check_organization
from tuneforge_core.errors import Violations
from tuneforge_core.settings import KitSettings

KEY_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}\Z")
MIN_TTL = timedelta(hours=1)
MAX_METHOD_CHARS = 255


class ApiKeyServicer(api_key_service_pb2_grpc.ApiKeyServiceServicer):
    def __init__(self, store: IdentityStore, settings: KitSettings) -> None:
        self.store = store
        self.default_ttl = timedelta(days=settings.api_key_default_ttl_days)
        self.max_ttl = timedelta(days=settings.api_key_max_ttl_days)

    async def CreateApiKey(self, request: api_key_service_pb2.CreateApiKeyRequest,
                           context: grpc.aio.ServicerContext) -> api_key_service_pb2.CreateApiKeyResponse:
        v = Violations()
        check_organization(v, request.organization)
        if not KEY_NAME_RE.match(request.name):
            v.add("name", "must be 1-64 characters of letters, digits, '.', '_' or '-'")
        elif ID_LIKE_RE.match(request.name):
            v.add("name", ID_LIKE_NAME)
        if request.role not in ROLE_NAMES:
            v.add("role", "must be ROLE_VIEWER, ROLE_MEMBER or ROLE_ADMIN")
        ttl = self.default_ttl
        if request.HasField("ttl"):
            seconds = request.ttl.seconds
            in_range = MIN_TTL.total_seconds() <= seconds <= self.max_ttl.total_seconds()
            if not in_range or request.ttl.nanos < 0:
                v.add("ttl", f"must be between 1 hour and {self.max_ttl.days} days "
                             "(TUNEFORGE_API_KEY_MAX_TTL_DAYS)")
            else:
                ttl = timedelta(seconds=seconds)
        v.raise_if_any("the API key request is invalid")
        key, secret = await self.store.db.pool.run(self.store.create_key, request.organization, request.name,
                                              request.role, ttl, current_principal().name)
        return api_key_service_pb2.CreateApiKeyResponse(api_key=key, secret=secret)

    async def ListApiKeys(self, request: api_key_service_pb2.ListApiKeysRequest,
                          context: grpc.aio.ServicerContext) -> api_key_service_pb2.ListApiKeysResponse:
        v = Violations()
        check_organization(v, request.organization)
        v.raise_if_any("the request is invalid")
        size = paging.page_size(request.page_size)
        keys, token = await self.store.db.pool.run(self.store.list_keys, request.organization, size,
                                              request.page_token, request.show_inactive)
        return api_key_service_pb2.ListApiKeysResponse(api_keys=keys, next_page_token=token)

    async def RevokeApiKey(self, request: api_key_service_pb2.RevokeApiKeyRequest,
                           context: grpc.aio.ServicerContext) -> api_key_service_pb2.RevokeApiKeyResponse:
        v = Violations()
        check_organization(v, request.organization)
        if not request.api_key:
            v.add("api_key", "is required (the key's id or name)")
        elif len(request.api_key) > 64:
            v.add("api_key", "is not a key id or name (at most 64 characters)")
        v.raise_if_any("the request is invalid")
        key = await self.store.db.pool.run(self.store.revoke_key, request.organization, request.api_key)
        return api_key_service_pb2.RevokeApiKeyResponse(api_key=key)

    async def GetCaller(self, request: api_key_service_pb2.GetCallerRequest,
                        context: grpc.aio.ServicerContext) -> api_key_service_pb2.GetCallerResponse:
        return api_key_service_pb2.GetCallerResponse(caller=current_principal().to_proto())


class AuditServicer(audit_service_pb2_grpc.AuditServiceServicer):
    def __init__(self, store: IdentityStore) -> None:
        self.store = store

    async def ListAuditEvents(self, request: audit_service_pb2.ListAuditEventsRequest,
                              context: grpc.aio.ServicerContext) -> audit_service_pb2.ListAuditEventsResponse:
        v = Violations()
        check_organization(v, request.organization)
        if len(request.method) > MAX_METHOD_CHARS:
            v.add("method", f"must be at most {MAX_METHOD_CHARS} characters")
        v.raise_if_any("the request is invalid")
        size = paging.page_size(request.page_size)
        events, token = await self.store.db.pool.run(self.store.list_events, request.organization, size,
                                                request.page_token, request.method, request.failures_only)
        return audit_service_pb2.ListAuditEventsResponse(events=events, next_page_token=token)


__all__ = ["ApiKeyServicer", "AuditServicer", "identity_pb2"]
