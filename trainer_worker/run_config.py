"""RUN.json: everything one training process needs, written by the agent and read by ``trainer_worker.train``.

The spec travels as the JSON form of ``tuneforge.v1.JobSpec`` (proto field names, enum value names). The
jobs service fills every default before a job is queued; :func:`with_defaults` applies the same defaults
again so a recipe never guesses what an unset field means.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from google.protobuf import json_format
from pydantic import BaseModel, ConfigDict
from tuneforge.v1 import job_pb2


class RunConfig(BaseModel):
    """One attempt of one job, with every input already on local disk."""

    model_config = ConfigDict(extra="forbid")

    job_id: str
    attempt: int = 1
    spec: dict[str, Any]
    # A local model folder (or a hub id where the worker may download).
    model_path: str
    # Distillation: the teacher's local folder; None means spec.distillation.teacher_model as given.
    teacher_model_path: str | None = None
    train_file: Path
    validation_file: Path | None = None
    output_dir: Path
    events_file: Path

    @classmethod
    def load(cls, path: Path) -> RunConfig:
        return cls.model_validate_json(path.read_text(encoding="utf-8"))

    def dump(self, path: Path) -> Path:
        path.write_text(self.model_dump_json(indent=2), encoding="utf-8")
        return path

    def job_spec(self) -> job_pb2.JobSpec:
        """The spec as a proto with defaults applied; unknown fields are an error, not silently dropped."""
        return with_defaults(json_format.ParseDict(self.spec, job_pb2.JobSpec()))

    @staticmethod
    def spec_to_dict(spec: job_pb2.JobSpec) -> dict[str, Any]:
        return json_format.MessageToDict(spec, preserving_proto_field_name=True)


def with_defaults(spec: job_pb2.JobSpec) -> job_pb2.JobSpec:
    """A copy of ``spec`` with the defaults documented in job.proto filled in."""
    out = job_pb2.JobSpec()
    out.CopyFrom(spec)
    if out.method == job_pb2.TRAINING_METHOD_UNSPECIFIED:
        out.method = job_pb2.TRAINING_METHOD_SFT
    if out.adapter == job_pb2.ADAPTER_TYPE_UNSPECIFIED:
        out.adapter = job_pb2.ADAPTER_TYPE_LORA

    lora = out.lora
    _default(lora, "rank", 16)
    _default(lora, "alpha", 2 * lora.rank)
    _default(lora, "dropout", 0.05)
    _default(lora, "use_dora", False)
    if not lora.target_modules:
        lora.target_modules.append("all-linear")

    quant = out.quantization
    _default(quant, "bits", 4)
    if quant.type == job_pb2.QUANTIZATION_TYPE_UNSPECIFIED:
        quant.type = job_pb2.QUANTIZATION_TYPE_INT8 if quant.bits == 8 else job_pb2.QUANTIZATION_TYPE_NF4
    _default(quant, "double_quantization", True)
    _default(out.prompt_tuning, "num_virtual_tokens", 20)
    _method_defaults(out)

    hp = out.hyperparameters
    full = out.adapter == job_pb2.ADAPTER_TYPE_FULL
    _default(hp, "epochs", 3)
    _default(hp, "max_steps", 0)
    _default(hp, "batch_size", 4)
    _default(hp, "gradient_accumulation_steps", 1)
    _default(hp, "learning_rate", 2e-5 if full else 2e-4)
    _default(hp, "min_learning_rate", 0.1 * hp.learning_rate)
    if not hp.HasField("warmup_steps"):
        _default(hp, "warmup_ratio", 0.03)
    if hp.lr_scheduler == job_pb2.LR_SCHEDULER_UNSPECIFIED:
        hp.lr_scheduler = job_pb2.LR_SCHEDULER_COSINE
    if hp.optimizer == job_pb2.OPTIMIZER_UNSPECIFIED:
        hp.optimizer = job_pb2.OPTIMIZER_ADAMW
    _default(hp, "adam_beta1", 0.9)
    _default(hp, "adam_beta2", 0.999)
    _default(hp, "weight_decay", 0.01)
    _default(hp, "max_grad_norm", 1.0)
    _default(hp, "gradient_checkpointing", False)
    _default(hp, "packing", False)
    _default(hp, "group_by_length", False)
    _default(hp, "max_seq_length", 2048)
    _default(hp, "seed", 42)
    _default(hp, "dataloader_workers", 0)
    _default(hp, "logging_steps", 10)
    _default(hp, "eval_steps", 0)
    _default(hp, "save_steps", 0)
    _default(hp, "save_total_limit", 2)
    _default(hp, "assistant_only_loss", True)
    _default(hp.early_stopping, "patience", 3)
    _default(hp.early_stopping, "min_delta", 0.0)
    return out


def _method_defaults(out: job_pb2.JobSpec) -> None:
    """The defaults of DpoConfig, GrpoConfig, DistillationConfig, OrpoConfig and KtoConfig."""
    dpo = out.dpo
    _default(dpo, "beta", 0.1)
    _default(dpo, "preference_loss_weight", 1.0)
    _default(dpo, "sft_loss_weight", 0.0)
    _default(dpo, "average_log_probs", False)
    grpo = out.grpo
    _default(grpo, "num_generations", 4)
    _default(grpo, "temperature", 1.0)
    _default(grpo, "top_p", 1.0)
    _default(grpo, "top_k", 0)
    _default(grpo, "kl_beta", 0.04)
    _default(grpo, "clip_epsilon", 0.2)
    _default(grpo, "max_completion_length", 256)
    distillation = out.distillation
    _default(distillation, "temperature", 2.0)
    _default(distillation, "alpha", 0.5)
    _default(out.orpo, "beta", 0.1)
    kto = out.kto
    _default(kto, "beta", 0.1)
    _default(kto, "desirable_weight", 1.0)
    _default(kto, "undesirable_weight", 1.0)


def _default(message: Any, field: str, value: object) -> None:
    """Set an ``optional`` proto field only when the sender left it unset (0 and false stay as sent)."""
    if not message.HasField(field):
        setattr(message, field, value)
