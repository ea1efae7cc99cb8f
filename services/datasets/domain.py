"""The datasets service's domain types: plain values, free of gRPC, protos and SQLAlchemy.

Enum values are the proto enum names without their prefix, so converters map them by name and the
database stores readable strings ("READY", "OPENAI_CHAT").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from tuneforge_core.compat import Family, family_of_format


class DatasetState(StrEnum):
    PROCESSING = "PROCESSING"
    READY = "READY"
    FAILED = "FAILED"


class DatasetFormat(StrEnum):
    OPENAI_CHAT = "OPENAI_CHAT"
    SHAREGPT = "SHAREGPT"
    ALPACA = "ALPACA"
    PROMPT_COMPLETION = "PROMPT_COMPLETION"
    TEXT = "TEXT"
    PREFERENCE = "PREFERENCE"
    OPENAI_PREFERENCE = "OPENAI_PREFERENCE"
    PROMPT_ONLY = "PROMPT_ONLY"
    KTO = "KTO"


def family(fmt: DatasetFormat) -> Family:
    """The one row shape a format is normalized to, from tuneforge_core.compat's table (the jobs service and
    the worker read the same one)."""
    found = family_of_format(fmt.value)
    if found is None:
        raise ValueError(f"{fmt.value} has no family in tuneforge_core.compat.FORMAT_FAMILY")
    return found


# The formats whose rows are conversations: normalized to {"messages": [...]}, rendered with a chat template.
CHAT_FORMATS: frozenset[DatasetFormat] = frozenset(f for f in DatasetFormat if family(f) is Family.CHAT)


class SplitKind(StrEnum):
    """Also the file name of the split: <kind>.jsonl."""

    TRAIN = "train"
    VALIDATION = "validation"
    TEST = "test"


SPLIT_KINDS: tuple[SplitKind, ...] = (SplitKind.TRAIN, SplitKind.VALIDATION, SplitKind.TEST)


class Severity(StrEnum):
    WARNING = "WARNING"
    ERROR = "ERROR"


@dataclass(frozen=True)
class Issue:
    """One problem in a dataset; `line` is 1-based, 0 for the dataset as a whole."""

    severity: Severity
    code: str
    line: int
    message: str
    field: str = ""
    message_index: int | None = None

    def location(self) -> str:
        """How a BadRequest FieldViolation names it: "line 7", "line 7: messages[2].role", "file" or, for
        a file-level issue about one part (a ZIP entry, the column mapping), "file: ../evil.txt"."""
        if self.line <= 0:
            return f"file: {self.field}" if self.field else "file"
        return f"line {self.line}: {self.field}" if self.field else f"line {self.line}"


@dataclass(frozen=True)
class TokenStats:
    """Tokens per example with one tokenizer; `train_tokens` sums the train split, each cut at max_length."""

    tokenizer: str
    min: int
    median: int
    p95: int
    max: int
    total: int
    truncated_count: int
    max_length: int
    train_tokens: int = 0


@dataclass(frozen=True)
class Statistics:
    example_count: int = 0
    mean_messages_per_example: float = 0.0
    total_characters: int = 0
    duplicate_count: int = 0
    tokens: TokenStats | None = None
    dropped_by_max_samples: int = 0
    # DatasetStatistics.longest_example_bytes: 0 when not known.
    longest_example_bytes: int = 0


@dataclass(frozen=True)
class DatasetOptions:
    """UploadDatasetMetadata.options; see DatasetOptions in dataset.proto for what each one does."""

    max_samples: int | None = None
    system_prompt: str = ""
    prompt_template: str = ""
    max_prompt_length: int = 0
    lazy_tokenize: bool = False
    streaming: bool = False


@dataclass(frozen=True)
class ValidationReport:
    """What validation found. The counts include every issue; `issues` lists at most the issue limit."""

    format: DatasetFormat
    examples_checked: int
    error_count: int
    warning_count: int
    issues: tuple[Issue, ...]
    issues_truncated: bool
    statistics: Statistics
    issue_limit: int = 100

    @property
    def valid(self) -> bool:
        return self.error_count == 0

    @property
    def errors(self) -> tuple[Issue, ...]:
        return tuple(i for i in self.issues if i.severity is Severity.ERROR)


@dataclass(frozen=True)
class SplitConfig:
    """A split as requested: None means "the default" for that field."""

    train_fraction: float | None = None
    validation_fraction: float | None = None
    test_fraction: float | None = None
    seed: int | None = None


@dataclass(frozen=True)
class SplitPlan:
    """A split config with defaults filled in and checked."""

    fractions: tuple[float, float, float]
    seed: int


@dataclass(frozen=True)
class SplitFile:
    kind: SplitKind
    example_count: int
    key: str


@dataclass(frozen=True)
class UploadSpec:
    """The metadata message of UploadDataset / ValidateDataset."""

    organization: str
    name: str = ""
    description: str = ""
    format: DatasetFormat | None = None
    filename: str = ""
    size_bytes: int = 0
    sha256: str = ""
    split: SplitConfig = field(default_factory=SplitConfig)
    request_id: str = ""
    min_examples: int | None = None
    tokenizer: str = ""
    max_length: int = 0
    options: DatasetOptions = field(default_factory=DatasetOptions)
    # CSV/Parquet: format field -> column name.
    column_mapping: dict[str, str] = field(default_factory=dict)
    issue_limit: int | None = None
    # Another dataset (id or name) whose examples are the validation split.
    validation_dataset: str = ""


@dataclass(frozen=True)
class DatasetRecord:
    id: str
    organization: str
    name: str
    description: str
    state: DatasetState
    format: DatasetFormat
    source_filename: str
    source_key: str
    size_bytes: int
    sha256: str
    statistics: Statistics
    splits: tuple[SplitFile, ...]
    error_count: int
    warning_count: int
    split_plan: SplitPlan
    create_time: datetime
    update_time: datetime
    failure_message: str = ""
    request_id: str = ""
    options: DatasetOptions = field(default_factory=DatasetOptions)
    validation_dataset_id: str = ""
    # What the request_id was first used for: a hash of the request's metadata (not of its content, which
    # `sha256` is).
    request_fingerprint: str = ""
