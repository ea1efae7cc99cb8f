"""Direct preference optimization with TRL's DPOTrainer, on {"prompt", "chosen", "rejected"} rows.

DpoConfig maps onto TRL's loss list: the sigmoid preference loss (``sigmoid_norm`` when log-probabilities
are averaged over tokens) weighted by ``preference_loss_weight``, plus an SFT loss on the chosen answers when
``sft_loss_weight`` is above 0. The reference policy is ``reference_model`` where the spec names one: it is
loaded frozen (eval mode, the training dtype) and handed to TRL as ``ref_model``, and must share the base
model's tokenizer. Without one, an adapter's reference is the base with the adapter switched off, so no
second copy is loaded; full fine-tuning keeps a frozen copy.
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from trainer_worker.recipes.base import BaseRecipe


class DPORecipe(BaseRecipe):
    method = "DPO"
    trainer_class = DPOTrainer

    def trainer_config(self, args: dict[str, Any]) -> DPOConfig:
        dpo = self.spec.dpo
        loss_type = ["sigmoid_norm" if dpo.average_log_probs else "sigmoid"]
        loss_weights = [dpo.preference_loss_weight]
        if dpo.sft_loss_weight > 0:
            loss_type.append("sft")
            loss_weights.append(dpo.sft_loss_weight)
        return DPOConfig(
            **args,
            beta=dpo.beta,
            loss_type=loss_type,
            loss_weights=loss_weights,
            max_length=self.hp.max_seq_length,
            disable_dropout=not self.keeps_dropout(),  # TRL's default turns LoRA's dropout off too
            activation_offloading=self.speed.activation_offloading,  # JobSpec.speed (trainer_worker.speed)
        )

    def trainer_extras(self, train: Dataset) -> dict[str, Any]:
        dpo = self.spec.dpo
        if not dpo.reference_model:
            return {}  # TRL's own reference: the base (adapter off), or a frozen copy of it
        path = self.cfg.reference_model_path or dpo.reference_model
        return {"ref_model": self.load_frozen_model(path, "reference model")}
