"""`tuneforge jobs metrics JOB`: a job's training and evaluation points (MetricsService.ListMetrics) as a
table, a terminal line plot of the losses by step (plotext), or JSON."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated

import typer
from google.protobuf import json_format
from rich.table import Table
from tuneforge.v1 import metrics_pb2

K = metrics_pb2.MetricKind
KINDS = [K.METRIC_KIND_TRAIN, K.METRIC_KIND_EVAL]


@dataclass
class Row:
    """One step: its training point and its evaluation, either of which may be missing."""

    step: int
    epoch: float | None = None
    loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None


def rows_of(points: Iterable[metrics_pb2.MetricPoint]) -> list[Row]:
    """Training and evaluation points merged by step, in step order (a later attempt's point for a step
    replaces an earlier one's)."""
    by_step: dict[int, Row] = {}
    for p in sorted(points, key=lambda p: (p.attempt, p.step)):
        row = by_step.setdefault(p.step, Row(p.step))
        row.epoch = p.epoch
        if p.kind == K.METRIC_KIND_TRAIN:
            row.loss = p.loss if p.HasField("loss") else row.loss
            row.learning_rate = p.learning_rate if p.HasField("learning_rate") else row.learning_rate
            row.tokens_per_second = (p.tokens_per_second if p.HasField("tokens_per_second")
                                     else row.tokens_per_second)
        elif p.kind == K.METRIC_KIND_EVAL and p.HasField("eval_loss"):
            row.eval_loss = p.eval_loss
    return [by_step[s] for s in sorted(by_step)]


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def metrics_table(rows: Sequence[Row]) -> Table:
    table = Table("STEP", "EPOCH", "LOSS", "EVAL LOSS", "LR", "TOKENS/S")
    for r in rows:
        table.add_row(str(r.step), _number(r.epoch, ".2f"), _number(r.loss, ".4f"),
                      _number(r.eval_loss, ".4f"), _number(r.learning_rate, ".3g"),
                      _number(r.tokens_per_second, ",.0f"))
    return table


def loss_plot(rows: Sequence[Row], title: str, width: int = 100, height: int = 25) -> str:
    """loss and eval_loss by step as a terminal line plot (plotext 6's figure API), without colour codes so
    that it reads the same in a terminal, a pipe or a log."""
    import plotext as plt  # type: ignore[import-untyped]

    figure = plt.figure
    figure.clear()
    figure.plot_size(width, height)
    figure.theme("colorless")
    train = [(r.step, r.loss) for r in rows if r.loss is not None and math.isfinite(r.loss)]
    evals = [(r.step, r.eval_loss) for r in rows if r.eval_loss is not None and math.isfinite(r.eval_loss)]
    for points, label, marker in ((train, "loss", "hd"), (evals, "eval_loss", "o")):
        if points:
            signal = figure.signal([s for s, _ in points], [v for _, v in points], marker=marker)
            signal.label(label)
            signal.lines()
            figure.draw(signal)
    figure.title(title)
    figure.label("step")
    out: str = figure.build().string(colorless=True)
    figure.clear()
    return out


def register(jobs_app: typer.Typer) -> None:
    """Adds `jobs metrics` to the CLI (services.cli.main)."""

    @jobs_app.command("metrics")
    def jobs_metrics(
        ref: Annotated[str, typer.Argument(help="Job id or name.")],
        plot: Annotated[bool, typer.Option("--plot", help="Plot loss and eval_loss by step.")] = False,
        address: Annotated[str, typer.Option("--address", envvar="TUNEFORGE_ADDRESS",
                                             help="gRPC address of the platform.")] = "127.0.0.1:50051",
        org: Annotated[str, typer.Option("--org", envvar="TUNEFORGE_ORGANIZATION",
                                         help="Organization (default: the API key's).")] = "",
        as_json: Annotated[bool, typer.Option("--json", help="Print the points as JSON.")] = False,
    ) -> None:
        """The job's training and evaluation metrics by step: loss, eval_loss, learning rate, tokens/s."""
        from services.cli.main import api, console

        with api(address, org) as client:
            job = client.get_job(ref)
            points = client.list_metrics(job.id, KINDS)
        if as_json:
            console.print_json(json.dumps({"job": job.id, "points": [
                json_format.MessageToDict(p, preserving_proto_field_name=True) for p in points]}))
            return
        rows = rows_of(points)
        if not rows:
            console.print(f"job {job.name} has reported no training metrics yet", highlight=False)
            return
        if plot:
            width = max(40, min(console.width, 160))
            typer.echo(loss_plot(rows, f"{job.name}: loss by step", width=width))
            return
        console.print(metrics_table(rows))
