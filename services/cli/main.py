"""The `tuneforge` command: run the platform, and talk to it over gRPC."""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from tuneforge.v1 import dataset_pb2, dataset_service_pb2, identity_pb2, job_pb2, job_service_pb2, metrics_pb2

from services.cli import chat as chat_cli
from services.cli import config_create, datasets_cli
from services.cli import dead_letters as dead_letters_cli
from services.cli import metrics as metrics_cli
from services.cli import timeline as timeline_cli
from services.cli import usage as usage_cli
from services.cli.credentials import admin_key_path, api_key
from services.cli.dataset_options import build_import_request, import_option_of
from services.cli.dataset_report import import_as_options, report_lines
from services.cli.render import (
    BytesColumn,
    SpeedColumn,
    dataset_table,
    job_table,
    outcome,
    plan_table,
    size_text,
    watch,
    whole_ids,
)
from services.cli.render import as_json as to_json
from services.client import TuneForgeClient, TuneForgeError
from services.client.errors import from_rpc_error
from services.platform.supervisor import Platform, PlatformConfig, PlatformStartError

app = typer.Typer(help="TuneForge: fine-tune LLMs with validated data, estimates and live metrics.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
datasets_app = typer.Typer(help="Upload and inspect datasets.", no_args_is_help=True)
jobs_app = typer.Typer(help="Create, follow and cancel fine-tuning jobs.", no_args_is_help=True)
keys_app = typer.Typer(help="Create, list and revoke the organization's API keys (admin).",
                       no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")
app.add_typer(jobs_app, name="jobs")
app.add_typer(keys_app, name="keys")
usage_cli.register(app)  # tuneforge usage (services.cli.usage)
metrics_cli.register(jobs_app)  # tuneforge jobs metrics (services.cli.metrics)
timeline_cli.register(jobs_app)  # tuneforge jobs events, jobs eval (services.cli.timeline)
chat_cli.register(app)  # tuneforge chat, tuneforge deployments (services.cli.chat)
dead_letters_cli.register(app)  # tuneforge dead-letters (services.cli.dead_letters)

console = Console()
err_console = Console(stderr=True)

Address = Annotated[str, typer.Option("--address", envvar="TUNEFORGE_ADDRESS",
                                      help="gRPC address of the platform.")]
Org = Annotated[str, typer.Option("--org", envvar="TUNEFORGE_ORGANIZATION",
                                  help="Organization (default: the API key's; another is refused).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the resource as JSON.")]
MergeFlag = Annotated[bool | None, typer.Option("--merge/--no-merge", help="Also store merged weights.")]
DEFAULT_ADDRESS = "127.0.0.1:50051"


USER_ERRORS = {"INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "FAILED_PRECONDITION", "UNAUTHENTICATED",
               "PERMISSION_DENIED"}


@contextmanager
def api(address: str, org: str) -> Iterator[TuneForgeClient]:
    """A client for one command; an API error is printed with its field violations and exits 2 for the
    caller's mistakes (bad input, unknown names) and 1 for everything else."""
    key = api_key()
    try:
        with TuneForgeClient(address, org, api_key=key) as client:
            yield client
    except TuneForgeError as err:
        err_console.print(f"[red]error[/red] {escape(str(err))}", highlight=False)
        if err.code.name == "UNAUTHENTICATED" and not key:
            err_console.print(f"set TUNEFORGE_API_KEY, or run where `tuneforge up` keeps its data "
                              f"({admin_key_path()} holds the first admin key)", highlight=False)
        if err.code.name == "UNAVAILABLE" and "failed to connect" in err.message.lower():
            err_console.print(f"nothing answers at {escape(address)}: start the platform (`tuneforge up`), "
                              "or point --address (TUNEFORGE_ADDRESS) at it", highlight=False)
        raise typer.Exit(2 if err.code.name in USER_ERRORS else 1) from None


# -- platform ------------------------------------------------------------------------------------

@app.command()
def up(
    data_dir: Annotated[Path, typer.Option(envvar="TUNEFORGE_DATA_DIR")] = Path(".tuneforge"),
    host: Annotated[str, typer.Option(envvar="TUNEFORGE_GRPC_HOST", help="gRPC listen host.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="TUNEFORGE_GRPC_PORT",
                                      help="gRPC port (0: a free port).")] = 50051,
    workers: Annotated[int, typer.Option(help="CPU/GPU trainer workers to start.")] = 1,
    nats_url: Annotated[str, typer.Option(envvar="TUNEFORGE_NATS_URL",
                                          help="Use this NATS instead of an embedded one.")] = "",
    http_host: Annotated[str, typer.Option(envvar="TUNEFORGE_HTTP_HOST",
                                           help="REST/JSON gateway and web console host.")] = "127.0.0.1",
    http_port: Annotated[int, typer.Option(envvar="TUNEFORGE_HTTP_PORT",
                                           help="REST/JSON and console port (0: a free port).")] = 8080,
) -> None:
    """Start the platform and keep it running until Ctrl-C; a worker, the services process or the embedded
    nats-server that dies is restarted (with a line here and in logs/platform.log). The first start on a
    data dir prints the default organization's admin API key, kept in <data dir>/admin.key for the CLI."""
    platform = Platform(PlatformConfig(data_dir=data_dir, grpc_host=host, grpc_port=port, workers=workers,
                                       nats_url=nats_url, http_host=http_host, http_port=http_port))
    key_file = admin_key_path(data_dir)
    had_key = key_file.exists()
    try:
        platform.start()
    except PlatformStartError as exc:
        err_console.print(f"[red]error[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    console.print(f"TuneForge is up on [bold]{platform.address}[/bold] (NATS {platform.nats_url}, "
                  f"data in {platform.data_dir}, logs in {platform.logs_dir}). Ctrl-C stops it.")
    console.print(f"REST/JSON API on [bold]{platform.http_url}/v1/[/bold] (OpenAPI: "
                  f"{platform.http_url}/v1/openapi.json); web console on [bold]{platform.http_url}/[/bold]",
                  highlight=False, soft_wrap=True)
    if not had_key and key_file.exists():
        console.print(f"Created the first admin API key of organization 'default' (shown once; the CLI "
                      f"reads it from {key_file}):\n  {key_file.read_text().strip()}", highlight=False)
    stopping = False

    def _stop(*_args: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        while not stopping:
            for line in platform.supervise():  # a dead worker or nats-server is restarted
                err_console.print(f"[yellow]{escape(line)}[/yellow]", highlight=False, soft_wrap=True)
            problem = platform.check_alive()
            if problem:
                err_console.print(f"[red]{problem}[/red]; stopping")
                break
            time.sleep(0.5)
    finally:
        console.print("stopping…")
        platform.stop()


@app.command()
def demo(
    data_dir: Annotated[Path, typer.Option()] = Path(".tuneforge/demo"),
    examples: Annotated[int, typer.Option(help="Rows in the generated chat dataset.")] = 300,
    epochs: Annotated[int, typer.Option()] = 3,
) -> None:
    """Run the main job end to end on embedded defaults: platform up, upload, LoRA SFT, watch, stop."""
    from services.cli.demo import run_demo

    try:
        code = run_demo(data_dir, examples=examples, epochs=epochs, console=console)
    except PlatformStartError as exc:
        err_console.print(f"[red]error[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    raise typer.Exit(code)


# -- datasets ------------------------------------------------------------------------------------

# tuneforge datasets upload, datasets validate (services.cli.datasets_cli)
datasets_cli.register(datasets_app, console, err_console, api)


def dataset_source(uri: str, **options: object) -> dataset_pb2.DatasetSource:
    """s3://bucket/key, gs://bucket/object, or a Hugging Face dataset id (hf://owner/name or owner/name)."""
    if uri.startswith("s3://"):
        return dataset_pb2.DatasetSource(s3_uri=uri, **options)  # type: ignore[arg-type]
    if uri.startswith("gs://"):
        return dataset_pb2.DatasetSource(gcs_uri=uri, **options)  # type: ignore[arg-type]
    return dataset_pb2.DatasetSource(huggingface_id=uri.removeprefix("hf://"), **options)  # type: ignore[arg-type]


def credentials_from_env(source: dataset_pb2.DatasetSource) -> dataset_service_pb2.SourceCredentials:
    """The caller's secrets for `source`, from the environment (flags would stay in shell history); a
    BadParameter naming the variables when the environment holds none of them (--env-credentials would
    otherwise send empty credentials, and the import fail later as if the secrets were wrong)."""
    names: tuple[str, ...]
    if source.WhichOneof("source") == "huggingface_id":
        names = ("HF_TOKEN",)
    else:
        names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
    values = {name: os.environ.get(name, "") for name in names}
    if not any(values.values()):
        raise typer.BadParameter(f"none of {', '.join(names)} is set in the environment",
                                 param_hint="--env-credentials")
    if source.WhichOneof("source") == "huggingface_id":
        return dataset_service_pb2.SourceCredentials(huggingface_token=values["HF_TOKEN"])
    return dataset_service_pb2.SourceCredentials(
        access_key_id=values["AWS_ACCESS_KEY_ID"], secret_access_key=values["AWS_SECRET_ACCESS_KEY"],
        session_token=values["AWS_SESSION_TOKEN"])


@datasets_app.command("import")
def datasets_import(
    source: Annotated[str, typer.Argument(help="s3://bucket/key, gs://bucket/object or a Hugging Face id.")],
    name: Annotated[str, typer.Option(help="Unique within the organization.")],
    description: Annotated[str, typer.Option()] = "",
    region: Annotated[str, typer.Option(help="S3/GCS: the bucket's region.")] = "",
    endpoint_url: Annotated[str, typer.Option(help="S3/GCS: an S3-compatible endpoint.")] = "",
    hf_config: Annotated[str, typer.Option(help="Hugging Face: the configuration.")] = "",
    hf_split: Annotated[str, typer.Option(help="Hugging Face: the split (default train).")] = "",
    streaming: Annotated[bool, typer.Option(help="Hugging Face: stream rows, no full download.")] = False,
    max_rows: Annotated[int, typer.Option(help="Hugging Face: at most this many rows (0: all).")] = 0,
    env_credentials: Annotated[bool, typer.Option(
        "--env-credentials", help="Send AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN (S3; "
        "GCS HMAC keys) or HF_TOKEN from the environment. Secrets are never taken as flags.")] = False,
    format: datasets_cli.Format = None,
    column_mapping: datasets_cli.ColumnMap = None,
    train: Annotated[float | None, typer.Option(help="Train fraction (default 0.8).")] = None,
    validation: Annotated[float | None, typer.Option(help="Validation fraction (default 0.15).")] = None,
    test: Annotated[float | None, typer.Option(help="Test fraction (default 0.05).")] = None,
    seed: Annotated[int | None, typer.Option(help="Split seed (default 42).")] = None,
    min_examples: datasets_cli.MinExamples = None,
    tokenizer: datasets_cli.Tokenizer = "",
    max_length: datasets_cli.MaxLength = 0,
    max_samples: datasets_cli.MaxSamples = None,
    system_prompt: datasets_cli.SystemPrompt = "",
    prompt_template: datasets_cli.PromptTemplate = "",
    issue_limit: datasets_cli.IssueLimit = None,
    request_id: Annotated[str, typer.Option(
        help="Idempotency key: a retry with the same one returns the dataset made the first time "
        "(default: a new one).")] = "",
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until READY or FAILED.")] = True,
    address: Address = DEFAULT_ADDRESS, org: Org = "", as_json: AsJson = False,
) -> None:
    """Import a dataset from S3, GCS or the Hugging Face Hub; it is validated and split like an upload,
    with the same options (--format, --column-mapping, ...). A bad option is refused by its name."""
    options = {"region": region, "endpoint_url": endpoint_url, "huggingface_config": hf_config,
               "huggingface_split": hf_split, "streaming": streaming, "max_rows": max_rows}
    where = dataset_source(source, **options)
    request = build_import_request(
        where, name=name, description=description, format=format, column_mapping=column_mapping,
        train=train, validation=validation, test=test, seed=seed, min_examples=min_examples,
        tokenizer=tokenizer, max_length=max_length, max_samples=max_samples, system_prompt=system_prompt,
        prompt_template=prompt_template, issue_limit=issue_limit, request_id=request_id or str(uuid.uuid4()),
        credentials=credentials_from_env(where) if env_credentials else None)
    report: dataset_pb2.ValidationReport | None = None
    with api(address, org) as client:
        request.organization = client.organization
        try:
            response = client.datasets.CreateDataset(request, timeout=client.timeout_s)
        except grpc.RpcError as err:
            refused = from_rpc_error(err)
            refused.message = import_as_options(refused.message)  # "check --endpoint-url", not the field
            if not refused.violations:
                raise refused from None  # printed as any other error by api()
            # As upload says it: the message, then each field as the option that sets it.
            err_console.print(f"[red]error[/red] {escape(str(refused.message).split(': ')[0])}",
                              highlight=False, soft_wrap=True)
            for v in refused.violations:
                err_console.print(f"  - {escape(import_option_of(v.field))}: {escape(v.description)}",
                                  highlight=False, soft_wrap=True)
            raise typer.Exit(2 if refused.code.name in USER_ERRORS else 1) from None
        dataset = response.dataset
        while wait and dataset.state == dataset_pb2.DATASET_STATE_PROCESSING:
            time.sleep(0.5)
            dataset = client.get_dataset(dataset.id)
        ready = dataset.state == dataset_pb2.DATASET_STATE_READY
        if not as_json and (ready or dataset.validation.error_count):
            try:  # what upload prints after its table; an import that failed before reading has none
                report = client.datasets.GetValidationReport(dataset_service_pb2.GetValidationReportRequest(
                    organization=client.organization, dataset=dataset.id), timeout=client.timeout_s).report
            except grpc.RpcError:
                report = None
    if as_json:
        console.print_json(to_json(dataset))
    else:
        console.print(dataset_table([dataset]))
        if dataset.state == dataset_pb2.DATASET_STATE_READY and report is not None:
            for line in report_lines(report)[1:]:
                console.print(escape(line), highlight=False, soft_wrap=True)
    if dataset.state == dataset_pb2.DATASET_STATE_FAILED:
        # The cause first, once (as upload says it), then what the report adds.
        first = import_as_options(dataset.failure_message.split(". First:")[0].split("; the first")[0])
        err_console.print(f"[red]failed[/red] {escape(first)}", highlight=False, soft_wrap=True)
        for line in report_lines(report)[1:] if report is not None else []:
            err_console.print(escape(line), highlight=False, soft_wrap=True)
        raise typer.Exit(1)


@datasets_app.command("get")
def datasets_get(ref: Annotated[str, typer.Argument(help="Dataset id or name.")],
                 address: Address = DEFAULT_ADDRESS, org: Org = "", as_json: AsJson = False) -> None:
    """Show one dataset."""
    with api(address, org) as client:
        dataset = client.get_dataset(ref)
    console.print_json(to_json(dataset)) if as_json else console.print(dataset_table([dataset]))


@datasets_app.command("delete")
def datasets_delete(ref: Annotated[str, typer.Argument(help="Dataset id or name.")],
                    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask first.")] = False,
                    address: Address = DEFAULT_ADDRESS, org: Org = "") -> None:
    """Delete a dataset and its stored files. Refused while a job that has not ended trains on it; jobs
    that ended keep what they made. Cannot be undone."""
    if not yes and not typer.confirm(f"Delete dataset {ref} and its stored files?"):
        raise typer.Exit(1)
    with api(address, org) as client:
        dataset = client.get_dataset(ref)
        client.delete_dataset(dataset.id)
    console.print(f"deleted dataset {escape(dataset.id)} ({escape(dataset.name)})", highlight=False)


@datasets_app.command("list")
def datasets_list(page_size: Annotated[int, typer.Option()] = 50,
                  page_token: Annotated[str, typer.Option()] = "",
                  address: Address = DEFAULT_ADDRESS, org: Org = "", as_json: AsJson = False) -> None:
    """List datasets, newest first."""
    with api(address, org) as client:
        response = client.list_datasets(page_size, page_token)
    if as_json:
        console.print_json(to_json(response))
        return
    console.print(dataset_table(list(response.datasets)))
    if response.next_page_token:
        console.print(f"next page: --page-token {response.next_page_token}")


# -- jobs ----------------------------------------------------------------------------------------

def build_spec(spec_file: Path | None, **flags: object) -> job_pb2.JobSpec:
    """A JobSpec from a JSON file (JobSpec in proto JSON), with command-line flags taking precedence."""
    spec = job_pb2.JobSpec()
    if spec_file is not None:
        try:
            json_format.Parse(spec_file.read_text(), spec)
        except (json_format.ParseError, ValueError) as exc:
            raise typer.BadParameter(f"{spec_file}: {exc}", param_hint="--spec") from exc
    hp, lora = spec.hyperparameters, spec.lora
    setters = {
        "model": lambda v: setattr(spec, "base_model", v),
        "dataset": lambda v: setattr(spec, "dataset", v),
        "method": lambda v: setattr(spec, "method",
                                    job_pb2.TrainingMethod.Value(f"TRAINING_METHOD_{v.upper()}")),
        "adapter": lambda v: setattr(spec, "adapter",
                                     job_pb2.AdapterType.Value(f"ADAPTER_TYPE_{v.upper()}")),
        "epochs": lambda v: setattr(hp, "epochs", v),
        "max_steps": lambda v: setattr(hp, "max_steps", v),
        "batch_size": lambda v: setattr(hp, "batch_size", v),
        "learning_rate": lambda v: setattr(hp, "learning_rate", v),
        "max_seq_length": lambda v: setattr(hp, "max_seq_length", v),
        "logging_steps": lambda v: setattr(hp, "logging_steps", v),
        "seed": lambda v: setattr(hp, "seed", v),
        "lora_rank": lambda v: setattr(lora, "rank", v),
        "lora_alpha": lambda v: setattr(lora, "alpha", v),
        "lora_dropout": lambda v: setattr(lora, "dropout", v),
        "merge": lambda v: setattr(spec.output, "merge_adapter", v),
        "pool": lambda v: setattr(spec.hardware, "pool", v),
    }
    for key, value in flags.items():
        if value is not None:
            try:
                setters[key](value)
            except ValueError as exc:
                raise typer.BadParameter(f"unknown value '{value}'", param_hint=f"--{key}") from exc
    return spec


@jobs_app.command("create")
def jobs_create(
    model: Annotated[str | None, typer.Option(help="HF id, local path or s3:// URI.")] = None,
    dataset: Annotated[str | None, typer.Option(help="Dataset id or name.")] = None,
    spec_file: Annotated[Path | None, typer.Option("--spec", exists=True, help="JobSpec as JSON.")] = None,
    name: Annotated[str, typer.Option()] = "",
    method: Annotated[str | None, typer.Option(help="sft, dpo, grpo, distillation, orpo, kto.")] = None,
    adapter: Annotated[str | None, typer.Option(help="lora, qlora, full, prompt_tuning.")] = None,
    epochs: Annotated[int | None, typer.Option()] = None,
    max_steps: Annotated[int | None, typer.Option()] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    learning_rate: Annotated[float | None, typer.Option()] = None,
    max_seq_length: Annotated[int | None, typer.Option()] = None,
    logging_steps: Annotated[int | None, typer.Option()] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    lora_rank: Annotated[int | None, typer.Option()] = None,
    lora_alpha: Annotated[int | None, typer.Option()] = None,
    lora_dropout: Annotated[float | None, typer.Option()] = None,
    merge: MergeFlag = None,
    pool: Annotated[str | None, typer.Option(help="The worker pool to run in (spec.hardware.pool).")] = None,
    priority: Annotated[str | None, typer.Option(
        help="low, normal or high: its place among the organization's own queued jobs.")] = None,
    validate_only: Annotated[bool, typer.Option(help="Check the spec, create nothing.")] = False,
    follow: Annotated[bool, typer.Option("--watch", help="Follow the job until it ends.")] = False,
    config_file: Annotated[Path | None, typer.Option(
        "--config", exists=True, dir_okay=False,
        help="A Synth TOML, ModelForge JSON or NeMo Customizer hyperparameters file.")] = None,
    examples: Annotated[int | None, typer.Option(
        help="--config: train on the first N rows of its file.")] = None,
    dry_run: Annotated[bool, typer.Option(
        help="--config: show the resolved spec and plan, create nothing.")] = False,
    gpu_type: Annotated[str | None, typer.Option(
        help="--config: the GPU type, for files that cannot say it.")] = None,
    wandb_project: Annotated[str | None, typer.Option(
        help="Report to Weights & Biases, in this project (spec.integrations).")] = None,
    wandb_entity: Annotated[str | None, typer.Option(help="W&B team or user.")] = None,
    wandb_name: Annotated[str | None, typer.Option(help="W&B run name (default: the job id).")] = None,
    wandb_tag: Annotated[list[str] | None, typer.Option(help="W&B run tag (repeat for more).")] = None,
    wandb_base_url: Annotated[str | None, typer.Option(help="A self-hosted W&B server.")] = None,
    wandb_api_key: Annotated[str | None, typer.Option(
        envvar="WANDB_API_KEY", show_default=False,
        help="W&B API key; prefer the WANDB_API_KEY variable. Sealed by the server, never shown.")] = None,
    mlflow: Annotated[bool, typer.Option(
        "--mlflow",
        help="Report to MLflow (the workers' default server unless --mlflow-tracking-uri).")] = False,
    mlflow_tracking_uri: Annotated[str | None, typer.Option(help="MLflow server, http(s)://.")] = None,
    mlflow_experiment: Annotated[str | None, typer.Option(
        help="MLflow experiment (default tuneforge).")] = None,
    mlflow_run_name: Annotated[str | None, typer.Option(
        help="MLflow run name (default: the job id).")] = None,
    mlflow_token: Annotated[str | None, typer.Option(
        envvar="MLFLOW_TRACKING_TOKEN", show_default=False,
        help="MLflow bearer token; prefer the MLFLOW_TRACKING_TOKEN variable. Sealed, never shown.")] = None,
    tensorboard: Annotated[bool, typer.Option(
        "--tensorboard", help="Write TensorBoard event files among the job's artifacts.")] = False,
    address: Address = DEFAULT_ADDRESS, org: Org = "", as_json: AsJson = False,
) -> None:
    """Validate a job spec and queue the job."""
    trackers = tracker_integrations(
        wandb_project=wandb_project, wandb_entity=wandb_entity, wandb_name=wandb_name, wandb_tags=wandb_tag,
        wandb_base_url=wandb_base_url, wandb_api_key=wandb_api_key, mlflow=mlflow,
        mlflow_tracking_uri=mlflow_tracking_uri, mlflow_experiment=mlflow_experiment,
        mlflow_run_name=mlflow_run_name, mlflow_token=mlflow_token, tensorboard=tensorboard)
    if trackers and config_file is not None:
        raise typer.BadParameter("the --wandb-*, --mlflow* and --tensorboard options go with --spec or the "
                                 "flags, not --config", param_hint="--config")
    if config_file is not None:  # services.cli.config_create
        config_create.refuse_with_config(
            spec=spec_file, method=method, adapter=adapter, epochs=epochs, max_steps=max_steps,
            batch_size=batch_size, learning_rate=learning_rate, max_seq_length=max_seq_length,
            logging_steps=logging_steps, seed=seed, lora_rank=lora_rank, lora_alpha=lora_alpha,
            lora_dropout=lora_dropout, merge=merge, pool=pool, priority=priority)
    elif examples is not None or dry_run or gpu_type is not None:
        raise typer.BadParameter("--examples, --dry-run and --gpu-type go with --config",
                                 param_hint="--config")
    spec = build_spec(spec_file, model=model, dataset=dataset, method=method, adapter=adapter, epochs=epochs,
                      max_steps=max_steps, batch_size=batch_size, learning_rate=learning_rate,
                      max_seq_length=max_seq_length, logging_steps=logging_steps, seed=seed,
                      lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, merge=merge,
                      pool=pool)
    spec.integrations.extend(trackers)  # after the spec file's own; CreateJob refuses a second of a kind
    if priority is not None and priority.lower() not in PRIORITIES:
        raise typer.BadParameter(f"unknown value '{priority}': low, normal or high", param_hint="--priority")
    with api(address, org) as client:
        if config_file is None:
            rank = job_pb2.JobPriority.ValueType(PRIORITIES[priority.lower()] if priority else 0)
            job = client.create_job(spec, name=name, request_id=str(uuid.uuid4()),
                                    validate_only=validate_only, priority=rank)
        else:
            made = config_create.create_from_config(
                client, console, config_file, dataset=dataset, model=model, gpu_type=gpu_type,
                examples=examples, name=name, dry_run=dry_run, validate_only=validate_only, as_json=as_json)
            if made is None:
                return
            job = made
        if validate_only:  # the server made the job up to check it, and kept nothing: no id, no state
            show_validated_spec(job, as_json)
            return
        if as_json:
            console.print_json(to_json(job))
        else:
            console.print(job_table([job]))
        if follow:
            final = watch(client, job, console)
            outcome(final, console)
            if final.state != job_pb2.JOB_STATE_SUCCEEDED:
                raise typer.Exit(1)


def tracker_integrations(*, wandb_project: str | None, wandb_entity: str | None, wandb_name: str | None,
                         wandb_tags: list[str] | None, wandb_base_url: str | None, wandb_api_key: str | None,
                         mlflow: bool, mlflow_tracking_uri: str | None, mlflow_experiment: str | None,
                         mlflow_run_name: str | None, mlflow_token: str | None,
                         tensorboard: bool) -> list[job_pb2.Integration]:
    """spec.integrations from `jobs create`'s tracker options (OpenAI's fine-tuning `integrations`). A
    key or token from the environment goes only with its tracker's options; the server checks the rest."""
    out: list[job_pb2.Integration] = []
    wandb_given = any(v is not None for v in (wandb_entity, wandb_name, wandb_tags, wandb_base_url))
    if wandb_project is not None or wandb_given:
        if wandb_project is None:
            raise typer.BadParameter("is required with the other --wandb-* options",
                                     param_hint="--wandb-project")
        out.append(job_pb2.Integration(wandb=job_pb2.WandbIntegration(
            project=wandb_project, entity=wandb_entity or "", name=wandb_name or "", tags=wandb_tags or [],
            base_url=wandb_base_url or "", api_key=wandb_api_key or "")))
    if mlflow or any(v is not None for v in (mlflow_tracking_uri, mlflow_experiment, mlflow_run_name)):
        out.append(job_pb2.Integration(mlflow=job_pb2.MlflowIntegration(
            tracking_uri=mlflow_tracking_uri or "", experiment_name=mlflow_experiment or "",
            run_name=mlflow_run_name or "", token=mlflow_token or "")))
    if tensorboard:
        out.append(job_pb2.Integration(tensorboard=job_pb2.TensorboardIntegration()))
    return out


def show_validated_spec(job: job_pb2.Job, as_json: bool) -> None:
    """What `jobs create --validate-only` learnt: the spec is valid, nothing was created, and the spec the
    server would run (its defaults filled, dataset and model resolved), with the estimate it was admitted
    with when there is one."""
    usage = job.usage
    estimate = ({"cost_usd": usage.estimated_cost_usd, "hours": usage.estimated_duration.seconds / 3600}
                if usage.HasField("estimated_duration") else None)
    if as_json:
        spec = json_format.MessageToDict(job.spec, preserving_proto_field_name=True)
        console.print_json(data={"valid": True, "created": False, "estimate": estimate, "spec": spec})
        return
    console.print("[green]valid[/green]: nothing was created. The spec the platform would run "
                  "(defaults filled in):", highlight=False)
    console.print_json(json_format.MessageToJson(job.spec, preserving_proto_field_name=True))
    if estimate is not None:
        console.print(f"estimate: {estimate['hours']:.2f} h, ${estimate['cost_usd']:.2f}", highlight=False)


@app.command("plan")
def plan(
    model: Annotated[str | None, typer.Option(help="HF id, local path or s3:// URI.")] = None,
    dataset: Annotated[str | None, typer.Option(help="Dataset id or name.")] = None,
    spec_file: Annotated[Path | None, typer.Option("--spec", exists=True, help="JobSpec as JSON.")] = None,
    method: Annotated[str | None, typer.Option(help="sft, dpo, grpo, distillation, orpo, kto.")] = None,
    adapter: Annotated[str | None, typer.Option(help="lora, qlora, full, prompt_tuning.")] = None,
    epochs: Annotated[int | None, typer.Option()] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    max_seq_length: Annotated[int | None, typer.Option()] = None,
    address: Address = DEFAULT_ADDRESS, org: Org = "", as_json: AsJson = False,
) -> None:
    """Before committing: does the job fit each GPU type, how long it runs and what it costs."""
    spec = build_spec(spec_file, model=model, dataset=dataset, method=method, adapter=adapter, epochs=epochs,
                      batch_size=batch_size, max_seq_length=max_seq_length)
    with api(address, org) as client:
        response = client.plan_job(spec)
    if as_json:
        console.print_json(to_json(response))
        return
    console.print(f"training tokens: {response.training_tokens:,} ({response.tokens_per_epoch:,} per epoch)")
    console.print(plan_table(response))
    if response.cheapest_fit.gpu_type:
        best = response.cheapest_fit
        console.print(f"cheapest fit: {best.gpu_count} x {best.gpu_type}, "
                      f"{best.time.total_seconds / 3600:.2f} h, ${best.cost.total_usd:.2f}")
    for note in [*response.notes, *response.suggestions]:
        console.print(f"[yellow]note[/yellow] {note}")


@jobs_app.command("get")
def jobs_get(ref: Annotated[str, typer.Argument(help="Job id or name.")],
             address: Address = DEFAULT_ADDRESS, org: Org = "", as_json: AsJson = False) -> None:
    """Show one job."""
    with api(address, org) as client:
        job = client.get_job(ref)
    if as_json:
        console.print_json(to_json(job))
    else:
        console.print(job_table([job]))
        if job.status_message:
            console.print(f"status: {escape(job.status_message)}")
        if job.error.message:
            console.print(f"error: {job.error.message}")
        if job.output.adapter_uri:
            console.print(f"adapter: {job.output.adapter_uri}")


@jobs_app.command("list")
def jobs_list(state: Annotated[list[str] | None, typer.Option(help="Only jobs in this state.")] = None,
              page_size: Annotated[int, typer.Option()] = 50,
              page_token: Annotated[str, typer.Option()] = "",
              address: Address = DEFAULT_ADDRESS, org: Org = "", as_json: AsJson = False) -> None:
    """List jobs, newest first."""
    try:
        states = [job_pb2.JobState.Value(f"JOB_STATE_{s.upper()}") for s in state or []]
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--state") from exc
    with api(address, org) as client:
        response = client.list_jobs(page_size, page_token, states)
    if as_json:
        console.print_json(to_json(response))
        return
    console.print(job_table(list(response.jobs)))
    if response.next_page_token:
        console.print(f"next page: --page-token {response.next_page_token}")


@jobs_app.command("watch")
def jobs_watch(ref: Annotated[str, typer.Argument(help="Job id or name.")],
               address: Address = DEFAULT_ADDRESS, org: Org = "") -> None:
    """Follow a job's progress and metrics until it ends; exits non-zero unless it SUCCEEDED."""
    with api(address, org) as client:
        final = watch(client, client.get_job(ref), console)
    outcome(final, console)
    if final.state != job_pb2.JOB_STATE_SUCCEEDED:
        raise typer.Exit(1)


def _choices(enum: Any, prefix: str) -> dict[str, int]:
    """A proto enum's values by lower-case short name ("warning" for LOG_LEVEL_WARNING), unset left out."""
    return {name.removeprefix(prefix).lower(): number for name, number in enum.items() if number}


LEVELS = _choices(metrics_pb2.LogLevel, "LOG_LEVEL_")
PRIORITIES = _choices(job_pb2.JobPriority, "JOB_PRIORITY_")
SOURCES = _choices(metrics_pb2.LogSource, "LOG_SOURCE_")


@jobs_app.command("logs")
def jobs_logs(ref: Annotated[str, typer.Argument(help="Job id or name.")],
              follow: Annotated[bool, typer.Option("--follow", "-f",
                                                   help="Keep printing until the job ends.")] = False,
              level: Annotated[str, typer.Option(help="Only this level and above: debug, info, warning, "
                                                      "error, critical.")] = "",
              source: Annotated[list[str] | None, typer.Option(help="Only these sources: worker, training.")]
              = None,
              address: Address = DEFAULT_ADDRESS, org: Org = "", as_json: AsJson = False) -> None:
    """Print the job's log (the worker's and the training process's), oldest first."""
    if level and level not in LEVELS:
        raise typer.BadParameter(f"'{level}' is not one of {', '.join(LEVELS)}", param_hint="--level")
    bad = [s for s in source or [] if s not in SOURCES]
    if bad:
        raise typer.BadParameter(f"'{bad[0]}' is not one of {', '.join(SOURCES)}", param_hint="--source")
    with api(address, org) as client:
        job = client.get_job(ref)
        entries = client.stream_logs(
            job.id, follow=follow, min_level=metrics_pb2.LogLevel.ValueType(LEVELS.get(level, 0)),
            sources=[metrics_pb2.LogSource.ValueType(SOURCES[s]) for s in source or []])
        for entry in entries:
            if as_json:
                console.print(json_format.MessageToJson(entry, preserving_proto_field_name=True, indent=None),
                              highlight=False, soft_wrap=True)
                continue
            when = entry.time.ToDatetime().strftime("%H:%M:%S")
            name = metrics_pb2.LogLevel.Name(entry.level).removeprefix("LOG_LEVEL_")
            where = metrics_pb2.LogSource.Name(entry.source).removeprefix("LOG_SOURCE_").lower()
            console.print(f"{when} {name:<8} {where:<8} #{entry.attempt} {escape(entry.message)}",
                          highlight=False, soft_wrap=True)


@jobs_app.command("cancel")
def jobs_cancel(ref: Annotated[str, typer.Argument(help="Job id or name.")],
                address: Address = DEFAULT_ADDRESS, org: Org = "") -> None:
    """Request cancellation of a job."""
    with api(address, org) as client:
        job = client.cancel_job(ref)
    console.print(job_table([job]))


@jobs_app.command("delete")
def jobs_delete(ref: Annotated[str, typer.Argument(help="Job id or name.")],
                yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask first.")] = False,
                address: Address = DEFAULT_ADDRESS, org: Org = "") -> None:
    """Delete a job that has ended, with its checkpoints, outputs, metrics and logs. Cannot be undone."""
    if not yes and not typer.confirm(f"Delete job {ref} with its checkpoints, outputs, metrics and logs?"):
        raise typer.Exit(1)
    with api(address, org) as client:
        response = client.delete_job(ref)
    note = " (it was already deleted)" if response.already_deleted else ""
    console.print(f"deleted job {escape(response.job)}{note}", highlight=False)


@app.command("workers")
def workers(page_size: Annotated[int, typer.Option()] = 50,
            page_token: Annotated[str, typer.Option()] = "",
            address: Address = DEFAULT_ADDRESS, org: Org = "", as_json: AsJson = False) -> None:
    """List the trainer workers heard from recently: pool, hardware, what each runs, and whether it is
    alive."""
    with api(address, org) as client:
        response = client.list_workers(page_size, page_token)
    if as_json:
        console.print_json(to_json(response))
        return
    table = Table("ID", "HOST", "POOL", "GPU", "STATE", "JOB", "LAST HEARTBEAT", "ALIVE")
    for w in response.workers:
        gpu = "cpu" if w.gpu_type == "cpu" else f"{w.gpu_type or 'unknown GPU'} x{w.gpu_count}"
        if w.gpu_memory_bytes:
            gpu += f" ({w.gpu_memory_bytes / 2**30:.0f} GiB)"
        if w.multi_node:
            gpu += ", multi-node (Ray)"
        state = job_pb2.WorkerState.Name(w.state).removeprefix("WORKER_STATE_")
        job = f"{w.job} (attempt {w.attempt})" if w.job else "-"
        seen = w.last_heartbeat_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(escape(w.id), escape(w.hostname), escape(w.pool), escape(gpu), state, job, seen,
                      "yes" if w.alive else "[red]no[/red]")
    console.print(whole_ids(table))
    if response.next_page_token:
        console.print(f"next page: --page-token {response.next_page_token}")


@app.command("pools")
def pools(address: Address = DEFAULT_ADDRESS, org: Org = "", as_json: AsJson = False) -> None:
    """List the worker pools: their workers (alive, idle, busy, draining) and queue depth, every
    organization's queued jobs they would take and your organization's among them."""
    with api(address, org) as client:
        found = client.list_pools()
    if as_json:
        console.print_json(to_json(job_service_pb2.ListPoolsResponse(pools=found)))
        return
    table = Table("POOL", "GPU", "ALIVE", "IDLE", "BUSY", "DRAINING", "RUNNING", "QUEUED", "QUEUED (YOURS)")
    for p in found:
        gpu = "cpu" if p.gpu_type == "cpu" else f"{p.gpu_type or 'unknown GPU'} x{p.max_gpu_count}"
        alive = str(p.workers_alive) if p.workers_alive else "[red]0[/red]"
        counts = (p.workers_idle, p.workers_busy, p.workers_draining, p.running_jobs, p.queued_jobs,
                  p.queued_jobs_own)
        table.add_row(escape(p.name), escape(gpu), alive, *map(str, counts))
    console.print(whole_ids(table))


# -- artifacts -----------------------------------------------------------------------------------

@jobs_app.command("artifacts")
def jobs_artifacts(ref: Annotated[str, typer.Argument(help="Job id or name.")],
                   address: Address = DEFAULT_ADDRESS, org: Org = "",
                   as_json: Annotated[bool, typer.Option(
                       "--json", help="Print them as JSON, with the download URLs.")] = False) -> None:
    """List the job's stored outputs (adapter, merged model, checkpoints): each file with its size and
    SHA-256. The first listing of a large model takes a while: the platform hashes it once."""
    from tuneforge.v1 import artifact_pb2

    with api(address, org) as client:
        artifacts = client.get_job_artifacts(ref)
    if as_json:
        console.print_json(to_json(job_service_pb2.GetJobArtifactsResponse(artifacts=artifacts)))
        return
    if not artifacts:
        console.print(f"job {escape(ref)} has no stored artifacts yet", highlight=False)
    for artifact in artifacts:
        kind = artifact_pb2.ArtifactKind.Name(artifact.kind).removeprefix("ARTIFACT_KIND_").lower()
        console.print(f"[bold]{escape(artifact.name)}[/bold] ({kind}, {len(artifact.files)} files, "
                      f"{size_text(artifact.size_bytes)})", highlight=False, soft_wrap=True)
        for f in artifact.files:
            console.print(f"  {escape(f.path)}  {size_text(f.size_bytes)}  sha256 {f.sha256}",
                          highlight=False, soft_wrap=True)


@jobs_app.command("checkpoints")
def jobs_checkpoints(ref: Annotated[str, typer.Argument(help="Job id or name.")],
                     address: Address = DEFAULT_ADDRESS, org: Org = "", as_json: AsJson = False) -> None:
    """List the job's complete checkpoints: step, epoch, losses, size, the best one (*), and whether each
    still keeps its optimizer state (needed to resume from it exactly)."""
    with api(address, org) as client:
        response = client.list_checkpoints(ref)
    if as_json:
        console.print_json(to_json(response))
        return
    if not response.checkpoints:
        console.print(f"job {escape(ref)} has no complete checkpoints", highlight=False)
        return

    def loss(value: float, present: bool) -> str:
        return f"{value:.4f}" if present else "-"

    table = Table("NAME", "STEP", "EPOCH", "TRAIN LOSS", "EVAL LOSS", "SIZE", "BEST", "OPTIMIZER")
    for c in response.checkpoints:
        table.add_row(escape(c.name), str(c.step), f"{c.epoch:.2f}",
                      loss(c.train_loss, c.HasField("train_loss")),
                      loss(c.eval_loss, c.HasField("eval_loss")), size_text(c.size_bytes),
                      "*" if c.best else "", "kept" if c.optimizer_state_kept else "pruned")
    console.print(whole_ids(table))  # names and steps are printed whole, never cut
    if response.best_metric:
        console.print(f"best (*) by {response.best_metric}", highlight=False)


@jobs_app.command("download")
def jobs_download(
    ref: Annotated[str, typer.Argument(help="Job id or name.")],
    directory: Annotated[Path, typer.Argument(help="Folder for the files.", file_okay=False)],
    merged: Annotated[bool, typer.Option("--merged", help="The merged model, not the adapter.")] = False,
    checkpoint: Annotated[int | None, typer.Option(
        "--checkpoint", metavar="STEP", help="The checkpoint of this step instead (0: the latest).")] = None,
    logs: Annotated[bool, typer.Option("--logs", help="The training log (training.log), any state.")] = False,
    evaluation: Annotated[bool, typer.Option(
        "--evaluation", help="The evaluation report (evaluation.json).")] = False,
    address: Address = DEFAULT_ADDRESS, org: Org = "",
) -> None:
    """Download the job's adapter (or merged model, a checkpoint, the training log or the evaluation report)
    into DIRECTORY, checking every file's SHA-256. An interrupted download resumes where it stopped when run
    again."""
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )
    from tuneforge.v1 import artifact_pb2

    from services.client import ChecksumMismatch, DownloadError

    if sum((merged, checkpoint is not None, logs, evaluation)) > 1:
        raise typer.BadParameter("choose one of --merged, --checkpoint, --logs and --evaluation",
                                 param_hint="--merged")
    kind = (artifact_pb2.ARTIFACT_KIND_MERGED_MODEL if merged else artifact_pb2.ARTIFACT_KIND_CHECKPOINT
            if checkpoint is not None else artifact_pb2.ARTIFACT_KIND_TRAINING_LOG if logs
            else artifact_pb2.ARTIFACT_KIND_EVALUATION_REPORT if evaluation
            else artifact_pb2.ARTIFACT_KIND_ADAPTER)
    with api(address, org) as client:
        artifact = client.get_job_artifact(ref, kind, checkpoint or 0)
        done: dict[str, int] = {}
        columns = (TextColumn("{task.description}"), BarColumn(), BytesColumn(), SpeedColumn(),
                   TimeRemainingColumn())
        with Progress(*columns, console=console) as bar:
            task = bar.add_task(artifact.name, total=artifact.size_bytes)

            def progress(path: str, size: int) -> None:
                done[path] = size
                bar.update(task, completed=sum(done.values()))

            try:
                client.download_artifact(ref, directory, artifact=artifact, progress=progress)
            except ChecksumMismatch as err:
                bar.stop()
                err_console.print(f"[red]error[/red] {escape(str(err))}; run the command again to download "
                                  "it anew", highlight=False, soft_wrap=True)
                raise typer.Exit(1) from None
            except DownloadError as err:
                bar.stop()
                err_console.print(f"[red]error[/red] {escape(str(err))}", highlight=False, soft_wrap=True)
                raise typer.Exit(1) from None
    console.print(f"{escape(artifact.name)}: {len(artifact.files)} files, {size_text(artifact.size_bytes)}, "
                  f"sha256 verified, in {escape(str(directory))}", highlight=False, soft_wrap=True)


# -- keys and audit ------------------------------------------------------------------------------

ROLES = _choices(identity_pb2.Role, "ROLE_")


def _key_table(keys: list[identity_pb2.ApiKey]) -> Table:
    table = Table("ID", "NAME", "ROLE", "PREFIX", "CREATED", "EXPIRES", "STATE", "LAST USED")
    now = time.time()
    for k in keys:
        state = ("[red]revoked[/red]" if k.HasField("revoke_time") else
                 "[red]expired[/red]" if k.expire_time.seconds <= now else "active")
        table.add_row(k.id, escape(k.name), identity_pb2.Role.Name(k.role).removeprefix("ROLE_").lower(),
                      k.prefix + "…", _when(k.create_time), _when(k.expire_time), state,
                      _when(k.last_use_time) if k.HasField("last_use_time") else "-")
    return whole_ids(table)


def _when(ts: Timestamp) -> str:
    return ts.ToDatetime().strftime("%Y-%m-%d %H:%M")


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="Unique among the organization's keys.")],
    role: Annotated[str, typer.Option(help="viewer, member or admin.")] = "member",
    ttl_days: Annotated[int, typer.Option(help="Days the key lives (0: the platform's default, 90).")] = 0,
    address: Address = DEFAULT_ADDRESS, org: Org = "", as_json: AsJson = False,
) -> None:
    """Create an API key; its secret is printed once, and only here."""
    if role not in ROLES:
        raise typer.BadParameter(f"'{role}' is not one of {', '.join(ROLES)}", param_hint="--role")
    with api(address, org) as client:
        try:
            response = client.create_api_key(name, identity_pb2.Role.ValueType(ROLES[role]),
                                             ttl_s=ttl_days * 86400)
        except TuneForgeError as err:  # the server's `ttl` is this command's --ttl-days
            ttl = [v.description for v in err.violations if v.field == "ttl"]
            if ttl:
                raise typer.BadParameter(ttl[0], param_hint="--ttl-days") from None
            raise
    if as_json:
        console.print_json(to_json(response))
        return
    console.print(_key_table([response.api_key]))
    console.print("secret (shown once; send it as TUNEFORGE_API_KEY):")
    console.print(response.secret, highlight=False, soft_wrap=True)


@keys_app.command("list")
def keys_list(show_all: Annotated[bool, typer.Option("--all", help="Also revoked and expired keys.")] = False,
              page_size: Annotated[int, typer.Option()] = 50,
              page_token: Annotated[str, typer.Option()] = "",
              address: Address = DEFAULT_ADDRESS, org: Org = "", as_json: AsJson = False) -> None:
    """List the organization's API keys, newest first (never their secrets)."""
    with api(address, org) as client:
        response = client.list_api_keys(page_size, page_token, show_inactive=show_all)
    if as_json:
        console.print_json(to_json(response))
        return
    console.print(_key_table(list(response.api_keys)))
    if response.next_page_token:
        console.print(f"next page: --page-token {response.next_page_token}")


@keys_app.command("revoke")
def keys_revoke(ref: Annotated[str, typer.Argument(help="Key id or name.")],
                address: Address = DEFAULT_ADDRESS, org: Org = "") -> None:
    """Revoke an API key at once."""
    with api(address, org) as client:
        key = client.revoke_api_key(ref)
    console.print(_key_table([key]))


@app.command("whoami")
def whoami(address: Address = DEFAULT_ADDRESS, as_json: AsJson = False) -> None:
    """The organization, role and principal of the API key the CLI uses."""
    with api(address, "") as client:
        caller = client.whoami()
    if as_json:
        console.print_json(to_json(caller))
        return
    role = identity_pb2.Role.Name(caller.role).removeprefix("ROLE_").lower()
    console.print(f"{escape(caller.principal)} in organization {escape(caller.organization)} (role {role})")


@app.command("audit")
def audit(method: Annotated[str, typer.Option(help="Only calls of this RPC, e.g. CreateJob.")] = "",
          failures: Annotated[bool, typer.Option("--failures", help="Only refused or failed calls.")] = False,
          page_size: Annotated[int, typer.Option()] = 50,
          page_token: Annotated[str, typer.Option()] = "",
          address: Address = DEFAULT_ADDRESS, org: Org = "", as_json: AsJson = False) -> None:
    """The organization's audit log, newest first: every change and every refused call (admin)."""
    with api(address, org) as client:
        response = client.list_audit_events(page_size, page_token, method=method, failures_only=failures)
    if as_json:
        console.print_json(to_json(response))
        return
    table = Table("TIME", "PRINCIPAL", "METHOD", "RESOURCE", "CODE", "PEER")
    for e in response.events:
        code = e.code if e.code == "OK" else f"[red]{escape(e.code)}[/red]"
        table.add_row(e.time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"), escape(e.principal),
                      escape(e.method.rsplit("/", 1)[-1]), escape(e.resource) or "-", code, escape(e.peer))
    console.print(whole_ids(table))
    if response.next_page_token:
        console.print(f"next page: --page-token {response.next_page_token}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
