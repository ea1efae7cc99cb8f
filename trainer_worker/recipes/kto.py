"""Kahneman-Tversky optimization with TRL's KTOTrainer, on {"prompt", "completion", "label"} rows.

KTO learns from single completions marked desirable (label true) or not, so it also takes preference pairs:
each pair becomes one desirable and one undesirable row (TRL's ``unpair_preference_dataset``). KTO estimates
its KL term from the mismatched pairs of each batch in a fixed order, so the rows are shuffled once with the
job's seed and then read sequentially (``group_by_length`` does not apply).
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset
from trl import KTOConfig, KTOTrainer
from trl.data_utils import unpair_preference_dataset

from trainer_worker.recipes.base import BaseRecipe
from tuneforge_core.compat import Family


class KTORecipe(BaseRecipe):
    method = "KTO"
    trainer_class = KTOTrainer

    def prepare(self, rows: list[dict[str, Any]]) -> Dataset:
        data = Dataset.from_list(rows)
        data = unpair_preference_dataset(data) if self.family == Family.PREFERENCE else data
        return data.shuffle(seed=self.hp.seed)

    def trainer_config(self, args: dict[str, Any]) -> KTOConfig:
        kto = self.spec.kto  # group_by_length: refused at CreateJob (KTO reads its rows in order)
        return KTOConfig(
            **{**args, "train_sampling_strategy": "sequential"},
            beta=kto.beta,
            desirable_weight=kto.desirable_weight,
            undesirable_weight=kto.undesirable_weight,
            max_length=self.hp.max_seq_length,
            disable_dropout=not self.keeps_dropout(),  # TRL's default turns LoRA's dropout off too
            activation_offloading=self.speed.activation_offloading,  # JobSpec.speed (trainer_worker.speed)
        )
