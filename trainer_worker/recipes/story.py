"""The training loop's part of the job's timeline, and what the result says about the kept weights.

:class:`StoryCallback` writes ``timeline`` events while the Trainer runs: TRAINING_STARTED when the loop
starts, EPOCH_COMPLETED at each epoch's end (with that epoch's evaluation when one ran at that step; the
Trainer evaluates *after* ``on_epoch_end``, so the event waits for it), and EARLY_STOPPED when
transformers' EarlyStoppingCallback ended training before its last step. After training,
:meth:`StoryCallback.conclude` says which step's weights were kept (the best checkpoint's with
``load_best_model_at_end``, else the last step), puts that step's evaluation into the final metrics in place
of the last one, and counts the tokens trained. It reads the Trainer's ``log_history``, which a resumed run
restores from its checkpoint, so an evaluation of an earlier attempt still counts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from transformers import (
    EarlyStoppingCallback,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from trainer_worker.events import EarlyStopInfo, EventSink


def _numbers(logs: Mapping[str, Any], prefix: str = "eval_") -> dict[str, float]:
    return {k: float(v) for k, v in logs.items()
            if k.startswith(prefix) and isinstance(v, int | float) and not isinstance(v, bool)
            and math.isfinite(float(v))}


# Timing numbers of an evaluation: not what an epoch's or checkpoint's timeline entry is about.
TIMING = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")


def evaluation_at(state: TrainerState, step: int) -> dict[str, float]:
    """The eval_* numbers of the last evaluation logged at ``step`` ({} when none ran there)."""
    found: dict[str, float] = {}
    for entry in state.log_history:
        if entry.get("step") == step and "eval_loss" in entry:
            found = _numbers(entry)
    return found


class StoryCallback(TrainerCallback):
    """Timeline events of the training loop (see the module docstring)."""

    def __init__(self, sink: EventSink, early_stopping: EarlyStoppingCallback | None = None) -> None:
        self._sink = sink
        self.early_stopping = early_stopping
        self._pending_epoch: tuple[int, float] | None = None  # (step, epoch) waiting for its evaluation
        self.early_stop: EarlyStopInfo | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        total = f"{state.max_steps} steps" if state.max_steps > 0 else "an unknown number of steps"
        resumed = f", resuming at step {state.global_step}" if state.global_step else ""
        self._sink.timeline(
            "TRAINING_STARTED", f"Training started: {total} over {args.num_train_epochs:g} epochs{resumed}.",
            step=state.global_step, epoch=float(state.epoch or 0.0),
        )

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._flush_epoch(state)
        step, epoch = state.global_step, float(state.epoch or 0.0)
        if abs(epoch - round(epoch)) > 1e-3:
            return  # the loop ended mid-epoch (early stopping, max_steps, a stop request): no epoch completed
        evaluation = evaluation_at(state, step)
        if evaluation or args.eval_strategy == "no":  # IntervalStrategy is a str enum
            self._epoch(step, epoch, evaluation)
        else:  # the epoch's evaluation (if any) runs right after this callback
            self._pending_epoch = (step, epoch)

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if self._pending_epoch is not None and self._pending_epoch[0] == state.global_step:
            step, epoch = self._pending_epoch
            self._pending_epoch = None
            self._epoch(step, epoch, _numbers(metrics or {}))

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._flush_epoch(state)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._flush_epoch(state)
        self.early_stop = self._early_stop(args, state)
        if self.early_stop is not None:
            info = self.early_stop
            self._sink.timeline(
                "EARLY_STOPPED", f"Early stopping ended training at step {info.stopped_step}: {info.reason}.",
                step=info.stopped_step, epoch=float(state.epoch or 0.0),
                metrics={"best_step": info.best_step, f"best_{info.metric}": info.best_value},
            )

    def _flush_epoch(self, state: TrainerState) -> None:
        if self._pending_epoch is not None:
            step, epoch = self._pending_epoch
            self._pending_epoch = None
            self._epoch(step, epoch, evaluation_at(state, step))

    def _epoch(self, step: int, epoch: float, evaluation: Mapping[str, float]) -> None:
        loss = evaluation.get("eval_loss")
        tail = f"; eval_loss {loss:.4f}" if loss is not None else ""
        self._sink.timeline("EPOCH_COMPLETED", f"Epoch {round(epoch)} completed at step {step}{tail}.",
                            step=step, epoch=epoch,
                            metrics={k: v for k, v in evaluation.items() if k not in TIMING})

    def _early_stop(self, args: TrainingArguments, state: TrainerState) -> EarlyStopInfo | None:
        """Why EarlyStoppingCallback ended training, or None when it did not (the run reached its end)."""
        early = self.early_stopping
        if early is None or early.early_stopping_patience_counter < early.early_stopping_patience:
            return None
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            return None  # patience ran out on the very last evaluation: training ended anyway
        metric = args.metric_for_best_model or "eval_loss"
        metric = metric if metric.startswith("eval_") else f"eval_{metric}"
        best_step = int(state.best_global_step or 0)
        best = float(state.best_metric) if state.best_metric is not None else float("nan")
        patience, min_delta = early.early_stopping_patience, float(early.early_stopping_threshold or 0.0)
        reason = (f"{metric} did not improve by more than {min_delta:g} for {patience} evaluation"
                  f"{'s' if patience != 1 else ''} after step {best_step} (best {best:.4f})")
        return EarlyStopInfo(stopped_step=state.global_step, best_step=best_step, metric=metric,
                             best_value=best, patience=patience, reason=reason)

    def conclude(self, state: TrainerState, args: TrainingArguments, metrics: dict[str, float]) -> int:
        """The kept step; ``metrics``' eval_* keys become that step's evaluation (in place)."""
        kept = state.global_step
        if args.load_best_model_at_end and state.best_global_step:
            kept = int(state.best_global_step)
        evaluation = evaluation_at(state, kept)
        if evaluation:
            for key in [k for k in metrics if k.startswith("eval_")]:
                del metrics[key]
            metrics.update(evaluation)
        return kept
