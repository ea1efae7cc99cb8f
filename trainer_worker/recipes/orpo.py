"""Odds-ratio preference optimization with TRL's ORPOTrainer (trl.experimental in TRL 1.16).

ORPO adds an odds-ratio preference term to the SFT loss on the chosen answer, so it needs no reference model
and no prior SFT stage. Same {"prompt", "chosen", "rejected"} rows as DPO.
"""

from __future__ import annotations

import warnings
from typing import Any

from trainer_worker.recipes.base import BaseRecipe

with warnings.catch_warnings():  # TRL warns on every import of its experimental package
    warnings.simplefilter("ignore")
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer


class ORPORecipe(BaseRecipe):
    method = "ORPO"
    trainer_class = ORPOTrainer

    def trainer_config(self, args: dict[str, Any]) -> ORPOConfig:
        return ORPOConfig(**args, beta=self.spec.orpo.beta, max_length=self.hp.max_seq_length,
                          disable_dropout=not self.keeps_dropout())  # TRL's default drops LoRA's dropout
