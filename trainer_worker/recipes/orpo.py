"""Odds-ratio preference optimization with TRL's ORPOTrainer (trl.experimental in TRL 1.16).

ORPO adds an odds-ratio preference term to the SFT loss on the chosen answer, so it needs no reference model
and no prior SFT stage. Same {"prompt", "chosen", "rejected"} rows as DPO.
"""

from __future__ import annotations

import warnings
from typing import Any

from datasets import Dataset
from transformers import PreTrainedModel, TrainerCallback

from trainer_worker.recipes.base import BaseRecipe
from trainer_worker.recipes.data import PREFERENCE

with warnings.catch_warnings():  # TRL warns on every import of its experimental package
    warnings.simplefilter("ignore")
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer


class ORPORecipe(BaseRecipe):
    method = "ORPO"
    families = (PREFERENCE,)

    def build_trainer(
        self,
        model: PreTrainedModel,
        args: dict[str, Any],
        train: Dataset,
        validation: Dataset | None,
        callbacks: list[TrainerCallback],
    ) -> ORPOTrainer:
        config = ORPOConfig(**args, beta=self.spec.orpo.beta, max_length=self.hp.max_seq_length)
        return ORPOTrainer(
            model=model,
            args=config,
            train_dataset=train,
            eval_dataset=validation,
            processing_class=self.tokenizer,
            peft_config=self.peft_config(),
            callbacks=callbacks,
        )
