"""SFT of a vision-language model with LoRA or QLoRA, through TRL's vision path.

Supports what JobSpec.model_type asks of a vision-language base model (LLaVA, Qwen2-VL/2.5-VL, Llama 3.2
Vision, ... anything ``AutoModelForImageTextToText`` loads):

- MODEL_TYPE_VLM on an image dataset: the model's processor renders each chat row with its images (read
  from the local files the agent fetched, ``trainer_worker.vision``) and TRL's
  ``DataCollatorForVisionLanguageModeling`` turns them into pixel values batch by batch. LoRA goes on every
  linear layer the spec names (``all-linear``: the vision tower, projector and language model); with
  ``assistant_only_loss`` only the answers train.
- MODEL_TYPE_LLM (or a text dataset): text rows through the tokenizer, as plain SFT, with the LoRA targets
  restricted to the language model's modules, so the vision tower and projector stay untouched. The adapter
  loads onto the whole vision-language model.

No packing (image batches are padded), no full fine-tuning or prompt tuning (CreateJob refuses them). The
evaluation after training on image data runs through the same collator (trainer_worker.vision_evaluation).
It extends SFTRecipe, whose
chat, weights and assistant-only handling the text path keeps; what differs is the loading of the model and
processor, the image rows, and the LoRA targets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig, PeftConfig
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    PreTrainedModel,
    ProcessorMixin,
)

from trainer_worker.errors import TrainingError
from trainer_worker.recipes.sft import SFTRecipe
from tuneforge_core import model_types as mt
from tuneforge_core.reasons import Reason
from tuneforge_core.spec import target_modules_for_peft

# A lookahead that PEFT's full match of a module's dotted name must pass: the name runs through a
# "language_model" module (LLaVA, Qwen2-VL/2.5-VL, Mllama, Gemma 3 ... all name their language model so).
LANGUAGE_MODEL_ONLY = r"(?=(?:.*\.)?language_model\.)"


class VisionSFTRecipe(SFTRecipe):
    """One SFT run of a vision-language base model (whole model on images, or its language model alone)."""

    method = "SFT"
    auto_model_class = AutoModelForImageTextToText

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.vision = False  # whether the data holds images (then the processor renders it)
        self.language_leaves: list[str] = []  # names of the language model's linear layers (q_proj, ...)

    # -- setup ------------------------------------------------------------------------------------------

    def load_tokenizer(self, path: str) -> Any:
        """The model's processor for a VLM job (its tokenizer once the data turns out to be text only)."""
        if self.spec.model_type != mt.VLM:
            return super().load_tokenizer(path)
        try:
            processor = AutoProcessor.from_pretrained(path, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise TrainingError(
                Reason.MODEL_NOT_FOUND, f"Could not load the processor of {path}: {exc}"
            ) from exc
        if not isinstance(processor, ProcessorMixin):
            raise TrainingError(
                Reason.TRAINING_FAILED,
                f"spec.model_type is MODEL_TYPE_VLM, but {path} has no image processor (a text-only model?).",
            )
        tokenizer = processor.tokenizer
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return processor

    def prepare(self, rows: list[dict[str, Any]]) -> Dataset:
        """Image rows as TRL's vision path reads them: every content a list of parts (one Arrow type for
        strings and parts alike), ``images`` the local files; text rows as plain SFT has them."""
        if not any(row.get("images") for row in rows):
            return super().prepare(rows)
        return Dataset.from_list([_vision_row(row, number) for number, row in enumerate(rows, start=1)])

    def load_data(self) -> tuple[Dataset, Dataset | None]:
        train, validation = super().load_data()
        self.vision = "images" in train.column_names
        processor = isinstance(self.tokenizer, ProcessorMixin)
        if self.vision and not processor:
            raise TrainingError(
                Reason.BAD_TRAINING_DATA,
                "The dataset holds images, but spec.model_type is not MODEL_TYPE_VLM: images need the "
                "vision-language model.",
            )
        if processor and not self.vision:
            self.sink.log(
                "The dataset holds no images: training the language model only, on text.", "warning"
            )
            self.tokenizer = self.tokenizer.tokenizer
        return train, validation

    def load_model(
        self, path: str | None = None, *, trainable: bool = True, model_class: Any = None, **extra: Any
    ) -> PreTrainedModel:
        where = Path(path or self.cfg.model_path)
        if where.is_dir() and mt.folder_model_type(where) != mt.VLM:
            raise TrainingError(
                Reason.TRAINING_FAILED,
                f"spec.model_type is {mt.name(self.spec.model_type)} for a vision-language model, but the "
                "base model has no vision tower (no vision_config in its config.json).",
            )
        model = super().load_model(path, trainable=trainable, model_class=model_class, **extra)
        self.language_leaves = sorted({
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and "language_model." in f"{name}."
            and name.rsplit(".", 1)[-1] != "lm_head"
        })
        return model

    def peft_config(self) -> PeftConfig | None:
        """The spec's LoRA; without images, its targets restricted to the language model's modules."""
        config = super().peft_config()
        if not isinstance(config, LoraConfig) or self.vision:
            return config
        config.target_modules = language_model_targets(list(self.spec.lora.target_modules),
                                                       self.language_leaves)
        return config

    def trainer_config(self, args: dict[str, Any]) -> Any:
        if self.vision:
            # TRL's vision collator reads the raw columns; the Trainer must not drop them.
            args = {**args, "remove_unused_columns": False}
        return super().trainer_config(args)

    def _stop_at_end_of_turn(self, model: PreTrainedModel) -> None:
        """The base's rule, read from the processor's tokenizer (a processor has no special tokens)."""
        processor = self.tokenizer
        if not isinstance(processor, ProcessorMixin):
            super()._stop_at_end_of_turn(model)
            return
        self.tokenizer = processor.tokenizer
        try:
            super()._stop_at_end_of_turn(model)
        finally:
            self.tokenizer = processor

    def evaluate(self) -> None:
        if not self.vision:
            super().evaluate()
            return
        from trainer_worker.evaluation import evaluate  # it imports the recipes
        from trainer_worker.vision_evaluation import VisionEvaluation

        self.evaluation_report = evaluate(self, VisionEvaluation)


def language_model_targets(targets: list[str], leaves: list[str]) -> str:
    """One regular expression (PEFT full-matches it against each module's dotted name) for the spec's
    LoRA targets inside the language model only: ``all-linear`` means each linear layer found there."""
    if targets == ["all-linear"]:
        if not leaves:
            raise TrainingError(
                Reason.TRAINING_FAILED,
                "The base model has no linear layers under a 'language_model' module; its language model "
                "cannot be trained alone.",
            )
        inner = r"(?:.*\.)?(?:" + "|".join(leaves) + ")"
    else:
        pattern = target_modules_for_peft(targets)
        inner = pattern if isinstance(pattern, str) else r"(?:.*\.)?(?:" + "|".join(pattern) + ")"
    return LANGUAGE_MODEL_ONLY + inner


def _vision_row(row: dict[str, Any], number: int) -> dict[str, Any]:
    images = [str(p) for p in row.get("images") or []]
    for image in images:
        if not Path(image).is_file():
            raise TrainingError(
                Reason.BAD_TRAINING_DATA, f"Row {number} names the image {image}, which is not on the worker."
            )
    messages = []
    for message in row["messages"]:
        content = message.get("content") or ""
        parts = (
            [{"type": "text", "text": content}]
            if isinstance(content, str)
            else [{"type": p.get("type"), "text": p.get("text")} for p in content]
        )
        messages.append({"role": message["role"], "content": parts})
    return {"messages": messages, "images": images}

