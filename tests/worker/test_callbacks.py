"""The shared Trainer callbacks: metric events with throughput, the NaN watchdog, stop requests."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from transformers import TrainerControl

from tests.worker.helpers import read_events
from trainer_worker.events import EventSink
from trainer_worker.recipes.callbacks import DivergenceWatchdog, MetricsCallback, StopCallback
from trainer_worker.stop import StopSignal

ARGS: Any = SimpleNamespace(per_device_train_batch_size=4, gradient_accumulation_steps=2, world_size=1)


def _state(step: int, tokens: int) -> Any:
    return SimpleNamespace(global_step=step, max_steps=100, epoch=step / 50, num_input_tokens_seen=tokens)


def test_metrics_callback_writes_train_and_eval_points(tmp_path: Path) -> None:
    sink = EventSink(tmp_path / "events.jsonl")
    callback = MetricsCallback(sink)
    control = TrainerControl()

    callback.on_train_begin(ARGS, _state(0, 0), control)
    callback.on_log(ARGS, _state(10, 5000), control, logs={"loss": 2.0, "learning_rate": 1e-4})
    callback.on_log(ARGS, _state(10, 5000), control, logs={"eval_loss": 1.5, "eval_mean_token_accuracy": 0.4})
    callback.on_log(ARGS, _state(100, 50000), control, logs={"train_runtime": 9.0, "train_loss": 1.9})

    state, train, evaluation = read_events(tmp_path / "events.jsonl")
    assert state["state"] == "running"
    assert train["kind"] == "train" and (train["step"], train["total_steps"], train["loss"]) == (10, 100, 2.0)
    assert train["tokens_per_second"] > 0 and train["samples_per_second"] > 0 and train["eta_seconds"] >= 0
    assert evaluation == {**evaluation, "kind": "eval", "eval_loss": 1.5, "eval_token_accuracy": 0.4}
    assert callback.summary == {"train_runtime": 9.0, "train_loss": 1.9}


def test_metrics_callback_reports_the_step_reached_and_the_last_one(tmp_path: Path) -> None:
    sink = EventSink(tmp_path / "events.jsonl")
    callback = MetricsCallback(sink, progress_interval_s=3600)
    control = TrainerControl()

    callback.on_train_begin(ARGS, _state(0, 0), control)
    for step in range(1, 6):
        callback.on_step_end(ARGS, _state(step, 100 * step), control)
    callback.on_train_end(ARGS, _state(5, 500), control)

    progress = [e for e in read_events(tmp_path / "events.jsonl") if e["type"] == "progress"]
    # The first step, then nothing within the interval, then the step training ended at.
    assert [(e["step"], e["total_steps"]) for e in progress] == [(1, 100), (5, 100)]
    assert progress[-1]["epoch"] == 0.1


def test_watchdog_stops_on_the_first_non_finite_loss() -> None:
    watchdog = DivergenceWatchdog()
    control = TrainerControl()

    watchdog.on_log(ARGS, _state(5, 0), control, logs={"loss": 3.0, "grad_norm": 1.0})
    assert watchdog.diverged_at is None and not control.should_training_stop
    control.should_save = True
    watchdog.on_log(ARGS, _state(10, 0), control, logs={"loss": 3.0, "grad_norm": float("inf")})
    assert watchdog.diverged_at == 10
    assert control.should_training_stop and not control.should_save


def test_stop_callback_halts_between_steps() -> None:
    stop = StopSignal()
    callback = StopCallback(stop)
    control = TrainerControl()

    callback.on_step_end(ARGS, _state(1, 0), control)
    assert not control.should_training_stop
    stop.request("received SIGTERM")
    control.should_evaluate = True
    callback.on_step_end(ARGS, _state(2, 0), control)
    assert control.should_training_stop and not control.should_evaluate
    assert stop.reason == "received SIGTERM"
