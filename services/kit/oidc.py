"""OIDC bearer tokens: a JWT is accepted only when a configured issuer signed it for TuneForge.

An identity provider (Keycloak, Auth0, Entra ID, Google...) signs short-lived JWTs with a private key and
publishes the public keys as a JWKS at a URL. TUNEFORGE_OIDC_ISSUERS lists the issuers TuneForge trusts
(`parse_issuers`), each with the audience its tokens must name, where its JWKS lives and how a token maps
onto a TuneForge organization and role. `OidcVerifier.verify(token)` then returns the caller's
`OidcIdentity` or raises `TokenRejected`:

- the issuer is picked by the token's unverified `iss` and must be configured; nothing else of the token
  is trusted before its signature is checked.
- the signature must verify with that issuer's key named by the token's `kid`, under an algorithm the
  issuer allows. Only asymmetric algorithms can be configured: never `none`, never HS*, so a token
  "signed" with the issuer's public key as an HMAC secret (the classic key-confusion attack) is refused
  before any key is touched, and a JWK's own `alg`, when it has one, must match the token's.
- `exp` is required; `exp`, `nbf` and `iat` are checked with the issuer's leeway (clock skew), `iss` and
  `aud` must match, `sub` must be a non-empty string.
- the organization is the issuer's fixed one, or else the token's organization claim (a valid
  organization name); the role is the role claim (viewer, member or admin), the issuer's default when
  the token has none. A token that names anything else is refused, not downgraded.

Every refusal is a `TokenRejected` whose reason is a short sentence safe to return to the caller: it never
holds key material or the token, only the name of the claim or check that failed (and the issuer, which
the caller sent). Details of JWKS failures go to the log.

JWKS are fetched with urllib, at most `timeout_s` per fetch however slow the server is, and cached per
issuer for `jwks_cache_s`. A token whose `kid` is not in the cache triggers one refetch (key rotation),
but fetch attempts for an issuer are at least `min_refetch_s` apart, so tokens with made-up key ids
cannot turn the verifier into a load generator against the identity provider. When a refresh fails and
keys were fetched before, the old keys keep verifying (an identity provider outage does not lock
everyone out) and the fetch is retried on the same schedule. `verify` is synchronous and thread-safe:
the gRPC interceptor runs it in a worker thread.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jwt
import pydantic
from jwt.exceptions import InvalidSubjectError

from services.kit.validation import NAME_RE

log = logging.getLogger(__name__)

ENV_VAR = "TUNEFORGE_OIDC_ISSUERS"
ROLES = ("viewer", "member", "admin")
# Asymmetric signatures only: an issuer signs with its private key and we hold nothing secret.
SUPPORTED_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
                        "EdDSA")
# Real tokens are a few KiB at most; anything longer is refused before decoding.
MAX_TOKEN_CHARS = 16 * 1024
# A JWKS is a few KiB; a response larger than this is not one.
MAX_JWKS_BYTES = 1024 * 1024
_JWT_RE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\Z")


class TokenRejected(Exception):
    """A bearer token was refused; `reason` is a short sentence that is safe to show to the caller."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def looks_like_jwt(token: str) -> bool:
    """True for three non-empty base64url segments joined by dots (a compact JWS); API keys never are."""
    return bool(_JWT_RE.match(token))


# ---- configuration ------------------------------------------------------------------------------

class OidcIssuer(pydantic.BaseModel):
    """One trusted identity provider, as an entry of TUNEFORGE_OIDC_ISSUERS."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    issuer: str = pydantic.Field(min_length=1)
    audience: str = pydantic.Field(min_length=1)
    jwks_url: str
    organization: str = ""
    organization_claim: str = pydantic.Field(default="tuneforge_org", min_length=1)
    role_claim: str = pydantic.Field(default="tuneforge_role", min_length=1)
    default_role: str = "viewer"
    algorithms: list[str] = pydantic.Field(default_factory=lambda: ["RS256", "ES256"], min_length=1)
    leeway_s: float = pydantic.Field(default=30, ge=0, le=600)

    @pydantic.field_validator("jwks_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urllib.parse.urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL")
        return value

    @pydantic.field_validator("organization")
    @classmethod
    def _check_organization(cls, value: str) -> str:
        if value and not NAME_RE.match(value):
            raise ValueError("must be 1-63 characters of a-z, 0-9, '.', '_' or '-', starting with a letter "
                             "or digit")
        return value

    @pydantic.field_validator("default_role")
    @classmethod
    def _check_role(cls, value: str) -> str:
        if value not in ROLES:
            raise ValueError(f"must be one of {', '.join(ROLES)}")
        return value

    @pydantic.field_validator("algorithms")
    @classmethod
    def _check_algorithms(cls, value: list[str]) -> list[str]:
        for alg in value:
            if alg not in SUPPORTED_ALGORITHMS:
                raise ValueError(f"algorithm {alg!r} is not allowed (only the asymmetric "
                                 f"{', '.join(SUPPORTED_ALGORITHMS)})")
        return value


def parse_issuers(text: str) -> list[OidcIssuer]:
    """The issuers of TUNEFORGE_OIDC_ISSUERS (a JSON list of objects); empty means none.

    Raises ValueError naming the variable and what is wrong with it.
    """
    if not text.strip():
        return []
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{ENV_VAR} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
                         ) from None
    if not isinstance(raw, list):
        raise ValueError(f"{ENV_VAR} must be a JSON list of issuer objects, not a {type(raw).__name__}")
    issuers: list[OidcIssuer] = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ValueError(f"{ENV_VAR}: entry {index} must be a JSON object, not a {type(item).__name__}")
        try:
            issuers.append(OidcIssuer.model_validate(item))
        except pydantic.ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'entry'}: {_message(err)}"
                                 for err in exc.errors())
            raise ValueError(f"{ENV_VAR}: entry {index} is invalid: {problems}") from None
    _check_unique(issuers)
    return issuers


def _message(err: Any) -> str:
    if err["type"] == "extra_forbidden":
        return "is not a known field"
    msg = str(err["msg"])
    return msg.removeprefix("Value error, ")


def _check_unique(issuers: Sequence[OidcIssuer]) -> None:
    seen: set[str] = set()
    for issuer in issuers:
        if issuer.issuer in seen:
            raise ValueError(f"{ENV_VAR} lists issuer {issuer.issuer!r} more than once")
        seen.add(issuer.issuer)


# ---- verification -------------------------------------------------------------------------------

@dataclass(frozen=True)
class OidcIdentity:
    """Who a verified token speaks for; `expires_at` is its `exp` in seconds since the epoch."""

    subject: str
    organization: str
    role: str
    issuer: str
    expires_at: float | None


class OidcVerifier:
    """Verifies bearer JWTs of the configured issuers (see the module docstring)."""

    def __init__(self, issuers: Sequence[OidcIssuer], *, jwks_cache_s: float = 300, timeout_s: float = 5,
                 min_refetch_s: float = 10) -> None:
        _check_unique(issuers)
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self._issuers = {i.issuer: i for i in issuers}
        self._keys = {i.issuer: _JwksCache(i, cache_s=jwks_cache_s, timeout_s=timeout_s,
                                           min_refetch_s=min_refetch_s) for i in issuers}

    @property
    def issuers(self) -> list[OidcIssuer]:
        return list(self._issuers.values())

    def verify(self, token: str) -> OidcIdentity:
        if not isinstance(token, str) or not token:
            raise TokenRejected("token is empty")
        if len(token) > MAX_TOKEN_CHARS:
            raise TokenRejected(f"token is longer than {MAX_TOKEN_CHARS} characters")
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise TokenRejected("token is not a well-formed JWT") from None
        if not isinstance(unverified, dict):
            raise TokenRejected("token is not a well-formed JWT")

        iss = unverified.get("iss")
        if iss is None:
            raise TokenRejected("token has no 'iss' claim")
        if not isinstance(iss, str):
            raise TokenRejected("token claim 'iss' is not a string")
        issuer = self._issuers.get(iss)
        if issuer is None:
            raise TokenRejected(f"token issuer {_quote(iss)} is not configured")

        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in issuer.algorithms:
            raise TokenRejected(f"token algorithm is not one that issuer {_quote(iss)} allows "
                                f"({', '.join(issuer.algorithms)})")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise TokenRejected("token header 'kid' is not a string")

        key = self._keys[iss].key(kid, alg)
        try:
            claims = jwt.decode(
                token, key, algorithms=[alg], audience=issuer.audience, issuer=issuer.issuer,
                leeway=issuer.leeway_s,
                options={"require": ["exp", "iss", "aud", "sub"], "verify_signature": True,
                         "verify_exp": True, "verify_nbf": True, "verify_iat": True, "verify_aud": True,
                         "verify_iss": True, "verify_sub": True, "enforce_minimum_key_length": True},
            )
        except jwt.PyJWTError as exc:
            raise TokenRejected(_reason(exc)) from None

        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise TokenRejected("token claim 'sub' must be a non-empty string")
        exp = claims["exp"]
        if isinstance(exp, bool) or not isinstance(exp, int | float):
            raise TokenRejected("token claim 'exp' is not a number")
        return OidcIdentity(subject=subject, organization=_organization(issuer, claims),
                            role=_role(issuer, claims), issuer=issuer.issuer, expires_at=float(exp))


def _organization(issuer: OidcIssuer, claims: dict[str, Any]) -> str:
    if issuer.organization:
        return issuer.organization
    name = issuer.organization_claim
    value = claims.get(name)
    if value is None or value == "":
        raise TokenRejected(f"token has no {_quote(name)} claim (its organization)")
    if not isinstance(value, str):
        raise TokenRejected(f"token claim {_quote(name)} is not a string")
    if not NAME_RE.match(value):
        raise TokenRejected(f"token claim {_quote(name)} is not a valid organization name")
    return value


def _role(issuer: OidcIssuer, claims: dict[str, Any]) -> str:
    value = claims.get(issuer.role_claim)
    if value is None:
        return issuer.default_role
    if not isinstance(value, str) or value not in ROLES:
        raise TokenRejected(f"token claim {_quote(issuer.role_claim)} must be one of {', '.join(ROLES)}")
    return value


def _reason(exc: jwt.PyJWTError) -> str:
    """A caller-safe sentence for a PyJWT failure (PyJWT's own messages may quote key data)."""
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "token has expired"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "token is not valid yet (nbf or iat is in the future)"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"token has no {_quote(exc.claim)} claim"
    if isinstance(exc, jwt.InvalidAudienceError):
        return "token audience is not the one this issuer is configured for"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "token issuer does not match"
    if isinstance(exc, jwt.InvalidIssuedAtError):
        return "token claim 'iat' is not a number"
    if isinstance(exc, jwt.InvalidSignatureError):
        return "token signature is invalid"
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return "token algorithm does not match its signing key"
    if isinstance(exc, InvalidSubjectError):
        return "token claim 'sub' must be a non-empty string"
    if isinstance(exc, jwt.InvalidKeyError | jwt.PyJWKError):
        return "token signing key of this issuer cannot be used"
    if isinstance(exc, jwt.DecodeError):
        return "token is not a well-formed JWT"
    return "token is invalid"


def _quote(value: str, limit: int = 100) -> str:
    """`value` in quotes for a message: printable characters only, cut at `limit`."""
    clean = "".join(c if c.isprintable() else "?" for c in value[:limit])
    return f"'{clean}…'" if len(value) > limit else f"'{clean}'"


# ---- the keys of one issuer ---------------------------------------------------------------------

class _JwksCache:
    """The JWKS of one issuer: fetched on demand, cached, refetched on expiry or an unknown kid."""

    def __init__(self, issuer: OidcIssuer, *, cache_s: float, timeout_s: float, min_refetch_s: float) -> None:
        self.issuer = issuer
        self.cache_s = cache_s
        self.timeout_s = timeout_s
        self.min_refetch_s = min_refetch_s
        self._fetch_lock = threading.Lock()  # one fetch at a time; held while fetching
        self._state_lock = threading.Lock()  # guards the fields below; never held while fetching
        self._jwks: dict[str | None, dict[str, Any]] | None = None  # kid -> JWK
        self._fetched_at = -math.inf  # monotonic time of the last successful fetch
        self._attempted_at = -math.inf  # ... and of the last attempt, successful or not
        self._generation = 0  # bumped by every successful fetch
        self._parsed: dict[tuple[str | None, str], jwt.PyJWK] = {}  # (kid, alg) -> key, this generation

    def key(self, kid: str | None, alg: str) -> jwt.PyJWK:
        jwks, generation, fetched_at = self._snapshot()
        if jwks is None or time.monotonic() - fetched_at >= self.cache_s:
            jwks, generation = self._refresh(generation)
        jwk = _pick(jwks, kid)
        if jwk is None and kid is not None:
            # Perhaps the issuer rotated its keys since we fetched them.
            jwks, generation = self._refresh(generation)
            jwk = _pick(jwks, kid)
        if jwk is None:
            if kid is None:
                raise TokenRejected(f"token has no 'kid' header and issuer {_quote(self.issuer.issuer)} "
                                    "publishes more than one key")
            raise TokenRejected(f"token signing key is not in the JWKS of issuer "
                                f"{_quote(self.issuer.issuer)}")
        return self._parse(kid, alg, jwk, generation)

    def _snapshot(self) -> tuple[dict[str | None, dict[str, Any]] | None, int, float]:
        with self._state_lock:
            return self._jwks, self._generation, self._fetched_at

    def _refresh(self, seen_generation: int) -> tuple[dict[str | None, dict[str, Any]], int]:
        """Fetches the JWKS unless another thread just did or the last attempt was too recent.

        Returns the freshest keys there are; raises TokenRejected only when there are none at all.
        """
        if self._fetch_lock.acquire(timeout=self.timeout_s + 1):
            try:
                with self._state_lock:
                    fresh = self._generation != seen_generation
                    too_soon = time.monotonic() - self._attempted_at < self.min_refetch_s
                    if not fresh and not too_soon:
                        self._attempted_at = time.monotonic()
                if not fresh and not too_soon:
                    self._fetch_and_store()
            finally:
                self._fetch_lock.release()
        jwks, generation, _ = self._snapshot()
        if jwks is None:
            raise TokenRejected(f"cannot fetch the JWKS of issuer {_quote(self.issuer.issuer)}")
        return jwks, generation

    def _fetch_and_store(self) -> None:
        url = self.issuer.jwks_url
        try:
            jwks = _parse_jwks(_fetch(url, self.timeout_s))
        except _FetchError as exc:
            with self._state_lock:
                stale = self._jwks is not None
            log.warning("cannot fetch the JWKS of OIDC issuer %s from %s: %s%s", self.issuer.issuer, url, exc,
                        " (still using the keys fetched before)" if stale else "")
            return
        with self._state_lock:
            self._jwks = jwks
            self._fetched_at = time.monotonic()
            self._generation += 1
            self._parsed = {}
        log.info("fetched the JWKS of OIDC issuer %s: %d key(s)", self.issuer.issuer, len(jwks))

    def _parse(self, kid: str | None, alg: str, jwk: dict[str, Any], generation: int) -> jwt.PyJWK:
        declared = jwk.get("alg")
        if declared is not None and declared != alg:
            raise TokenRejected("token algorithm does not match its signing key")
        with self._state_lock:
            cached = self._parsed.get((kid, alg)) if generation == self._generation else None
        if cached is not None:
            return cached
        try:
            # Bound to the token's algorithm: PyJWT refuses a key of another type (an EC key for RS256).
            key = jwt.PyJWK(jwk, algorithm=alg)
        except (jwt.PyJWTError, NotImplementedError, TypeError, ValueError) as exc:
            log.warning("OIDC issuer %s: key %r cannot be used for %s: %s", self.issuer.issuer, kid, alg, exc)
            raise TokenRejected("token signing key of this issuer cannot be used for its algorithm") from None
        with self._state_lock:
            if generation == self._generation:
                self._parsed[(kid, alg)] = key
        return key


def _pick(jwks: dict[str | None, dict[str, Any]], kid: str | None) -> dict[str, Any] | None:
    if kid in jwks:
        return jwks[kid]
    if kid is None and len(jwks) == 1:
        return next(iter(jwks.values()))
    return None


class _FetchError(Exception):
    pass


def _parse_jwks(body: bytes) -> dict[str | None, dict[str, Any]]:
    """The signing keys of a JWKS document by kid (a key without one is stored under None)."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise _FetchError(f"the response is not JSON ({exc})") from None
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, list):
        raise _FetchError("the response is not a JWKS (no 'keys' list)")
    out: dict[str | None, dict[str, Any]] = {}
    for jwk in keys:
        if not isinstance(jwk, dict) or not isinstance(jwk.get("kty"), str):
            continue
        # Public keys for signatures only: a symmetric ('oct') key or an encryption key has no place here.
        if jwk["kty"] == "oct" or jwk.get("use", "sig") != "sig":
            continue
        kid = jwk.get("kid")
        if kid is not None and not isinstance(kid, str):
            continue
        out.setdefault(kid, jwk)
    return out


def _fetch(url: str, timeout_s: float) -> bytes:
    """GET `url`, giving up after `timeout_s` in all (name lookup, connect and a slow body included)."""
    result: list[bytes | BaseException] = []
    done = threading.Event()

    def run() -> None:
        try:
            result.append(_get(url, timeout_s))
        except BaseException as exc:  # reported to the waiting thread
            result.append(exc)
        finally:
            done.set()

    # A daemon thread, so that a server that stalls cannot hold up the caller past timeout_s: the
    # thread itself ends at its socket timeout.
    threading.Thread(target=run, name="oidc-jwks-fetch", daemon=True).start()
    if not done.wait(timeout_s):
        raise _FetchError(f"no complete answer within {timeout_s:g} s")
    outcome = result[0]
    if isinstance(outcome, _FetchError):
        raise outcome
    if isinstance(outcome, BaseException):
        raise _FetchError(f"{type(outcome).__name__}: {outcome}")
    return outcome


def _get(url: str, timeout_s: float) -> bytes:
    deadline = time.monotonic() + timeout_s
    request = urllib.request.Request(url, headers={"Accept": "application/json",
                                                   "User-Agent": "tuneforge-oidc"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            chunks: list[bytes] = []
            size = 0
            while chunk := response.read1(65536):
                size += len(chunk)
                if size > MAX_JWKS_BYTES:
                    raise _FetchError(f"the response is larger than {MAX_JWKS_BYTES} bytes")
                if time.monotonic() > deadline:
                    raise _FetchError(f"no complete answer within {timeout_s:g} s")
                chunks.append(chunk)
            return b"".join(chunks)
    except urllib.error.HTTPError as exc:
        raise _FetchError(f"HTTP status {exc.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise _FetchError(str(getattr(exc, "reason", exc))) from None
