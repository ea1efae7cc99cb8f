"""Training recipes: one readable file per method, run by ``trainer_worker.train``.

This module must not import torch: :func:`check_supported` runs before it, so a bad spec fails fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from tuneforge.v1 import job_pb2

from trainer_worker.errors import TrainingError

if TYPE_CHECKING:
    from pathlib import Path

    from trainer_worker.events import EventSink
    from trainer_worker.run_config import RunConfig
    from trainer_worker.stop import StopSignal


class Recipe(Protocol):
    def run(self) -> tuple[Path, Path | None, dict[str, float]]:
        """setup -> train -> save -> cleanup; returns (adapter_dir, merged_dir, final_metrics)."""
        ...


def check_supported(spec: job_pb2.JobSpec) -> None:
    """Reject what no recipe here trains yet, with a sentence the user can act on."""
    if spec.method != job_pb2.TRAINING_METHOD_SFT:
        name = job_pb2.TrainingMethod.Name(spec.method).removeprefix("TRAINING_METHOD_")
        raise TrainingError("TRAINING_FAILED", f"Training method {name} is not supported by this worker yet.")
    if spec.adapter not in (job_pb2.ADAPTER_TYPE_LORA, job_pb2.ADAPTER_TYPE_FULL):
        name = job_pb2.AdapterType.Name(spec.adapter).removeprefix("ADAPTER_TYPE_")
        raise TrainingError("TRAINING_FAILED", f"Adapter type {name} is not supported by this worker yet.")


def build(cfg: RunConfig, spec: job_pb2.JobSpec, sink: EventSink, stop: StopSignal) -> Recipe:
    """The recipe for the spec's method (imports torch)."""
    from trainer_worker.recipes.sft import SFTRecipe

    return SFTRecipe(cfg, spec, sink, stop)
