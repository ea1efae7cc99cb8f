"""`tuneforge datasets upload` (every UploadDatasetMetadata option, a progress bar) and `tuneforge datasets
validate` (a local file checked in-process by the server's own validation code, nothing uploaded).

An upload has three phases the user waits through: hashing the file (its SHA-256 travels in the metadata,
so the server can check what it received), sending it, and the server's work once the last byte is in
(validating, normalizing, counting tokens with --tokenizer, splitting, storing). UploadDataset answers
only at the end and the dataset has no row before it is READY (services/datasets/uploads.py: an upload
is all or nothing), so the last phase has no server-side progress to poll: it is shown as a spinner with
the time spent and what the server is doing.
"""

from __future__ import annotations

import hashlib
import shlex
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text
from tuneforge.v1 import dataset_pb2, dataset_service_pb2

from services.cli.dataset_options import FORMATS, build_metadata, encoding_problem, option_of
from services.cli.dataset_report import as_options, from_violations, report_lines, summary_lines
from services.cli.render import BytesColumn, SpeedColumn, as_json, dataset_table

# Refusals explained here, option by option or cause first (the others: as every command prints errors).
EXPLAINED = frozenset({"INVALID_ARGUMENT", "ALREADY_EXISTS"})
CHUNK_BYTES = 1024 * 1024  # as the Python client sends them (at most 4 MiB per message)
HASH_BYTES = 4 * 1024 * 1024

def _formats(incomplete: str) -> list[str]:
    return [name for name in FORMATS if name.startswith(incomplete.lower())]


Format = Annotated[str | None, typer.Option(
    "--format", autocompletion=_formats,
    help="The records' format: openai_chat, sharegpt, alpaca, prompt_completion, text, preference, "
    "openai_preference, prompt_only, kto (default: detected from the content).")]
ColumnMap = Annotated[list[str] | None, typer.Option(
    "--column-mapping", metavar="COLUMN=FIELD[,...]",
    help="Which CSV/Parquet column or JSONL key holds which field, e.g. question=prompt,answer=completion "
    "(repeatable). Unmapped ones keep their own name.")]
MinExamples = Annotated[int | None, typer.Option(help="Fewer valid examples is an error (default 100).")]
Tokenizer = Annotated[str, typer.Option(
    help="Count tokens with this model's tokenizer (a local folder or a model in the Hugging Face cache).")]
MaxLength = Annotated[int, typer.Option(help="Token cutoff for the statistics (0: 2048).")]
MaxSamples = Annotated[int | None, typer.Option(help="Keep only the first N valid examples.")]
SystemPrompt = Annotated[str, typer.Option(help="Prepended to every example as its system message.")]
PromptTemplate = Annotated[str, typer.Option(
    help="Wraps every prompt, e.g. '<user> {prompt}'; placeholders {prompt} (required), {system_prompt}; "
    "literal braces as {{ and }}.")]
IssueLimit = Annotated[int | None, typer.Option(help="Issues the report lists, 1-1000 (default 100).")]


# As services.cli.main declares them (the annotations must resolve in this module's globals).
DEFAULT_ADDRESS = "127.0.0.1:50051"
Address = Annotated[str, typer.Option("--address", envvar="TUNEFORGE_ADDRESS",
                                      help="gRPC address of the platform.")]
Org = Annotated[str, typer.Option("--org", envvar="TUNEFORGE_ORGANIZATION",
                                  help="Organization (default: the API key's; another is refused).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the resource as JSON.")]


def register(datasets_app: typer.Typer, console: Console, err_console: Console, api: Any) -> None:
    """Adds `datasets upload` and `datasets validate` to `datasets_app`; `api` is main's client context."""

    @datasets_app.command("upload")
    def datasets_upload(
        path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True,
                                             help="JSONL, CSV, Parquet, or a ZIP with images.")],
        name: Annotated[str, typer.Option(help="Unique within the organization.")],
        description: Annotated[str, typer.Option()] = "",
        format: Format = None,
        column_mapping: ColumnMap = None,
        train: Annotated[float | None, typer.Option(help="Train fraction (default 0.8).")] = None,
        validation: Annotated[float | None, typer.Option(
            help="Validation fraction (default 0.15; 0 with --validation-dataset).")] = None,
        test: Annotated[float | None, typer.Option(help="Test fraction (default 0.05).")] = None,
        seed: Annotated[int | None, typer.Option(help="Split seed (default 42).")] = None,
        min_examples: MinExamples = None,
        tokenizer: Tokenizer = "",
        max_length: MaxLength = 0,
        max_samples: MaxSamples = None,
        system_prompt: SystemPrompt = "",
        prompt_template: PromptTemplate = "",
        issue_limit: IssueLimit = None,
        validation_dataset: Annotated[str, typer.Option(
            help="A READY dataset (id or name) whose examples are the validation split.")] = "",
        request_id: Annotated[str, typer.Option(
            help="Idempotency key: a retry with the same one returns the dataset made the first time "
            "(default: a new one).")] = "",
        address: Address = DEFAULT_ADDRESS, org: Org = "", json_out: AsJson = False,
    ) -> None:
        """Upload a dataset file; it is validated, normalized and split before the command returns."""
        metadata = build_metadata(
            path, name=name, description=description, format=format, column_mapping=column_mapping,
            train=train, validation=validation, test=test, seed=seed, min_examples=min_examples,
            tokenizer=tokenizer, max_length=max_length, max_samples=max_samples, system_prompt=system_prompt,
            prompt_template=prompt_template, issue_limit=issue_limit, validation_dataset=validation_dataset,
            request_id=request_id or str(uuid.uuid4()))
        cause = encoding_problem(path)
        if cause:  # nothing is sent: the server could only say that no line is UTF-8
            err_console.print(f"[red]error[/red] {escape(cause)}", highlight=False, soft_wrap=True)
            raise typer.Exit(1)  # the file is invalid (as `datasets validate` exits), not an option
        show = not json_out and err_console.is_terminal
        with api(address, org) as client:
            metadata.organization = client.organization
            try:
                response = upload(client.datasets, path, metadata, err_console, show=show,
                                  timeout_s=max(client.timeout_s, 600))
            except _Refused as refused:
                if refused.error.code.name not in EXPLAINED:
                    raise refused.error from None  # printed as any other error by main's api()
                _explain(err_console, refused.error, path, dict(metadata.column_mapping.columns))
                raise typer.Exit(1 if _invalid_file(refused.error) else 2) from None
        if json_out:
            console.print_json(as_json(response.dataset))
            return
        console.print(dataset_table([response.dataset]))
        for line in report_lines(response.report)[1:]:
            console.print(escape(line), highlight=False, soft_wrap=True)

    @datasets_app.command("validate")
    def datasets_validate(
        path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True,
                                             help="JSONL, CSV, Parquet, or a ZIP with images.")],
        format: Format = None,
        column_mapping: ColumnMap = None,
        min_examples: MinExamples = None,
        tokenizer: Tokenizer = "",
        max_length: MaxLength = 0,
        max_samples: MaxSamples = None,
        system_prompt: SystemPrompt = "",
        prompt_template: PromptTemplate = "",
        issue_limit: IssueLimit = None,
        json_out: Annotated[bool, typer.Option("--json", help="Print the ValidationReport as JSON.")] = False,
    ) -> None:
        """Check a local file as an upload would, without uploading it: the server's validation code runs
        here. Prints the validation report (--json: the ValidationReport message); exits 1 when the file
        is invalid, 2 when an option is."""
        metadata = build_metadata(
            path, format=format, column_mapping=column_mapping, min_examples=min_examples,
            tokenizer=tokenizer, max_length=max_length, max_samples=max_samples, system_prompt=system_prompt,
            prompt_template=prompt_template, issue_limit=issue_limit)
        report = validate_locally(path, metadata, err_console, show=not json_out and err_console.is_terminal)
        if json_out:
            console.print_json(as_json(report))
        else:
            for line in report_lines(report, path=path, column_mapping=dict(metadata.column_mapping.columns)):
                verdict = ("green" if line.startswith("valid:") else
                           "red" if line.startswith("invalid:") else "")
                text = f"[{verdict}]{escape(line)}[/{verdict}]" if verdict else escape(line)
                console.print(text, highlight=False, soft_wrap=True)
        if not report.valid:
            raise typer.Exit(1)


class _Refused(Exception):
    def __init__(self, error: Any) -> None:
        super().__init__(str(error))
        self.error = error


def _invalid_file(error: Any) -> bool:
    """Whether the server refused the file itself (exit 1, as `datasets validate` exits for it), not an
    option (exit 2)."""
    from services.client import Reason

    return getattr(error, "reason", None) == Reason.DATASET_INVALID


def _explain(err_console: Console, error: Any, path: Path, mapping: dict[str, str]) -> None:
    """An upload the server refused: which option is wrong, or what is wrong with the file (cause first)."""
    from services.client import Reason

    violations = list(getattr(error, "violations", []))
    if getattr(error, "reason", None) == Reason.DATASET_INVALID:
        first = str(error.message).split(". First:")[0].split("; the first")[0]
        err_console.print(f"[red]error[/red] {escape(first)}", highlight=False, soft_wrap=True)
        count = int(error.metadata.get("error_count", "0") or 0)
        problems = from_violations(violations)
        for line in summary_lines(problems, error_count=count, truncated=count > len(problems), path=path,
                                  column_mapping=mapping):
            err_console.print(escape(line), highlight=False, soft_wrap=True)
        err_console.print(f"(tuneforge datasets validate {escape(shlex.quote(str(path)))} prints the whole "
                          "report)",
                          highlight=False, soft_wrap=True)
        return
    message = str(error.message)
    if violations:  # the message repeats the first violation: the violations say it with the option
        message = message.split(": ")[0]
    err_console.print(f"[red]error[/red] {escape(as_options(message))}", highlight=False, soft_wrap=True)
    for v in violations:
        err_console.print(f"  - {escape(option_of(v.field))}: {escape(v.description)}", highlight=False,
                          soft_wrap=True)


class _Bytes(BytesColumn):
    """Bytes done of the total; nothing for the server's phase, which has no byte count."""

    def render(self, task: Task) -> Text:
        return Text("") if task.fields.get("server") else super().render(task)


class _Speed(SpeedColumn):
    def render(self, task: Task) -> Text:
        return Text("") if task.fields.get("server") else super().render(task)


def _bar(console: Console, show: bool) -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), _Bytes(), _Speed(),
                    TimeElapsedColumn(), console=console, disable=not show, transient=False)


def hash_file(path: Path, bar: Progress, task: TaskID) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(HASH_BYTES), b""):
            digest.update(block)
            bar.advance(task, len(block))
    return digest.hexdigest()


def upload(stub: Any, path: Path, metadata: dataset_service_pb2.UploadDatasetMetadata, console: Console, *,
           show: bool, timeout_s: float) -> dataset_service_pb2.UploadDatasetResponse:
    """UploadDataset with a progress bar on `console` (when `show`): hashing, bytes sent, then the server's
    processing. Raises _Refused with the typed error when the server refuses."""
    from services.client.errors import from_rpc_error

    size = path.stat().st_size
    with _bar(console, show) as bar:
        hashing = bar.add_task(f"checksum {path.name}", total=size)
        metadata.sha256 = hash_file(path, bar, hashing)
        waits = f" (the server loads tokenizer {metadata.tokenizer} first)" if metadata.tokenizer else ""
        sending = bar.add_task(f"upload {path.name}{waits}", total=size)
        server_task: list[TaskID] = []
        lock = threading.Lock()

        def server_phase() -> None:
            with lock:
                if not server_task:
                    work = "validating, counting tokens" if metadata.tokenizer else "validating"
                    server_task.append(bar.add_task(f"server: {work}, splitting", total=None, server=True))

        def requests() -> Iterator[dataset_service_pb2.UploadDatasetRequest]:
            yield dataset_service_pb2.UploadDatasetRequest(metadata=metadata)
            with path.open("rb") as f:
                for block in iter(lambda: f.read(CHUNK_BYTES), b""):
                    yield dataset_service_pb2.UploadDatasetRequest(chunk=block)
                    bar.advance(sending, len(block))  # taken by gRPC: the next one is asked for
            bar.update(sending, description=f"upload {path.name}")
            server_phase()

        try:
            response: dataset_service_pb2.UploadDatasetResponse = stub.UploadDataset(requests(),
                                                                                     timeout=timeout_s)
        except grpc.RpcError as err:
            raise _Refused(from_rpc_error(err)) from None
        if server_task:
            bar.update(server_task[0], total=1, completed=1)
    return response


def validate_locally(path: Path, metadata: dataset_service_pb2.UploadDatasetMetadata, console: Console, *,
                     show: bool) -> dataset_pb2.ValidationReport:
    """The report UploadDataset / ValidateDataset would make of `path`, made here by the same code
    (services.datasets.local) with the server's default limits. An option the server would refuse exits 2
    naming it."""
    from services.datasets.local import options_of, validate_file
    from tuneforge_core.errors import TuneForgeError

    try:
        opts, _ = options_of(metadata)
    except TuneForgeError as err:
        for violation in err.violations:
            console.print(f"[red]error[/red] {escape(option_of(violation.field))}: "
                          f"{escape(violation.description)}", highlight=False, soft_wrap=True)
        if not err.violations:
            console.print(f"[red]error[/red] {escape(err.message)}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    work = "validating, counting tokens" if opts.tokenizer else "validating"
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  disable=not show, transient=True) as bar:
        bar.add_task(f"{work} {path.name}", total=None)
        try:
            return validate_file(path, opts)
        except TuneForgeError as err:  # e.g. a tokenizer that cannot be loaded
            bar.stop()
            console.print(f"[red]error[/red] {escape(as_options(err.message))}", highlight=False,
                          soft_wrap=True)
            raise typer.Exit(2) from None
