"""`tuneforge jobs create --config FILE`: a job from a Synth TOML, ModelForge JSON or NeMo Customizer
hyperparameters file, with Synth's own flags (`--dataset`, `--examples N`, `--dry-run`).

The mapping lives in `tuneforge_core.config_files` and the uploads in `services.client.config_jobs`; this
module only prints. `jobs create` (services.cli.main) hands over to `create_from_config` when `--config` is
given.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from google.protobuf import json_format
from rich.console import Console
from rich.markup import escape
from tuneforge.v1 import job_pb2

from services.cli.render import plan_table
from services.client import TuneForgeClient
from services.client.config_jobs import ConfigDryRun
from tuneforge_core.config_files import FORMAT_TITLES, ConfigJob, read_config


def refuse_with_config(**flags: Any) -> None:
    """Spec flags other than --model and --dataset do not combine with --config: the file says them."""
    given = sorted(f"--{k.replace('_', '-')}" for k, v in flags.items() if v is not None)
    if given:
        raise typer.BadParameter(f"{', '.join(given)} cannot be combined with --config: set them in the file",
                                 param_hint="--config")


def _notes(console: Console, config: ConfigJob) -> None:
    console.print(f"config: {FORMAT_TITLES[config.format]}", highlight=False)
    for note in config.notes:
        console.print(f"[yellow]note[/yellow] {escape(note.field)}: {escape(note.description)}",
                      highlight=False)


def create_from_config(client: TuneForgeClient, console: Console, config_file: Path, *, dataset: str | None,
                       model: str | None, gpu_type: str | None, examples: int | None, name: str,
                       dry_run: bool, validate_only: bool, as_json: bool) -> job_pb2.Job | None:
    """Creates (or with --dry-run, shows) the job the file asks for; returns the job when one was made."""
    if dry_run:
        result = client.dry_run_config(config_file, dataset=dataset, model=model, gpu_type=gpu_type,
                                       examples=examples, name=name)
        show_dry_run(console, result, as_json)
        return None
    job = client.create_job_from_config(config_file, dataset=dataset, model=model, gpu_type=gpu_type,
                                        examples=examples, name=name, validate_only=validate_only)
    if not as_json:  # the notes again (reading the file is cheap): keys accepted without effect
        _notes(console, read_config(config_file, validate=False))
    return job


def show_dry_run(console: Console, result: ConfigDryRun, as_json: bool) -> None:
    if as_json:
        console.print_json(json.dumps({
            "format": result.config.format,
            "checked_by_platform": result.checked_by_platform,
            "notes": [{"key": n.field, "note": n.description} for n in result.config.notes],
            "uploads": [u.describe() for u in result.uploads],
            "spec": json_format.MessageToDict(result.spec, preserving_proto_field_name=True),
            "plan": json_format.MessageToDict(result.plan, preserving_proto_field_name=True)
            if result.plan is not None else None,
            "plan_error": result.plan_error,
        }))
        return
    _notes(console, result.config)
    for upload in result.uploads:
        console.print(f"would {escape(upload.describe())}", highlight=False)
    where = "checked by the platform (CreateJob validate_only)" if result.checked_by_platform else \
        "resolved here: the dataset is a local file, not uploaded by a dry run"
    console.print(f"resolved job spec, {where}:", highlight=False)
    console.print_json(json_format.MessageToJson(result.spec, preserving_proto_field_name=True))
    if result.plan is None:
        console.print(f"[yellow]no plan[/yellow] {escape(result.plan_error)}", highlight=False)
        return
    plan = result.plan
    console.print(f"training tokens: {plan.training_tokens:,} ({plan.tokens_per_epoch:,} per epoch)")
    console.print(plan_table(plan))
    for note in [*plan.notes, *plan.suggestions]:
        console.print(f"[yellow]note[/yellow] {escape(note)}", highlight=False)
    console.print("dry run: nothing was created")


__all__ = ["create_from_config", "refuse_with_config", "show_dry_run"]
