"""The kit's authentication on a real server (the identity component alone, real NATS, SQLite): API keys,
roles, organization scoping, calls per second, the audit trail, OIDC tokens and TLS."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from google.protobuf.duration_pb2 import Duration
from tuneforge.v1 import api_key_service_pb2, api_key_service_pb2_grpc, identity_pb2

from services.client import TuneForgeClient
from services.client import client as client_module
from services.identity.component import IdentityComponent
from services.kit.auth import RateLimiter, scope_request
from services.kit.identity import SERVICE_PRINCIPAL, IdentityStore, Principal, is_api_key
from services.kit.runtime import serve
from tests.auth import SERVICE_METADATA
from tuneforge_core.errors import PermissionDenied, ResourceExhausted, error_from_rpc_error
from tuneforge_core.settings import KitSettings


@contextlib.asynccontextmanager
async def serving(settings: KitSettings) -> AsyncIterator[str]:
    stop = asyncio.Event()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve([IdentityComponent], settings, name="identity",
                                     on_ready=ready.set_result, stop=stop))
    done, _ = await asyncio.wait({ready, task}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    try:
        yield ready.result()
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def create_key(stub: Any, org: str, role: int, name: str = "k", **kwargs: Any) -> str:
    response = await stub.CreateApiKey(api_key_service_pb2.CreateApiKeyRequest(
        organization=org, name=name, role=role, **kwargs), metadata=SERVICE_METADATA)
    return str(response.secret)


async def test_keys_are_shown_once_stored_hashed_and_revocable(kit_settings: KitSettings) -> None:
    async with serving(kit_settings) as address, grpc.aio.insecure_channel(address) as channel:
        stub = api_key_service_pb2_grpc.ApiKeyServiceStub(channel)
        admin = await create_key(stub, "acme", identity_pb2.ROLE_ADMIN, "boss")
        assert is_api_key(admin)
        caller = (await stub.GetCaller(api_key_service_pb2.GetCallerRequest(), metadata=bearer(admin))).caller
        assert (caller.organization, caller.role) == ("acme", identity_pb2.ROLE_ADMIN)
        assert caller.principal.startswith("key:key_")
        # The database holds the prefix and a hash, never the key.
        raw = b"".join(p.read_bytes() for p in kit_settings.data_dir.glob("identity.db*"))
        assert admin.encode() not in raw and admin[:15].encode() in raw
        listed = await stub.ListApiKeys(api_key_service_pb2.ListApiKeysRequest(), metadata=bearer(admin))
        assert [k.name for k in listed.api_keys] == ["boss"]
        assert admin not in str(listed)
        # An admin makes a viewer key, then revokes it: it authenticates nothing from then on.
        viewer = (await stub.CreateApiKey(api_key_service_pb2.CreateApiKeyRequest(
            name="eyes", role=identity_pb2.ROLE_VIEWER), metadata=bearer(admin))).secret
        await stub.GetCaller(api_key_service_pb2.GetCallerRequest(), metadata=bearer(viewer))
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await stub.ListApiKeys(api_key_service_pb2.ListApiKeysRequest(), metadata=bearer(viewer))
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "role viewer may not call ListApiKeys" in (denied.value.details() or "")
        revoked = await stub.RevokeApiKey(api_key_service_pb2.RevokeApiKeyRequest(api_key="eyes"),
                                          metadata=bearer(admin))
        assert revoked.api_key.HasField("revoke_time")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.GetCaller(api_key_service_pb2.GetCallerRequest(), metadata=bearer(viewer))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "revoked" in (refused.value.details() or "") and viewer not in (refused.value.details() or "")
        # Revoking twice is a no-op; an unknown key is NOT_FOUND naming the field.
        again = await stub.RevokeApiKey(api_key_service_pb2.RevokeApiKeyRequest(api_key="eyes"),
                                        metadata=bearer(admin))
        assert again.api_key.revoke_time == revoked.api_key.revoke_time
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.RevokeApiKey(api_key_service_pb2.RevokeApiKeyRequest(api_key="nope"),
                                    metadata=bearer(admin))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_key_requests_are_validated_field_by_field(kit_settings: KitSettings) -> None:
    async with serving(kit_settings) as address, grpc.aio.insecure_channel(address) as channel:
        stub = api_key_service_pb2_grpc.ApiKeyServiceStub(channel)
        admin = await create_key(stub, "acme", identity_pb2.ROLE_ADMIN)
        for request, field in [
            (api_key_service_pb2.CreateApiKeyRequest(name="", role=identity_pb2.ROLE_MEMBER), "name"),
            (api_key_service_pb2.CreateApiKeyRequest(name="a b", role=identity_pb2.ROLE_MEMBER), "name"),
            (api_key_service_pb2.CreateApiKeyRequest(name="x"), "role"),
            (api_key_service_pb2.CreateApiKeyRequest(name="x", role=99), "role"),  # type: ignore[arg-type]
            (api_key_service_pb2.CreateApiKeyRequest(name="x", role=identity_pb2.ROLE_MEMBER,
                                                     ttl=Duration(seconds=60)), "ttl"),
            (api_key_service_pb2.CreateApiKeyRequest(name="x", role=identity_pb2.ROLE_MEMBER,
                                                     ttl=Duration(seconds=10 * 365 * 86400)), "ttl"),
            (api_key_service_pb2.CreateApiKeyRequest(name="x", role=identity_pb2.ROLE_MEMBER,
                                                     ttl=Duration(seconds=-3600)), "ttl"),
            (api_key_service_pb2.CreateApiKeyRequest(name="x", role=identity_pb2.ROLE_MEMBER,
                                                     ttl=Duration(seconds=2**63 - 1)), "ttl"),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await stub.CreateApiKey(request, metadata=bearer(admin))
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
            assert field in (bad.value.details() or ""), (request, bad.value.details())
        await stub.CreateApiKey(api_key_service_pb2.CreateApiKeyRequest(
            name="dup", role=identity_pb2.ROLE_MEMBER), metadata=bearer(admin))
        with pytest.raises(grpc.aio.AioRpcError) as dup:
            await stub.CreateApiKey(api_key_service_pb2.CreateApiKeyRequest(
                name="dup", role=identity_pb2.ROLE_MEMBER), metadata=bearer(admin))
        assert dup.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_an_organization_over_its_calls_per_second_is_told_which_limit(
        kit_settings: KitSettings) -> None:
    settings = kit_settings.model_copy(update={"api_calls_per_second": 2.0})
    async with serving(settings) as address, grpc.aio.insecure_channel(address) as channel:
        stub = api_key_service_pb2_grpc.ApiKeyServiceStub(channel)
        acme = await create_key(stub, "acme", identity_pb2.ROLE_VIEWER, "a")
        other = await create_key(stub, "bravo", identity_pb2.ROLE_VIEWER, "b")
        codes = []
        for _ in range(10):
            try:
                await stub.GetCaller(api_key_service_pb2.GetCallerRequest(), metadata=bearer(acme))
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as err:
                codes.append(err.code())
                assert "api_calls_per_second" in (err.details() or "").lower() or \
                    "TUNEFORGE_API_CALLS_PER_SECOND" in (err.details() or "")
                # It says when to retry: a RetryInfo, read back by the typed errors the client raises.
                typed = error_from_rpc_error(err, service="identity")
                assert typed.retry_after_s is not None and 0 < typed.retry_after_s <= 0.5, typed.retry_after_s
                retry_after_s = typed.retry_after_s
        assert codes[:4] == [grpc.StatusCode.OK] * 4 and grpc.StatusCode.RESOURCE_EXHAUSTED in codes
        # Waiting that long is enough: the next call is let in.
        await asyncio.sleep(retry_after_s)
        await stub.GetCaller(api_key_service_pb2.GetCallerRequest(), metadata=bearer(acme))
        # Another organization has its own allowance.
        await stub.GetCaller(api_key_service_pb2.GetCallerRequest(), metadata=bearer(other))


async def test_the_python_client_waits_out_the_calls_per_second_it_is_told(
        kit_settings: KitSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    """TuneForgeClient makes a call refused for the calls per second again after the RetryInfo's wait (at
    most RATE_LIMIT_RETRIES times); with no retries left, the ResourceExhausted says how long to wait."""
    settings = kit_settings.model_copy(update={"api_calls_per_second": 2.0})
    async with serving(settings) as address, grpc.aio.insecure_channel(address) as channel:
        key = await create_key(api_key_service_pb2_grpc.ApiKeyServiceStub(channel), "acme",
                               identity_pb2.ROLE_VIEWER)

        def calls(n: int) -> None:
            with TuneForgeClient(address, api_key=key) as client:
                for _ in range(n):
                    client.whoami()

        await asyncio.to_thread(calls, 12)  # a burst of 4, then about 2 a second: every call answered
        monkeypatch.setattr(client_module, "RATE_LIMIT_RETRIES", 0)
        with pytest.raises(ResourceExhausted) as refused:
            await asyncio.to_thread(calls, 12)
        assert refused.value.retry_after_s is not None and refused.value.retry_after_s > 0


def test_rate_limiter_refills() -> None:
    limiter = RateLimiter(1.0)  # bursts of 2
    assert limiter.allow("a") and limiter.allow("a")
    assert not limiter.allow("a")
    assert 0.9 < limiter.wait_s("a") <= 1.0  # a whole token away: a second at 1 a second
    assert limiter.allow("b")
    assert all(RateLimiter(0).allow("a") for _ in range(10_000))


def test_scope_request_fills_the_organization_and_refuses_another() -> None:
    from tuneforge.v1 import dataset_service_pb2

    viewer = Principal(organization="acme", role=identity_pb2.ROLE_VIEWER, name="key:x")
    request = dataset_service_pb2.GetDatasetRequest(dataset="d")
    scope_request(request, viewer)
    assert request.organization == "acme"
    nested = dataset_service_pb2.UploadDatasetRequest(
        metadata=dataset_service_pb2.UploadDatasetMetadata(organization="bravo"))
    with pytest.raises(PermissionDenied) as denied:
        scope_request(nested, viewer)
    assert denied.value.violations[0].field == "metadata.organization"
    # A chunk frame has no metadata: nothing to fill. The service principal keeps what it names.
    scope_request(dataset_service_pb2.UploadDatasetRequest(chunk=b"x"), viewer)
    named = dataset_service_pb2.GetDatasetRequest(organization="bravo")
    scope_request(named, SERVICE_PRINCIPAL)
    assert named.organization == "bravo"


def test_an_expired_key_is_refused(tmp_path: Path) -> None:
    store = IdentityStore.open(f"sqlite:///{tmp_path / 'identity.db'}")
    try:
        _key, secret = store.create_key("acme", "old", identity_pb2.ROLE_ADMIN,
                                        datetime.timedelta(seconds=-1), "tests")
        with pytest.raises(Exception, match="expired"):
            store.authenticate_key(secret)
        with pytest.raises(Exception, match="not known"):
            store.authenticate_key(secret[:-1] + ("A" if secret[-1] != "A" else "B"))
    finally:
        store.close()


def test_a_cached_key_is_refused_once_it_expires(tmp_path: Path) -> None:
    """The event loop's check of a key verified moments ago still sees its expiry come (the entry stays
    cached for a minute here, the key lives two seconds)."""
    import time

    store = IdentityStore.open(f"sqlite:///{tmp_path / 'identity.db'}", cache_s=60.0)
    try:
        key, secret = store.create_key("acme", "brief", identity_pb2.ROLE_MEMBER,
                                       datetime.timedelta(seconds=2), "tests")
        first = store.authenticate_key(secret)
        cached = store.authenticate_key_cached(secret)
        assert cached is not None and cached == first
        assert (cached.organization, cached.role, cached.name) == ("acme", identity_pb2.ROLE_MEMBER,
                                                                   f"key:{key.id}")
        time.sleep(2.1)
        with pytest.raises(Exception, match="expired"):
            store.authenticate_key_cached(secret)
    finally:
        store.close()


def test_only_an_api_keys_exact_shape_is_one() -> None:
    good = "tf_" + "aZ09" * 13
    assert is_api_key(good)
    for bad in (good[:-1], good + "a", good + "\n", "tx_" + good[3:], good[:-1] + "é", good[:-1] + "\uff11",
                good[:-1] + "-", good.upper()):
        assert not is_api_key(bad), bad


def test_a_key_verified_moments_ago_authenticates_without_the_database(tmp_path: Path) -> None:
    """The event loop's fast path (MethodGate.admit_fast): a cached key needs no database thread; an unknown,
    tampered, revoked or stale one goes to the database as before."""
    store = IdentityStore.open(f"sqlite:///{tmp_path / 'identity.db'}", cache_s=60.0)
    try:
        key, secret = store.create_key("acme", "k", identity_pb2.ROLE_MEMBER, datetime.timedelta(days=1),
                                       "tests")
        assert store.authenticate_key_cached(secret) is None  # never verified here: the database decides
        verified = store.authenticate_key(secret)
        fast = store.authenticate_key_cached(secret)
        assert fast == verified and fast.organization == "acme"
        tampered = secret[:-1] + ("A" if secret[-1] != "A" else "B")
        with pytest.raises(Exception, match="not known"):
            store.authenticate_key_cached(tampered)  # same lookup prefix, another secret
        assert store.authenticate_key_cached("not-a-key") is None
        store.revoke_key("acme", key.id)
        assert store.authenticate_key_cached(secret) is None  # revoking here drops the cached entry
        with pytest.raises(Exception, match="revoked"):
            store.authenticate_key(secret)
        with pytest.raises(Exception, match="revoked"):
            store.authenticate_key_cached(secret)  # now cached as revoked
    finally:
        store.close()


# -- OIDC ------------------------------------------------------------------------------------------

@pytest.fixture
def jwks() -> Iterator[tuple[str, Any]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    public.update({"kid": "k1", "use": "sig", "alg": "RS256"})
    body = json.dumps({"keys": [public]}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/jwks.json", key
    finally:
        server.shutdown()


async def test_an_oidc_token_of_a_configured_issuer_is_a_caller(kit_settings: KitSettings,
                                                                 jwks: tuple[str, Any]) -> None:
    url, key = jwks
    issuers = [{"issuer": "https://idp.example", "audience": "tuneforge", "jwks_url": url,
                "organization_claim": "org", "role_claim": "role"}]
    settings = kit_settings.model_copy(update={"oidc_issuers": json.dumps(issuers)})
    now = int(datetime.datetime.now(datetime.UTC).timestamp())
    claims = {"iss": "https://idp.example", "aud": "tuneforge", "sub": "alice", "org": "acme",
              "role": "member", "iat": now, "exp": now + 600}
    good = jwt.encode(claims, key, algorithm="RS256", headers={"kid": "k1"})
    wrong_audience = jwt.encode({**claims, "aud": "other"}, key, algorithm="RS256", headers={"kid": "k1"})
    async with serving(settings) as address, grpc.aio.insecure_channel(address) as channel:
        stub = api_key_service_pb2_grpc.ApiKeyServiceStub(channel)
        caller = (await stub.GetCaller(api_key_service_pb2.GetCallerRequest(), metadata=bearer(good))).caller
        assert (caller.organization, caller.role) == ("acme", identity_pb2.ROLE_MEMBER)
        assert caller.principal == "oidc:https://idp.example#alice"
        with pytest.raises(grpc.aio.AioRpcError) as denied:  # a member does not manage keys
            await stub.ListApiKeys(api_key_service_pb2.ListApiKeysRequest(), metadata=bearer(good))
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.GetCaller(api_key_service_pb2.GetCallerRequest(), metadata=bearer(wrong_audience))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


# -- TLS -------------------------------------------------------------------------------------------

def _certificate(folder: Path) -> tuple[Path, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = folder / "server.pem", folder / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


async def test_the_server_speaks_tls_from_settings(kit_settings: KitSettings, tmp_path: Path) -> None:
    cert, key = _certificate(tmp_path)
    settings = kit_settings.model_copy(update={"grpc_host": "localhost", "tls_cert_file": str(cert),
                                               "tls_key_file": str(key), "tls_ca_file": str(cert)})
    async with serving(settings) as address:
        port = address.rsplit(":", 1)[1]
        credentials = grpc.ssl_channel_credentials(cert.read_bytes())
        async with grpc.aio.secure_channel(f"localhost:{port}", credentials) as channel:
            stub = api_key_service_pb2_grpc.ApiKeyServiceStub(channel)
            caller = await stub.GetCaller(api_key_service_pb2.GetCallerRequest(), metadata=SERVICE_METADATA)
            assert caller.caller.principal == "service"
        async with grpc.aio.insecure_channel(f"localhost:{port}") as plain:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await api_key_service_pb2_grpc.ApiKeyServiceStub(plain).GetCaller(
                    api_key_service_pb2.GetCallerRequest(), metadata=SERVICE_METADATA, timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_refuses_a_client_without_a_certificate(kit_settings: KitSettings,
                                                                 tmp_path: Path) -> None:
    """With a client CA the server asks for a certificate it signed: the services' own channels present
    theirs; a client with none cannot even connect."""
    cert, key = _certificate(tmp_path)
    settings = kit_settings.model_copy(update={
        "grpc_host": "localhost", "tls_cert_file": str(cert), "tls_key_file": str(key),
        "tls_client_ca_file": str(cert), "tls_ca_file": str(cert)})
    async with serving(settings) as address:
        target = f"localhost:{address.rsplit(':', 1)[1]}"
        with_cert = grpc.ssl_channel_credentials(cert.read_bytes(), key.read_bytes(), cert.read_bytes())
        async with grpc.aio.secure_channel(target, with_cert) as channel:
            caller = await api_key_service_pb2_grpc.ApiKeyServiceStub(channel).GetCaller(
                api_key_service_pb2.GetCallerRequest(), metadata=SERVICE_METADATA)
            assert caller.caller.principal == "service"
        async with grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(cert.read_bytes())) as bare:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await api_key_service_pb2_grpc.ApiKeyServiceStub(bare).GetCaller(
                    api_key_service_pb2.GetCallerRequest(), metadata=SERVICE_METADATA, timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_list_fields_are_honoured(kit_settings: KitSettings) -> None:
    """show_inactive, the audit log's method and failures_only filters, and page tokens."""
    from tuneforge.v1 import audit_service_pb2, audit_service_pb2_grpc

    async with serving(kit_settings) as address, grpc.aio.insecure_channel(address) as channel:
        keys = api_key_service_pb2_grpc.ApiKeyServiceStub(channel)
        audit = audit_service_pb2_grpc.AuditServiceStub(channel)
        admin = await create_key(keys, "acme", identity_pb2.ROLE_ADMIN, "boss")
        for name in ("a", "b", "c"):
            await keys.CreateApiKey(api_key_service_pb2.CreateApiKeyRequest(
                name=name, role=identity_pb2.ROLE_VIEWER), metadata=bearer(admin))
        revoked = await keys.RevokeApiKey(api_key_service_pb2.RevokeApiKeyRequest(api_key="b"),
                                          metadata=bearer(admin))
        active = await keys.ListApiKeys(api_key_service_pb2.ListApiKeysRequest(), metadata=bearer(admin))
        everything = await keys.ListApiKeys(api_key_service_pb2.ListApiKeysRequest(show_inactive=True),
                                            metadata=bearer(admin))
        assert sorted(k.name for k in active.api_keys) == ["a", "boss", "c"]
        assert sorted(k.name for k in everything.api_keys) == ["a", "b", "boss", "c"]
        pages, token = [], ""
        while True:
            page = await keys.ListApiKeys(api_key_service_pb2.ListApiKeysRequest(
                page_size=1, page_token=token, show_inactive=True), metadata=bearer(admin))
            pages += [k.name for k in page.api_keys]
            token = page.next_page_token
            if not token:
                break
        assert pages == [k.name for k in everything.api_keys]  # newest first, each once
        with pytest.raises(grpc.aio.AioRpcError) as bad:  # a token of another query
            await keys.ListApiKeys(api_key_service_pb2.ListApiKeysRequest(page_token=(await keys.ListApiKeys(
                api_key_service_pb2.ListApiKeysRequest(page_size=1, show_inactive=True),
                metadata=bearer(admin))).next_page_token), metadata=bearer(admin))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError):  # a refusal for the audit log
            await keys.ListApiKeys(api_key_service_pb2.ListApiKeysRequest(organization="bravo"),
                                   metadata=bearer(admin))
        creates = await audit.ListAuditEvents(audit_service_pb2.ListAuditEventsRequest(
            method="CreateApiKey"), metadata=bearer(admin))
        assert len(creates.events) == 3 and {e.code for e in creates.events} == {"OK"}
        full = await audit.ListAuditEvents(audit_service_pb2.ListAuditEventsRequest(
            method="/tuneforge.v1.ApiKeyService/RevokeApiKey"), metadata=bearer(admin))
        assert [e.resource for e in full.events] == [revoked.api_key.id]  # the key's id, whatever was named
        failures = await audit.ListAuditEvents(audit_service_pb2.ListAuditEventsRequest(failures_only=True),
                                               metadata=bearer(admin))
        assert failures.events and all(e.code != "OK" for e in failures.events)
        assert any(e.code == "PERMISSION_DENIED" and e.method.endswith("/ListApiKeys")
                   for e in failures.events)


async def test_concurrent_calls_each_run_as_their_own_caller(kit_settings: KitSettings) -> None:
    """The interceptor makes each method's handler once and hands every call its own decision through the
    call's context: interleaved calls of several organizations and roles, admitted and refused, never see
    one another's caller."""
    async with serving(kit_settings) as address, grpc.aio.insecure_channel(address) as channel:
        stub = api_key_service_pb2_grpc.ApiKeyServiceStub(channel)
        keys = {org: await create_key(stub, org, role, f"{org}-key")
                for org, role in (("acme", identity_pb2.ROLE_ADMIN), ("globex", identity_pb2.ROLE_VIEWER),
                                  ("initech", identity_pb2.ROLE_MEMBER))}

        async def as_caller(org: str) -> tuple[str, str]:
            caller = (await stub.GetCaller(api_key_service_pb2.GetCallerRequest(),
                                           metadata=bearer(keys[org]))).caller
            return org, caller.organization

        async def listing(org: str) -> tuple[str, str]:
            try:
                listed = await stub.ListApiKeys(api_key_service_pb2.ListApiKeysRequest(),
                                                metadata=bearer(keys[org]))
            except grpc.aio.AioRpcError as exc:
                return org, exc.code().name
            return org, ",".join(k.name for k in listed.api_keys)

        calls = [f(org) for _ in range(20) for org in keys for f in (as_caller, listing)]
        results = await asyncio.gather(*calls)
        assert all(org == seen for org, seen in results[0::2])
        # ListApiKeys is an admin's: only acme's key may list, and it sees only acme's keys.
        assert set(results[1::2]) == {("acme", "acme-key"), ("globex", "PERMISSION_DENIED"),
                                      ("initech", "PERMISSION_DENIED")}
