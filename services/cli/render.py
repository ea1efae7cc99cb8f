"""How the CLI shows resources and live progress."""

from __future__ import annotations

import threading
from typing import Any

from google.protobuf import json_format
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from tuneforge.v1 import dataset_pb2, estimation_pb2, estimation_service_pb2, job_pb2, metrics_pb2

from services.client import TuneForgeClient, TuneForgeError
from tuneforge_core import states

JS = job_pb2.JobState


def enum_name(enum: Any, value: int, prefix: str) -> str:
    return enum.Name(value).removeprefix(prefix) if value in enum.values() else str(value)


def job_state(job: job_pb2.Job) -> str:
    return enum_name(JS, job.state, "JOB_STATE_")


def as_json(message: Any) -> str:
    return json_format.MessageToJson(message, preserving_proto_field_name=True, indent=2)


# Columns printed whole however narrow the terminal: ids and names are copied into the next command.
WHOLE_COLUMNS = frozenset({"ID", "NAME", "JOB", "PRINCIPAL", "RESOURCE", "PREFIX", "PATH", "SHA256", "POOL",
                           "MODEL", "DATASET", "DEPLOYMENT", "STEP"})


class WholeTable(Table):
    """A table that never cuts a cell: on a terminal wide enough for every cell on one line it is a table;
    on a narrower one each row is printed as its own block of `HEADER  value` lines, since rich would
    otherwise end long ids (and squeezed headers) with an ellipsis."""

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        natural = Table.__rich_measure__(self, console, options.update(width=10**6)).maximum
        if natural <= options.max_width or not self.columns:
            yield from Table.__rich_console__(self, console, options)
            return
        headers = [str(c.header) for c in self.columns]
        rows = list(zip(*(c._cells for c in self.columns), strict=True))
        for k, row in enumerate(rows):
            grid = Table.grid(padding=(0, 2))
            grid.add_column(style="bold", no_wrap=True)
            grid.add_column(overflow="fold")
            for header, cell in zip(headers, row, strict=True):
                grid.add_row(header, cell)
            if k:
                yield ""
            yield grid


def whole_ids(table: Table) -> Table:
    """`table` with nothing cut, however narrow the terminal: its id-like columns are as wide as their
    longest cell and never wrap, and a table too wide for the terminal prints as one block per row
    (WholeTable)."""
    for column in table.columns:
        if str(column.header) in WHOLE_COLUMNS:
            cells = [cell_len(str(c)) for c in column._cells]
            column.no_wrap = True
            column.min_width = max([cell_len(str(column.header)), *cells])
        else:
            column.overflow = "fold"
    table.__class__ = WholeTable  # same attributes, another way to render: no copy of the rows needed
    return table


def dataset_table(datasets: list[dataset_pb2.Dataset]) -> Table:
    table = Table("ID", "NAME", "STATE", "FORMAT", "EXAMPLES", "SPLITS", "CREATED")
    for d in datasets:
        splits = " ".join(f"{enum_name(dataset_pb2.DatasetSplitKind, s.kind, 'DATASET_SPLIT_KIND_').lower()}"
                          f"={s.example_count}" for s in d.splits)
        table.add_row(d.id, d.name, enum_name(dataset_pb2.DatasetState, d.state, "DATASET_STATE_"),
                      enum_name(dataset_pb2.DatasetFormat, d.format, "DATASET_FORMAT_"),
                      str(d.statistics.example_count), splits,
                      d.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"))
    return whole_ids(table)


def job_table(jobs: list[job_pb2.Job]) -> Table:
    table = Table("ID", "NAME", "STATE", "MODEL", "METHOD", "STEP", "CREATED")
    for j in jobs:
        step = f"{j.progress.step}/{j.progress.total_steps}" if j.progress.total_steps else "-"
        table.add_row(j.id, j.name, job_state(j), j.spec.base_model,
                      enum_name(job_pb2.TrainingMethod, j.spec.method, "TRAINING_METHOD_") + "/" +
                      enum_name(job_pb2.AdapterType, j.spec.adapter, "ADAPTER_TYPE_"),
                      step, j.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"))
    return whole_ids(table)


def plan_table(plan: estimation_service_pb2.PlanJobResponse) -> Table:
    """One row per GPU type the plan fitted, cheapest first as the service ordered them."""
    table = Table("GPU", "COUNT", "FITS", "GiB/GPU", "HOURS", "USD", "BASIS")
    for fit in plan.fits:
        table.add_row(
            fit.gpu_type, str(fit.gpu_count), "yes" if fit.fits else "no",
            f"{fit.memory_per_gpu.total / 2**30:.1f}", f"{fit.time.total_seconds / 3600:.2f}",
            f"{fit.cost.total_usd:.2f}",
            enum_name(estimation_pb2.EstimateSource, fit.source, "ESTIMATE_SOURCE_"),
        )
    return whole_ids(table)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"


def watch(client: TuneForgeClient, job: job_pb2.Job, console: Console) -> job_pb2.Job:
    """Shows the job's progress until it ends: a live bar on a terminal, one line per point otherwise."""
    fields: dict[str, Any] = {"state": job_state(job), "loss": "-", "lr": "-", "tps": "-", "eta": "-"}
    live = console.is_terminal
    progress = Progress(
        TextColumn("[bold]{task.fields[state]:<10}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
        TextColumn("{task.fields[tps]} tok/s"), TextColumn("ETA {task.fields[eta]}"), TimeElapsedColumn(),
        console=console, disable=not live,
    )
    task = progress.add_task("train", total=None, **fields)
    lock = threading.Lock()
    last_step = [-1]

    def on_point(point: metrics_pb2.MetricPoint) -> None:
        if point.kind == metrics_pb2.METRIC_KIND_EVAL:
            console.print(f"  eval  step {point.step}: eval_loss {_fmt(point.eval_loss, '.4f')}")
            return
        if point.kind != metrics_pb2.METRIC_KIND_TRAIN:
            return
        get = point.HasField
        values: dict[str, Any] = {
            "loss": _fmt(point.loss if get("loss") else None, ".4f"),
            "lr": _fmt(point.learning_rate if get("learning_rate") else None, ".2e"),
            "tps": _fmt(point.tokens_per_second if get("tokens_per_second") else None, ",.0f"),
            "eta": _eta(point.eta_seconds if get("eta_seconds") else None),
        }
        with lock:
            if point.step <= last_step[0]:
                return
            last_step[0] = point.step
            progress.update(task, completed=point.step, total=point.total_steps or None, **values)
        if not live:
            console.print(f"  step {point.step}/{point.total_steps}  epoch {point.epoch:.2f}  "
                          f"loss {values['loss']}  lr {values['lr']}  grad_norm "
                          f"{_fmt(point.grad_norm if get('grad_norm') else None, '.3f')}  "
                          f"{values['tps']} tok/s  ETA {values['eta']}")

    def follow_metrics() -> None:
        try:
            for point in client.stream_metrics(job.id, follow=True):
                on_point(point)
        except TuneForgeError:
            pass  # the job view below still reports the outcome

    threading.Thread(target=follow_metrics, daemon=True).start()
    final = job
    with progress:
        for update in client.watch_job(job.id):
            final = update
            with lock:
                state = job_state(update)
                if state != fields["state"] and not live:
                    console.print(f"[bold]{state}[/bold]")
                fields["state"] = state
                total = update.progress.total_steps or None
                if update.state == JS.JOB_STATE_SUCCEEDED and total:
                    progress.update(task, state=state, total=total, completed=total)
                else:
                    progress.update(task, state=state, total=total)
            if states.is_final(update.state):
                break
    return final


def outcome(job: job_pb2.Job, console: Console) -> None:
    state = job_state(job)
    if job.state == JS.JOB_STATE_SUCCEEDED:
        console.print(f"[green]Job {job.id} SUCCEEDED[/green]")
        console.print(f"  adapter: {job.output.adapter_uri}")
        if job.output.merged_model_uri:
            console.print(f"  merged model: {job.output.merged_model_uri}")
        for key, value in sorted(job.output.final_metrics.items()):
            console.print(f"  {key}: {value:.4g}")
    else:
        console.print(f"[red]Job {job.id} ended {state}[/red]: {job.error.message}")
