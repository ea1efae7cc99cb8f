"""Trainer callbacks every recipe shares: metrics out to the events file, the NaN watchdog, stop requests."""

from __future__ import annotations

import math
import time
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from trainer_worker import distributed
from trainer_worker.events import EventSink
from trainer_worker.stop import StopSignal

# Method metrics forwarded with each point (MetricPoint.values): DPO/ORPO/KTO rewards and margins, GRPO
# rewards per function and KL, distillation's two loss terms. Anything else the trainers log stays local.
METHOD_METRIC_PREFIXES = (
    "reward",
    "rewards/",
    "kl",
    "logps/",
    "log_odds",
    "nll_loss",
    "completions/mean_length",
    "distillation_loss",
    "hard_loss",
)


def method_metrics(logs: dict[str, float], prefix: str = "") -> dict[str, float]:
    """The method-specific numbers of a Trainer log dict (``prefix`` "eval_" for evaluation logs)."""
    return {
        key: value
        for key, value in logs.items()
        if key.startswith(prefix)
        and key.removeprefix(prefix).startswith(METHOD_METRIC_PREFIXES)
        and isinstance(value, int | float)
    }


def _halt(control: TrainerControl) -> None:
    """Stop after this step without the evaluation or checkpoint the step would otherwise trigger."""
    control.should_training_stop = True
    control.should_evaluate = False
    control.should_save = False


class MetricsCallback(TrainerCallback):
    """Turns the Trainer's log dicts into train/eval metric events with throughput and ETA, and reports the
    step reached (``progress``) about once a second and when training ends, so the job's progress is the
    step that ran even when the run ends between logging steps (``max_steps`` < ``logging_steps``)."""

    def __init__(self, sink: EventSink, progress_interval_s: float = 1.0) -> None:
        self._sink = sink
        self._progress_interval_s = progress_interval_s
        self._progress_at = float("-inf")  # the first step reports at once (monotonic() may be < interval)
        self.summary: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}
        self._start = self._last_time = 0.0
        self._start_step = self._last_step = 0
        self._last_tokens = 0

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._start = self._last_time = time.monotonic()
        self._start_step = self._last_step = state.global_step
        self._last_tokens = state.num_input_tokens_seen
        self._sink.state("running")

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        now = time.monotonic()
        if now - self._progress_at >= self._progress_interval_s:
            self._progress(state)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._progress(state)  # the step training ended at, logged or not

    def _progress(self, state: TrainerState) -> None:
        self._progress_at = time.monotonic()
        self._sink.progress(state.global_step, total_steps=state.max_steps, epoch=state.epoch,
                            tokens_trained=state.num_input_tokens_seen)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        logs = logs or {}
        if "loss" in logs:
            self._train_point(args, state, logs)
        elif "eval_loss" in logs:
            self.last_eval = {k: v for k, v in logs.items() if isinstance(v, int | float)}
            self._sink.metric(
                "eval",
                state.global_step,
                total_steps=state.max_steps,
                epoch=state.epoch,
                eval_loss=logs["eval_loss"],
                eval_token_accuracy=logs.get("eval_mean_token_accuracy"),
                **method_metrics(logs, "eval_"),
            )
        elif "train_runtime" in logs:
            self.summary = {k: float(v) for k, v in logs.items() if isinstance(v, int | float)}

    def _train_point(self, args: TrainingArguments, state: TrainerState, logs: dict[str, float]) -> None:
        now = time.monotonic()
        elapsed, window = now - self._start, max(now - self._last_time, 1e-9)
        steps_done = state.global_step - self._start_step
        samples = (state.global_step - self._last_step) * args.per_device_train_batch_size
        samples *= args.gradient_accumulation_steps * args.world_size
        eta = (state.max_steps - state.global_step) * elapsed / steps_done if steps_done else None
        self._sink.metric(
            "train",
            state.global_step,
            total_steps=state.max_steps,
            epoch=state.epoch,
            loss=logs["loss"],
            learning_rate=logs.get("learning_rate"),
            grad_norm=logs.get("grad_norm"),
            tokens_per_second=(state.num_input_tokens_seen - self._last_tokens) / window,
            samples_per_second=samples / window,
            eta_seconds=eta,
            token_accuracy=logs.get("mean_token_accuracy"),
            **method_metrics(logs),
        )
        self._last_time, self._last_step = now, state.global_step
        self._last_tokens = state.num_input_tokens_seen


class DivergenceWatchdog(TrainerCallback):
    """Stops training at the first logged NaN/inf loss or gradient norm.

    Requires ``logging_nan_inf_filter=False``: the Trainer otherwise drops non-finite losses from the logged
    average and a diverged run would look healthy.
    """

    def __init__(self) -> None:
        self.diverged_at: int | None = None

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        values = [v for k, v in (logs or {}).items() if k in ("loss", "grad_norm", "train_loss")]
        if self.diverged_at is None and any(isinstance(v, float) and not math.isfinite(v) for v in values):
            self.diverged_at = state.global_step
            _halt(control)


class StopCallback(TrainerCallback):
    """Ends training between optimizer steps once a stop was requested."""

    def __init__(self, stop: StopSignal) -> None:
        self._stop = stop

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._stop.interruptible = False  # from here on, stop between steps only

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if distributed.any_rank(self._stop.requested):  # every rank leaves the loop at the same step
            _halt(control)

    on_epoch_end = on_step_end
