"""Knowledge distillation from a teacher model: SFT data, the student also matches the teacher's softened
next-token distribution.

The loss is ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy`` over the tokens SFT
trains on (Hinton et al.; ``T`` the temperature). It is a small subclass of TRL's SFTTrainer rather than
TRL's GKD/DistillationTrainer, which generate on-policy completions: offline distillation on the job's own
data is what DistillationConfig (temperature, alpha) describes, and it costs one extra forward pass.
The teacher must share the student's tokenizer, or its token ids would mean different words.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import PreTrainedModel
from trl import SFTTrainer

from trainer_worker.recipes.sft import SFTRecipe

FORWARD_KEYS = ("input_ids", "attention_mask", "position_ids")


class DistillationTrainer(SFTTrainer):
    """SFTTrainer whose loss mixes the hard labels with a frozen teacher's soft ones."""

    def __init__(self, *args: Any, teacher: PreTrainedModel, temperature: float, alpha: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)  # type: ignore[arg-type]
        self.temperature, self.alpha = temperature, alpha

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        forward = {k: inputs[k] for k in FORWARD_KEYS if k in inputs}
        outputs = model(**forward, use_cache=False)
        with torch.no_grad():
            teacher_logits = self.teacher(**forward, use_cache=False).logits
        vocab = min(outputs.logits.size(-1), teacher_logits.size(-1))
        labels = inputs["labels"][:, 1:]
        mask = labels != -100
        # A soft prompt (prompt tuning) adds its virtual tokens in front of the student's logits.
        student_logits = outputs.logits[:, -teacher_logits.size(1) :]
        student = student_logits[:, :-1, :vocab][mask].float()
        teacher = teacher_logits[:, :-1, :vocab][mask].float()
        tokens = mask.sum() if num_items_in_batch is None else num_items_in_batch
        tokens = torch.as_tensor(tokens, device=student.device).clamp(min=1)
        hard = F.cross_entropy(student, labels[mask], reduction="sum") / tokens
        t = self.temperature
        soft = F.kl_div(
            F.log_softmax(student / t, dim=-1),
            F.log_softmax(teacher / t, dim=-1),
            log_target=True,
            reduction="sum",
        )
        soft = soft * t * t / tokens
        loss = self.alpha * soft + (1 - self.alpha) * hard
        mode = "train" if model.training else "eval"
        self._metrics[mode]["distillation_loss"].append(soft.item())
        self._metrics[mode]["hard_loss"].append(hard.item())
        if mode == "train":
            self._total_train_tokens += int(mask.sum().item())
        return (loss, outputs) if return_outputs else loss


class DistillationRecipe(SFTRecipe):
    method = "distillation"
    trainer_class = DistillationTrainer  # type: ignore[assignment]

    def trainer_extras(self, train: Dataset) -> dict[str, Any]:
        distillation = self.spec.distillation
        teacher_path = self.cfg.teacher_model_path or distillation.teacher_model
        return {
            "teacher": self.load_frozen_model(teacher_path, "teacher model"),
            "temperature": distillation.temperature,
            "alpha": distillation.alpha,
        }
