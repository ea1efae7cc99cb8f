"""Warm start: training that starts from another job's weights (JobAssignment.warm_start).

Two halves, like checkpointing, so that torch never reaches the agent:

- The agent (:func:`fetch`) downloads the source folder (a checkpoint folder, or the source job's final
  adapter or model) into the attempt's own work folder before training, and passes its local path in
  RunConfig.warm_start. From then on nothing reads the source job: it may be deleted while this one trains.
- The recipe, in the training process:
  - LoRA, QLoRA and prompt tuning: the base model is loaded as usual (quantized for QLoRA) and the source
    adapter is put on it trainable (:func:`start_from`: ``PeftModel.from_pretrained(base, folder,
    is_trainable=True)``) instead of a fresh adapter (:func:`loads_adapter` tells ``peft_config`` to make
    none). A checkpoint folder holds ``adapter_model.safetensors`` like a final adapter folder.
  - Full fine-tuning: the model is loaded from the folder (:func:`full_model_path`).
  - restore_optimizer_state: the optimizer and learning-rate scheduler state of the checkpoint
    (``optimizer.pt``, ``scheduler.pt``) are loaded into the Trainer once it has built them, at the start of
    training (:func:`restore_optimizer_state`, through the Trainer's own ``_load_optimizer_and_scheduler``,
    which loads with ``weights_only=True``). The step count, epochs and data order start afresh: this is a
    new job continuing that optimizer, not a resume of the old one. A job that resumes its own checkpoint
    (a later delivery) restores its own optimizer state instead.

The jobs service has already checked that the source fits (same base model, adapter type and shape; the
optimizer state exists and the optimizer is the same): services/jobs/warm_start.py.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import job_pb2

from trainer_worker.errors import TrainingError, Transient
from tuneforge_core.reasons import Reason

if TYPE_CHECKING:
    from trainer_worker.run_config import RunConfig
    from tuneforge_core.storage import ObjectStore

WARM_START_DIR = "warm-start"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"


class WarmStart(BaseModel):
    """RunConfig.warm_start: the source weights, on local disk."""

    model_config = ConfigDict(extra="forbid")

    job_id: str
    # The source folder as the jobs service named it (for log lines) and where the agent put it.
    uri: str
    path: Path
    # The checkpoint's step; 0 for the source's final adapter (or model).
    step: int = 0
    restore_optimizer_state: bool = False

    def describe(self) -> str:
        what = f"checkpoint of step {self.step}" if self.step else "final weights"
        return f"job {self.job_id}'s {what}"


# -- agent ----------------------------------------------------------------------------------------------


async def fetch(source: events_pb2.WarmStartSource, locate: Callable[[str], tuple[ObjectStore, str]],
                work_dir: Path, log: Callable[[str], None]) -> WarmStart | None:
    """Downloads the assignment's warm-start folder into `work_dir`; None when the job names none."""
    if not source.uri:
        return None
    store, key = locate(source.uri)
    dest = work_dir / WARM_START_DIR
    shutil.rmtree(dest, ignore_errors=True)
    log(f"Fetching the weights to start from: {source.uri}.")
    try:
        await asyncio.to_thread(store.get_dir, key, dest)
    except FileNotFoundError as exc:
        raise TrainingError(
            Reason.MODEL_NOT_FOUND,
            f"The weights to start from ({source.uri}, of job {source.job_id}) are no longer stored; was "
            "that job deleted?",
        ) from exc
    except Exception as exc:
        raise Transient(f"could not fetch {source.uri}: {exc}") from exc
    return WarmStart(job_id=source.job_id, uri=source.uri, path=dest, step=source.step,
                     restore_optimizer_state=source.restore_optimizer_state)


# -- training process -----------------------------------------------------------------------------------


def _is_full(spec: job_pb2.JobSpec) -> bool:
    return spec.adapter == job_pb2.ADAPTER_TYPE_FULL


def loads_adapter(cfg: RunConfig, spec: job_pb2.JobSpec) -> bool:
    """Whether the recipe puts the source's adapter on the base model instead of making a fresh one."""
    return cfg.warm_start is not None and not _is_full(spec)


def full_model_path(cfg: RunConfig, spec: job_pb2.JobSpec) -> str | None:
    """Full fine-tuning from another job: the folder to load the model from; None otherwise."""
    if cfg.warm_start is None or not _is_full(spec):
        return None
    return str(cfg.warm_start.path)


def start_from(model: Any, cfg: RunConfig, spec: job_pb2.JobSpec, log: Callable[[str], None]) -> Any:
    """The base `model` with the source adapter on it, trainable (or `model` as it is when there is none)."""
    warm = cfg.warm_start
    if warm is None:
        return model
    if _is_full(spec):
        log(f"Starting from {warm.describe()} (the whole model, loaded from {warm.uri}).")
        return model
    from peft import PeftModel

    if not (warm.path / "adapter_config.json").is_file():
        raise TrainingError(Reason.MODEL_NOT_FOUND,
                            f"The weights to start from ({warm.uri}) hold no adapter (adapter_config.json).")
    try:
        model = PeftModel.from_pretrained(model, str(warm.path), is_trainable=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise TrainingError(Reason.TRAINING_FAILED,
                            f"Could not load the adapter of {warm.describe()} from {warm.uri}: {exc}",
                            ) from exc
    log(f"Starting from {warm.describe()}: its adapter is loaded onto the base model, trainable.")
    return model


def restore_optimizer_state(trainer: Any, cfg: RunConfig, log: Callable[[str], None], *,
                            resuming: bool) -> None:
    """Adds the callback that loads the checkpoint's optimizer and scheduler state when training starts."""
    warm = cfg.warm_start
    if warm is None or not warm.restore_optimizer_state:
        return
    if resuming:
        log("Resuming this job's own checkpoint: its optimizer state is restored, not the warm start's.")
        return
    missing = [name for name in (OPTIMIZER_FILE, SCHEDULER_FILE) if not (warm.path / name).is_file()]
    if missing:
        raise TrainingError(Reason.TRAINING_FAILED,
                            f"restore_optimizer_state: {warm.describe()} has no {' or '.join(missing)}.")
    if getattr(trainer, "is_deepspeed_enabled", False):
        raise TrainingError(Reason.TRAINING_FAILED,
                            "restore_optimizer_state is not supported with DeepSpeed: start from the "
                            "checkpoint's weights only.")
    from transformers import TrainerCallback

    source = warm

    class RestoreOptimizerState(TrainerCallback):
        """At the start of training, once the Trainer built (and wrapped) its optimizer and scheduler."""

        done = False

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.done:
                return
            self.done = True
            trainer._load_optimizer_and_scheduler(str(source.path))
            lr = trainer.lr_scheduler.get_last_lr()[0] if trainer.lr_scheduler is not None else None
            log(f"Restored the optimizer and learning-rate scheduler state of {source.describe()} "
                f"({OPTIMIZER_FILE}, {SCHEDULER_FILE}); the learning rate continues at {lr}.")

    trainer.add_callback(RestoreOptimizerState())
