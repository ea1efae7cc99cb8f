"""Authentication, authorization and the audit trail of every RPC, in one gate per method.

Each call carries `authorization: Bearer <credential>`: an API key (services.kit.identity), an OIDC token
of a configured issuer (services.kit.oidc), or the platform's service token (the services' calls to each
other). `CallAuth` checks it before the request is even parsed, then:

- the RPC's `(tuneforge.v1.access)` option (protos/tuneforge/v1/access.proto) says what it needs; a
  viewer may READ, a member also WRITE, an admin also ADMIN. A role without the right is
  PERMISSION_DENIED. `check_access_declared` refuses to serve a method that does not state its access.
- the organization comes from the credential: every `organization` field of the request (top level, or
  in a message the request holds, like UploadDataset's metadata) is filled with it, and a request that
  names another organization is PERMISSION_DENIED naming the field. So every lookup below runs in the
  caller's organization, and another organization's resources are simply not found. Only the service
  principal acts in the organization its request names.
- an organization may make `api_calls_per_second` calls per second to one process (burst of twice as
  many); past that, RESOURCE_EXHAUSTED with reason QUOTA_EXCEEDED names the setting, and its RetryInfo
  says when the organization's next call is let in. It may also hold
  `api_streams_per_organization` streams (server-streaming and bidirectional calls: StreamMetrics,
  WatchJob...) open at once on one process; one more is refused the same way, naming that setting.
- every call that may change something (WRITE and ADMIN RPCs) and every refused credential or role is
  written to the audit log: principal, organization, method, resource, status code, peer.

Health checking and reflection stay open, as load balancers and grpcurl expect; they reveal no data.
The principal of the running call is `current_principal()`.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import hmac
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import grpc
import grpc.aio
from google.protobuf import descriptor, descriptor_pool
from google.protobuf.message import Message
from tuneforge.v1 import access_pb2

from services.kit.identity import (
    ROLE_NAMES,
    ROLES_BY_NAME,
    SERVICE_PRINCIPAL,
    AuditRecord,
    IdentityStore,
    Principal,
    is_api_key,
    unauthenticated,
)
from tuneforge_core.errors import (
    FieldViolation,
    PermissionDenied,
    ResourceExhausted,
    TuneForgeError,
    status_from_exception,
)
from tuneforge_core.reasons import Reason

log = logging.getLogger(__name__)

AUTH_HEADER = "authorization"
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1.", "/grpc.reflection.v1alpha.")
ACCESS_NAMES: dict[int, str] = {access_pb2.ACCESS_READ: "READ", access_pb2.ACCESS_WRITE: "WRITE",
                access_pb2.ACCESS_ADMIN: "ADMIN"}
# The least role that has each access (roles and accesses are both ordered).
_LEAST_ROLE: dict[int, str] = {access_pb2.ACCESS_READ: "viewer", access_pb2.ACCESS_WRITE: "member",
               access_pb2.ACCESS_ADMIN: "admin"}
# Request and response fields that name the resource a call is about, for the audit log.
_RESOURCE_FIELDS = ("job", "dataset", "api_key", "name", "deployment")

_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("tuneforge_principal",
                                                                             default=None)


def current_principal() -> Principal:
    """The principal of the call being served (set by its MethodGate)."""
    principal = _principal.get()
    if principal is None:
        raise unauthenticated("this call was not authenticated")
    return principal


# -- what each method needs -----------------------------------------------------------------------

@functools.lru_cache(maxsize=512)
def method_access(method: str) -> int:
    """The `access` option of "/package.Service/Method", or ACCESS_UNSPECIFIED."""
    service_name, _, name = method.lstrip("/").partition("/")
    try:
        service = descriptor_pool.Default().FindServiceByName(service_name)
    except KeyError:
        return access_pb2.ACCESS_UNSPECIFIED
    found = service.methods_by_name.get(name)
    if found is None:
        return access_pb2.ACCESS_UNSPECIFIED
    return int(found.GetOptions().Extensions[access_pb2.access])


def check_access_declared(service_names: Sequence[str]) -> None:
    """Raises RuntimeError naming every method of these services without an `access` option."""
    missing = []
    for service_name in service_names:
        service = descriptor_pool.Default().FindServiceByName(service_name)
        for method in service.methods:
            if method_access(f"/{service_name}/{method.name}") == access_pb2.ACCESS_UNSPECIFIED:
                missing.append(f"{service_name}.{method.name}")
    if missing:
        raise RuntimeError("these RPCs do not declare their (tuneforge.v1.access) option: "
                           + ", ".join(missing))


def mutating(access: int) -> bool:
    return access in (access_pb2.ACCESS_WRITE, access_pb2.ACCESS_ADMIN)


# -- who is calling ---------------------------------------------------------------------------------

class OidcLike(Protocol):
    """What the authenticator needs of an OIDC verifier (services.kit.oidc.OidcVerifier)."""

    def verify(self, token: str) -> Any: ...


def _looks_like_jwt(token: str) -> bool:
    parts = token.split(".")
    return len(parts) == 3 and all(parts) and all(
        c.isalnum() or c in "-_" for part in parts for c in part)


class Authenticator:
    """Turns the `authorization` metadata of a call into a Principal, or raises Unauthenticated."""

    def __init__(self, store: IdentityStore, service_token: str, oidc: OidcLike | None = None) -> None:
        self.store = store
        self._service_token = service_token
        self.oidc = oidc

    @staticmethod
    def credential(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
        """The bearer credential of `metadata`: None when there is none, raises when it is malformed."""
        values = [v for k, v in (metadata or ()) if k.lower() == AUTH_HEADER]
        if not values:
            return None
        if len(values) > 1:
            raise unauthenticated("the call carries more than one authorization header")
        value = values[0] if isinstance(values[0], str) else ""
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthenticated("the authorization header must be 'Bearer <API key or token>'")
        return token.strip()

    @staticmethod
    def describe(token: str | None) -> str:
        """What a refused credential looked like, for the audit log (never the secret itself)."""
        if token is None:
            return "none"
        if is_api_key(token):
            return f"key prefix {token[:15]}…"
        return "bearer token"

    def authenticate_fast(self, token: str | None) -> Principal | None:
        """The principal when no I/O is needed to know it (the service token, or an API key verified
        moments ago), for the event loop; None sends the call to `authenticate` on a database thread. A
        refusal it can decide alone (a revoked or expired cached key) raises as `authenticate` would."""
        if token is None:
            return None
        if self._service_token and hmac.compare_digest(token.encode(), self._service_token.encode()):
            return SERVICE_PRINCIPAL
        return self.store.authenticate_key_cached(token)

    def authenticate(self, token: str | None) -> Principal:
        if token is None:
            raise unauthenticated("this call carries no credential: send 'authorization: Bearer <API key>' "
                                  "(an admin makes keys with `tuneforge keys create`; the CLI and the "
                                  "Python client read TUNEFORGE_API_KEY)")
        if self._service_token and hmac.compare_digest(token.encode(), self._service_token.encode()):
            return SERVICE_PRINCIPAL
        if is_api_key(token):
            return self.store.authenticate_key(token)
        if self.oidc is not None and _looks_like_jwt(token):
            from services.kit.oidc import TokenRejected  # the optional dependency, imported when used

            try:
                identity = self.oidc.verify(token)
            except TokenRejected as exc:
                raise unauthenticated(f"the bearer token was refused: {exc}") from None
            return Principal(organization=identity.organization, role=ROLES_BY_NAME[identity.role],
                             name=f"oidc:{identity.issuer}#{identity.subject}",
                             expires_at=_expiry(identity.expires_at))
        raise unauthenticated("the credential is neither a TuneForge API key nor a token of a configured "
                              "OIDC issuer")


def _expiry(epoch: float | None) -> Any:
    from datetime import UTC, datetime

    return None if epoch is None else datetime.fromtimestamp(epoch, UTC)


# -- calls per second -------------------------------------------------------------------------------

class RateLimiter:
    """A token bucket per organization: `rate` calls a second, bursts of twice that."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst = max(1.0, 2 * rate)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def allow(self, organization: str) -> bool:
        return self.wait_s(organization) == 0.0

    def wait_s(self, organization: str) -> float:
        """0.0: the call is let in (and takes a token); else the seconds until the organization's next
        token, and the call is not let in."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get(organization, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            if tokens < 1:
                self._buckets[organization] = (tokens, now)
                return (1 - tokens) / self.rate
            self._buckets[organization] = (tokens - 1, now)
            return 0.0


class StreamLimiter:
    """Streams open per organization in this process, at most `limit` each (0: no limit). Used from the
    event loop's thread only."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    def open(self, organization: str) -> bool:
        held = self._open.get(organization, 0)
        if 0 < self.limit <= held:
            return False
        self._open[organization] = held + 1
        return True

    def close(self, organization: str) -> None:
        held = self._open.get(organization, 0) - 1
        if held > 0:
            self._open[organization] = held
        else:
            self._open.pop(organization, None)

    def held(self, organization: str) -> int:
        return self._open.get(organization, 0)


# -- the organization of a request --------------------------------------------------------------------

@functools.lru_cache(maxsize=512)
def _organization_paths(message_type: descriptor.Descriptor) -> tuple[tuple[str, ...], ...]:
    """Paths to the `organization` string fields of a request: its own, and those of the singular
    message fields it holds (one level down)."""
    paths: list[tuple[str, ...]] = []
    own = message_type.fields_by_name.get("organization")
    if own is not None and own.type == descriptor.FieldDescriptor.TYPE_STRING:
        paths.append(("organization",))
    for field in message_type.fields:
        if field.type != descriptor.FieldDescriptor.TYPE_MESSAGE or _repeated(field):
            continue
        inner = field.message_type.fields_by_name.get("organization") if field.message_type else None
        if inner is not None and inner.type == descriptor.FieldDescriptor.TYPE_STRING:
            paths.append((field.name, "organization"))
    return tuple(paths)


def _repeated(field: Any) -> bool:
    return bool(field.is_repeated)


def scope_request(request: Any, principal: Principal) -> None:
    """Fills every organization field of `request` with the principal's organization; a request naming
    another one is PERMISSION_DENIED. The service principal's requests keep the organization they name."""
    if not isinstance(request, Message) or principal.service:
        return
    for path in _organization_paths(request.DESCRIPTOR):
        holder: Any = request
        if len(path) == 2:
            if not request.HasField(path[0]):
                continue
            holder = getattr(request, path[0])
        value = holder.organization
        if value and value != principal.organization:
            field = ".".join(path)
            raise PermissionDenied(
                f"this credential belongs to organization '{principal.organization}' and cannot act in "
                f"organization '{value}'", reason=Reason.PERMISSION_DENIED,
                violations=[FieldViolation(field, "must be empty or the credential's organization")])
        holder.organization = principal.organization


def resource_of(message: Any) -> str:
    """The resource a request or response names (its job, dataset, ...), for the audit log."""
    if not isinstance(message, Message):
        return ""
    for name in _RESOURCE_FIELDS:
        field = message.DESCRIPTOR.fields_by_name.get(name)
        if field is None or _repeated(field):
            continue
        value = getattr(message, name)
        if isinstance(value, str) and value:
            return value
        if isinstance(value, Message) and message.HasField(name):
            inner = getattr(value, "id", "")
            if isinstance(inner, str) and inner:
                return inner
    return ""


# -- the gate ---------------------------------------------------------------------------------------

class CallAuth:
    """Authenticates, authorizes, scopes, rate-limits and audits every call; see the module docstring.

    `for_method` gives each method its `MethodGate` (None for the open ones), which the server's call
    pipeline (services.kit.pipeline) runs inside the method's handler before the request is parsed."""

    def __init__(self, authenticator: Authenticator, *, calls_per_second: float = 0.0,
                 streams_per_organization: int = 0) -> None:
        self.authenticator = authenticator
        self.limiter = RateLimiter(calls_per_second)
        self.calls_per_second = calls_per_second
        self.streams = StreamLimiter(streams_per_organization)

    @contextmanager
    def stream_held(self, principal: Principal) -> Iterator[None]:
        """Counts a stream of `principal`'s organization while it is open; RESOURCE_EXHAUSTED when the
        organization already holds `api_streams_per_organization` here (the service principal has no
        limit)."""
        if principal.service:
            yield
            return
        organization = principal.organization
        if not self.streams.open(organization):
            limit = self.streams.limit
            raise ResourceExhausted(
                f"organization '{organization}' already holds {limit} open streams on this service process, "
                "its limit (TUNEFORGE_API_STREAMS_PER_ORGANIZATION); close one, or retry later",
                reason=Reason.QUOTA_EXCEEDED,
                metadata={"limit": "api_streams_per_organization", "value": str(limit)})
        try:
            yield
        finally:
            self.streams.close(organization)

    def for_method(self, method: str) -> MethodGate | None:
        """The gate of "/package.Service/Method"; None for health checking and reflection."""
        return None if method.startswith(PUBLIC_PREFIXES) else MethodGate(self, method)

    def authorize(self, principal: Principal, access: int, method: str) -> None:
        if principal.service:
            return
        if access == access_pb2.ACCESS_UNSPECIFIED or principal.role < access:
            role = ROLE_NAMES.get(principal.role, "unknown")
            needed = _LEAST_ROLE.get(access, "an access this method does not declare")
            raise PermissionDenied(
                f"role {role} may not call {method.rsplit('/', 1)[-1]} (it needs {needed} or above)",
                reason=Reason.PERMISSION_DENIED,
                metadata={"role": role, "required": ACCESS_NAMES.get(access, "UNSPECIFIED")})
        wait_s = self.limiter.wait_s(principal.organization)
        if wait_s:
            raise ResourceExhausted(
                f"organization '{principal.organization}' is over its limit of {self.calls_per_second:g} "
                f"calls per second (TUNEFORGE_API_CALLS_PER_SECOND); retry in {wait_s:.2f} s",
                reason=Reason.QUOTA_EXCEEDED,
                metadata={"limit": "api_calls_per_second", "value": f"{self.calls_per_second:g}"},
                retry_after_s=wait_s)

    async def audit(self, context: grpc.aio.ServicerContext, method: str, organization: str, who: str,
                    code: str, message: str = "", resource: str = "") -> None:
        store = self.authenticator.store
        record = AuditRecord(method=method, code=code, organization=organization, principal=who,
                             resource=resource, message=message, peer=_peer(context))
        try:
            await store.db.pool.run(store.record, [record])
        except Exception:
            log.exception("could not write the audit event of %s", method)


class MethodGate:
    """What one method's calls go through before their request is parsed (made once per method)."""

    __slots__ = ("access", "auth", "method", "mutating")

    def __init__(self, auth: CallAuth, method: str) -> None:
        self.auth = auth
        self.method = method
        self.access = method_access(method)
        self.mutating = mutating(self.access)

    def admit_fast(self, context: grpc.aio.ServicerContext) -> Principal | None:
        """The call's principal, set as the running call's, when the event loop alone can tell it is let in
        (a credential verified moments ago, its role enough, its organization under its rate). None: the
        call goes through `admit`, which needs the database or refuses it."""
        authenticator = self.auth.authenticator
        try:
            token = authenticator.credential(context.invocation_metadata())
            principal = authenticator.authenticate_fast(token)
            if principal is None:
                return None
            self.auth.authorize(principal, self.access, self.method)
        except TuneForgeError:
            return None  # `admit` refuses it again, and audits the refusal
        _principal.set(principal)
        return principal

    async def admit(self, context: grpc.aio.ServicerContext) -> Principal:
        """`admit_fast` the whole way: the credential checked on a database thread when it must be, a
        refusal audited and raised (PermissionDenied, Unauthenticated, ResourceExhausted)."""
        authenticator = self.auth.authenticator
        token: str | None = None
        try:
            token = authenticator.credential(context.invocation_metadata())
            principal = authenticator.authenticate_fast(token)
            if principal is None:  # the database is needed: off the event loop
                principal = await authenticator.store.db.pool.run(authenticator.authenticate, token)
        except TuneForgeError as exc:
            organization = str(exc.metadata.get("organization", "")) if exc.metadata else ""
            await self.auth.audit(context, self.method, organization, authenticator.describe(token),
                                  exc.code.name, exc.message)
            raise
        try:
            self.auth.authorize(principal, self.access, self.method)
        except TuneForgeError as exc:
            await self.auth.audit(context, self.method, principal.organization, principal.name, exc.code.name,
                                  exc.message)
            raise
        _principal.set(principal)
        return principal

    def enter(self, request: Any, principal: Principal) -> None:
        """Scopes a parsed request into the principal's organization (PermissionDenied when it names
        another)."""
        scope_request(request, principal)

    async def outcome(self, context: grpc.aio.ServicerContext, principal: Principal, resource: str,
                      response: Any, exc: BaseException | None) -> None:
        """Audits the end of a call that may change something (WRITE and ADMIN methods)."""
        if exc is None:
            await self.auth.audit(context, self.method, principal.organization, principal.name, "OK", "",
                                  resource_of(response) or resource)
            return
        code, message = _code_of(exc, context)
        await self.auth.audit(context, self.method, principal.organization, principal.name, code, message,
                              resource)


def _peer(context: grpc.aio.ServicerContext) -> str:
    try:
        return str(context.peer())
    except Exception:
        return ""


def _code_of(exc: BaseException, context: grpc.aio.ServicerContext) -> tuple[str, str]:
    if isinstance(exc, grpc.aio.AbortError):
        code = context.code() if hasattr(context, "code") else None
        return (code.name if isinstance(code, grpc.StatusCode) else "ABORTED"), ""
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED", ""
    if isinstance(exc, Exception):
        status = status_from_exception(exc)
        names = {code.value[0]: code.name for code in grpc.StatusCode}
        return names.get(status.code, "UNKNOWN"), status.message
    return "UNKNOWN", ""


# -- the client side: services calling services ------------------------------------------------------

class _Bearer:
    def __init__(self, token: str) -> None:
        self._value = f"Bearer {token}"

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata[AUTH_HEADER] = self._value
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                          details.wait_for_ready)


class _UnaryUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _UnaryStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _StreamUnary(_Bearer, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any,
                                     request_iterator: Any) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


class _StreamStream(_Bearer, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, client_call_details: Any,
                                      request_iterator: Any) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


def bearer_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors that add `authorization: Bearer <token>` to every call of an aio channel, one per
    call shape (grpc.aio files an interceptor under the first shape it implements only)."""
    return [_UnaryUnary(token), _UnaryStream(token), _StreamUnary(token), _StreamStream(token)]
