"""Which format an example is in, from its keys alone (`SIGNATURES`, most specific first): cheap enough to
run on every line, which is how a file mixing formats is caught line by line."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from services.datasets.domain import DatasetFormat

# Detection signatures, most specific first: the keys an object of each format must have.
SIGNATURES: tuple[tuple[DatasetFormat, frozenset[str]], ...] = (
    (DatasetFormat.OPENAI_CHAT, frozenset({"messages"})),
    (DatasetFormat.SHAREGPT, frozenset({"conversations"})),
    (DatasetFormat.OPENAI_PREFERENCE, frozenset({"input", "preferred_output", "non_preferred_output"})),
    (DatasetFormat.PREFERENCE, frozenset({"chosen", "rejected"})),
    (DatasetFormat.ALPACA, frozenset({"instruction", "output"})),
    (DatasetFormat.KTO, frozenset({"prompt", "completion", "label"})),
    (DatasetFormat.PROMPT_COMPLETION, frozenset({"prompt", "completion"})),
    (DatasetFormat.PROMPT_ONLY, frozenset({"prompt"})),
    (DatasetFormat.TEXT, frozenset({"text"})),
)


def classify(obj: dict[str, Any]) -> DatasetFormat | None:
    """The format an object's keys say it is, or None when they match no format."""
    for fmt, keys in SIGNATURES:
        if keys <= obj.keys():
            return fmt
    return None


def detect(objects: Iterable[dict[str, Any]]) -> DatasetFormat | None:
    """The format most objects match (ties: the first one seen), or None when none matches any."""
    votes: dict[DatasetFormat, int] = {}
    for obj in objects:
        fmt = classify(obj)
        if fmt is not None:
            votes[fmt] = votes.get(fmt, 0) + 1
    return max(votes, key=lambda f: votes[f]) if votes else None
