"""`tuneforge jobs metrics`: a job's train and eval points as a table, a plot or JSON. The rendering is tested
on points as ListMetrics returns them, and the command through the CLI with the client answering from them
(the service side of ListMetrics has its own tests)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest
from tuneforge.v1 import job_pb2, metrics_pb2
from typer.testing import CliRunner

from services.cli import main
from services.cli.metrics import loss_plot, metrics_table, rows_of

K = metrics_pb2.MetricKind


def points() -> list[metrics_pb2.MetricPoint]:
    out = []
    for step in range(1, 11):
        out.append(metrics_pb2.MetricPoint(job_id="job_1", kind=K.METRIC_KIND_TRAIN, step=step,
                                           epoch=step / 10, attempt=1, loss=3.0 - 0.2 * step,
                                           learning_rate=2e-4, tokens_per_second=1234.5))
    for step in (5, 10):
        out.append(metrics_pb2.MetricPoint(job_id="job_1", kind=K.METRIC_KIND_EVAL, step=step,
                                           epoch=step / 10, attempt=1, eval_loss=2.5 - 0.05 * step))
    # A later attempt reported step 10 again: its point wins.
    out.append(metrics_pb2.MetricPoint(job_id="job_1", kind=K.METRIC_KIND_TRAIN, step=10, epoch=1.0,
                                       attempt=2, loss=0.9, learning_rate=1e-4, tokens_per_second=999.0))
    return out


def test_train_and_eval_points_merge_by_step() -> None:
    rows = rows_of(reversed(points()))
    assert [r.step for r in rows] == list(range(1, 11))
    assert rows[4].loss == pytest.approx(2.0) and rows[4].eval_loss == pytest.approx(2.25)
    assert rows[0].eval_loss is None
    assert (rows[9].loss, rows[9].learning_rate) == (0.9, 1e-4) and rows[9].eval_loss == pytest.approx(2.0)


def test_the_plot_draws_both_losses() -> None:
    text = loss_plot(rows_of(points()), "demo: loss by step", width=80, height=20)
    lines = text.splitlines()
    assert len(lines) == 20 and "demo: loss by step" in text and "\x1b[" not in text, "no colour codes"
    assert "loss" in text and "eval_loss" in text and "step" in text


class FakeClient:
    """The client the CLI makes, answering from `points()`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def get_job(self, ref: str) -> job_pb2.Job:
        return job_pb2.Job(id="job_1", name=ref)

    def list_metrics(self, job_id: str, kinds: Sequence[int]) -> list[metrics_pb2.MetricPoint]:
        assert job_id == "job_1" and set(kinds) == {K.METRIC_KIND_TRAIN, K.METRIC_KIND_EVAL}
        return points()


def test_the_command_prints_a_table_a_plot_or_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(main, "TuneForgeClient", FakeClient)
    runner = CliRunner()
    env = {"TUNEFORGE_API_KEY": "tf_test", "COLUMNS": "120"}
    result = runner.invoke(main.app, ["jobs", "metrics", "my-job"], env=env)
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if line.startswith("│ 5 "))
    assert [c.strip() for c in row.split("│")[1:-1]] == ["5", "0.50", "2.0000", "2.2500", "0.0002", "1,234"]
    assert any(line.startswith("│ 1 ") and "│ -" in line for line in result.output.splitlines())

    result = runner.invoke(main.app, ["jobs", "metrics", "my-job", "--plot"], env=env)
    assert result.exit_code == 0, result.output
    assert "my-job: loss by step" in result.output and "eval_loss" in result.output

    result = runner.invoke(main.app, ["jobs", "metrics", "my-job", "--json"], env=env)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["job"] == "job_1" and len(data["points"]) == 13
    assert data["points"][10]["kind"] == "METRIC_KIND_EVAL" and data["points"][10]["eval_loss"] == 2.25


def test_a_job_without_metrics_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    class Empty(FakeClient):
        def list_metrics(self, job_id: str, kinds: Sequence[int]) -> list[metrics_pb2.MetricPoint]:
            return []

    monkeypatch.setattr(main, "TuneForgeClient", Empty)
    result = CliRunner().invoke(main.app, ["jobs", "metrics", "quiet"], env={"TUNEFORGE_API_KEY": "k"})
    assert result.exit_code == 0 and "job quiet has reported no training metrics yet" in result.output


def test_a_table_with_no_rows_is_just_its_header() -> None:
    assert [str(c.header) for c in metrics_table([]).columns] == [
        "STEP", "EPOCH", "LOSS", "EVAL LOSS", "LR", "TOKENS/S"]
