"""Group relative policy optimization with TRL's GRPOTrainer, on prompt-only rows and built-in graders.

For each prompt the policy samples ``num_generations`` completions (plain ``generate``; no vLLM on these
workers), the reward functions score them, and each completion's advantage is its reward against its
group's. ``kl_beta`` > 0 keeps a reference model: the base with the adapter off, or a frozen copy for full
fine-tuning. Extra columns of the rows (such as ``answer``) reach the reward functions.
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from trainer_worker.recipes import rewards
from trainer_worker.recipes.base import BaseRecipe


class GRPORecipe(BaseRecipe):
    method = "GRPO"
    trainer_class = GRPOTrainer

    def trainer_config(self, args: dict[str, Any]) -> GRPOConfig:
        grpo = self.spec.grpo
        return GRPOConfig(
            **args,
            num_generations=grpo.num_generations,
            temperature=grpo.temperature,
            top_p=grpo.top_p,
            top_k=grpo.top_k,
            beta=grpo.kl_beta,
            epsilon=grpo.clip_epsilon,
            max_completion_length=grpo.max_completion_length,
        )

    def trainer_extras(self, train: Dataset) -> dict[str, Any]:
        return {"reward_funcs": rewards.build(self.spec.grpo, train.column_names)}
