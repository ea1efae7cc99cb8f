"""The blocking part of an upload or a re-split: validate, normalize, split, store. Runs in a worker thread.

Object keys (stable; workers get them as URIs through Dataset.splits):
  datasets/<org>/<dataset_id>/source.jsonl                 the uploaded bytes, as received
  datasets/<org>/<dataset_id>/<split>.jsonl                the splits made at upload
  datasets/<org>/<dataset_id>/splits/<version>/<split>.jsonl  the splits of each later SplitDataset
Split files are never overwritten: a job that was given a split's URI keeps reading the same examples
even if the dataset is re-split meanwhile. Deleting the dataset removes everything under its prefix.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from services.datasets.domain import (
    SPLIT_KINDS,
    DatasetFormat,
    SplitFile,
    SplitPlan,
    ValidationReport,
)
from services.datasets.splitting import assign_splits, split_counts
from services.datasets.validation import ISSUE_LIMIT, validate_file
from services.kit.storage import ObjectStore


def dataset_prefix(organization: str, dataset_id: str) -> str:
    return f"datasets/{organization}/{dataset_id}/"


def source_key(organization: str, dataset_id: str) -> str:
    return f"{dataset_prefix(organization, dataset_id)}source.jsonl"


def resplit_prefix(organization: str, dataset_id: str, version: str) -> str:
    return f"{dataset_prefix(organization, dataset_id)}splits/{version}/"


@dataclass(frozen=True)
class Processed:
    report: ValidationReport
    # Empty when the report has errors. Splits that got no example are left out.
    splits: tuple[SplitFile, ...]


def write_splits(normalized: Path, counts: tuple[int, int, int], seed: int,
                 work_dir: Path) -> list[tuple[Path, int]]:
    """Routes each line of `normalized` to its split file in work_dir; returns (path, count) per split."""
    paths = [work_dir / f"{kind.value}.jsonl" for kind in SPLIT_KINDS]
    with ExitStack() as stack, normalized.open("rb") as source:
        outs = [stack.enter_context(p.open("wb")) for p in paths]
        for line, k in zip(source, assign_splits(counts, seed), strict=True):
            outs[k].write(line)
    return list(zip(paths, counts, strict=True))


def validate_and_split(source: Path, *, work_dir: Path, store: ObjectStore, split_prefix: str,
                       plan: SplitPlan, format: DatasetFormat | None, min_examples: int,
                       issue_limit: int = ISSUE_LIMIT) -> Processed:
    """Validates `source`; if it is valid, writes its normalized splits to the store under split_prefix.

    The caller owns cleanup: on any error, it deletes what was stored under the prefix.
    """
    normalized = work_dir / "normalized.jsonl"
    with normalized.open("wb") as out:
        report = validate_file(source, format=format, min_examples=min_examples, issue_limit=issue_limit,
                               normalized_out=out)
    if not report.valid:
        return Processed(report, ())
    counts = split_counts(report.statistics.example_count, plan.fractions)
    splits = []
    for kind, (path, count) in zip(SPLIT_KINDS, write_splits(normalized, counts, plan.seed, work_dir),
                                   strict=True):
        if count:
            key = f"{split_prefix}{kind.value}.jsonl"
            store.put_file(key, path)
            splits.append(SplitFile(kind, count, key))
    return Processed(report, tuple(splits))
