"""The stable issue codes of a validation report (ValidationIssue.code), and how a checker reports one.

Clients may branch on the codes, so a value never changes once released. `IssueCode` is a `StrEnum`: an
`Issue.code` holds a member where this service made the issue, a plain string where a stored report was
read back, and the two compare equal.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from services.datasets.domain import Severity


class IssueCode(StrEnum):
    # -- reading the file (readers.py) ---------------------------------------------------------------------
    EMPTY_FILE = "EMPTY_FILE"
    INVALID_UTF8 = "INVALID_UTF8"
    INVALID_JSON = "INVALID_JSON"
    TRUNCATED_LINE = "TRUNCATED_LINE"
    LINE_TOO_LONG = "LINE_TOO_LONG"
    INVALID_CSV = "INVALID_CSV"
    CSV_COLUMN_COUNT = "CSV_COLUMN_COUNT"
    MISSING_COLUMN = "MISSING_COLUMN"
    INVALID_PARQUET = "INVALID_PARQUET"
    INVALID_ARCHIVE = "INVALID_ARCHIVE"
    UNSUPPORTED_CONTAINER = "UNSUPPORTED_CONTAINER"
    UNSAFE_ARCHIVE_ENTRY = "UNSAFE_ARCHIVE_ENTRY"
    ARCHIVE_TOO_LARGE = "ARCHIVE_TOO_LARGE"
    MISSING_MASTER_FILE = "MISSING_MASTER_FILE"
    MISSING_IMAGE = "MISSING_IMAGE"
    INVALID_IMAGE = "INVALID_IMAGE"
    DECODED_TOO_LARGE = "DECODED_TOO_LARGE"
    # -- the file as a whole (validation.py) ---------------------------------------------------------------
    NOT_AN_OBJECT = "NOT_AN_OBJECT"
    FORMAT_MISMATCH = "FORMAT_MISMATCH"
    MIXED_FORMATS = "MIXED_FORMATS"
    TOO_FEW_EXAMPLES = "TOO_FEW_EXAMPLES"
    DUPLICATE_EXAMPLES = "DUPLICATE_EXAMPLES"  # warning
    CLASS_IMBALANCE = "CLASS_IMBALANCE"  # warning
    # -- one example (messages.py, checkers.py) ------------------------------------------------------------
    MISSING_MESSAGES = "MISSING_MESSAGES"
    MESSAGES_NOT_A_LIST = "MESSAGES_NOT_A_LIST"
    EMPTY_MESSAGES = "EMPTY_MESSAGES"
    MESSAGE_NOT_AN_OBJECT = "MESSAGE_NOT_AN_OBJECT"
    MISSING_ROLE = "MISSING_ROLE"
    INVALID_ROLE = "INVALID_ROLE"
    MISSING_CONTENT = "MISSING_CONTENT"
    CONTENT_NOT_A_STRING = "CONTENT_NOT_A_STRING"
    EMPTY_CONTENT = "EMPTY_CONTENT"
    INVALID_WEIGHT = "INVALID_WEIGHT"
    INVALID_TOOL_CALL = "INVALID_TOOL_CALL"
    TOOL_WITHOUT_CALL = "TOOL_WITHOUT_CALL"
    SYSTEM_NOT_FIRST = "SYSTEM_NOT_FIRST"
    ROLES_NOT_ALTERNATING = "ROLES_NOT_ALTERNATING"
    MISSING_ASSISTANT_TURN = "MISSING_ASSISTANT_TURN"
    MISSING_FIELD = "MISSING_FIELD"
    WRONG_TYPE = "WRONG_TYPE"
    EMPTY_VALUE = "EMPTY_VALUE"
    INVALID_LABEL = "INVALID_LABEL"
    MIXED_SHAPES = "MIXED_SHAPES"
    INVALID_CONTENT_PART = "INVALID_CONTENT_PART"
    NO_TRAINABLE_TURN = "NO_TRAINABLE_TURN"  # warning
    UNKNOWN_FIELD = "UNKNOWN_FIELD"  # warning
    IDENTICAL_PAIR = "IDENTICAL_PAIR"  # warning


IssueSink = Callable[..., None]
"""`add(code, message, field="", message_index=None, severity=Severity.ERROR)` for the current line."""


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def show(value: Any, limit: int = 40) -> str:
    """A user's value quoted in a message, short enough for an error listing."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def unknown_keys(
    obj: dict[str, Any], allowed: frozenset[str], add: IssueSink, prefix: str = "", index: int | None = None
) -> None:
    """An UNKNOWN_FIELD warning for each key of `obj` the format does not know (it is dropped)."""
    for key in obj:
        if key not in allowed:
            add(
                IssueCode.UNKNOWN_FIELD,
                f'"{key}" is not a field of this format and is dropped; known fields: '
                f"{', '.join(sorted(allowed))}.",
                f"{prefix}{key}",
                index,
                severity=Severity.WARNING,
            )
