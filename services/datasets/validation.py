"""Validates an uploaded file in one streaming pass and writes its normalized examples.

- Line numbers are 1-based lines of the file (JSONL, and CSV where a record starts), Parquet row
  numbers, or lines of train.jsonl inside a ZIP. Blank lines are ignored but counted; a UTF-8 BOM is
  ignored.
- The format is named by the user or detected from the first 100 objects; every line is then classified
  by its keys, and a line that clearly belongs to another format is a FORMAT_MISMATCH error on that line
  plus one MIXED_FORMATS error saying which lines look like which format.
- Every problem on a line is reported (not only the first), so one round of fixes is enough. The report
  lists at most `issue_limit` issues (errors first) and counts all of them.
- Duplicates are exact duplicates of the *normalized* example (key order and whitespace do not matter);
  more than 10% of them is a warning. Classification-style data (targets from at most 50 short labels)
  whose most and least common labels differ by more than 10:1 is a warning.
- The normalized example (what the splits contain) is the family's canonical shape (see checkers.py),
  with DatasetOptions.system_prompt / prompt_template applied, and only the first max_samples kept.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import IO, Any

import msgspec

from services.datasets.checkers import CHECKERS, Example
from services.datasets.detection import SIGNATURES, classify, detect
from services.datasets.domain import (
    DatasetFormat,
    DatasetOptions,
    Issue,
    Severity,
    Statistics,
    ValidationReport,
)
from services.datasets.fast_chat import (
    FastBatch,
    FastChat,
    chat_counts,
    chat_digest,
    fast_chat,
    fast_chat_batch,
    last_assistant,
)
from services.datasets.issues import IssueCode, json_type
from services.datasets.options import apply_options
from services.datasets.readers import (
    DETECTION_SAMPLE_LINES,
    MAX_LINE_BYTES,
    UNREADABLE,
    LineBlock,
    SourceKind,
    csv_records,
    decoded_too_large,
    extract_zip,
    image_problem,
    jsonl_chunks,
    mapped_objects,
    parquet_records,
    parse_json_line,
    sniff,
    unsupported_container,
    wide_encoding,
)

ISSUE_LIMIT = 100
FAST_BATCH = 256
WRITE_BATCH = 1024
MAX_ISSUE_LIMIT = 1000
DEFAULT_MIN_EXAMPLES = 100
DUPLICATE_WARNING_FRACTION = 0.10
# Classification-style data: targets drawn from at most this many labels of at most this many characters.
MAX_CLASSES = 50
MAX_LABEL_CHARS = 40
MIN_CLASSIFICATION_EXAMPLES = 20
IMBALANCE_RATIO = 10.0

SIGNATURE_KEYS = dict(SIGNATURES)

ImageUri = Callable[[str], str]
"""Maps an image path inside a ZIP (relative to train.jsonl) to what the normalized example holds."""


_encode_lines = msgspec.json.Encoder().encode_lines


def normalized_line(record: Any) -> bytes:
    """A normalized record as one canonical JSONL line: compact, UTF-8, insertion-ordered keys."""
    return msgspec.json.encode(record) + b"\n"


def detect_format(path: Path, sample_lines: int = DETECTION_SAMPLE_LINES) -> DatasetFormat | None:
    """The format most of the first parsable JSONL objects match, or None when none matches any."""
    objects = (
        obj for _, obj in _JsonlRecords(path, MAX_LINE_BYTES, lambda *a, **k: None) if isinstance(obj, dict)
    )
    return detect(islice(objects, sample_lines))


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

    def file_issue(
        self, code: str, message: str, line: int = 0, field: str = "", severity: Severity = Severity.ERROR
    ) -> None:
        self.add(Issue(severity, code, line, message, field))

    def listed(self) -> tuple[Issue, ...]:
        errors = self.errors[: self.limit]
        warnings = self.warnings[: self.limit - len(errors)]
        return tuple(sorted(errors + warnings, key=lambda i: (i.line, i.message_index or 0)))


class _LineSink:
    """The IssueSink of the line being checked: one object for the whole file, not a closure per line."""

    def __init__(self, issues: _Collector) -> None:
        self.issues = issues
        self.line = 0

    def __call__(
        self,
        code: str,
        message: str,
        field: str = "",
        message_index: int | None = None,
        severity: Severity = Severity.ERROR,
    ) -> None:
        self.issues.add(Issue(severity, code, self.line, message, field, message_index))


class _JsonlRecords:
    """The objects of a JSONL file, a line at a time. Once `fast` is set (after detection), lines are
    taken in windows of FAST_BATCH (non-blank) lines: a window of plain chat lines is yielded as one
    FastBatch (with its first line number), any other window line by line, as fast_chat's Example or as
    the parsed object.

    A window is read whole before any of its lines is checked, so a LINE_TOO_LONG in it is reported
    before the issues of the lines above it, as it always was: which issues a truncated report lists
    does not change."""

    def __init__(self, path: Path, max_line_bytes: int, add: Callable[..., None]) -> None:
        self.path, self.max_line_bytes, self.add = path, max_line_bytes, add
        self.fast = False

    def _slow(self, number: int, line: bytes | None, unterminated: bool) -> Any:
        return UNREADABLE if line is None else parse_json_line(line, unterminated, number, self.add)

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        chunks = jsonl_chunks(self.path, self.max_line_bytes, self.add)
        lines: list[bytes] = []  # lines of the LineBlock being read: lines[k] is line start + k
        start = k = 0
        ahead: tuple[int, bytes | None, bool] | None = None  # an item read after `lines`
        done = False
        while True:
            if not self.fast:
                if k < len(lines):
                    line = lines[k]
                    k += 1
                    if line.strip():
                        yield start + k - 1, self._slow(start + k - 1, line, False)
                    continue
                chunk = next(chunks, None)
                if chunk is None:
                    return
                if isinstance(chunk, LineBlock):
                    lines, start, k = chunk.lines, chunk.start, 0
                else:
                    yield chunk[0], self._slow(*chunk)
                continue
            while ahead is None and not done and len(lines) - k < FAST_BATCH:
                chunk = next(chunks, None)
                if chunk is None:
                    done = True
                elif isinstance(chunk, LineBlock):  # the lines right after lines[k:]: join them
                    rest = lines[k:]
                    lines, start, k = rest + chunk.lines, chunk.start - len(rest), 0
                else:
                    ahead = chunk
            window = lines[k : k + FAST_BATCH]
            if window and (len(window) == FAST_BATCH or (ahead is None and done)):
                clean = fast_chat_batch(start + k, window)
                if clean is not None:
                    k += len(window)
                    yield clean.start, clean
                    continue
            items: list[tuple[int, bytes | None, bool]] = []
            while len(items) < FAST_BATCH:
                if k < len(lines):
                    if lines[k].strip():
                        items.append((start + k, lines[k], False))
                    k += 1
                elif ahead is not None:
                    items.append(ahead)
                    ahead = None
                elif done:
                    break
                elif (chunk := next(chunks, None)) is None:
                    done = True
                elif isinstance(chunk, LineBlock):
                    lines, start, k = chunk.lines, chunk.start, 0
                else:
                    items.append(chunk)
            if not items:
                return
            for number, raw, unterminated in items:
                example = None if raw is None else fast_chat(raw)
                yield number, example if example is not None else self._slow(number, raw, unterminated)


@dataclass
class Validated:
    """A report, and the ZIP images the valid examples refer to (paths relative to `image_root`)."""

    report: ValidationReport
    kind: SourceKind
    image_root: Path | None = None
    images: set[str] = field(default_factory=set)


@dataclass
class _Mismatch:
    count: int = 0
    lines: list[int] = field(default_factory=list)


def validate_source(
    path: Path,
    *,
    work_dir: Path,
    format: DatasetFormat | None = None,
    options: DatasetOptions = DatasetOptions(),
    column_mapping: dict[str, str] | None = None,
    min_examples: int = DEFAULT_MIN_EXAMPLES,
    issue_limit: int = ISSUE_LIMIT,
    max_line_bytes: int = MAX_LINE_BYTES,
    max_extracted_bytes: int = 2**31,
    max_decoded_bytes: int = 2**31,
    normalized_out: IO[bytes] | None = None,
    image_uri: ImageUri | None = None,
) -> Validated:
    """Validates any accepted container; writes each kept example's normalized line to `normalized_out`.

    `format` None means detect it from content; when nothing matches, the file is checked as OpenAI chat
    (the must-have format), which tells the user what a line should look like. ZIPs are extracted into
    `work_dir`, which the caller owns.

    The normalized examples may be at most `max_decoded_bytes` (the upload limit), whatever the container
    and the options (a Parquet file or a system prompt can multiply the bytes), or `max_extracted_bytes`
    for a ZIP, which may expand that far: past it, reading stops with a DECODED_TOO_LARGE error.
    """
    issues = _Collector(issue_limit)

    def add_file(code: str, message: str, line: int = 0, field: str = "") -> None:
        issues.file_issue(code, message, line, field)

    mapping = column_mapping or {}
    kind = sniff(path, has_mapping=bool(mapping))
    result = Validated(
        ValidationReport(format or DatasetFormat.OPENAI_CHAT, 0, 0, 0, (), False, Statistics(), issue_limit),
        kind,
    )
    if path.stat().st_size == 0:
        add_file(
            IssueCode.EMPTY_FILE, "The file is empty (0 bytes); upload a file with one example per line."
        )
        result.report = _report(format or DatasetFormat.OPENAI_CHAT, 0, issues, Statistics())
        return result
    with path.open("rb") as start:
        head_bytes = start.read(4096)
    wide = wide_encoding(head_bytes)
    if wide is not None:  # the cause, once, rather than invalid UTF-8 on line 1 and "0 examples"
        add_file(IssueCode.INVALID_UTF8, f"The file is {wide[0]} ({wide[1]}), not UTF-8; save it as UTF-8 "
                 f"(e.g. iconv -f {wide[0]} -t UTF-8).")
        result.report = _report(format or DatasetFormat.OPENAI_CHAT, 0, issues, Statistics())
        return result
    unsupported = unsupported_container(head_bytes) if kind is not SourceKind.ZIP else None
    if unsupported is not None:  # likewise: not "invalid UTF-8 (byte 0x8b)" on line 1
        add_file(IssueCode.UNSUPPORTED_CONTAINER, unsupported)
        result.report = _report(format or DatasetFormat.OPENAI_CHAT, 0, issues, Statistics())
        return result
    records: Iterator[tuple[int, Any]]
    jsonl: _JsonlRecords | None = None
    if kind is SourceKind.ZIP:
        archive = extract_zip(path, work_dir / "archive", max_extracted_bytes, add_file)
        if archive is None:
            result.report = _report(format or DatasetFormat.OPENAI_CHAT, 0, issues, Statistics())
            return result
        result.image_root = archive.root
        jsonl = _JsonlRecords(archive.master, max_line_bytes, add_file)
        records = iter(jsonl)
    elif kind is SourceKind.CSV:
        records = csv_records(path, mapping, max_line_bytes, add_file)
    elif kind is SourceKind.PARQUET:
        records = parquet_records(path, mapping, add_file, max_decoded_bytes)
    else:
        jsonl = _JsonlRecords(path, max_line_bytes, add_file)
        records = iter(jsonl)
    if jsonl is not None and mapping:  # keys renamed object by object, so never the raw-line fast path
        records = mapped_objects(records, mapping, add_file, DETECTION_SAMPLE_LINES)
        jsonl = None

    head = list(islice(records, DETECTION_SAMPLE_LINES))
    detected = format or detect(obj for _, obj in head if isinstance(obj, dict)) or DatasetFormat.OPENAI_CHAT
    checker = CHECKERS[detected]
    expected_keys = SIGNATURE_KEYS[detected]
    how = "named in metadata.format" if format else "detected from most lines"
    mismatches: dict[DatasetFormat, _Mismatch] = {}
    if (
        jsonl is not None
        and detected is DatasetFormat.OPENAI_CHAT
        and not (options.system_prompt or options.prompt_template)
    ):
        jsonl.fast = True
    fast = jsonl is not None and jsonl.fast
    add = _LineSink(issues)

    checked = examples = kept = dropped = messages = characters = duplicates = first_duplicate = 0
    longest = 0  # bytes of the longest kept example's line (DatasetStatistics.longest_example_bytes)
    with_images = False
    decoded = 0  # bytes of the normalized examples
    budget = max_extracted_bytes if kind is SourceKind.ZIP else max_decoded_bytes
    targets: Counter[str] | None = Counter()
    # 64-bit hashes (SipHash, seeded per process), not the examples: millions of examples fit in a few
    # hundred MB; a collision (odds ~n²/2⁶⁵) would only miscount a warning.
    seen: set[int] = set()
    pending: list[bytes] = []
    max_samples = options.max_samples
    for number, obj in chain(head, records):
        if obj.__class__ is FastBatch:
            # Lines with no issue, normalized by encoding their structs: counted and written in bulk.
            rows = obj.rows
            n = len(rows)
            checked += n
            examples += n
            take = n if max_samples is None else min(n, max(0, max_samples - kept))
            if take < n:
                dropped += n - take
                rows = rows[:take]
                batch_messages, batch_characters = chat_counts(rows)
            else:
                batch_messages, batch_characters = obj.messages, obj.characters
            if not take:
                continue
            kept += take
            messages += batch_messages
            characters += batch_characters
            longest = max(longest, max(obj.lengths[:take]))
            digests = list(map(hash, rows))
            fresh = set(digests)
            if len(fresh) == take and seen.isdisjoint(fresh):
                seen |= fresh
            else:
                for line_number, digest in enumerate(digests, number):
                    if digest in seen:
                        duplicates += 1
                        first_duplicate = first_duplicate or line_number
                    else:
                        seen.add(digest)
            if targets is not None:
                for row in rows:
                    targets = _count_target(targets, last_assistant(row))
                    if targets is None:
                        break
            encoded_rows = _encode_lines(rows)
            decoded += len(encoded_rows)
            if decoded > budget:
                decoded_too_large(add_file, budget, f"the examples up to line {number + n - 1}", number)
                break
            if normalized_out is not None:
                pending.append(encoded_rows)
                normalized_out.writelines(pending)
                pending.clear()
            continue
        checked += 1
        add.line = number
        example: Example | None
        if obj.__class__ is Example:
            example = obj
        elif obj is UNREADABLE:
            continue
        elif not isinstance(obj, dict):
            add(IssueCode.NOT_AN_OBJECT, f"Each line must be one JSON object, not {json_type(obj)}.")
            continue
        else:
            shape = classify(obj)
            # A line with another format's keys is a mismatch, unless it merely lacks some of this format's
            # keys (a prompt-only line in a prompt/completion file): then the checker says what is missing.
            if (
                shape is not None
                and shape is not detected
                and not expected_keys <= obj.keys()
                and not SIGNATURE_KEYS[shape] < expected_keys
            ):
                add(
                    IssueCode.FORMAT_MISMATCH,
                    f"The line looks like {shape.value} (it has "
                    f"{', '.join(sorted(SIGNATURE_KEYS[shape]))}), but the file is {detected.value} ({how}); "
                    "one file must hold one format.",
                )
                seen_shape = mismatches.setdefault(shape, _Mismatch())
                seen_shape.count += 1
                if len(seen_shape.lines) < 5:
                    seen_shape.lines.append(number)
                continue
            example = checker.check(obj, add)
            if example is None or not _images_ok(example, result, add):
                continue
        examples += 1
        if max_samples is not None and kept >= max_samples:
            dropped += 1
            continue
        record = example.record
        if options.system_prompt or options.prompt_template:
            record = apply_options(record, detected, options.system_prompt, options.prompt_template)
        if example.images and image_uri is not None:
            record["images"] = [image_uri(p) for p in example.images]
        kept += 1
        messages += example.messages
        characters += example.characters
        encoded = msgspec.json.encode(record)
        decoded += len(encoded) + 1
        longest = max(longest, len(encoded))
        with_images = with_images or bool(example.images)
        if decoded > budget:
            decoded_too_large(add_file, budget, f"the examples up to line {number}", number)
            break
        if isinstance(record, FastChat):
            digest = hash(record)
        else:
            digest = chat_digest(encoded) if fast else hash(encoded)
        if digest in seen:
            duplicates += 1
            first_duplicate = first_duplicate or number
        else:
            seen.add(digest)
        if targets is not None:
            targets = _count_target(targets, example.target)
        if normalized_out is not None:
            pending.append(encoded + b"\n")
            if len(pending) == WRITE_BATCH:
                normalized_out.writelines(pending)
                pending.clear()
    if normalized_out is not None:
        normalized_out.writelines(pending)

    if mismatches:
        parts = [
            f"{f.value} on {m.count} line(s) (first: {', '.join(map(str, m.lines))})"
            for f, m in mismatches.items()
        ]
        add_file(
            IssueCode.MIXED_FORMATS,
            f"The file mixes formats: it is {detected.value} ({how}), but lines look like "
            f"{'; '.join(parts)}. Split it into one file per format.",
        )
    if checked < min_examples:
        add_file(
            IssueCode.TOO_FEW_EXAMPLES,
            f"The file has {checked} example{'s' if checked != 1 else ''}; at least "
            f"{min_examples} are required (metadata.min_examples).",
        )
    if kept and duplicates > DUPLICATE_WARNING_FRACTION * kept and first_duplicate:
        issues.file_issue(
            IssueCode.DUPLICATE_EXAMPLES,
            f"{duplicates} of {kept} examples ({100 * duplicates / kept:.0f}%) repeat an earlier "
            f"example exactly (the first on line {first_duplicate}); duplicates weigh those "
            "examples more in training.",
            severity=Severity.WARNING,
        )
    _check_balance(targets, kept, issues)
    stats = Statistics(
        example_count=kept,
        mean_messages_per_example=messages / kept if kept else 0.0,
        total_characters=characters,
        duplicate_count=duplicates,
        dropped_by_max_samples=dropped,
        # Image tokens are not in the bytes: no bound is given for a dataset with images.
        longest_example_bytes=0 if with_images else longest,
    )
    result.report = _report(detected, checked, issues, stats)
    return result


def _count_target(targets: Counter[str], label: str | None) -> Counter[str] | None:
    """Counts one example's target; None once the targets no longer look like class labels."""
    if (
        label is None
        or len(label) > MAX_LABEL_CHARS
        or (label not in targets and len(targets) >= MAX_CLASSES)
    ):
        return None
    targets[label] += 1
    return targets


def _images_ok(example: Example, result: Validated, add: Callable[..., None]) -> bool:
    ok = True
    for k, image in enumerate(example.images):
        if result.image_root is None:
            add(
                IssueCode.MISSING_IMAGE,
                f"Image {image!r} cannot be found: examples with images must be uploaded as a "
                "ZIP holding train.jsonl and the images.",
                f"images[{k}]",
            )
            ok = False
            continue
        problem = image_problem(result.image_root, image)
        if problem is not None:
            add(problem[0], problem[1], f"images[{k}]")
            ok = False
        else:
            result.images.add(image)
    return ok


def _check_balance(targets: Counter[str] | None, kept: int, issues: _Collector) -> None:
    """Warns when classification-style targets are imbalanced beyond IMBALANCE_RATIO."""
    if targets is None or len(targets) < 2 or kept < MIN_CLASSIFICATION_EXAMPLES or len(targets) * 2 > kept:
        return
    ((common, most),) = targets.most_common(1)
    rare, least = min(targets.items(), key=lambda kv: kv[1])
    if most > IMBALANCE_RATIO * least:
        issues.file_issue(
            IssueCode.CLASS_IMBALANCE,
            f"The targets look like {len(targets)} class labels, and they are imbalanced: {common!r} has "
            f"{most} examples but {rare!r} only {least} ({most / least:.0f}:1, more than "
            f"{IMBALANCE_RATIO:.0f}:1); the model may learn to always answer {common!r}.",
            severity=Severity.WARNING,
        )


def validate_file(
    path: Path,
    *,
    format: DatasetFormat | None = None,
    min_examples: int = DEFAULT_MIN_EXAMPLES,
    issue_limit: int = ISSUE_LIMIT,
    normalized_out: IO[bytes] | None = None,
    **kwargs: Any,
) -> ValidationReport:
    """validate_source with a throwaway work folder: the report only."""
    with tempfile.TemporaryDirectory(prefix="validate-") as work:
        return validate_source(
            path,
            work_dir=Path(work),
            format=format,
            min_examples=min_examples,
            issue_limit=issue_limit,
            normalized_out=normalized_out,
            **kwargs,
        ).report


def _report(fmt: DatasetFormat, checked: int, issues: _Collector, stats: Statistics) -> ValidationReport:
    listed = issues.listed()
    return ValidationReport(
        format=fmt,
        examples_checked=checked,
        error_count=issues.error_count,
        warning_count=issues.warning_count,
        issues=listed,
        issues_truncated=len(listed) < issues.error_count + issues.warning_count,
        statistics=stats,
        issue_limit=issues.limit,
    )
