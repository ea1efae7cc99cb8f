"""Who may call: API keys, the principal a call runs as, and the audit log.

Every service process verifies credentials against the same two tables (`identity_api_keys`,
`identity_audit_events`): one SQLite file `<data_dir>/identity.db` on embedded defaults, or the shared
PostgreSQL database. The identity service (services.identity) manages them over gRPC; the kit's auth
interceptor (services.kit.auth) reads them on every call.

An API key is `tf_` and 52 random base62 characters (about 309 bits). The platform keeps its first 15
characters as a lookup prefix and the SHA-256 of the whole key, never the key: a fast hash is right for a
secret this long, as it is for GitHub's or Stripe's tokens; a password hash would only slow every call.
A verified key is cached for `cache_s` seconds in the process that verified it; revoking through this
store drops the entry at once, other processes notice within `cache_s`.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import secrets
import string
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import DateTime, Index, Integer, String, Text, UniqueConstraint, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from tuneforge.v1 import identity_pb2

from services.kit import paging
from services.kit.db import Database
from tuneforge_core.errors import AlreadyExists, FieldViolation, NotFound, Unauthenticated
from tuneforge_core.ids import new_id
from tuneforge_core.reasons import Reason

MIGRATIONS = Path(__file__).parent / "identity_migrations"
KEY_PREFIX = "tf_"
_SECRET_CHARS = 52
KEY_LENGTH = len(KEY_PREFIX) + _SECRET_CHARS
LOOKUP_CHARS = len(KEY_PREFIX) + 12
_ALPHABET = string.ascii_letters + string.digits
# A key's last use is written at most this often, so a busy key does not write on every call.
LAST_USE_EVERY_S = 60.0
# Secrets a process remembers having verified (IdentityStore.authenticate_key_cached); past this many the
# memory starts again (keys in use at once are far fewer).
VERIFIED_KEPT = 4096

ROLE_NAMES: dict[int, str] = {identity_pb2.ROLE_VIEWER: "viewer", identity_pb2.ROLE_MEMBER: "member",
              identity_pb2.ROLE_ADMIN: "admin"}
ROLES_BY_NAME: dict[str, int] = {name: role for role, name in ROLE_NAMES.items()}


class Base(DeclarativeBase):
    pass


class ApiKeyRow(Base):
    __tablename__ = "identity_api_keys"
    __table_args__ = (UniqueConstraint("organization", "name", name="uq_identity_keys_org_name"),
                      Index("ix_identity_keys_org_created", "organization", "created_at", "id"))

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    organization: Mapped[str] = mapped_column(String(63))
    name: Mapped[str] = mapped_column(String(64))
    role: Mapped[int] = mapped_column(Integer)
    lookup: Mapped[str] = mapped_column(String(LOOKUP_CHARS), unique=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_by: Mapped[str] = mapped_column(String(255), default="")


class AuditRow(Base):
    __tablename__ = "identity_audit_events"
    __table_args__ = (Index("ix_identity_audit_org_seq", "organization", "seq"),)

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    organization: Mapped[str] = mapped_column(String(63), default="")
    principal: Mapped[str] = mapped_column(String(255), default="")
    method: Mapped[str] = mapped_column(String(255))
    resource: Mapped[str] = mapped_column(String(255), default="")
    code: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text, default="")
    peer: Mapped[str] = mapped_column(String(255), default="")


@dataclass(frozen=True)
class Principal:
    """Who a call runs as. `service` principals are the platform's own services: they act in the
    organization their request names, with every right."""

    organization: str
    role: int
    name: str
    expires_at: datetime | None = None
    service: bool = False

    def to_proto(self) -> identity_pb2.Caller:
        caller = identity_pb2.Caller(organization=self.organization,
                                     role=identity_pb2.Role.ValueType(self.role), principal=self.name)
        if self.expires_at is not None:
            caller.expire_time.FromDatetime(self.expires_at)
        return caller


SERVICE_PRINCIPAL = Principal(organization="", role=identity_pb2.ROLE_ADMIN, name="service", service=True)


@dataclass(frozen=True)
class AuditRecord:
    method: str
    code: str
    organization: str = ""
    principal: str = ""
    resource: str = ""
    message: str = ""
    peer: str = ""


@dataclass(frozen=True)
class _Cached:
    id: str
    organization: str
    role: int
    secret_sha256: str
    expires_at: datetime
    revoked_at: datetime | None
    fetched_at: float

    @functools.cached_property
    def principal(self) -> Principal:
        """Who the key's calls run as (one object for every call while this entry is cached)."""
        return Principal(organization=self.organization, role=self.role, name=f"key:{self.id}",
                         expires_at=self.expires_at)

    @functools.cached_property
    def expires_epoch(self) -> float:
        return self.expires_at.timestamp()


def _utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes for what was stored as UTC."""
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _now() -> datetime:
    return datetime.now(UTC)


def _ts(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def new_secret() -> str:
    return KEY_PREFIX + "".join(secrets.choice(_ALPHABET) for _ in range(_SECRET_CHARS))


def sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


_KEY_SHAPE = re.compile(rf"{re.escape(KEY_PREFIX)}[A-Za-z0-9]{{{_SECRET_CHARS}}}")


def is_api_key(token: str) -> bool:
    """Whether `token` has an API key's shape (prefix, length, alphabet)."""
    return _KEY_SHAPE.fullmatch(token) is not None


def unauthenticated(message: str, **metadata: str) -> Unauthenticated:
    return Unauthenticated(message, reason=Reason.UNAUTHENTICATED, metadata=metadata or None)


def key_proto(row: ApiKeyRow) -> identity_pb2.ApiKey:
    return identity_pb2.ApiKey(
        id=row.id, organization=row.organization, name=row.name, role=identity_pb2.Role.ValueType(row.role),
        prefix=row.lookup,
        create_time=_ts(_utc(row.created_at)), expire_time=_ts(_utc(row.expires_at)),
        revoke_time=_ts(_utc(row.revoked_at)), last_use_time=_ts(_utc(row.last_used_at)),
        created_by=row.created_by)


def event_proto(row: AuditRow) -> identity_pb2.AuditEvent:
    return identity_pb2.AuditEvent(
        id=row.id, time=_ts(_utc(row.time)), organization=row.organization, principal=row.principal,
        method=row.method, resource=row.resource, code=row.code, message=row.message, peer=row.peer)


class IdentityStore:
    """API keys and audit events in one database, shared by every service process."""

    def __init__(self, db: Database, *, cache_s: float = 5.0) -> None:
        self.db = db
        self.cache_s = cache_s
        self._cache: dict[str, _Cached] = {}
        self._last_use: dict[str, float] = {}
        self._lock = threading.Lock()
        # Secrets verified against their cache entry (`authenticate_key_cached`): the entry they matched.
        self._verified: dict[str, _Cached] = {}

    @classmethod
    def open(cls, url: str, *, cache_s: float = 5.0, workers: int | None = None) -> IdentityStore:
        database = Database(url, "identity", workers) if workers else Database(url, "identity")
        store = cls(database, cache_s=cache_s)
        store.db.migrate(MIGRATIONS)
        return store

    def close(self) -> None:
        self.db.dispose()

    # -- keys ------------------------------------------------------------------------------------

    def create_key(self, organization: str, name: str, role: int, ttl: timedelta,
                   created_by: str) -> tuple[identity_pb2.ApiKey, str]:
        """A new key and its secret (the only time the secret exists outside the caller's hands)."""
        secret = new_secret()
        now = _now()
        row = ApiKeyRow(id=new_id("key"), organization=organization, name=name, role=role,
                        lookup=secret[:LOOKUP_CHARS], secret_sha256=sha256(secret), created_at=now,
                        expires_at=now + ttl, created_by=created_by)
        try:
            with self.db.session() as session:
                session.add(row)
        except IntegrityError:
            raise AlreadyExists(f"an API key named '{name}' already exists in organization '{organization}'",
                                violations=[FieldViolation("name", "is taken")]) from None
        return key_proto(row), secret

    def has_keys(self, organization: str) -> bool:
        with self.db.session() as session:
            return session.scalar(select(ApiKeyRow.id).where(ApiKeyRow.organization == organization)
                                  .limit(1)) is not None

    def list_keys(self, organization: str, size: int, token: str, show_inactive: bool
                  ) -> tuple[list[identity_pb2.ApiKey], str]:
        query = ("api_keys", organization, show_inactive)
        cursor = paging.decode_token(token, query, cursor_type=tuple[datetime, str])
        with self.db.session() as session:
            stmt = select(ApiKeyRow).where(ApiKeyRow.organization == organization)
            if not show_inactive:
                stmt = stmt.where(ApiKeyRow.revoked_at.is_(None), ApiKeyRow.expires_at > _now())
            if cursor is not None:
                at, last_id = cursor
                stmt = stmt.where((ApiKeyRow.created_at < at)
                                  | ((ApiKeyRow.created_at == at) & (ApiKeyRow.id < last_id)))
            rows = session.scalars(stmt.order_by(ApiKeyRow.created_at.desc(), ApiKeyRow.id.desc())
                                   .limit(size + 1)).all()
        more = len(rows) > size
        rows = rows[:size]
        next_token = paging.encode_token((_utc(rows[-1].created_at), rows[-1].id), query) if more else ""
        return [key_proto(r) for r in rows], next_token

    def revoke_key(self, organization: str, ref: str) -> identity_pb2.ApiKey:
        with self.db.session() as session:
            row = session.scalar(select(ApiKeyRow).where(
                ApiKeyRow.organization == organization,
                (ApiKeyRow.id == ref) | (ApiKeyRow.name == ref)))
            if row is None:
                raise NotFound(f"API key '{ref}' not found in organization '{organization}'",
                               violations=[FieldViolation("api_key", "no such key")])
            if row.revoked_at is None:
                row.revoked_at = _now()
            lookup = row.lookup
            key = key_proto(row)
        with self._lock:
            self._cache.pop(lookup, None)
        return key

    def authenticate_key_cached(self, secret: str) -> Principal | None:
        """`authenticate_key` when it needs no database (the key verified within `cache_s` and its last use
        recorded recently): cheap enough for the event loop. None when the database is needed."""
        now_mono = time.monotonic()
        # A secret that matched this very cache entry before: every check of `_verify` but the hash (which
        # the entry's hash cannot have changed for) and the shape (it had it). Lock-free reads of dicts.
        verified = self._verified.get(secret)
        if (verified is not None and self._cache.get(secret[:LOOKUP_CHARS]) is verified
                and now_mono - verified.fetched_at <= self.cache_s and verified.revoked_at is None
                and now_mono - self._last_use.get(verified.id, -LAST_USE_EVERY_S) < LAST_USE_EVERY_S
                and verified.expires_epoch > time.time()):
            return verified.principal
        if not is_api_key(secret):
            return None
        with self._lock:
            cached = self._cache.get(secret[:LOOKUP_CHARS])
            if cached is None or now_mono - cached.fetched_at > self.cache_s:
                return None
            if now_mono - self._last_use.get(cached.id, -LAST_USE_EVERY_S) >= LAST_USE_EVERY_S:
                return None
        principal = self._verify(secret, cached, now_mono)
        if len(self._verified) >= VERIFIED_KEPT:
            self._verified.clear()
        self._verified[secret] = cached
        return principal

    def authenticate_key(self, secret: str) -> Principal:
        """The principal of an API key, or Unauthenticated saying why (never quoting the secret)."""
        if not is_api_key(secret):
            raise unauthenticated("the credential is not a TuneForge API key (expected 'tf_' and 52 "
                                  "letters or digits)")
        lookup = secret[:LOOKUP_CHARS]
        now_mono = time.monotonic()
        with self._lock:
            cached = self._cache.get(lookup)
        if cached is None or now_mono - cached.fetched_at > self.cache_s:
            with self.db.session() as session:
                row = session.scalar(select(ApiKeyRow).where(ApiKeyRow.lookup == lookup))
                if row is None:
                    raise unauthenticated("the API key is not known (it may have been deleted or typed "
                                          "wrong)")
                expires_at = _utc(row.expires_at)
                assert expires_at is not None
                cached = _Cached(row.id, row.organization, row.role, row.secret_sha256, expires_at,
                                 _utc(row.revoked_at), now_mono)
            with self._lock:
                self._cache[lookup] = cached
        return self._verify(secret, cached, now_mono)

    def _verify(self, secret: str, cached: _Cached, now_mono: float) -> Principal:
        lookup = secret[:LOOKUP_CHARS]
        if not hmac.compare_digest(cached.secret_sha256, sha256(secret)):
            raise unauthenticated("the API key is not known (it may have been deleted or typed wrong)")
        if cached.revoked_at is not None:
            raise unauthenticated(f"API key {lookup}… was revoked at {cached.revoked_at:%Y-%m-%d %H:%M:%S} "
                                  "UTC", organization=cached.organization)
        if cached.expires_epoch <= time.time():
            raise unauthenticated(f"API key {lookup}… expired at {cached.expires_at:%Y-%m-%d %H:%M:%S} UTC",
                                  organization=cached.organization)
        self._touch(cached.id, now_mono)
        return cached.principal

    def _touch(self, key_id: str, now_mono: float) -> None:
        with self._lock:
            if now_mono - self._last_use.get(key_id, -LAST_USE_EVERY_S) < LAST_USE_EVERY_S:
                return
            self._last_use[key_id] = now_mono
        with self.db.session() as session:
            row = session.get(ApiKeyRow, key_id)
            if row is not None:
                row.last_used_at = _now()

    def key_organization(self, lookup: str) -> str:
        """The organization of the key with this lookup prefix, or "" (for auditing a refused key)."""
        with self.db.session() as session:
            return session.scalar(select(ApiKeyRow.organization).where(ApiKeyRow.lookup == lookup)) or ""

    # -- audit -----------------------------------------------------------------------------------

    def record(self, records: Sequence[AuditRecord]) -> None:
        if not records:
            return
        now = _now()
        with self.db.session() as session:
            session.add_all([AuditRow(id=new_id("aud"), time=now, organization=r.organization[:63],
                                      principal=r.principal[:255], method=r.method[:255],
                                      resource=r.resource[:255], code=r.code, message=r.message[:2000],
                                      peer=r.peer[:255]) for r in records])

    def list_events(self, organization: str, size: int, token: str, method: str, failures_only: bool
                    ) -> tuple[list[identity_pb2.AuditEvent], str]:
        query = ("audit", organization, method, failures_only)
        cursor = paging.decode_token(token, query, cursor_type=int)
        with self.db.session() as session:
            stmt = select(AuditRow).where(AuditRow.organization == organization)
            if method:
                stmt = stmt.where(AuditRow.method == method if method.startswith("/")
                                  else AuditRow.method.endswith("/" + method))
            if failures_only:
                stmt = stmt.where(AuditRow.code != "OK")
            if cursor is not None:
                stmt = stmt.where(AuditRow.seq < cursor)
            rows = session.scalars(stmt.order_by(AuditRow.seq.desc()).limit(size + 1)).all()
        more = len(rows) > size
        rows = rows[:size]
        return [event_proto(r) for r in rows], paging.encode_token(rows[-1].seq, query) if more else ""

