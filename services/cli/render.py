"""How the CLI shows resources and live progress."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from google.protobuf import json_format
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text
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


def size_text(n: float) -> str:
    """A byte count in binary units (KiB, MiB...), as every size the CLI prints is."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class BytesColumn(DownloadColumn):
    """Bytes done of the total, in the binary units of the sizes the CLI prints beside the bar."""

    def __init__(self) -> None:
        super().__init__(binary_units=True)


class SpeedColumn(TransferSpeedColumn):
    """Transfer speed in binary units (rich's own column has decimal ones only)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("?" if speed is None else f"{size_text(speed)}/s", style="progress.data.speed")


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


# Once the job ended, how long `watch` waits for its metrics stream to end before it prints the outcome. The
# stream ends by itself: the metrics service's follow grace (TUNEFORGE_METRICS_FOLLOW_GRACE_S, 1 s) after the
# job ended, or after the service's next look at the job (every 15 s) if the announcement of the end was lost.
METRICS_END_WAIT_S = 30.0
# How long points that came while the job was shown QUEUED or PREPARING wait for its RUNNING before they
# are printed anyway. The points come from the metrics service, the state from the jobs service; the first
# points usually come first, RUNNING a moment later (WatchJob looks at the job every 5 s even if its
# announcement was lost).
HOLD_FOR_RUNNING_S = 10.0
# States shown before the job trains: points that come while one of them is shown wait for RUNNING.
BEFORE_TRAINING = frozenset({JS.JOB_STATE_UNSPECIFIED, JS.JOB_STATE_QUEUED, JS.JOB_STATE_PREPARING})


def _pump(source: str, items: Callable[[], Iterable[Any]], out: queue.Queue[tuple[str, Any]]) -> None:
    """Puts each item of a stream on `out` as (source, item), then (source + "_end", the error or None)."""
    try:
        for item in items():
            out.put((source, item))
    except Exception as exc:  # handed to the thread that prints, which decides
        out.put((source + "_end", exc))
        return
    out.put((source + "_end", None))


class _WatchView:
    """What `watch` shows, printed by one thread in the order it decides: a line per state change (from
    WatchJob) and per train or eval point (from StreamMetrics), and the bar on a terminal.

    The two streams race: a job's first points usually arrive before WatchJob says RUNNING. Points that
    arrive while the job is shown QUEUED or PREPARING are held until a state change is shown (RUNNING:
    its line, then the points; any other: the points, then its line) or `hold_s` passed. The final state's
    line waits until the metrics stream ended, so it comes after the last step."""

    def __init__(self, job: job_pb2.Job, console: Console, progress: Progress, task: TaskID,
                 hold_s: float) -> None:
        self.console, self.progress, self.task, self.hold_s = console, progress, task, hold_s
        self.shown = job.state  # the state last printed (the one given is not: the caller showed it)
        self.final: job_pb2.Job | None = None
        self.held: list[metrics_pb2.MetricPoint] = []
        self.held_since = 0.0
        self.last_step: dict[int, int] = {}  # per kind: each series only moves forward

    def release_at(self) -> float | None:
        """When the points held are printed if no RUNNING came; None when none are held."""
        return self.held_since + self.hold_s if self.held else None

    def point(self, point: metrics_pb2.MetricPoint, now: float) -> None:
        if point.kind not in (metrics_pb2.METRIC_KIND_TRAIN, metrics_pb2.METRIC_KIND_EVAL):
            return
        if point.step <= self.last_step.get(point.kind, -1):
            return  # a repeat (a redelivered report, an attempt resumed from a checkpoint)
        self.last_step[point.kind] = point.step
        if self.final is None and self.shown in BEFORE_TRAINING:
            if not self.held:
                self.held_since = now
            self.held.append(point)
            return
        self._print_point(point)

    def job(self, job: job_pb2.Job) -> None:
        if states.is_final(job.state):
            self.final = job  # its line once the metrics stream ended (finish)
            self.release()
            return
        if job.state != self.shown:
            if job.state == JS.JOB_STATE_RUNNING:
                self._print_state(job.state)
                self.release()
            else:
                self.release()
                self._print_state(job.state)
        self._bar(job)

    def release(self) -> None:
        held, self.held = self.held, []
        for point in held:
            self._print_point(point)

    def finish(self, final: job_pb2.Job) -> None:
        self.release()
        if final.state != self.shown:
            self._print_state(final.state)
        self._bar(final)

    def _bar(self, job: job_pb2.Job) -> None:
        """The bar's state, and its total when the job knows it (a SUCCEEDED job's bar is full)."""
        total = job.progress.total_steps
        if not total:
            self.progress.update(self.task, state=self._name())
        elif job.state == JS.JOB_STATE_SUCCEEDED:
            self.progress.update(self.task, state=self._name(), total=total, completed=total)
        else:
            self.progress.update(self.task, state=self._name(), total=total)

    def _name(self) -> str:
        return enum_name(JS, self.shown, "JOB_STATE_")

    def _print_state(self, state: job_pb2.JobState.ValueType) -> None:
        self.shown = state
        self.console.print(f"[bold]{self._name()}[/bold]")

    def _print_point(self, point: metrics_pb2.MetricPoint) -> None:
        if point.kind == metrics_pb2.METRIC_KIND_EVAL:
            self.console.print(f"  eval  step {point.step}: eval_loss {_fmt(point.eval_loss, '.4f')}")
            return
        get = point.HasField
        values: dict[str, Any] = {
            "loss": _fmt(point.loss if get("loss") else None, ".4f"),
            "lr": _fmt(point.learning_rate if get("learning_rate") else None, ".2e"),
            "tps": _fmt(point.tokens_per_second if get("tokens_per_second") else None, ",.0f"),
            "eta": _eta(point.eta_seconds if get("eta_seconds") else None),
        }
        self.progress.update(self.task, completed=point.step, total=point.total_steps or None, **values)
        self.console.print(f"  step {point.step}/{point.total_steps}  epoch {point.epoch:.2f}  "
                           f"loss {values['loss']}  lr {values['lr']}  grad_norm "
                           f"{_fmt(point.grad_norm if get('grad_norm') else None, '.3f')}  "
                           f"{values['tps']} tok/s  ETA {values['eta']}")


def watch(client: TuneForgeClient, job: job_pb2.Job, console: Console, *,
          end_wait_s: float = METRICS_END_WAIT_S, hold_s: float = HOLD_FOR_RUNNING_S) -> job_pb2.Job:
    """Shows the job's progress until it ends, and returns it as it ended: a line per state change and per
    train or eval point (on a terminal, under a live bar), every point the job reported once, in step
    order, before the caller prints the outcome.

    WatchJob and StreamMetrics (with follow; it ends by itself a little after the job) are each read by a
    thread of their own; this thread prints what they bring (_WatchView says in what order). Once WatchJob
    says the job ended, the points still on their way are waited for, `end_wait_s` at most."""
    live = console.is_terminal
    progress = Progress(
        TextColumn("[bold]{task.fields[state]:<10}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
        TextColumn("{task.fields[tps]} tok/s"), TextColumn("ETA {task.fields[eta]}"), TimeElapsedColumn(),
        console=console, disable=not live,
    )
    task = progress.add_task("train", total=job.progress.total_steps or None, state=job_state(job), loss="-",
                             lr="-", tps="-", eta="-")
    view = _WatchView(job, console, progress, task, hold_s)
    events: queue.Queue[tuple[str, Any]] = queue.Queue()
    for source, items in (("metrics", lambda: client.stream_metrics(job.id, follow=True)),
                          ("job", lambda: client.watch_job(job.id))):
        threading.Thread(target=_pump, args=(source, items, events), name=f"watch-{source}",
                         daemon=True).start()
    last = job
    final: job_pb2.Job | None = None  # the job as WatchJob said it ended
    ended_at = 0.0
    metrics_open = True
    with progress:
        while True:
            now = time.monotonic()
            release_at = view.release_at()
            if release_at is not None and now >= release_at:
                view.release()  # RUNNING is late: the points are printed under the state shown
            if final is not None:
                if not metrics_open:
                    break
                if now >= ended_at + end_wait_s:
                    console.print(f"[dim]the job's metrics stream had not ended {end_wait_s:g} s after the "
                                  f"job; stopped waiting for it[/dim]")
                    break
            deadlines = [d for d in (view.release_at(), ended_at + end_wait_s if final is not None else None)
                         if d is not None]
            try:  # at most a second at a time: Ctrl-C is seen at once
                source, item = events.get(timeout=min([1.0, *(max(d - now, 0.0) for d in deadlines)]))
            except queue.Empty:
                continue
            if source == "metrics":
                view.point(item, time.monotonic())
            elif source == "job":
                last = item
                view.job(item)
                if states.is_final(item.state) and final is None:
                    final, ended_at = item, time.monotonic()
            elif source == "job_end":
                if final is None:
                    if item is not None:
                        raise item
                    final, ended_at = last, time.monotonic()  # ended without a final state: as it was last
            elif source == "metrics_end":
                metrics_open = False
                if isinstance(item, TuneForgeError):
                    console.print(f"[yellow]the job's metrics stream failed[/yellow]: {escape(str(item))}")
                elif item is not None:
                    raise item
        final = final if final is not None else last  # (the loop only ends once it is set)
        view.finish(final)
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
