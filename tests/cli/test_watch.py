"""`tuneforge jobs watch` and `jobs create --watch` (services.cli.render.watch): every metric step the job
reported is printed once, in order, before the outcome, for a job that already ended and for a live one,
on a terminal and redirected; state lines come in order with the steps. The client is a fake answering
WatchJob and StreamMetrics from scripts, paced with events the way the two streams race in a real run."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from io import StringIO
from typing import Any

import pytest
from rich.console import Console
from tuneforge.v1 import job_pb2, metrics_pb2
from typer.testing import CliRunner

from services.cli import main
from services.cli.render import outcome, watch
from services.client import Unavailable

JS = job_pb2.JobState
K = metrics_pb2.MetricKind
TOTAL = 60
WAIT_S = 10.0  # how long a script waits for the other stream before the test fails


def job(state: job_pb2.JobState.ValueType, step: int = 0) -> job_pb2.Job:
    j = job_pb2.Job(id="job_1", name="readme-watch", state=state,
                    progress=job_pb2.JobProgress(step=step, total_steps=TOTAL))
    if state == JS.JOB_STATE_SUCCEEDED:
        j.output.adapter_uri = "file:///tmp/readme-watch/adapter"
        j.output.final_metrics["train_loss"] = 0.5
        j.end_time.GetCurrentTime()
    return j


def train(step: int) -> metrics_pb2.MetricPoint:
    return metrics_pb2.MetricPoint(job_id="job_1", kind=K.METRIC_KIND_TRAIN, step=step, total_steps=TOTAL,
                                   epoch=step / TOTAL, attempt=1, loss=3.0 - step / 30, learning_rate=2e-4,
                                   tokens_per_second=1234.0, eta_seconds=TOTAL - step)


def evaluation(step: int) -> metrics_pb2.MetricPoint:
    return metrics_pb2.MetricPoint(job_id="job_1", kind=K.METRIC_KIND_EVAL, step=step, total_steps=TOTAL,
                                   epoch=step / TOTAL, attempt=1, eval_loss=2.0 - step / 60)


STEPS = [10, 20, 30, 40, 50, 60]


def stored_points() -> list[metrics_pb2.MetricPoint]:
    """What StreamMetrics replays for the ended job: (step, kind) order, an eval point every 30 steps."""
    out = []
    for step in STEPS:
        out.append(train(step))
        if step % 30 == 0:
            out.append(evaluation(step))
    return out


def waited(event: threading.Event) -> None:
    assert event.wait(WAIT_S), "the other stream never got there"


class EndedJobClient:
    """A job that SUCCEEDED a while ago: WatchJob answers it once and ends; StreamMetrics replays the stored
    points (each one a few milliseconds apart, as over a network) and ends."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> EndedJobClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def get_job(self, ref: str) -> job_pb2.Job:
        return job(JS.JOB_STATE_SUCCEEDED, TOTAL)

    def watch_job(self, ref: str) -> Iterator[job_pb2.Job]:
        yield job(JS.JOB_STATE_SUCCEEDED, TOTAL)

    def stream_metrics(self, job_id: str, *, follow: bool = True) -> Iterator[metrics_pb2.MetricPoint]:
        assert follow
        for point in stored_points():
            time.sleep(0.02)
            yield point


def lines_of(text: str) -> list[str]:
    """The printed lines that matter here, in order: states, train and eval steps, the outcome (on a
    terminal, without the live bar's redraws, which start with the state too but say more)."""
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    keep = re.compile(r"(QUEUED|PREPARING|RUNNING|CANCELLING|SUCCEEDED|FAILED|CANCELLED)$|step \d+/|"
                      r"eval\s+step \d+:|Job job_1 ")
    return [line.strip() for line in re.split(r"[\r\n]", plain) if keep.match(line.strip())]


def steps_and_summary(text: str) -> list[str]:
    out = []
    for line in lines_of(text):
        if m := re.match(r"(eval\s+)?step (\d+)", line):
            out.append(f"{'eval ' if m.group(1) else ''}{m.group(2)}")
        elif line.startswith("Job job_1 "):
            out.append(line)
    return out


ENDED = ["10", "20", "30", "eval 30", "40", "50", "60", "eval 60", "Job job_1 SUCCEEDED"]


@pytest.mark.parametrize("run", range(3))
def test_watching_an_ended_job_redirected_prints_every_step_before_the_summary(
        monkeypatch: pytest.MonkeyPatch, run: int) -> None:
    monkeypatch.setattr(main, "TuneForgeClient", EndedJobClient)
    result = CliRunner().invoke(main.app, ["jobs", "watch", "readme-watch"],
                                env={"TUNEFORGE_API_KEY": "tf_test", "COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    assert steps_and_summary(result.output) == ENDED, result.output
    assert "step 20/60  epoch 0.33  loss 2.3333  lr 2.00e-04" in result.output, result.output


def test_watching_an_ended_job_on_a_terminal_prints_every_step_before_the_summary() -> None:
    out = StringIO()
    console = Console(file=out, force_terminal=True, width=120, color_system=None)
    client = EndedJobClient()
    final = watch(client, client.get_job("job_1"), console)  # type: ignore[arg-type]
    outcome(final, console)
    assert final.state == JS.JOB_STATE_SUCCEEDED
    assert steps_and_summary(out.getvalue()) == ENDED, out.getvalue()


class LiveJobClient(EndedJobClient):
    """A job followed from QUEUED: its first points reach StreamMetrics before WatchJob says RUNNING (the
    points come from the metrics service, the state from the jobs service), and its last ones after WatchJob
    said SUCCEEDED (StreamMetrics ends by itself a little after the job)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.preparing, self.early, self.mid, self.ended = (threading.Event() for _ in range(4))

    def get_job(self, ref: str) -> job_pb2.Job:
        return job(JS.JOB_STATE_QUEUED)

    def watch_job(self, ref: str) -> Iterator[job_pb2.Job]:
        yield job(JS.JOB_STATE_QUEUED)
        yield job(JS.JOB_STATE_PREPARING)
        self.preparing.set()
        waited(self.early)  # steps 1 and 10 are on their way to the CLI
        yield job(JS.JOB_STATE_RUNNING)
        waited(self.mid)
        yield job(JS.JOB_STATE_RUNNING, 40)
        self.ended.set()
        yield job(JS.JOB_STATE_SUCCEEDED, TOTAL)

    def stream_metrics(self, job_id: str, *, follow: bool = True) -> Iterator[metrics_pb2.MetricPoint]:
        waited(self.preparing)
        yield train(1)
        yield train(10)
        self.early.set()
        for step in (20, 30, 40):
            yield train(step)
        yield evaluation(30)  # late: an older step than the last train point, still printed once
        yield train(30)  # a repeat (e.g. a redelivered report): not printed again
        self.mid.set()
        waited(self.ended)
        time.sleep(0.05)  # the last points come after WatchJob's SUCCEEDED
        yield train(50)
        yield train(60)
        yield evaluation(60)


LIVE = ["PREPARING", "RUNNING", "step 1/60", "step 10/60", "step 20/60", "step 30/60", "step 40/60",
        "eval  step 30:", "step 50/60", "step 60/60", "eval  step 60:", "SUCCEEDED", "Job job_1 SUCCEEDED"]


@pytest.mark.parametrize("terminal", [False, True])
def test_a_live_job_prints_states_in_order_with_its_steps_and_every_step_before_the_summary(
        terminal: bool) -> None:
    out = StringIO()
    console = Console(file=out, force_terminal=terminal, width=120, color_system=None)
    client = LiveJobClient()
    final = watch(client, client.get_job("job_1"), console)  # type: ignore[arg-type]
    outcome(final, console)
    got = [next((p for p in LIVE if line.startswith(p)), line) for line in lines_of(out.getvalue())]
    assert got == LIVE, out.getvalue()


def test_points_wait_for_running_only_so_long() -> None:
    """A RUNNING that WatchJob does not bring (a lost announcement, until its next poll) holds the steps
    back only `hold_s`: then they are printed under the state shown."""
    out = StringIO()
    console = Console(file=out, width=120, color_system=None)
    shown = threading.Event()

    class NoRunning(EndedJobClient):
        def get_job(self, ref: str) -> job_pb2.Job:
            return job(JS.JOB_STATE_PREPARING)

        def watch_job(self, ref: str) -> Iterator[job_pb2.Job]:
            yield job(JS.JOB_STATE_PREPARING)
            deadline = time.monotonic() + WAIT_S
            while "step 10/60" not in out.getvalue():
                assert time.monotonic() < deadline, out.getvalue()
                time.sleep(0.01)
            shown.set()
            yield job(JS.JOB_STATE_FAILED)

        def stream_metrics(self, job_id: str, *, follow: bool = True) -> Iterator[metrics_pb2.MetricPoint]:
            yield train(10)
            waited(shown)

    client = NoRunning()
    started = time.monotonic()
    final = watch(client, client.get_job("job_1"), console, hold_s=0.2)  # type: ignore[arg-type]
    outcome(final, console)
    assert time.monotonic() - started < 5
    assert [line.split(" ")[0] for line in lines_of(out.getvalue())] == ["step", "FAILED", "Job"]


def test_a_metrics_stream_that_does_not_end_is_waited_for_only_so_long() -> None:
    out = StringIO()
    console = Console(file=out, width=120, color_system=None)
    release = threading.Event()

    class Endless(EndedJobClient):
        def stream_metrics(self, job_id: str, *, follow: bool = True) -> Iterator[metrics_pb2.MetricPoint]:
            yield from stored_points()
            release.wait(WAIT_S)  # a stream the service never ends
            yield train(TOTAL + 10)

    client = Endless()
    try:
        started = time.monotonic()
        final = watch(client, client.get_job("job_1"), console, end_wait_s=0.3)  # type: ignore[arg-type]
        outcome(final, console)
        assert time.monotonic() - started < 5
    finally:
        release.set()
    assert steps_and_summary(out.getvalue()) == ENDED, out.getvalue()
    assert "stopped waiting" in out.getvalue(), out.getvalue()


def test_an_error_of_watch_job_is_raised() -> None:
    class Down(EndedJobClient):
        def watch_job(self, ref: str) -> Iterator[job_pb2.Job]:
            raise Unavailable("the jobs service is unavailable")
            yield  # a generator

    client = Down()
    with pytest.raises(Unavailable):
        watch(client, job(JS.JOB_STATE_RUNNING), Console(file=StringIO()))  # type: ignore[arg-type]
