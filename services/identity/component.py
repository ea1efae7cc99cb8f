"""The identity service: API keys and the audit log over gRPC, and the first admin key.

The tables live in the kit (services.kit.identity) because every service process checks calls against
them; this component only manages them. On start, when `bootstrap_admin_key_file` is set (`tuneforge up`
sets `<data_dir>/admin.key`), the file does not exist and the default organization has no key yet, it
creates an admin key for the default organization and writes it there (mode 0600), so the CLI and the
demo work with no extra step. The key is not written anywhere else; delete the file once the key is
kept elsewhere, or revoke the key.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from tuneforge.v1 import api_key_service_pb2_grpc, audit_service_pb2_grpc, identity_pb2

from services.identity.servicer import ApiKeyServicer, AuditServicer
from services.kit.runtime import Component, Registration, Runtime

log = logging.getLogger(__name__)

DEFAULT_ORGANIZATION = "default"
BOOTSTRAP_KEY_NAME = "admin"


class IdentityComponent(Component):
    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        self.store = runtime.identity

    def registrations(self) -> Sequence[Registration]:
        return [
            Registration("tuneforge.v1.ApiKeyService", ApiKeyServicer(self.store, self.runtime.settings),
                         api_key_service_pb2_grpc.add_ApiKeyServiceServicer_to_server),
            Registration("tuneforge.v1.AuditService", AuditServicer(self.store),
                         audit_service_pb2_grpc.add_AuditServiceServicer_to_server),
        ]

    async def start(self) -> None:
        path = self.runtime.settings.bootstrap_admin_key_file
        if path:
            await self.store.db.pool.run(self.bootstrap_admin_key, Path(path))

    def bootstrap_admin_key(self, path: Path) -> bool:
        """Creates the default organization's first admin key in `path`; False when there is nothing to do."""
        if path.exists():
            return False
        if self.store.has_keys(DEFAULT_ORGANIZATION):
            log.warning("%s does not exist but organization '%s' already has API keys: not creating another "
                        "admin key (create one with `tuneforge keys create`)", path, DEFAULT_ORGANIZATION)
            return False
        ttl = timedelta(days=self.runtime.settings.api_key_max_ttl_days)
        _key, secret = self.store.create_key(DEFAULT_ORGANIZATION, BOOTSTRAP_KEY_NAME,
                                             identity_pb2.ROLE_ADMIN, ttl, "platform")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, (secret + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(path)
        log.info("created the first admin key of organization '%s' in %s", DEFAULT_ORGANIZATION, path)
        return True
