"""Opaque page tokens: the position after the last item returned, bound to the query that made it."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from tuneforge_core.errors import FieldViolation, InvalidArgument
from tuneforge_core.reasons import Reason

MAX_PAGE_SIZE = 1000


def page_size(requested: int, default: int = 50, maximum: int = MAX_PAGE_SIZE) -> int:
    if requested < 0:
        raise InvalidArgument("page_size must not be negative",
                              violations=[FieldViolation("page_size", "must not be negative")])
    return min(requested or default, maximum)


def _fingerprint(query: Any) -> str:
    return hashlib.sha256(json.dumps(query, sort_keys=True, default=str).encode()).hexdigest()[:12]


def encode_token(cursor: Any, query: Any) -> str:
    raw = json.dumps({"c": cursor, "q": _fingerprint(query)}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, query: Any) -> Any:
    """The cursor in `token`, or None for the first page; INVALID_ARGUMENT if forged or from another query."""
    if not token:
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if data["q"] != _fingerprint(query):
            raise ValueError("query changed")
        return data["c"]
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument("page_token is invalid or belongs to a different query",
                              reason=Reason.INVALID_PAGE_TOKEN,
                              violations=[FieldViolation("page_token", "not a token this query returned")],
                              ) from exc
