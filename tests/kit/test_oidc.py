"""OIDC tokens: only a configured issuer's signature, for our audience, in its validity window, with a known
organization and role, makes an identity; everything else is a TokenRejected with a caller-safe reason.

The JWKS comes from a real HTTP server on a loopback port; tokens are signed with PyJWT and real keys."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from services.kit.oidc import (
    OidcIdentity,
    OidcIssuer,
    OidcVerifier,
    TokenRejected,
    looks_like_jwt,
    parse_issuers,
)

ISS = "https://idp.example.com/realms/tuneforge"
AUD = "tuneforge-api"


# ---- keys and a JWKS server ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def rsa_jwk(key: rsa.RSAPrivateKey, kid: str, **extra: Any) -> dict[str, Any]:
    return {**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid, "use": "sig", **extra}


def ec_jwk(key: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    return {**ECAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid, "use": "sig"}


class JwksServer:
    """Serves `self.body` (the JWKS as JSON unless replaced) with `self.status`; counts the GETs."""

    def __init__(self) -> None:
        self.body = b'{"keys": []}'
        self.status = 200
        self.hits = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits += 1
                self.send_response(server.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(server.body)))
                self.end_headers()
                self.wfile.write(server.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/certs"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def publish(self, *keys: dict[str, Any]) -> None:
        self.body = json.dumps({"keys": list(keys)}).encode()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def jwks(rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> Iterator[JwksServer]:
    server = JwksServer()
    server.publish(rsa_jwk(rsa_key, "rsa-1"), ec_jwk(ec_key, "ec-1"))
    try:
        yield server
    finally:
        server.close()


def issuer(jwks: JwksServer | str, **overrides: Any) -> OidcIssuer:
    url = jwks if isinstance(jwks, str) else jwks.url
    return OidcIssuer(**{"issuer": ISS, "audience": AUD, "jwks_url": url, **overrides})


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"iss": ISS, "aud": AUD, "sub": "user-42", "iat": now, "exp": now + 600,
                            "tuneforge_org": "acme", "tuneforge_role": "member"}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def sign(key: Any, payload: dict[str, Any], *, kid: str | None = "rsa-1", alg: str = "RS256") -> str:
    return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid} if kid is not None else None)


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def rejected(verifier: OidcVerifier, token: str, *fragments: str) -> str:
    """The reason `token` is refused; it must hold every fragment and nothing of the token."""
    with pytest.raises(TokenRejected) as info:
        verifier.verify(token)
    reason = info.value.reason
    assert str(info.value) == reason
    for fragment in fragments:
        assert fragment in reason
    for segment in token.split("."):
        if len(segment) > 8:
            assert segment not in reason
    return reason


# ---- valid tokens -------------------------------------------------------------------------------

def test_valid_token_gives_the_claimed_organization_and_role(
        jwks: JwksServer, rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = OidcVerifier([issuer(jwks)])
    payload = claims(tuneforge_role="admin")
    identity = verifier.verify(sign(rsa_key, payload))
    assert identity == OidcIdentity(subject="user-42", organization="acme", role="admin", issuer=ISS,
                                    expires_at=float(payload["exp"]))


def test_fixed_organization_wins_and_a_missing_role_is_the_default(
        jwks: JwksServer, rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = OidcVerifier([issuer(jwks, organization="globex", default_role="member")])
    identity = verifier.verify(sign(rsa_key, claims(tuneforge_org="acme", tuneforge_role=None)))
    assert (identity.organization, identity.role) == ("globex", "member")
    # Without a fixed organization it comes from the claim; the issuer's default role is viewer.
    identity = OidcVerifier([issuer(jwks)]).verify(sign(rsa_key, claims(tuneforge_role=None)))
    assert (identity.organization, identity.role) == ("acme", "viewer")


def test_claim_names_are_configurable(jwks: JwksServer, rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = OidcVerifier([issuer(jwks, organization_claim="org", role_claim="tf/role")])
    identity = verifier.verify(sign(rsa_key, claims(org="initech", **{"tf/role": "admin"})))
    assert (identity.organization, identity.role) == ("initech", "admin")


def test_ec_key_and_audience_lists(jwks: JwksServer, ec_key: ec.EllipticCurvePrivateKey) -> None:
    verifier = OidcVerifier([issuer(jwks)])
    token = sign(ec_key, claims(aud=["account", AUD]), kid="ec-1", alg="ES256")
    assert verifier.verify(token).subject == "user-42"


def test_leeway_absorbs_small_clock_skew(jwks: JwksServer, rsa_key: rsa.RSAPrivateKey) -> None:
    now = int(time.time())
    verifier = OidcVerifier([issuer(jwks, leeway_s=30)])
    assert verifier.verify(sign(rsa_key, claims(exp=now - 10, nbf=now + 10, iat=now + 10)))
    strict = OidcVerifier([issuer(jwks, leeway_s=0)])
    rejected(strict, sign(rsa_key, claims(exp=now - 10)), "expired")


def test_several_issuers_each_with_their_own_keys(
        jwks: JwksServer, rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey) -> None:
    other = JwksServer()
    other.publish(rsa_jwk(other_rsa_key, "rsa-1"))
    try:
        verifier = OidcVerifier([issuer(jwks), issuer(other, issuer="https://other.example", audience="tf")])
        assert verifier.verify(sign(rsa_key, claims())).issuer == ISS
        token = sign(other_rsa_key, claims(iss="https://other.example", aud="tf"))
        assert verifier.verify(token).issuer == "https://other.example"
        # The first issuer's name with the second issuer's key: not its signature.
        rejected(verifier, sign(other_rsa_key, claims()), "signature")
    finally:
        other.close()


# ---- refused tokens -----------------------------------------------------------------------------

def test_wrong_audience(jwks: JwksServer, rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = OidcVerifier([issuer(jwks)])
    rejected(verifier, sign(rsa_key, claims(aud="another-api")), "audience")
    rejected(verifier, sign(rsa_key, claims(aud=None)), "'aud'")


def test_unknown_issuer(jwks: JwksServer, rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = OidcVerifier([issuer(jwks)])
    reason = rejected(verifier, sign(rsa_key, claims(iss="https://evil.example")))
    assert reason == "token issuer 'https://evil.example' is not configured"
    rejected(verifier, sign(rsa_key, claims(iss=None)), "'iss'")
    assert jwks.hits == 0  # nothing is fetched for an issuer we do not trust


def test_expired(jwks: JwksServer, rsa_key: rsa.RSAPrivateKey) -> None:
    now = int(time.time())
    rejected(OidcVerifier([issuer(jwks)]), sign(rsa_key, claims(iat=now - 3600, exp=now - 120)), "expired")


def test_not_yet_valid(jwks: JwksServer, rsa_key: rsa.RSAPrivateKey) -> None:
    now = int(time.time())
    verifier = OidcVerifier([issuer(jwks)])
    rejected(verifier, sign(rsa_key, claims(nbf=now + 300)), "not valid yet")
    rejected(verifier, sign(rsa_key, claims(iat=now + 300)), "not valid yet")


def test_exp_and_sub_are_required(jwks: JwksServer, rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = OidcVerifier([issuer(jwks)])
    rejected(verifier, sign(rsa_key, claims(exp=None)), "'exp'")
    rejected(verifier, sign(rsa_key, claims(sub=None)), "'sub'")
    rejected(verifier, sign(rsa_key, claims(sub="")), "'sub'")
    rejected(verifier, sign(rsa_key, claims(exp=str(int(time.time()) + 600))), "'exp'")


def test_signature_by_another_key(
        jwks: JwksServer, rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = OidcVerifier([issuer(jwks)])
    rejected(verifier, sign(other_rsa_key, claims()), "signature is invalid")
    # A valid token with its payload swapped for another one.
    header, _, signature = sign(rsa_key, claims()).split(".")
    forged = f"{header}.{b64(json.dumps(claims(tuneforge_role='admin')).encode())}.{signature}"
    rejected(verifier, forged, "signature is invalid")


def test_alg_none(jwks: JwksServer) -> None:
    verifier = OidcVerifier([issuer(jwks)])
    token = jwt.encode(claims(), "", algorithm="none", headers={"kid": "rsa-1"})
    rejected(verifier, token, "algorithm")
    # The same with a made-up signature, as an attacker might send it to pass a shape check.
    rejected(verifier, token + "c2lnbmF0dXJl", "algorithm")


def test_hs256_signed_with_the_public_key_is_refused(jwks: JwksServer, rsa_key: rsa.RSAPrivateKey) -> None:
    """The key-confusion attack: HMAC "signed" with the issuer's public key (PEM or JWK), which anyone has."""
    verifier = OidcVerifier([issuer(jwks, algorithms=["RS256", "ES256"])])
    pem = rsa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
    for secret in (pem, json.dumps(rsa_jwk(rsa_key, "rsa-1")).encode()):
        signing_input = (f"{b64(json.dumps({'alg': 'HS256', 'typ': 'JWT', 'kid': 'rsa-1'}).encode())}."
                         f"{b64(json.dumps(claims(tuneforge_role='admin')).encode())}")
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        rejected(verifier, f"{signing_input}.{b64(mac)}", "algorithm")
    # ... and an issuer cannot be configured to accept HMAC at all.
    with pytest.raises(ValueError, match="HS256"):
        issuer(jwks, algorithms=["HS256"])


def test_algorithm_must_be_one_the_issuer_allows(
        jwks: JwksServer, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> None:
    rsa_only = OidcVerifier([issuer(jwks, algorithms=["RS256"])])
    rejected(rsa_only, sign(ec_key, claims(), kid="ec-1", alg="ES256"), "algorithm")
    # A key is only used for its own type, whatever the header says.
    both = OidcVerifier([issuer(jwks)])
    rejected(both, sign(ec_key, claims(), kid="rsa-1", alg="ES256"), "key")


def test_a_jwk_alg_binds_its_key(jwks: JwksServer, rsa_key: rsa.RSAPrivateKey) -> None:
    jwks.publish(rsa_jwk(rsa_key, "rsa-1", alg="RS256"), rsa_jwk(rsa_key, "rsa-any"))
    verifier = OidcVerifier([issuer(jwks, algorithms=["RS256", "PS256"])])
    rejected(verifier, sign(rsa_key, claims(), kid="rsa-1", alg="PS256"), "algorithm")
    assert verifier.verify(sign(rsa_key, claims(), kid="rsa-any", alg="PS256")).subject == "user-42"


def test_role_must_be_known(jwks: JwksServer, rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = OidcVerifier([issuer(jwks)])
    for role in ("owner", "Admin", "", ["admin"]):
        rejected(verifier, sign(rsa_key, claims(tuneforge_role=role)), "'tuneforge_role'", "viewer, member")


def test_organization_claim_must_be_there(jwks: JwksServer, rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = OidcVerifier([issuer(jwks)])
    rejected(verifier, sign(rsa_key, claims(tuneforge_org=None)), "no 'tuneforge_org' claim")
    rejected(verifier, sign(rsa_key, claims(tuneforge_org="")), "no 'tuneforge_org' claim")
    rejected(verifier, sign(rsa_key, claims(tuneforge_org=7)), "'tuneforge_org'", "not a string")
    rejected(verifier, sign(rsa_key, claims(tuneforge_org="Acme Corp")), "'tuneforge_org'", "organization")


def test_garbage_is_not_a_jwt(jwks: JwksServer) -> None:
    verifier = OidcVerifier([issuer(jwks)])
    rejected(verifier, "aaaa.bbbb.cccc", "well-formed")
    rejected(verifier, "", "empty")
    rejected(verifier, "a" * 20000, "longer")


# ---- keys: cache, rotation, failures ------------------------------------------------------------

def test_jwks_is_cached_for_jwks_cache_s(jwks: JwksServer, rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = OidcVerifier([issuer(jwks)], jwks_cache_s=0.5, min_refetch_s=0)
    for _ in range(3):
        verifier.verify(sign(rsa_key, claims()))
    assert jwks.hits == 1
    time.sleep(0.6)
    verifier.verify(sign(rsa_key, claims()))
    assert jwks.hits == 2


def test_unknown_kid_refetches_once_rotated_keys_rate_limited(
        jwks: JwksServer, rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = OidcVerifier([issuer(jwks)], min_refetch_s=0.5)
    verifier.verify(sign(rsa_key, claims()))
    assert jwks.hits == 1
    jwks.publish(rsa_jwk(rsa_key, "rsa-1"), rsa_jwk(other_rsa_key, "rsa-2"))
    rotated = sign(other_rsa_key, claims(), kid="rsa-2")
    # Right after a fetch an unknown kid does not make another one...
    rejected(verifier, rotated, "not in the JWKS")
    assert jwks.hits == 1
    time.sleep(0.6)
    # ... later it does, once, and the new key verifies.
    assert verifier.verify(rotated).subject == "user-42"
    assert jwks.hits == 2
    rejected(verifier, sign(other_rsa_key, claims(), kid="rsa-made-up"), "not in the JWKS")
    assert jwks.hits == 2


def test_expired_cache_refetches_and_keeps_old_keys_when_the_issuer_is_down(
        jwks: JwksServer, rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = OidcVerifier([issuer(jwks)], jwks_cache_s=0, min_refetch_s=0)
    verifier.verify(sign(rsa_key, claims()))
    verifier.verify(sign(rsa_key, claims()))
    assert jwks.hits == 2
    jwks.status = 503
    assert verifier.verify(sign(rsa_key, claims())).subject == "user-42"
    assert jwks.hits == 3


def test_unreachable_jwks_fails_fast(rsa_key: rsa.RSAPrivateKey) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    verifier = OidcVerifier([issuer(f"http://127.0.0.1:{port}/certs")], timeout_s=2)
    start = time.monotonic()
    rejected(verifier, sign(rsa_key, claims()), f"cannot fetch the JWKS of issuer '{ISS}'")
    assert time.monotonic() - start < 2


def test_silent_jwks_server_times_out(rsa_key: rsa.RSAPrivateKey) -> None:
    """A server that accepts the connection and never answers costs at most timeout_s."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        verifier = OidcVerifier([issuer(f"http://127.0.0.1:{silent.getsockname()[1]}/certs")], timeout_s=0.5)
        start = time.monotonic()
        rejected(verifier, sign(rsa_key, claims()), "cannot fetch the JWKS")
        assert 0.4 < time.monotonic() - start < 1.5
        # A failed fetch is not retried at once: the next token is refused without waiting again.
        start = time.monotonic()
        rejected(verifier, sign(rsa_key, claims()), "cannot fetch the JWKS")
        assert time.monotonic() - start < 0.3


def test_dripping_jwks_server_times_out(rsa_key: rsa.RSAPrivateKey) -> None:
    """A server that answers a byte at a time (so no socket read times out) still costs at most timeout_s."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        stop = threading.Event()

        def drip() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                response = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n"
                for i in range(len(response) + 12):
                    if stop.wait(0.1):
                        return
                    try:
                        conn.sendall(response[i:i + 1] or b" ")
                    except OSError:
                        return

        thread = threading.Thread(target=drip, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/certs"
        verifier = OidcVerifier([issuer(url)], timeout_s=0.5)
        start = time.monotonic()
        rejected(verifier, sign(rsa_key, claims()), "cannot fetch the JWKS")
        assert time.monotonic() - start < 1.5
        stop.set()
        thread.join(timeout=5)


@pytest.mark.parametrize("body", [b"<html>not json</html>", b'{"no_keys": 1}', b"[1, 2]"])
def test_a_bad_jwks_document_is_a_fetch_failure(
        jwks: JwksServer, rsa_key: rsa.RSAPrivateKey, body: bytes) -> None:
    jwks.body = body
    rejected(OidcVerifier([issuer(jwks)]), sign(rsa_key, claims()), "cannot fetch the JWKS")


def test_symmetric_keys_in_a_jwks_are_ignored(jwks: JwksServer, rsa_key: rsa.RSAPrivateKey) -> None:
    jwks.publish({"kty": "oct", "kid": "rsa-1", "k": b64(b"s" * 32), "alg": "HS256"})
    rejected(OidcVerifier([issuer(jwks)]), sign(rsa_key, claims()), "not in the JWKS")


def test_verify_is_thread_safe_and_fetches_once(jwks: JwksServer, rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = OidcVerifier([issuer(jwks)])
    tokens = [sign(rsa_key, claims(sub=f"user-{i}")) for i in range(16)]
    results: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def work(index: int) -> None:
        barrier.wait()
        try:
            for token in tokens[index::8]:
                results.append(verifier.verify(token).subject)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert sorted(results) == sorted(f"user-{i}" for i in range(16))
    assert jwks.hits == 1


def test_no_kid_uses_the_only_key(jwks: JwksServer, rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = OidcVerifier([issuer(jwks)])
    rejected(verifier, sign(rsa_key, claims(), kid=None), "'kid'")
    jwks.publish(rsa_jwk(rsa_key, "only"))
    assert OidcVerifier([issuer(jwks)]).verify(sign(rsa_key, claims(), kid=None)).subject == "user-42"


# ---- looks_like_jwt -----------------------------------------------------------------------------

def test_looks_like_jwt(rsa_key: rsa.RSAPrivateKey) -> None:
    assert looks_like_jwt(sign(rsa_key, claims()))
    for value in ("tf_live_0123456789abcdef", "", "a.b", "a.b.c.d", "a..c", "a.b.", "a.b.c=", "a.b.c\n",
                  "a b.c.d"):
        assert not looks_like_jwt(value), value


# ---- configuration ------------------------------------------------------------------------------

def test_parse_issuers() -> None:
    assert parse_issuers("") == []
    assert parse_issuers("  \n") == []
    [parsed] = parse_issuers(json.dumps([{"issuer": ISS, "audience": AUD,
                                          "jwks_url": "https://idp.example.com/certs"}]))
    assert parsed == OidcIssuer(issuer=ISS, audience=AUD, jwks_url="https://idp.example.com/certs",
                                organization="", organization_claim="tuneforge_org",
                                role_claim="tuneforge_role", default_role="viewer",
                                algorithms=["RS256", "ES256"], leeway_s=30)


GOOD = {"issuer": ISS, "audience": AUD, "jwks_url": "https://idp.example.com/certs"}


@pytest.mark.parametrize(("text", "problem"), [
    ("{not json", "not valid JSON"),
    (json.dumps(GOOD), "must be a JSON list"),
    (json.dumps(["x"]), "entry 0 must be a JSON object"),
    (json.dumps([{k: v for k, v in GOOD.items() if k != "audience"}]), "audience"),
    (json.dumps([{**GOOD, "audience": ""}]), "audience"),
    (json.dumps([{**GOOD, "jwks_url": "ftp://idp.example.com/certs"}]), "http:// or https://"),
    (json.dumps([{**GOOD, "jwks_url": "certs.json"}]), "jwks_url"),
    (json.dumps([{**GOOD, "algorithms": ["none"]}]), "'none' is not allowed"),
    (json.dumps([{**GOOD, "algorithms": ["HS256"]}]), "'HS256' is not allowed"),
    (json.dumps([{**GOOD, "algorithms": []}]), "algorithms"),
    (json.dumps([{**GOOD, "default_role": "owner"}]), "default_role: must be one of viewer, member, admin"),
    (json.dumps([{**GOOD, "organization": "Not An Org"}]), "organization"),
    (json.dumps([{**GOOD, "leeway_s": -1}]), "leeway_s"),
    (json.dumps([{**GOOD, "audiance": "typo"}]), "audiance: is not a known field"),
    (json.dumps([GOOD, GOOD]), "more than once"),
])
def test_parse_issuers_errors(text: str, problem: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_issuers(text)
    message = str(info.value)
    assert message.startswith("TUNEFORGE_OIDC_ISSUERS")
    assert problem in message
