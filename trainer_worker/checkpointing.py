"""Checkpoints in object storage and resuming from them.

Two halves around the events file, so that neither storage credentials reach the training process nor torch
reaches the agent:

- In the training process, :func:`callbacks` adds a Trainer callback that, after each checkpoint the Trainer
  writes, hard-links it into a staging folder (the Trainer may rotate the original away while it uploads)
  and writes a ``checkpoint`` event. Recipes pass :func:`resume_checkpoint` to
  ``trainer.train(resume_from_checkpoint=...)``.
- In the agent, :class:`CheckpointStore` uploads each staged checkpoint under
  ``<output_prefix>/checkpoints/checkpoint-<step>/`` and writes the ``COMPLETE`` marker only after every
  file; before a later attempt starts it downloads the newest marked checkpoint into the attempt's
  ``resume`` folder. A checkpoint without its marker (a worker died while uploading) is never used, and only
  ``save_total_limit`` marked checkpoints are kept (the marker goes first when one is pruned).

Checkpoints resume from safetensors weights only; the optimizer, scheduler and RNG state are ``torch.load``
ed by the Trainer with ``weights_only=True``. A checkpoint holding pickled model weights is refused.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer_worker import distributed
from trainer_worker.errors import TrainingError
from trainer_worker.events import EventSink
from trainer_worker.run_config import RunConfig
from tuneforge_core.reasons import Reason

if TYPE_CHECKING:
    from tuneforge_core.storage import ObjectStore

COMPLETE = "COMPLETE"
STAGING_DIR = "checkpoint-uploads"
RESUME_DIR = "resume"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)\Z")
# Model weights that would be unpickled to resume; a checkpoint is resumed from safetensors only.
PICKLED_WEIGHTS = ("pytorch_model.bin", "adapter_model.bin", "model.bin")


def staging_dir(output_dir: Path) -> Path:
    return output_dir / STAGING_DIR


def resume_dir(output_dir: Path) -> Path:
    return output_dir / RESUME_DIR


def step_of(name: str) -> int | None:
    match = CHECKPOINT_NAME.match(name)
    return int(match.group(1)) if match else None


# -- training process ---------------------------------------------------------------------------------


def callbacks(cfg: RunConfig, sink: EventSink) -> list[Any]:
    """Trainer callbacks that hand each completed checkpoint to the agent for upload."""
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

    class StageCheckpoint(TrainerCallback):
        def on_save(
            self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
        ) -> None:
            _wait_for_all_ranks()  # every rank has written its shard and RNG state
            if not distributed.world().is_main:
                return
            source = Path(args.output_dir or cfg.output_dir) / f"checkpoint-{state.global_step}"
            if not source.is_dir():
                return
            staged = staging_dir(cfg.output_dir) / source.name
            shutil.rmtree(staged, ignore_errors=True)
            shutil.copytree(source, staged, copy_function=_link_or_copy)
            best = Path(state.best_model_checkpoint).name if state.best_model_checkpoint else ""
            sink.checkpoint(state.global_step, staged, best_step=step_of(best) or 0)

    return [StageCheckpoint()]


def resume_checkpoint(cfg: RunConfig) -> str | None:
    """A local folder holding the job's last complete checkpoint, or None to start from step 0."""
    marked = [d for d in resume_dir(cfg.output_dir).glob("checkpoint-*") if (d / COMPLETE).is_file()]
    marked = [d for d in marked if step_of(d.name) is not None]
    if not marked:
        return None
    latest = max(marked, key=lambda d: step_of(d.name) or 0)
    pickled = [name for name in PICKLED_WEIGHTS if (latest / name).exists()]
    if pickled:
        raise TrainingError(
            Reason.TRAINING_FAILED,
            f"The checkpoint {latest.name} holds pickled weights ({', '.join(pickled)}); "
            "the worker resumes from safetensors only.",
        )
    return str(latest)


def _wait_for_all_ranks() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _link_or_copy(source: str, target: str) -> None:
    """Hard links cost nothing and survive the Trainer deleting the original; copy across filesystems."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


# -- agent --------------------------------------------------------------------------------------------


class CheckpointStore:
    """The checkpoints of one job under ``<prefix>/checkpoints/`` in object storage (blocking calls)."""

    def __init__(self, store: ObjectStore, output_prefix: str) -> None:
        self.store = store
        self.root = f"{output_prefix.rstrip('/')}/checkpoints"

    def key(self, step: int) -> str:
        return f"{self.root}/checkpoint-{step}"

    def steps(self) -> tuple[list[int], list[int]]:
        """(complete, incomplete) checkpoint steps, each sorted."""
        files: dict[int, set[str]] = {}
        for key in self.store.list_keys(self.root + "/"):
            name, _, rest = key[len(self.root) + 1 :].partition("/")
            step = step_of(name)
            if step is not None:
                files.setdefault(step, set()).add(rest)
        complete = sorted(s for s, names in files.items() if COMPLETE in names)
        return complete, sorted(set(files) - set(complete))

    def upload(self, step: int, directory: Path, keep: int, *, protect: int = 0) -> str:
        """Upload every file, then the marker; then prune to ``keep`` complete checkpoints, never the
        ``protect`` step (the best checkpoint so far, which the run will load at its end)."""
        key = self.key(step)
        self.store.delete_prefix(self.key(step) + "/")  # leftovers of an attempt that died uploading it
        self.store.put_dir(key, directory)
        self.store.put_bytes(f"{key}/{COMPLETE}", str(step).encode())
        self.prune(keep, protect=protect)
        return self.store.uri(key)

    def prune(self, keep: int, *, protect: int = 0) -> None:
        """Keep the newest ``keep`` complete checkpoints (0: all) and the ``protect`` step (as the Trainer
        keeps its best checkpoint beside save_total_limit); drop stale half-uploaded ones."""
        complete, incomplete = self.steps()
        doomed = [step for step in (complete[:-keep] if keep > 0 else []) if step != protect]
        for step in doomed:
            self.store.delete_prefix(f"{self.key(step)}/{COMPLETE}")  # unusable first, then gone
            self.store.delete_prefix(self.key(step) + "/")
        newest = complete[-1] if complete else -1
        for step in incomplete:
            if step < newest:
                self.store.delete_prefix(self.key(step) + "/")

    def download_latest(self, output_dir: Path) -> int | None:
        """Fetch the newest complete checkpoint into the attempt's resume folder; its step, or None."""
        complete, _ = self.steps()
        if not complete:
            return None
        step = complete[-1]
        target = resume_dir(output_dir) / f"checkpoint-{step}"
        partial = target.with_name(f".partial-{target.name}")
        shutil.rmtree(partial, ignore_errors=True)
        self.store.get_dir(self.key(step), partial)  # includes the marker, fetched like any file
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        return step
