"""A dataset file checked where it is, by the code the datasets service runs, without uploading it: the
report UploadDataset / ValidateDataset would make of it (`tuneforge datasets validate`, and an upload's
check before it sends anything), and the size an estimate reads of it (a dry run of a config file that
names a local file: services.client.config_jobs)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from tuneforge.v1 import dataset_pb2, dataset_service_pb2, estimation_pb2

from services.datasets.converters import report_to_proto, upload_spec_from_proto
from services.datasets.processing import ProcessOptions, validate_only
from services.datasets.splitting import DEFAULT_FRACTIONS, SplitPlan, resolve_split, split_counts
from services.datasets.tokens import DEFAULT_MAX_LENGTH
from services.datasets.uploads import _check_options
from services.datasets.validation import DEFAULT_MIN_EXAMPLES, ISSUE_LIMIT
from tuneforge_core.errors import Violations


def options_of(metadata: dataset_service_pb2.UploadDatasetMetadata) -> tuple[ProcessOptions, SplitPlan]:
    """What the upload's metadata asks of the processing, with the server's defaults and limits: raises
    InvalidArgument naming each field the server would refuse (metadata.options..., metadata.split...)."""
    spec = upload_spec_from_proto(metadata)
    v = Violations()
    _check_options(v, spec)
    plan = resolve_split(spec.split, v, "metadata.split", defaults=DEFAULT_FRACTIONS)
    v.raise_if_any("invalid options")
    opts = ProcessOptions(format=spec.format, options=spec.options, column_mapping=dict(spec.column_mapping),
                          min_examples=spec.min_examples or DEFAULT_MIN_EXAMPLES,
                          issue_limit=spec.issue_limit or ISSUE_LIMIT, tokenizer=spec.tokenizer,
                          max_length=spec.max_length or DEFAULT_MAX_LENGTH)
    return opts, plan


def validate_file(path: Path, opts: ProcessOptions) -> dataset_pb2.ValidationReport:
    """The validation report of `path` (TuneForgeError when it cannot be read as asked, e.g. a tokenizer
    that cannot be loaded)."""
    with tempfile.TemporaryDirectory(prefix="tuneforge-validate-") as scratch:
        return report_to_proto(validate_only(path, work_dir=Path(scratch), opts=opts))


def size_of_file(report: dataset_pb2.ValidationReport, plan: SplitPlan,
                 name: str) -> estimation_pb2.DatasetSize:
    """The size an estimate reads of a dataset (EstimateJob / PlanJob dataset_size), as the file would be
    once uploaded with `plan`'s split."""
    train = split_counts(report.statistics.example_count, plan.fractions)[0]
    return estimation_pb2.DatasetSize(dataset=name, statistics=report.statistics, train_examples=train)
