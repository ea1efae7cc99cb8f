"""What `tuneforge datasets upload`, `datasets validate` and `datasets import` send: UploadDatasetMetadata or
CreateDatasetRequest from the same options, each checked here once with an error that names the option;
and the cause of a file that cannot be read at all.

Pure and cheap to import (no services.datasets): shell completion runs the CLI on every Tab.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import typer
from tuneforge.v1 import dataset_pb2, dataset_service_pb2

# --format: the DatasetFormat values by lower-case short name ("openai_chat"); "-" may stand for "_".
FORMATS: dict[str, int] = {name.removeprefix("DATASET_FORMAT_").lower(): number
                           for name, number in dataset_pb2.DatasetFormat.items() if number}

# The fields a column may be mapped to: every format's fields (dataset.proto, DatasetFormat), and images.
FIELDS = frozenset({"messages", "conversations", "instruction", "input", "output", "prompt", "completion",
                    "label", "text", "chosen", "rejected", "preferred_output", "non_preferred_output",
                    "images"})

MAX_ISSUE_LIMIT = 1000  # UploadDatasetMetadata.issue_limit: 1-1000
INT32_MAX = 2**31 - 1  # UploadDatasetMetadata.max_length is an int32
INT64_MAX = 2**63 - 1

# The option of each metadata field, so that the server's field violations name what the user typed.
OPTION_OF_FIELD = {
    "metadata.name": "--name", "metadata.description": "--description", "metadata.format": "--format",
    "metadata.split.train_fraction": "--train", "metadata.split.validation_fraction": "--validation",
    "metadata.split.test_fraction": "--test", "metadata.split.seed": "--seed",
    "metadata.split": "--train/--validation/--test",
    "metadata.request_id": "--request-id", "metadata.tokenizer": "--tokenizer",
    "metadata.max_length": "--max-length", "metadata.min_examples": "--min-examples",
    "metadata.options.max_samples": "--max-samples", "metadata.options.system_prompt": "--system-prompt",
    "metadata.options.prompt_template": "--prompt-template", "metadata.column_mapping": "--column-mapping",
    "metadata.issue_limit": "--issue-limit", "metadata.validation_dataset": "--validation-dataset",
}


def option_of(field: str) -> str:
    """The option that sets a metadata field ("metadata.options.max_samples" -> "--max-samples"), or the
    field itself when no option does."""
    if field.startswith("metadata.column_mapping"):
        return "--column-mapping"
    return OPTION_OF_FIELD.get(field, field)


# `datasets import`: CreateDatasetRequest names the shared fields without "metadata." ("options.max_samples"),
# and has the source and its credentials besides.
IMPORT_OPTION_OF_FIELD = {
    "source": "SOURCE", "source.s3_uri": "SOURCE", "source.gcs_uri": "SOURCE",
    "source.huggingface_id": "SOURCE", "source.upload_filename": "SOURCE",
    "source.region": "--region", "source.endpoint_url": "--endpoint-url",
    "source.huggingface_config": "--hf-config", "source.huggingface_split": "--hf-split",
    "source.streaming": "--streaming", "source.max_rows": "--max-rows",
    "credentials": "--env-credentials",
    "credentials.access_key_id": "--env-credentials (AWS_ACCESS_KEY_ID)",
    "credentials.secret_access_key": "--env-credentials (AWS_SECRET_ACCESS_KEY)",
    "credentials.session_token": "--env-credentials (AWS_SESSION_TOKEN)",
    "credentials.huggingface_token": "--env-credentials (HF_TOKEN)",
    "organization": "--org",
}


def import_option_of(field: str) -> str:
    """The option of `datasets import` that sets a CreateDatasetRequest field ("options.max_samples" ->
    "--max-samples", "source.endpoint_url" -> "--endpoint-url"), or the field itself when no option does."""
    if field in IMPORT_OPTION_OF_FIELD:
        return IMPORT_OPTION_OF_FIELD[field]
    shared = option_of(f"metadata.{field}")
    return field if shared == f"metadata.{field}" else shared


def parse_format(value: str | None) -> int:
    """--format: a DatasetFormat by short name, any case, '-' or '_'; None or "auto": detect it."""
    if value is None or value.strip().lower() in ("", "auto"):
        return dataset_pb2.DATASET_FORMAT_UNSPECIFIED
    key = value.strip().lower().replace("-", "_")
    if key not in FORMATS:
        raise typer.BadParameter(f"'{value}' is not a dataset format; one of {', '.join(FORMATS)} "
                                 "(or auto: detect it from the content)", param_hint="--format")
    return FORMATS[key]


def parse_column_mapping(values: list[str] | None) -> dict[str, str]:
    """--column-mapping COLUMN=FIELD[,COLUMN=FIELD...], repeatable (`question=prompt,answer=completion`).

    Returns ColumnMapping.columns: field -> column, as the proto keeps it. A pair written the other way
    round (FIELD=COLUMN: a field on the left, a name that is no field on the right) is refused with the
    pair to write instead, never silently turned around."""
    hint = "--column-mapping"
    mapping: dict[str, str] = {}
    columns: set[str] = set()
    for value in values or []:
        for pair in (p.strip() for p in value.split(",")):
            if not pair:
                continue
            column, sep, field = (s.strip() for s in pair.partition("="))
            if not sep or not column or not field:
                raise typer.BadParameter(f"'{pair}' is not COLUMN=FIELD (e.g. question=prompt)",
                                         param_hint=hint)
            if field not in FIELDS and column in FIELDS:
                raise typer.BadParameter(
                    f"'{pair}': '{field}' is not a dataset field and '{column}' is; write COLUMN=FIELD, "
                    f"i.e. {field}={column}", param_hint=hint)
            if field in mapping:
                raise typer.BadParameter(f"field '{field}' is mapped twice (from '{mapping[field]}' and "
                                         f"'{column}')", param_hint=hint)
            if column in columns:
                raise typer.BadParameter(f"column '{column}' is mapped twice", param_hint=hint)
            mapping[field] = column
            columns.add(column)
    return mapping


def check_options(*, train: float | None = None, validation: float | None = None, test: float | None = None,
                  seed: int | None = None, min_examples: int | None = None, max_length: int = 0,
                  max_samples: int | None = None, prompt_template: str = "", issue_limit: int | None = None,
                  validation_dataset: str = "") -> None:
    """Each option on its own, as upload, validate and import take it (typer.BadParameter naming it); the
    rules that need the server's code (fractions that sum to 1, templates) are checked by it."""
    def positive(value: int | None, option: str, what: str = "at least 1") -> None:
        if value is not None and value < 1:
            raise typer.BadParameter(f"must be {what}, not {value}", param_hint=option)

    positive(min_examples, "--min-examples")
    positive(max_samples, "--max-samples", "at least 1 (leave it out to keep every example)")
    for option, count in (("--min-examples", min_examples), ("--max-samples", max_samples)):
        if count is not None and count > INT64_MAX:
            raise typer.BadParameter(f"must be at most {INT64_MAX}", param_hint=option)
    if seed is not None and seed > 2**64 - 1:
        raise typer.BadParameter(f"must be at most {2**64 - 1}", param_hint="--seed")
    if not 0 <= max_length <= INT32_MAX:
        raise typer.BadParameter(f"must be between 0 and {INT32_MAX}, not {max_length}",
                                 param_hint="--max-length")
    if issue_limit is not None and not 1 <= issue_limit <= MAX_ISSUE_LIMIT:
        raise typer.BadParameter(f"must be between 1 and {MAX_ISSUE_LIMIT}, not {issue_limit}",
                                 param_hint="--issue-limit")
    for option, fraction in (("--train", train), ("--validation", validation), ("--test", test)):
        if fraction is not None and not 0 <= fraction <= 1:
            raise typer.BadParameter(f"must be a fraction in [0, 1], not {fraction}", param_hint=option)
    if seed is not None and seed < 0:
        raise typer.BadParameter(f"must not be negative, not {seed}", param_hint="--seed")
    if validation_dataset and validation:
        raise typer.BadParameter("must be 0 (or left out) when --validation-dataset gives the validation "
                                 "examples", param_hint="--validation")
    if prompt_template and "{prompt}" not in prompt_template:
        raise typer.BadParameter("must contain the placeholder {prompt}", param_hint="--prompt-template")


def _fill(message: dataset_service_pb2.UploadDatasetMetadata | dataset_service_pb2.CreateDatasetRequest, *,
          name: str, description: str, format: str | None, column_mapping: list[str] | None,
          train: float | None, validation: float | None, test: float | None, seed: int | None,
          min_examples: int | None, tokenizer: str, max_length: int, max_samples: int | None,
          system_prompt: str, prompt_template: str, issue_limit: int | None, request_id: str) -> None:
    """Sets the fields UploadDatasetMetadata and CreateDatasetRequest share (same names, same meaning)."""
    message.name, message.description, message.request_id = name, description, request_id
    message.format = parse_format(format)  # type: ignore[assignment]
    message.tokenizer, message.max_length = tokenizer, max_length
    message.options.system_prompt, message.options.prompt_template = system_prompt, prompt_template
    message.column_mapping.columns.update(parse_column_mapping(column_mapping))
    for field, value in (("train_fraction", train), ("validation_fraction", validation),
                         ("test_fraction", test), ("seed", seed)):
        if value is not None:
            setattr(message.split, field, value)
    if min_examples is not None:
        message.min_examples = min_examples
    if max_samples is not None:
        message.options.max_samples = max_samples
    if issue_limit is not None:
        message.issue_limit = issue_limit


def build_metadata(path: Path, *, name: str = "", description: str = "", format: str | None = None,
                   column_mapping: list[str] | None = None, train: float | None = None,
                   validation: float | None = None, test: float | None = None, seed: int | None = None,
                   min_examples: int | None = None, tokenizer: str = "", max_length: int = 0,
                   max_samples: int | None = None, system_prompt: str = "", prompt_template: str = "",
                   issue_limit: int | None = None, validation_dataset: str = "",
                   request_id: str = "") -> dataset_service_pb2.UploadDatasetMetadata:
    """The metadata of an upload (or a validation) of `path`, every option checked on its own here; the
    rules that need the server's code (fractions that sum to 1, templates) are checked by it."""
    check_options(train=train, validation=validation, test=test, seed=seed, min_examples=min_examples,
                  max_length=max_length, max_samples=max_samples, prompt_template=prompt_template,
                  issue_limit=issue_limit, validation_dataset=validation_dataset)
    metadata = dataset_service_pb2.UploadDatasetMetadata(
        filename=path.name, size_bytes=path.stat().st_size, validation_dataset=validation_dataset)
    _fill(metadata, name=name, description=description, format=format, column_mapping=column_mapping,
          train=train, validation=validation, test=test, seed=seed, min_examples=min_examples,
          tokenizer=tokenizer, max_length=max_length, max_samples=max_samples, system_prompt=system_prompt,
          prompt_template=prompt_template, issue_limit=issue_limit, request_id=request_id)
    return metadata


def build_import_request(source: dataset_pb2.DatasetSource, *, name: str = "", description: str = "",
                         format: str | None = None, column_mapping: list[str] | None = None,
                         train: float | None = None, validation: float | None = None,
                         test: float | None = None, seed: int | None = None, min_examples: int | None = None,
                         tokenizer: str = "", max_length: int = 0, max_samples: int | None = None,
                         system_prompt: str = "", prompt_template: str = "", issue_limit: int | None = None,
                         request_id: str = "",
                         credentials: dataset_service_pb2.SourceCredentials | None = None,
                         ) -> dataset_service_pb2.CreateDatasetRequest:
    """The CreateDatasetRequest of `tuneforge datasets import`: the upload's options, checked by the same
    code with the same errors. (CreateDatasetRequest has no validation_dataset: imports have no
    --validation-dataset.)"""
    check_options(train=train, validation=validation, test=test, seed=seed, min_examples=min_examples,
                  max_length=max_length, max_samples=max_samples, prompt_template=prompt_template,
                  issue_limit=issue_limit)
    request = dataset_service_pb2.CreateDatasetRequest(source=source, credentials=credentials)
    _fill(request, name=name, description=description, format=format, column_mapping=column_mapping,
          train=train, validation=validation, test=test, seed=seed, min_examples=min_examples,
          tokenizer=tokenizer, max_length=max_length, max_samples=max_samples, system_prompt=system_prompt,
          prompt_template=prompt_template, issue_limit=issue_limit, request_id=request_id)
    return request


def encoding_problem(path: Path) -> str | None:
    """Why `path` is not UTF-8 text when its first bytes say it is UTF-16 or UTF-32 (the server's own
    check, services.datasets.readers.wide_encoding), with the command that converts it; None otherwise."""
    from services.datasets.readers import wide_encoding

    with path.open("rb") as f:
        wide = wide_encoding(f.read(4096))
    if wide is None:
        return None
    encoding, order = wide
    converted = path.with_name(f"{path.stem}.utf8{path.suffix}")
    return (f"{path.name} is {encoding} ({order}), not UTF-8: save it as UTF-8, e.g. "
            f"iconv -f {encoding} -t UTF-8 {shlex.quote(str(path))} > {shlex.quote(str(converted))}")


def csv_header(path: Path) -> list[str]:
    """The columns of a CSV file's first line (empty when it is not readable CSV)."""
    import csv

    try:
        with path.open("r", encoding="utf-8-sig", newline="") as f:
            return [c.strip() for c in next(csv.reader(f), [])]
    except (UnicodeDecodeError, csv.Error, OSError):
        return []
