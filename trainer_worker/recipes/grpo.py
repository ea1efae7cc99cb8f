"""Group relative policy optimization with TRL's GRPOTrainer, on prompt-only rows and built-in graders.

For each prompt the policy samples ``num_generations`` completions (plain ``generate``; no vLLM on these
workers), the reward functions score them, and each completion's advantage is its reward against its
group's. ``kl_beta`` > 0 keeps a reference model: the base with the adapter off, or a frozen copy for full
fine-tuning. Extra columns of the rows (such as ``answer``) reach the reward functions.

The seeds' (NeMo Customizer's) knobs map onto GRPOConfig: ``normalize_rewards`` -> ``scale_rewards``,
``overlong_filtering`` -> ``mask_truncated_completions``, ``clip_epsilon``/``clip_epsilon_high`` ->
``epsilon``/``epsilon_high``, ``ratio_clip_c`` -> ``delta`` (two-sided clip), ``token_level_loss`` ->
``loss_type`` ("dapo" per token, "grpo" per sequence), ``generation_batch_size`` (``num_prompts_per_step``
x ``num_generations``). ``use_rloo`` swaps in TRL's RLOOTrainer (leave-one-out baseline, per-sequence loss;
``normalize_rewards`` -> ``normalize_advantages``).
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from trainer_worker.recipes import rewards
from trainer_worker.recipes.base import BaseRecipe


class GRPORecipe(BaseRecipe):
    method = "GRPO"
    trainer_class = GRPOTrainer

    def trainer_config(self, args: dict[str, Any]) -> TrainingArguments:
        grpo = self.spec.grpo
        common = {
            **args,
            "num_generations": grpo.num_generations,
            "temperature": grpo.temperature,
            "top_p": grpo.top_p,
            "top_k": grpo.top_k,
            "beta": grpo.kl_beta,
            "epsilon": grpo.clip_epsilon,
            "epsilon_high": grpo.clip_epsilon_high,
            "max_completion_length": grpo.max_completion_length,
            "mask_truncated_completions": grpo.overlong_filtering,
            "generation_batch_size": grpo.generation_batch_size,
        }
        if grpo.use_rloo:  # CreateJob refuses ratio_clip_c and token-level loss with it
            return RLOOConfig(**common, normalize_advantages=grpo.normalize_rewards)
        return GRPOConfig(
            **common,
            scale_rewards="group" if grpo.normalize_rewards else "none",
            loss_type="dapo" if grpo.token_level_loss else "grpo",
            delta=grpo.ratio_clip_c if grpo.HasField("ratio_clip_c") else None,
            vllm_importance_sampling_correction=grpo.importance_sampling_correction,  # no vLLM: false
        )

    def build_trainer(
        self,
        model: PreTrainedModel,
        args: dict[str, Any],
        train: Dataset,
        validation: Dataset | None,
        callbacks: list[TrainerCallback],
    ) -> Trainer:
        """GRPOTrainer, or RLOOTrainer with ``use_rloo`` (same arguments)."""
        config = self.trainer_config(args)
        common: dict[str, Any] = {
            "model": model,
            "train_dataset": train,
            "eval_dataset": validation,
            "processing_class": self.tokenizer,
            "peft_config": self.peft_config(),
            "callbacks": callbacks,
            **self.trainer_extras(train),
        }
        if isinstance(config, RLOOConfig):
            return RLOOTrainer(args=config, **common)
        assert isinstance(config, GRPOConfig)
        return GRPOTrainer(args=config, **common)

    def trainer_extras(self, train: Dataset) -> dict[str, Any]:
        return {"reward_funcs": rewards.build(self.spec.grpo, train.column_names)}
