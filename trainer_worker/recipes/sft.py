"""Supervised fine-tuning with TRL's SFTTrainer, on chat, prompt/completion or text rows.

Chat rows go through the model's own chat template; with ``assistant_only_loss`` only the assistant answers
(and their end-of-turn token) train, and ``"weight": 0`` on an assistant message (the OpenAI fine-tuning
format) leaves that message out of the loss.
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset
from trl import SFTConfig, SFTTrainer
from trl.chat_template_utils import get_training_chat_template
from tuneforge.v1 import job_pb2

from trainer_worker.errors import TrainingError
from trainer_worker.recipes.base import BaseRecipe
from tuneforge_core.reasons import Reason


class SFTRecipe(BaseRecipe):
    """One SFT run of one job attempt."""

    method = "SFT"
    trainer_class = SFTTrainer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Whether TRL masks non-assistant tokens itself; decided by the data in load_data.
        self.assistant_only_loss = False

    def load_data(self) -> tuple[Dataset, Dataset | None]:
        train, validation = super().load_data()
        self.assistant_only_loss = self.hp.assistant_only_loss and self.conversational
        if self.hp.assistant_only_loss and not self.conversational:
            self.sink.log(
                "assistant_only_loss applies to chat data only; training on every token.", "warning"
            )
        if self.conversational and _has_zero_weights(train, validation):
            if not self.assistant_only_loss:
                self.sink.log("Message weights need assistant_only_loss; training on every token.", "warning")
                return train, validation
            train = self._tokenize_weighted(train)
            validation = self._tokenize_weighted(validation) if validation is not None else None
            self.assistant_only_loss = False  # the mask now travels in the data, as TRL's assistant_masks
        return train, validation

    def trainer_config(self, args: dict[str, Any]) -> SFTConfig:
        """The common arguments plus SFT's own: packing, sequence length, assistant-only loss."""
        packing = self.hp.packing
        if packing and self.spec.adapter == job_pb2.ADAPTER_TYPE_PROMPT_TUNING:
            # The soft prompt goes in front of each sequence once: packed examples after the first lack it.
            self.sink.log("Packing does not apply to prompt tuning; training without it.", "warning")
            packing = False
        speed = self.speed
        return SFTConfig(
            **args,
            packing=packing,
            # TRL's best-fit packing is padding-free (each example attends within itself through its
            # position ids); with spec.speed.padding_free OFF, rows are concatenated and cut instead, and
            # attend across each other as classic packing does.
            packing_strategy="bfd" if speed.padding_free or not packing else "wrapped",
            padding_free=speed.padding_free,
            activation_offloading=speed.activation_offloading,
            max_length=self.hp.max_seq_length,
            assistant_only_loss=self.assistant_only_loss,
        )

    def _tokenize_weighted(self, data: Dataset) -> Dataset:
        """Honour ``"weight": 0`` on assistant messages (the OpenAI fine-tuning format), which TRL ignores.

        Each assistant message renders as one run of the chat template's assistant mask, in order; the runs of
        weight-0 messages are cleared, and TRL builds the labels from the mask that remains.
        """
        template = get_training_chat_template(self.tokenizer)  # None: the model's own template has markers

        def tokenize(row: dict[str, Any]) -> dict[str, list[int]]:
            out: Any = self.tokenizer.apply_chat_template(
                row["messages"],
                chat_template=template,
                tokenize=True,
                return_dict=True,
                return_assistant_tokens_mask=True,
            )
            mask = list(out["assistant_masks"])
            weights = [m.get("weight") for m in row["messages"] if m["role"] == "assistant"]
            runs = _runs_of_ones(mask)
            if len(runs) != len(weights):
                raise TrainingError(
                    Reason.BAD_TRAINING_DATA,
                    "Per-message weights cannot be applied: the base model's chat template does not mark "
                    "each assistant message separately.",
                )
            for (start, end), weight in zip(runs, weights, strict=True):
                if weight == 0:
                    mask[start:end] = [0] * (end - start)
            return {"input_ids": list(out["input_ids"]), "assistant_masks": mask}

        return data.map(tokenize, remove_columns=data.column_names)


def _has_zero_weights(*datasets: Dataset | None) -> bool:
    return any(
        message.get("weight") == 0
        for data in datasets
        if data is not None and "messages" in data.column_names  # conversational prompt/completion: none
        for row in data["messages"]
        for message in row
    )


def _runs_of_ones(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of 1s."""
    runs: list[tuple[int, int]] = []
    for i, bit in enumerate(mask):
        if bit and (i == 0 or not mask[i - 1]):
            runs.append((i, i + 1))
        elif bit:
            runs[-1] = (runs[-1][0], i + 1)
    return runs
