"""The blocking part of an upload or a re-split: validate, normalize, count tokens, split, store. Runs in
a worker thread.

Object keys (stable; workers get them as URIs through Dataset.splits):
  datasets/<org>/<dataset_id>/source.<jsonl|csv|parquet|zip>  the uploaded bytes, as received
  datasets/<org>/<dataset_id>/normalized.jsonl              every kept example, normalized, in file order
  datasets/<org>/<dataset_id>/token_lengths.bin             tokens per normalized example (uint32, LE)
  datasets/<org>/<dataset_id>/images/<path>                 the images a ZIP's examples refer to
  datasets/<org>/<dataset_id>/<split>.jsonl                 the splits made at upload
  datasets/<org>/<dataset_id>/splits/<version>/<split>.jsonl  the splits of each later SplitDataset
Split files are never overwritten: a job that was given a split's URI keeps reading the same examples
even if the dataset is re-split meanwhile. A re-split reads normalized.jsonl (and the token lengths), so
it never needs the source's container, column mapping or tokenizer again. Deleting the dataset removes
everything under its prefix.
"""

from __future__ import annotations

import dataclasses
from array import array
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from services.datasets.domain import (
    SPLIT_KINDS,
    DatasetFormat,
    DatasetOptions,
    SplitFile,
    SplitKind,
    SplitPlan,
    ValidationReport,
)
from services.datasets.readers import MAX_LINE_BYTES, SourceKind
from services.datasets.splitting import assign_splits, split_counts
from services.datasets.tokens import DEFAULT_MAX_LENGTH, load_tokenizer, token_lengths, token_stats
from services.datasets.validation import (
    DEFAULT_MIN_EXAMPLES,
    ISSUE_LIMIT,
    ImageUri,
    Validated,
    validate_source,
)
from tuneforge_core.storage import ObjectStore


def dataset_prefix(organization: str, dataset_id: str) -> str:
    return f"datasets/{organization}/{dataset_id}/"


def source_key(organization: str, dataset_id: str, kind: SourceKind = SourceKind.JSONL) -> str:
    return f"{dataset_prefix(organization, dataset_id)}source.{kind.value}"


# Keys under a dataset's prefix (dataset_prefix).
NORMALIZED = "normalized.jsonl"
TOKEN_LENGTHS = "token_lengths.bin"
IMAGES = "images/"


def resplit_prefix(organization: str, dataset_id: str, version: str) -> str:
    return f"{dataset_prefix(organization, dataset_id)}splits/{version}/"


@dataclass(frozen=True)
class ProcessOptions:
    """Everything that decides how a source becomes examples (from the upload metadata and settings)."""

    format: DatasetFormat | None = None
    options: DatasetOptions = field(default_factory=DatasetOptions)
    column_mapping: dict[str, str] = field(default_factory=dict)
    min_examples: int = DEFAULT_MIN_EXAMPLES
    issue_limit: int = ISSUE_LIMIT
    max_line_bytes: int = MAX_LINE_BYTES
    max_extracted_bytes: int = 2**31
    # What the examples may decode to (the upload limit): Parquet and the options can multiply the bytes.
    max_decoded_bytes: int = 2**31
    tokenizer: str = ""
    max_length: int = DEFAULT_MAX_LENGTH


@dataclass(frozen=True)
class Processed:
    report: ValidationReport
    # Empty when the report has errors. Splits that got no example are left out.
    splits: tuple[SplitFile, ...]
    kind: SourceKind = SourceKind.JSONL


def write_splits(
    normalized: Path, counts: tuple[int, int, int], seed: int, work_dir: Path
) -> list[tuple[Path, int]]:
    """Routes each line of `normalized` to its split file in work_dir; returns (path, count) per split."""
    paths = [work_dir / f"{kind.value}.jsonl" for kind in SPLIT_KINDS]
    with ExitStack() as stack, normalized.open("rb") as source:
        outs = [stack.enter_context(p.open("wb")) for p in paths]
        for line, k in zip(source, assign_splits(counts, seed), strict=True):
            outs[k].write(line)
    return list(zip(paths, counts, strict=True))


def _store_splits(
    normalized: Path,
    count: int,
    plan: SplitPlan,
    work_dir: Path,
    store: ObjectStore,
    split_prefix: str,
    validation_file: Path | None,
    validation_count: int,
) -> list[SplitFile]:
    counts = split_counts(count, plan.fractions)
    splits = []
    for kind, (path, n) in zip(
        SPLIT_KINDS, write_splits(normalized, counts, plan.seed, work_dir), strict=True
    ):
        if kind is SplitKind.VALIDATION and validation_file is not None:
            path, n = validation_file, validation_count
        if n:
            key = f"{split_prefix}{kind.value}.jsonl"
            store.put_file(key, path)
            splits.append(SplitFile(kind, n, key))
    return splits


def _with_train_tokens(report: ValidationReport, lengths: array, plan: SplitPlan) -> ValidationReport:
    """The report with train_tokens counted over the train split `plan` gives."""
    tokens = report.statistics.tokens
    if tokens is None:
        return report
    counts = split_counts(len(lengths), plan.fractions)
    stats = token_stats(
        lengths, tokens.tokenizer, tokens.max_length, (k == 0 for k in assign_splits(counts, plan.seed))
    )
    return dataclasses.replace(report, statistics=dataclasses.replace(report.statistics, tokens=stats))


def _validate_and_count(
    source: Path, work_dir: Path, opts: ProcessOptions, image_uri: ImageUri | None = None
) -> tuple[Validated, Path, array]:
    """Validates into work_dir/normalized.jsonl; with a tokenizer, adds token statistics (train_tokens
    not yet: that needs the split) and returns the length of each example."""
    tokenizer = load_tokenizer(opts.tokenizer) if opts.tokenizer else None
    normalized = work_dir / "normalized.jsonl"
    with normalized.open("wb") as out:
        validated = validate_source(
            source,
            work_dir=work_dir,
            format=opts.format,
            options=opts.options,
            column_mapping=opts.column_mapping,
            min_examples=opts.min_examples,
            issue_limit=opts.issue_limit,
            max_line_bytes=opts.max_line_bytes,
            max_extracted_bytes=opts.max_extracted_bytes,
            max_decoded_bytes=opts.max_decoded_bytes,
            normalized_out=out,
            image_uri=image_uri,
        )
    lengths = array("I")
    report = validated.report
    if tokenizer is not None and report.valid:
        lengths.extend(token_lengths(normalized, report.format, tokenizer))
        stats = token_stats(lengths, opts.tokenizer, opts.max_length)
        validated.report = dataclasses.replace(
            report, statistics=dataclasses.replace(report.statistics, tokens=stats)
        )
    return validated, normalized, lengths


def validate_only(source: Path, *, work_dir: Path, opts: ProcessOptions) -> ValidationReport:
    """What validate_and_split reports, token statistics included, without storing anything."""
    return _validate_and_count(source, work_dir, opts)[0].report


def validate_and_split(
    source: Path,
    *,
    work_dir: Path,
    store: ObjectStore,
    prefix: str,
    split_prefix: str,
    plan: SplitPlan,
    opts: ProcessOptions,
    validation_file: Path | None = None,
) -> Processed:
    """Validates `source`; if it is valid, stores its source, normalized examples, images, token lengths
    and splits. `validation_file` (normalized JSONL) replaces the validation split when given.

    The caller owns cleanup: on any error, it deletes what was stored under the dataset's prefix.
    """
    validated, normalized, lengths = _validate_and_count(
        source, work_dir, opts, lambda p: store.uri(f"{prefix}{IMAGES}{p}")
    )
    report = validated.report
    if not report.valid:
        return Processed(report, (), validated.kind)
    if report.statistics.tokens is not None:
        report = _with_train_tokens(report, lengths, plan)
        store.put_bytes(f"{prefix}{TOKEN_LENGTHS}", lengths.tobytes())
    if validated.image_root is not None:
        for image in sorted(validated.images):
            store.put_file(f"{prefix}{IMAGES}{image}", validated.image_root / image)
    validation_count = _count_lines(validation_file) if validation_file is not None else 0
    splits = _store_splits(
        normalized,
        report.statistics.example_count,
        plan,
        work_dir,
        store,
        split_prefix,
        validation_file,
        validation_count,
    )
    store.put_file(f"{prefix}{NORMALIZED}", normalized)
    store.put_file(f"{prefix}source.{validated.kind.value}", source)
    return Processed(report, tuple(splits), validated.kind)


def resplit(
    report: ValidationReport,
    *,
    work_dir: Path,
    store: ObjectStore,
    prefix: str,
    split_prefix: str,
    plan: SplitPlan,
    source_key: str = "",
) -> Processed:
    """New split files from the stored normalized examples; train_tokens follows the new train split.

    Datasets stored before normalized.jsonl existed are normalized again from their source (`source_key`).
    """
    if store.exists(f"{prefix}{NORMALIZED}"):
        normalized = store.get_file(f"{prefix}{NORMALIZED}", work_dir / NORMALIZED)
    else:
        source = store.get_file(source_key, work_dir / "source")
        normalized = work_dir / NORMALIZED
        with normalized.open("wb") as out:
            validate_source(
                source, work_dir=work_dir, format=report.format, min_examples=1, normalized_out=out
            )
    if report.statistics.tokens is not None:
        lengths = array("I")
        lengths.frombytes(store.get_bytes(f"{prefix}{TOKEN_LENGTHS}"))
        report = _with_train_tokens(report, lengths, plan)
    splits = _store_splits(normalized, _count_lines(normalized), plan, work_dir, store, split_prefix, None, 0)
    return Processed(report, tuple(splits))


def _count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for _ in f)
