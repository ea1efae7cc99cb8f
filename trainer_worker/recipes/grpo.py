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

REWARD_FUNCTION_REWARD_MODEL scores with ``reward_model``: a sequence-classification model with one label
(AutoModelForSequenceClassification, num_labels=1), frozen, sharing the base model's tokenizer, handed to
TRL among the reward functions; its mean is logged as ``rewards/reward_model/mean``.
"""

from __future__ import annotations

from typing import Any

import torch
from datasets import Dataset
from transformers import (
    AutoModelForSequenceClassification,
    PreTrainedModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
from trl.data_utils import apply_chat_template, is_conversational
from tuneforge.v1 import job_pb2

from trainer_worker.recipes import rewards
from trainer_worker.recipes.base import BaseRecipe

#: The name TRL logs a reward model's scores under (``rewards/reward_model/mean``).
REWARD_MODEL_NAME = "reward_model"


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
            use_bias_correction_kl=grpo.on_policy_kl_approximation,
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
        grpo = self.spec.grpo
        if job_pb2.REWARD_FUNCTION_REWARD_MODEL not in grpo.reward_functions:
            return {"reward_funcs": rewards.build(grpo, train.column_names)}
        model = self.load_reward_model(self.cfg.reward_model_path or grpo.reward_model)
        functions = rewards.build(grpo, train.column_names, reward_model=model)
        # The model's texts are tokenized with the base model's tokenizer, which it shares (checked).
        return {
            "reward_funcs": functions,
            "reward_processing_classes": [self.tokenizer if f is model else None for f in functions],
        }

    def reward_scorer(self) -> rewards.RewardFunc:
        """The reward model as a plain reward function, for the evaluation after training: the trainer's
        own copy where it has one (on its device), else loaded again."""
        model = next((f for f in getattr(self.trainer, "reward_funcs", []) if isinstance(f, torch.nn.Module)),
                     None)
        if model is None:
            model = self.load_reward_model(self.cfg.reward_model_path or self.spec.grpo.reward_model)
        accelerator = getattr(self.trainer, "accelerator", None)
        if accelerator is not None:
            model = accelerator.unwrap_model(model)
        return reward_model_function(model, self.tokenizer)

    def load_reward_model(self, path: str) -> Any:
        """spec.grpo.reward_model: one score per sequence, frozen, in the training dtype."""
        self._check_same_tokenizer(path, "reward model")
        model = self.load_model(path, trainable=False, model_class=AutoModelForSequenceClassification,
                                num_labels=1)
        if isinstance(model, torch.nn.Module):
            model.eval().requires_grad_(False)
            # TRL names a model's reward after its config's _name_or_path: a stable metric name instead of
            # the folder (which is a cache hash for a stored model).
            model.config._name_or_path = REWARD_MODEL_NAME
            # It scores each sequence's last token before the padding, which it finds by the pad token.
            model.config.pad_token_id = self.tokenizer.pad_token_id
        return model


def reward_model_function(model: Any, tokenizer: Any) -> rewards.RewardFunc:
    """A sequence-classification model's first logit on each prompt + completion, built as TRL's GRPOTrainer
    builds it (the chat template over prompt + completion messages, or the two strings joined)."""

    def reward_model(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        if is_conversational({"prompt": prompts[0]}):
            texts = [apply_chat_template({"messages": p + c}, tokenizer)["text"]
                     for p, c in zip(prompts, completions, strict=True)]
        else:
            texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        inputs = tokenizer(text=texts, return_tensors="pt", padding=True, padding_side="right",
                           add_special_tokens=False).to(next(model.parameters()).device)
        with torch.inference_mode():
            return [float(x) for x in model(**inputs).logits[:, 0].float().tolist()]

    return reward_model
