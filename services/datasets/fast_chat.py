"""The fast path for plain OpenAI chat lines, the common case: msgspec decodes them into typed structs in C,
in batches, and the rules its types do not express run over a whole batch at once. Anything it does not
accept goes through OpenAIChatChecker, the only source of issues; a property test pins that both agree.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from itertools import chain, repeat
from typing import Literal

import msgspec

from services.datasets.checkers import Example


# frozen: hashable in C, so duplicates are counted without encoding (see chat_digest). gc=False: they hold
# only strings, ints and tuples of such structs, so the garbage collector need not track them, which makes
# decoding them about 1.5x faster.
class _FastMessage(msgspec.Struct, forbid_unknown_fields=True, frozen=True, gc=False):
    role: Literal["system", "user", "assistant"]
    content: str
    weight: Literal[0, 1] | msgspec.UnsetType = msgspec.UNSET


class FastChat(msgspec.Struct, forbid_unknown_fields=True, frozen=True, gc=False):
    """A plain OpenAI chat line as msgspec decodes it; it encodes to its normalized line."""

    messages: tuple[_FastMessage, ...]


_decode_fast_chat = msgspec.json.Decoder(FastChat).decode
_messages = operator.attrgetter("messages")
_content = operator.attrgetter("content")
_role = operator.attrgetter("role")
_weight = operator.attrgetter("weight")


def _role_orders(longest: int) -> frozenset[tuple[str, ...]]:
    """Every role sequence the chat rules accept, up to `longest` messages: an optional system message,
    then user and assistant turns alternating, at least one of them an assistant turn."""
    orders: set[tuple[str, ...]] = set()
    for n in range(1, longest + 1):
        for first, second in (("user", "assistant"), ("assistant", "user")):
            turns = tuple(first if k % 2 == 0 else second for k in range(n))
            if "assistant" in turns:
                orders.add(turns)
                if n < longest:
                    orders.add(("system", *turns))
    return frozenset(orders)


# Longer conversations are checked message by message (_fast_example).
_ROLE_ORDERS = _role_orders(32)


@dataclass(frozen=True, slots=True)
class FastBatch:
    """Consecutive lines, the first numbered `start`, that are all plain, valid OpenAI chat lines."""

    start: int
    rows: list[FastChat]
    messages: int
    characters: int
    # Bytes of each row's line as read (without its line end): DatasetStatistics.longest_example_bytes.
    lengths: list[int]


def fast_chat_batch(start: int, lines: list[bytes]) -> FastBatch | None:
    """The lines as one FastBatch when every one is a plain, valid chat line (the common case); None
    otherwise, and each line then goes to fast_chat on its own.

    Each line is decoded on its own (joining them into one JSON array would let a line holding two
    objects, or an object split over two lines, pass), and the rules are checked over the whole batch
    at once, in C: no blank content, a known role order, and no weight 0 (which may leave nothing to
    train on: those lines take the per-line check)."""
    try:
        rows = list(map(_decode_fast_chat, lines))
    except (ValueError, RecursionError):  # DecodeError (and ValidationError), and UnicodeDecodeError
        return None
    conversations = list(map(_messages, rows))
    messages = list(chain.from_iterable(conversations))
    contents = list(map(_content, messages))
    if (
        not all(contents)
        or any(map(str.isspace, contents))
        or 0 in map(_weight, messages)
        or not all(map(_ROLE_ORDERS.__contains__, map(tuple, map(map, repeat(_role), conversations))))
    ):
        return None
    return FastBatch(start, rows, len(messages), sum(map(len, contents)), list(map(len, lines)))


def chat_counts(rows: list[FastChat]) -> tuple[int, int]:
    """(messages, characters) of some FastBatch rows."""
    messages = list(chain.from_iterable(map(_messages, rows)))
    return len(messages), sum(map(len, map(_content, messages)))


def last_assistant(row: FastChat) -> str | None:
    """The target of a FastBatch row: its last assistant turn."""
    for m in reversed(row.messages):
        if m.role == "assistant":
            return m.content
    return None


def chat_digest(encoded: bytes) -> int:
    """The duplicate-counting digest of a normalized line (without its line end) in a file that takes the
    fast path: the hash of its FastChat when it decodes as one (as hash(row) for a FastBatch row, since a
    row encodes to its normalized line and back), else the hash of the bytes. Equal lines, equal digests."""
    try:
        return hash(_decode_fast_chat(encoded))
    except (ValueError, RecursionError):  # UnicodeDecodeError too: not UTF-8
        return hash(encoded)


def fast_chat(line: bytes) -> Example | None:
    """The example of a plain, valid OpenAI chat line, decoded and type-checked by msgspec in C; None
    for anything else (tools, images, extra keys, a problem, a warning), which then takes the full
    checker, the only source of issues. Its record is the msgspec struct, which encodes to exactly what
    OpenAIChatChecker's normalized record encodes to."""
    try:
        row = _decode_fast_chat(line)
    except (ValueError, RecursionError):  # UnicodeDecodeError too: not UTF-8
        return None
    return _fast_example(row)


def _fast_example(row: FastChat) -> Example | None:
    """The rules msgspec's types do not express: non-blank content, a leading system message only,
    alternating turns, a trainable assistant turn."""
    messages = row.messages
    if not messages:
        return None
    previous = ""
    characters = 0
    trainable = False
    target = None
    unset = msgspec.UNSET
    for m in messages:
        content = m.content
        if not content or content.isspace():
            return None
        role = m.role
        if role == previous or (role == "system" and previous):
            return None
        if role == "assistant":
            target = content
            trainable = trainable or m.weight is unset or m.weight == 1
        previous = role
        characters += len(content)
    if not trainable:
        return None
    return Example(row, len(messages), characters, target)  # type: ignore[arg-type]
