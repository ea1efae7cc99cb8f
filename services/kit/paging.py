"""Opaque page tokens: signed, bound to the query that made them, and checked against the cursor's shape.

A token is `<payload>.<mac>`, both unpadded base64url: the payload is the cursor as JSON (the position
after the last item returned), the mac is HMAC-SHA256 over a version tag, the fingerprint of the query
and the payload. So a token is only accepted by the query that made it (same organization, same
filters), it cannot be forged or edited without the key, and a cursor that passes the mac is still
checked against the type its caller expects (`decode_token(token, query, cursor_type=tuple[int, int])`)
before it gets near SQL. Every failure, whatever its cause, is the same INVALID_ARGUMENT with reason
INVALID_PAGE_TOKEN and a violation on `page_token`: a client learns nothing from probing.

The key is process-wide. `configure_from_settings(settings)` sets it once when a service process starts
(`services.kit.runtime.serve` calls it): TUNEFORGE_PAGE_TOKEN_KEY if set (several comma-separated keys
rotate: the first signs, any verifies), else a key generated once and kept in
`<data_dir>/secrets/page_token.key` (mode 0600), shared by every process on that data dir. Processes that
serve the same API behind one address need the same key. Until something configures it (unit tests, scripts)
the key is a random one made for this process, so tokens work within the process and nowhere else.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import json
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydantic
import pydantic_core

from services.kit import keyfiles
from tuneforge_core.errors import FieldViolation, InvalidArgument
from tuneforge_core.reasons import Reason

MAX_PAGE_SIZE = 1000
# Tokens we make are far shorter; anything longer is rejected before any decoding work.
MAX_TOKEN_CHARS = 2048
KEY_FILE = "page_token.key"
MIN_KEY_BYTES = 16
_MAC_CONTEXT = b"tuneforge.page_token.v1\x00"


def page_size(requested: int, default: int = 50, maximum: int = MAX_PAGE_SIZE) -> int:
    if requested < 0:
        raise InvalidArgument("page_size must not be negative",
                              violations=[FieldViolation("page_size", "must not be negative")])
    return min(requested or default, maximum)


# ---- the key ------------------------------------------------------------------------------------

_keys: list[bytes] = [secrets.token_bytes(32)]


def configure(keys: str | bytes | Sequence[str | bytes]) -> None:
    """Sets the process' signing key(s): the first signs, any of them verifies.

    A string may hold several comma-separated keys. Each must be at least 16 bytes.
    """
    if isinstance(keys, str):
        parts: list[str | bytes] = [k.strip() for k in keys.split(",") if k.strip()]
    elif isinstance(keys, bytes):
        parts = [keys]
    else:
        parts = list(keys)
    encoded = [k.encode() if isinstance(k, str) else bytes(k) for k in parts]
    if not encoded:
        raise ValueError("TUNEFORGE_PAGE_TOKEN_KEY holds no key")
    if any(len(k) < MIN_KEY_BYTES for k in encoded):
        raise ValueError(f"TUNEFORGE_PAGE_TOKEN_KEY: each key must be at least {MIN_KEY_BYTES} characters")
    _keys[:] = encoded


def configure_from_settings(settings: Any) -> None:
    """The key from `settings.page_token_key`, or the data dir's generated key when that is empty."""
    configure(settings.page_token_key or load_or_create_key(Path(settings.data_dir)))


def load_or_create_key(data_dir: Path) -> str:
    """The key in data_dir/secrets/page_token.key, made with mode 0600 if absent (services.kit.keyfiles)."""
    return keyfiles.load_or_create_key(keyfiles.secret_file(data_dir, KEY_FILE),
                                       lambda: secrets.token_hex(32).encode())


# ---- tokens -------------------------------------------------------------------------------------

def _fingerprint(query: Any) -> bytes:
    return hashlib.sha256(json.dumps(query, sort_keys=True, default=str).encode()).digest()


def _mac(key: bytes, query: Any, payload: bytes) -> bytes:
    return hmac.new(key, _MAC_CONTEXT + _fingerprint(query) + payload, hashlib.sha256).digest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    """Strict base64url: only the alphabet, and only the one canonical spelling of the bytes."""
    raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    if _b64(raw) != text:
        raise ValueError("not canonical base64url")
    return raw


@functools.lru_cache(maxsize=64)
def _adapter(cursor_type: Any) -> pydantic.TypeAdapter[Any]:
    return pydantic.TypeAdapter(cursor_type)


def encode_token(cursor: Any, query: Any) -> str:
    """A token for the page after `cursor`, valid for `query` only.

    The cursor is stored as JSON (tuples become arrays, datetimes ISO strings): give `decode_token` the
    matching `cursor_type` to get the same shape back.
    """
    payload = pydantic_core.to_json(cursor)
    return f"{_b64(payload)}.{_b64(_mac(_keys[0], query, payload))}"


def decode_token(token: str, query: Any, *, cursor_type: Any = Any) -> Any:
    """The cursor in `token`, or None for the first page (an empty token).

    The cursor is validated strictly against `cursor_type` (e.g. `str`, `tuple[int, int]`,
    `tuple[datetime, str]`). A token that is malformed, unsigned, signed with another key, made by
    another query or holding another shape is INVALID_ARGUMENT with reason INVALID_PAGE_TOKEN.
    """
    if not token:
        return None
    try:
        if len(token) > MAX_TOKEN_CHARS:
            raise ValueError("too long")
        encoded_payload, encoded_mac = token.split(".")
        payload, mac = _unb64(encoded_payload), _unb64(encoded_mac)
        if not any(hmac.compare_digest(mac, _mac(key, query, payload)) for key in _keys):
            raise ValueError("bad signature")
        cursor = _adapter(cursor_type).validate_json(payload, strict=True)
        if cursor is None:
            raise ValueError("no cursor")
        return cursor
    except (ValueError, TypeError, binascii.Error, pydantic.ValidationError) as exc:
        raise invalid_page_token() from exc


def invalid_page_token() -> InvalidArgument:
    """The one error every unusable page token gets."""
    return InvalidArgument("page_token is invalid or belongs to a different query",
                           reason=Reason.INVALID_PAGE_TOKEN,
                           violations=[FieldViolation("page_token", "not a token this query returned")])
