"""Content validation of dataset files: one streaming pass over JSONL, no gRPC, no I/O but the file.

The driver (`validate_file`) handles what every JSONL format shares: UTF-8, JSON, one object per line,
counting, duplicates and the dataset-level rules. What an example must look like is a `FormatChecker`,
registered in `CHECKERS`; a new format is one more checker (and its signature in `SIGNATURES` is already
there for detection).

Decisions worth knowing:
- Blank (whitespace-only) lines are ignored, not flagged: editors and `cat a.jsonl b.jsonl` leave them,
  and they carry no data. They still count for line numbers, which are 1-based lines of the file.
- A UTF-8 byte-order mark at the start of the file is ignored; any other non-UTF-8 line is an error.
- Every problem on a line is reported (not only the first), so one round of fixes is enough.
- Duplicates are exact duplicates of the *normalized* example (key order and whitespace do not matter);
  more than 10% of them is a warning, not an error.
- The normalized example (what the splits contain) keeps only what training uses: for chat, each
  message's role, content and weight (when given). Other keys are dropped.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from services.datasets.domain import (
    DatasetFormat,
    Issue,
    Severity,
    Statistics,
    ValidationReport,
)

ISSUE_LIMIT = 100
DEFAULT_MIN_EXAMPLES = 100
DUPLICATE_WARNING_FRACTION = 0.10
DETECTION_SAMPLE_LINES = 100
BOM = b"\xef\xbb\xbf"

# Stable issue codes (ValidationIssue.code); clients may branch on them.
INVALID_UTF8 = "INVALID_UTF8"
INVALID_JSON = "INVALID_JSON"
NOT_AN_OBJECT = "NOT_AN_OBJECT"
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
MISSING_ASSISTANT_TURN = "MISSING_ASSISTANT_TURN"
NO_TRAINABLE_TURN = "NO_TRAINABLE_TURN"  # warning: every assistant message has weight 0
TOO_FEW_EXAMPLES = "TOO_FEW_EXAMPLES"
DUPLICATE_EXAMPLES = "DUPLICATE_EXAMPLES"  # warning
UNSUPPORTED_FORMAT = "UNSUPPORTED_FORMAT"


@dataclass(frozen=True)
class Example:
    """A valid example: its normalized record, and what the statistics count."""

    record: dict[str, Any]
    messages: int
    characters: int


IssueSink = Callable[..., None]
"""`add(code, message, field="", message_index=None, severity=Severity.ERROR)` for the current line."""


class FormatChecker(ABC):
    """The rules of one format for one parsed JSON object."""

    format: DatasetFormat

    @abstractmethod
    def check(self, obj: dict[str, Any], add: IssueSink) -> Example | None:
        """Reports the object's problems through `add`; returns the normalized example if it has no error."""


def _json_type(value: Any) -> str:
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


def _show(value: Any, limit: int = 40) -> str:
    """A user's value quoted in a message, short enough for an error listing."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class OpenAIChatChecker(FormatChecker):
    """{"messages": [{"role": "system|user|assistant|tool", "content": str, "weight": 0|1 (optional)}]}"""

    format = DatasetFormat.OPENAI_CHAT
    ROLES = ("system", "user", "assistant", "tool")

    def check(self, obj: dict[str, Any], add: IssueSink) -> Example | None:
        if "messages" not in obj:
            add(MISSING_MESSAGES, 'The example has no "messages" field; each line must look like '
                '{"messages": [{"role": "user", "content": "..."}, '
                '{"role": "assistant", "content": "..."}]}.', "messages")
            return None
        messages = obj["messages"]
        if not isinstance(messages, list):
            add(MESSAGES_NOT_A_LIST, f'"messages" must be a list of messages, not {_json_type(messages)}.',
                "messages")
            return None
        if not messages:
            add(EMPTY_MESSAGES, '"messages" is empty; an example needs at least a user and an assistant '
                "message.", "messages")
            return None
        ok = True
        role_problem = False
        normalized: list[dict[str, Any]] = []
        assistant_weights: list[int] = []
        characters = 0
        for i, message in enumerate(messages):
            path = f"messages[{i}]"
            if not isinstance(message, dict):
                add(MESSAGE_NOT_AN_OBJECT, f"Message {i} must be an object with role and content, not "
                    f"{_json_type(message)}.", path, i)
                ok, role_problem = False, True
                continue
            role, content = message.get("role"), message.get("content")
            if "role" not in message:
                add(MISSING_ROLE, f'Message {i} has no "role"; use one of {", ".join(self.ROLES)}.',
                    f"{path}.role", i)
                ok, role_problem = False, True
            elif not isinstance(role, str) or role not in self.ROLES:
                add(INVALID_ROLE, f"Message {i} has role {_show(role)}; use one of "
                    f"{', '.join(self.ROLES)}.", f"{path}.role", i)
                ok, role_problem = False, True
            if "content" not in message:
                add(MISSING_CONTENT, f'Message {i} has no "content".', f"{path}.content", i)
                ok = False
            elif not isinstance(content, str):
                hint = " (content parts are not supported yet)" if isinstance(content, list) else ""
                add(CONTENT_NOT_A_STRING, f"Message {i} content must be a string, not "
                    f"{_json_type(content)}{hint}.", f"{path}.content", i)
                ok = False
            elif not content.strip():
                add(EMPTY_CONTENT, f"Message {i} content is empty.", f"{path}.content", i)
                ok = False
            weight = message.get("weight")
            if "weight" in message and (isinstance(weight, bool) or not isinstance(weight, int | float)
                                        or weight not in (0, 1)):
                add(INVALID_WEIGHT, f"Message {i} weight is {_show(weight)}; it must be 0 (do not "
                    "train on this message) or 1.", f"{path}.weight", i)
                ok = False
            if not ok:
                continue
            entry: dict[str, Any] = {"role": role, "content": content}
            if "weight" in message:
                entry["weight"] = int(weight)
            if role == "assistant":
                assistant_weights.append(entry.get("weight", 1))
            characters += len(content)
            normalized.append(entry)
        if not role_problem and not any(isinstance(m, dict) and m.get("role") == "assistant"
                                        for m in messages):
            add(MISSING_ASSISTANT_TURN, "The example has no assistant message, so there is nothing to "
                "train on; add at least one message with role \"assistant\".", "messages")
            ok = False
        if not ok:
            return None
        if not any(assistant_weights):
            add(NO_TRAINABLE_TURN, "Every assistant message has weight 0, so training learns nothing from "
                "this example.", "messages", severity=Severity.WARNING)
        return Example({"messages": normalized}, len(normalized), characters)


CHECKERS: dict[DatasetFormat, FormatChecker] = {
    DatasetFormat.OPENAI_CHAT: OpenAIChatChecker(),
}

# Detection signatures, most specific first: the keys an object of each format must have.
SIGNATURES: tuple[tuple[DatasetFormat, frozenset[str]], ...] = (
    (DatasetFormat.OPENAI_CHAT, frozenset({"messages"})),
    (DatasetFormat.SHAREGPT, frozenset({"conversations"})),
    (DatasetFormat.OPENAI_PREFERENCE, frozenset({"input", "preferred_output", "non_preferred_output"})),
    (DatasetFormat.PREFERENCE, frozenset({"chosen", "rejected"})),
    (DatasetFormat.ALPACA, frozenset({"instruction", "output"})),
    (DatasetFormat.PROMPT_COMPLETION, frozenset({"prompt", "completion"})),
    (DatasetFormat.PROMPT_ONLY, frozenset({"prompt"})),
    (DatasetFormat.TEXT, frozenset({"text"})),
)


def supported_formats() -> tuple[DatasetFormat, ...]:
    return tuple(CHECKERS)


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line without its end-of-line) for every non-blank line."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(BOM):
                raw = raw[len(BOM):]
            line = raw.rstrip(b"\r\n")
            if line.strip():
                yield number, line


def detect_format(path: Path, sample_lines: int = DETECTION_SAMPLE_LINES) -> DatasetFormat | None:
    """The format most of the first parsable objects match, or None when none matches any signature."""
    votes: dict[DatasetFormat, int] = {}
    seen = 0
    for _, line in _lines(path):
        if seen >= sample_lines:
            break
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if not isinstance(obj, dict):
            continue
        seen += 1
        for fmt, keys in SIGNATURES:
            if keys <= obj.keys():
                votes[fmt] = votes.get(fmt, 0) + 1
                break
    if not votes:
        return None
    return max(votes, key=lambda f: votes[f])  # ties: the first counted, which is the first line's


def normalized_line(example: Example) -> bytes:
    """The example as one canonical JSONL line: compact, UTF-8, insertion-ordered keys."""
    return json.dumps(example.record, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


class _Collector:
    """Counts every issue and keeps the first `limit` errors and warnings (errors take precedence)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.errors: list[Issue] = []
        self.warnings: list[Issue] = []
        self.error_count = 0
        self.warning_count = 0

    def add(self, issue: Issue) -> None:
        if issue.severity is Severity.ERROR:
            self.error_count += 1
            if len(self.errors) < self.limit:
                self.errors.append(issue)
        else:
            self.warning_count += 1
            if len(self.warnings) < self.limit:
                self.warnings.append(issue)

    def listed(self) -> tuple[Issue, ...]:
        errors = self.errors[: self.limit]
        warnings = self.warnings[: self.limit - len(errors)]
        return tuple(sorted(errors + warnings, key=lambda i: (i.line, i.message_index or 0)))


def validate_file(path: Path, *, format: DatasetFormat | None = None,
                  min_examples: int = DEFAULT_MIN_EXAMPLES, issue_limit: int = ISSUE_LIMIT,
                  normalized_out: IO[bytes] | None = None) -> ValidationReport:
    """Validates a JSONL file; writes each valid example's normalized line to `normalized_out` if given.

    `format` None means detect it from content; when nothing matches, the file is checked as OpenAI chat
    (the must-have format), which tells the user what a line should look like.
    """
    issues = _Collector(issue_limit)
    detected = format or detect_format(path) or DatasetFormat.OPENAI_CHAT
    checker = CHECKERS.get(detected)
    if checker is None:
        names = ", ".join(f.value for f in CHECKERS)
        issues.add(Issue(Severity.ERROR, UNSUPPORTED_FORMAT, 0,
                         f"The file looks like {detected.value} data, which is not accepted yet; "
                         f"convert it to one of: {names}."))
        return _report(detected, 0, issues, Statistics())

    checked = examples = messages = characters = duplicates = first_duplicate = 0
    # 64-bit digests, not the examples: millions of examples fit in a few hundred MB; a collision
    # (odds ~n²/2⁶⁵) would only miscount a warning.
    seen: set[int] = set()
    for number, line in _lines(path):
        checked += 1

        def add(code: str, message: str, field: str = "", message_index: int | None = None,
                severity: Severity = Severity.ERROR, _line: int = number) -> None:
            issues.add(Issue(severity, code, _line, message, field, message_index))

        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            add(INVALID_UTF8, f"The line is not valid UTF-8 (byte 0x{line[exc.start]:02x} at position "
                f"{exc.start + 1}); save the file as UTF-8.")
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            add(INVALID_JSON, f"The line is not valid JSON: {exc.msg} at column {exc.colno}.")
            continue
        if not isinstance(obj, dict):
            add(NOT_AN_OBJECT, f"Each line must be one JSON object, not {_json_type(obj)}.")
            continue
        example = checker.check(obj, add)
        if example is None:
            continue
        examples += 1
        messages += example.messages
        characters += example.characters
        data = normalized_line(example)
        digest = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")
        if digest in seen:
            duplicates += 1
            first_duplicate = first_duplicate or number
        else:
            seen.add(digest)
        if normalized_out is not None:
            normalized_out.write(data)

    if checked < min_examples:
        issues.add(Issue(Severity.ERROR, TOO_FEW_EXAMPLES, 0,
                         f"The file has {checked} example{'s' if checked != 1 else ''}; at least "
                         f"{min_examples} are required (metadata.min_examples)."))
    if examples and duplicates > DUPLICATE_WARNING_FRACTION * examples and first_duplicate:
        issues.add(Issue(Severity.WARNING, DUPLICATE_EXAMPLES, 0,
                         f"{duplicates} of {examples} examples ({100 * duplicates / examples:.0f}%) "
                         f"repeat an earlier example exactly (the first on line {first_duplicate}); "
                         "duplicates weigh those examples more in training."))
    stats = Statistics(example_count=examples,
                       mean_messages_per_example=messages / examples if examples else 0.0,
                       total_characters=characters, duplicate_count=duplicates)
    return _report(detected, checked, issues, stats)


def _report(fmt: DatasetFormat, checked: int, issues: _Collector, stats: Statistics) -> ValidationReport:
    listed = issues.listed()
    return ValidationReport(format=fmt, examples_checked=checked, error_count=issues.error_count,
                            warning_count=issues.warning_count, issues=listed,
                            issues_truncated=len(listed) < issues.error_count + issues.warning_count,
                            statistics=stats)
