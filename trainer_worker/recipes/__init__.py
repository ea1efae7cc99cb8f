"""Training recipes: one readable file per method, run by ``trainer_worker.train``.

This module must not import torch: :func:`check_supported` runs before it, so a bad spec fails fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol

from tuneforge.v1 import job_pb2

from trainer_worker import vision
from trainer_worker.errors import TrainingError
from trainer_worker.events import EarlyStopInfo
from trainer_worker.recipes import rewards
from tuneforge_core.errors import InvalidArgument
from tuneforge_core.reasons import Reason
from tuneforge_core.spec import ensure_resolved

if TYPE_CHECKING:
    from pathlib import Path

    from trainer_worker.events import EventSink
    from trainer_worker.run_config import RunConfig
    from trainer_worker.stop import StopSignal

class Recipe(Protocol):
    # What the result reports beside the outputs (BaseRecipe documents them).
    kept_step: int
    early_stop: EarlyStopInfo | None
    tokens_trained: int
    evaluation_report: dict[str, object] | None

    def run(self) -> tuple[Path, Path | None, dict[str, float]]:
        """setup -> train -> save -> evaluate -> cleanup; returns (adapter_dir, merged_dir, final_metrics)."""
        ...


def _name(enum: object, value: int, prefix: str) -> str:
    return enum.Name(value).removeprefix(prefix)  # type: ignore[attr-defined]


def check_supported(spec: job_pb2.JobSpec) -> None:
    """Reject a spec that did not come resolved from the jobs service, or that no recipe here trains, with
    a sentence the user can act on (CreateJob checks the same; this is the worker's own line of defence)."""
    try:
        ensure_resolved(spec)
    except InvalidArgument as exc:
        raise TrainingError(Reason.TRAINING_FAILED, f"The job spec cannot be trained: {exc.message}") from exc
    if spec.method not in RECIPES:
        name = job_pb2.TrainingMethod.Name(spec.method).removeprefix("TRAINING_METHOD_")
        raise TrainingError(Reason.TRAINING_FAILED, f"Training method {name} is not run by this worker.")
    if (
        spec.method == job_pb2.TRAINING_METHOD_GRPO
        and job_pb2.REWARD_FUNCTION_USER_CODE in spec.grpo.reward_functions
        and not rewards.user_code_allowed()
    ):
        raise TrainingError(
            Reason.TRAINING_FAILED,
            f"This worker does not run user reward code; set {rewards.ALLOW_USER_CODE_ENV}=true to allow it.",
        )


# Method -> "module:class", imported only when built (each import pulls in torch and TRL).
RECIPES = {
    job_pb2.TRAINING_METHOD_SFT: "sft:SFTRecipe",
    job_pb2.TRAINING_METHOD_DPO: "dpo:DPORecipe",
    job_pb2.TRAINING_METHOD_GRPO: "grpo:GRPORecipe",
    job_pb2.TRAINING_METHOD_DISTILLATION: "distillation:DistillationRecipe",
    job_pb2.TRAINING_METHOD_ORPO: "orpo:ORPORecipe",
    job_pb2.TRAINING_METHOD_KTO: "kto:KTORecipe",
}


def build(cfg: RunConfig, spec: job_pb2.JobSpec, sink: EventSink, stop: StopSignal) -> Recipe:
    """The recipe for the spec's method (imports torch)."""
    # A vision-language base model or job: SFT on it trains through TRL's vision path (recipes/vlm.py).
    module, name = (vision.recipe_override(spec, cfg.model_path) or RECIPES[spec.method]).split(":")
    with stop.deferred():  # a stop during the C extensions' imports is raised once they are done
        recipe: type[Recipe] = getattr(importlib.import_module(f"trainer_worker.recipes.{module}"), name)
    return recipe(cfg, spec, sink, stop)  # type: ignore[call-arg]
