"""The evaluation after training for vision-language SFT on image data (see trainer_worker.evaluation).

The same report as text SFT: the mean token loss (and perplexity) of the base and the tuned model over the
first ``spec.evaluation.max_examples`` rows of the test split, counting the tokens training's loss counts,
then ``num_samples`` answers of both models. What differs is how a row becomes tensors: through the
recipe's own TRL vision collator (the processor renders each chat row with its images, and masks what
training masked), and the sample prompts go to the processor with their images.
"""

from __future__ import annotations

from typing import Any

import torch
from datasets import Dataset
from transformers import StoppingCriteriaList
from trl.data_utils import prepare_multimodal_messages

from trainer_worker.evaluation import Evaluation, StopRequested, _last_user_turn, summed_token_loss


class VisionEvaluation(Evaluation):
    """Evaluation of a vision-language model trained on image rows (``messages`` with parts, ``images``)."""

    def __init__(self, recipe: Any) -> None:
        super().__init__(recipe)
        self.processor = recipe.tokenizer
        self.tokenizer = self.processor.tokenizer  # decoding, padding and the end-of-turn rule
        self.sample_images: list[list[str]] = []

    # -- loss: the rows collated as training collated them -----------------------------------------------

    def _loss_dataset(self, rows: list[dict[str, Any]]) -> Dataset:
        data = self.recipe.prepare(rows)
        if len(data) == 0:
            raise ValueError("the test split has no rows")
        return data

    def _token_loss(self, model: Any, data: Dataset) -> float:
        trainer = self.recipe.trainer
        assert trainer is not None
        total, count = 0.0, 0
        for start in range(0, len(data), self.batch_size):
            self._check_stop()
            batch = trainer.data_collator([dict(data[i]) for i in range(start, min(start + self.batch_size,
                                                                                   len(data)))])
            labels = batch.pop("labels").to(self.device)
            inputs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            with self._inference():
                logits = model(**inputs, use_cache=False).logits
            batch_total, batch_count = summed_token_loss(logits[:, -labels.shape[1]:], labels)
            total, count = total + batch_total, count + batch_count
        if count == 0:
            raise ValueError("no test example has a token that training's loss counts")
        return total / count

    # -- samples: the prompt with its images ------------------------------------------------------------

    def _sample_source(self, row: dict[str, Any]) -> tuple[str, str, str]:
        messages = row["messages"]
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=len(messages))
        context = messages[:last]
        reference = _content_text(messages[last].get("content")) if last < len(messages) else ""
        self.sample_images.append([str(p) for p in row.get("images") or []])
        shown = _last_user_turn([{**m, "content": _content_text(m.get("content"))} for m in context])
        # What the model is given is rebuilt in _generate from the row's index; this is only its text.
        return str(len(self.sample_images) - 1), shown, reference

    def _generate(self, model: Any, prompts: list[str], max_new_tokens: int) -> list[str]:
        config = self._generation_config(max_new_tokens)
        answers: list[str] = []
        for index in prompts:  # one at a time: each prompt brings its own images
            self._check_stop()
            row = self._rows[int(index)]
            messages = row["messages"]
            last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"),
                       default=len(messages))
            images = self.sample_images[int(index)]
            context = prepare_multimodal_messages([dict(m) for m in messages[:last]], images=images)
            encoded = self.processor.apply_chat_template(
                [context], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
            ).to(self.device)
            with self._inference():
                out = model.generate(**encoded, generation_config=config,
                                     stopping_criteria=StoppingCriteriaList([StopRequested(self.recipe.stop)]))
            self._check_stop()
            width = encoded["input_ids"].shape[1]
            new = out[:, width:] if out.shape[1] >= width else out
            answers.append(self.tokenizer.batch_decode(new, skip_special_tokens=True)[0].strip())
        return answers

    def prepare(self) -> None:
        super().prepare()
        # The sample rows as prepared for the model (content parts, local image paths).
        self._rows = list(self.recipe.prepare(self.rows[: self.settings.num_samples]))


def _content_text(content: Any) -> str:
    """A message's text: the string, or its text parts joined (image parts have none)."""
    if isinstance(content, str):
        return content
    return "".join(str(part.get("text") or "") for part in content or [] if isinstance(part, dict))
