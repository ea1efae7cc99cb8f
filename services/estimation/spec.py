"""From a JobSpec to the estimator's `Setup`: the defaults job.proto documents, and the checks of the fields
an estimate depends on, each violation naming its field.

The jobs service validates the whole spec at CreateJob; this is the subset the arithmetic needs, checked
again because estimation is also called on drafts.
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneforge.v1 import job_pb2

from services.estimation.catalog import Catalog
from services.estimation.estimator import (
    Adapter,
    Hardware,
    Method,
    Precision,
    Setup,
    Strategy,
    lora_targets,
)
from services.estimation.resolver import ResolvedModel, resolve_model
from tuneforge_core.errors import TuneForgeError, Violations

ADAPTERS: dict[int, Adapter] = {
    job_pb2.ADAPTER_TYPE_UNSPECIFIED: "lora",
    job_pb2.ADAPTER_TYPE_LORA: "lora",
    job_pb2.ADAPTER_TYPE_QLORA: "qlora",
    job_pb2.ADAPTER_TYPE_FULL: "full",
    job_pb2.ADAPTER_TYPE_PROMPT_TUNING: "prompt_tuning",
}
METHODS: dict[int, Method] = {
    job_pb2.TRAINING_METHOD_UNSPECIFIED: "sft",
    job_pb2.TRAINING_METHOD_SFT: "sft",
    job_pb2.TRAINING_METHOD_DPO: "dpo",
    job_pb2.TRAINING_METHOD_GRPO: "grpo",
    job_pb2.TRAINING_METHOD_DISTILLATION: "distillation",
    job_pb2.TRAINING_METHOD_ORPO: "orpo",
    job_pb2.TRAINING_METHOD_KTO: "kto",
}
PRECISIONS: dict[int, Precision | None] = {
    job_pb2.PRECISION_UNSPECIFIED: None,
    job_pb2.PRECISION_BF16: "bf16",
    job_pb2.PRECISION_FP16: "fp16",
    job_pb2.PRECISION_FP32: "fp32",
}
OPTIMIZERS: dict[int, str] = {
    job_pb2.OPTIMIZER_UNSPECIFIED: "adamw",
    job_pb2.OPTIMIZER_ADAMW: "adamw",
    job_pb2.OPTIMIZER_ADAMW_8BIT: "adamw_8bit",
    job_pb2.OPTIMIZER_PAGED_ADAMW: "paged_adamw",
    job_pb2.OPTIMIZER_PAGED_ADAMW_8BIT: "paged_adamw_8bit",
    job_pb2.OPTIMIZER_SGD: "sgd",
    job_pb2.OPTIMIZER_ADAFACTOR: "adafactor",
}
STRATEGIES: dict[int, Strategy] = {
    job_pb2.DISTRIBUTED_STRATEGY_UNSPECIFIED: "none",
    job_pb2.DISTRIBUTED_STRATEGY_NONE: "none",
    job_pb2.DISTRIBUTED_STRATEGY_DDP: "ddp",
    job_pb2.DISTRIBUTED_STRATEGY_ZERO1: "zero1",
    job_pb2.DISTRIBUTED_STRATEGY_ZERO2: "zero2",
    job_pb2.DISTRIBUTED_STRATEGY_ZERO2_OFFLOAD: "zero2_offload",
    job_pb2.DISTRIBUTED_STRATEGY_ZERO3: "zero3",
    job_pb2.DISTRIBUTED_STRATEGY_ZERO3_OFFLOAD: "zero3_offload",
    job_pb2.DISTRIBUTED_STRATEGY_FSDP: "fsdp",
}


@dataclass(frozen=True)
class ResolvedSpec:
    model: ResolvedModel
    setup: Setup
    # The spec's GPU type; None when it left the choice to the scheduler.
    hardware: Hardware | None
    notes: tuple[str, ...]


def _optional(message: object, name: str, default: int | float | bool) -> int | float | bool:
    return getattr(message, name) if message.HasField(name) else default  # type: ignore[attr-defined]


def _range(v: Violations, message: object, name: str, path: str, low: float, high: float) -> None:
    if message.HasField(name):  # type: ignore[attr-defined]
        value = getattr(message, name)
        v.check(low <= value <= high, path, f"must be between {low:g} and {high:g}, got {value:g}")


def check_spec(v: Violations, spec: job_pb2.JobSpec, catalog: Catalog, field: str = "spec") -> None:
    """Adds a violation for every field an estimate uses that is missing or out of range."""
    v.check(bool(spec.base_model.strip()), f"{field}.base_model", "is required")
    v.check(spec.adapter in ADAPTERS, f"{field}.adapter", "is not an AdapterType")
    v.check(spec.method in METHODS, f"{field}.method", "is not a TrainingMethod")
    hp = spec.hyperparameters
    hp_path = f"{field}.hyperparameters"
    _range(v, hp, "epochs", f"{hp_path}.epochs", 1, 50)
    _range(v, hp, "max_steps", f"{hp_path}.max_steps", 0, 10**9)
    _range(v, hp, "batch_size", f"{hp_path}.batch_size", 1, 256)
    _range(v, hp, "gradient_accumulation_steps", f"{hp_path}.gradient_accumulation_steps", 1, 256)
    _range(v, hp, "max_seq_length", f"{hp_path}.max_seq_length", 16, 131072)
    v.check(hp.optimizer in OPTIMIZERS, f"{hp_path}.optimizer", "is not an Optimizer")
    v.check(hp.precision in PRECISIONS, f"{hp_path}.precision", "is not a Precision")
    _range(v, spec.lora, "rank", f"{field}.lora.rank", 1, 256)
    _range(v, spec.lora, "dropout", f"{field}.lora.dropout", 0, 0.5)
    if spec.quantization.HasField("bits"):
        v.check(spec.quantization.bits in (4, 8), f"{field}.quantization.bits", "must be 4 or 8")
    _range(v, spec.prompt_tuning, "num_virtual_tokens", f"{field}.prompt_tuning.num_virtual_tokens", 1, 512)
    _range(v, spec.grpo, "num_generations", f"{field}.grpo.num_generations", 2, 64)
    _range(v, spec.grpo, "max_completion_length", f"{field}.grpo.max_completion_length", 1, 8192)
    if spec.method == job_pb2.TRAINING_METHOD_DISTILLATION:
        v.check(
            bool(spec.distillation.teacher_model),
            f"{field}.distillation.teacher_model",
            "is required for distillation",
        )

    hw, hw_path = spec.hardware, f"{field}.hardware"
    v.check(hw.strategy in STRATEGIES, f"{hw_path}.strategy", "is not a DistributedStrategy")
    _range(v, hw, "node_count", f"{hw_path}.node_count", 1, 64)
    option = catalog.hardware(hw.gpu_type) if hw.gpu_type else None
    if hw.gpu_type and option is None:
        known = ", ".join(h.gpu_type for h in catalog.hardware_options())
        v.add(f"{hw_path}.gpu_type", f"'{hw.gpu_type}' is not a hardware option (one of: {known})")
    if hw.HasField("gpu_count"):
        count = hw.gpu_count
        if not 1 <= count <= 8:
            v.add(f"{hw_path}.gpu_count", f"must be between 1 and 8, got {count}")
        elif option is not None and count not in option.allowed_gpu_counts:
            allowed = ", ".join(str(c) for c in option.allowed_gpu_counts)
            v.add(f"{hw_path}.gpu_count", f"{option.display_name} allows {allowed} GPUs, got {count}")


def resolve_spec(spec: job_pb2.JobSpec, catalog: Catalog, field: str = "spec") -> ResolvedSpec:
    """Validates, resolves the model (and teacher) and fills in the defaults of job.proto."""
    v = Violations()
    check_spec(v, spec, catalog, field)
    v.raise_if_any("Invalid job spec")
    notes: list[str] = []
    model = resolve_model(catalog, spec.base_model.strip(), f"{field}.base_model")
    if model.note:
        notes.append(model.note)
    teacher = None
    if spec.method == job_pb2.TRAINING_METHOD_DISTILLATION:
        try:
            resolved = resolve_model(
                catalog, spec.distillation.teacher_model, f"{field}.distillation.teacher_model"
            )
            teacher = resolved.architecture
            if resolved.note:
                notes.append(resolved.note)
        except TuneForgeError:
            notes.append(
                f"teacher '{spec.distillation.teacher_model}' is unknown: assumed the size of the student"
            )
    hp, lora, quant = spec.hyperparameters, spec.lora, spec.quantization
    adapter = ADAPTERS[spec.adapter]
    precision = PRECISIONS[hp.precision]
    if adapter == "qlora" and quant.compute_dtype in (job_pb2.PRECISION_BF16, job_pb2.PRECISION_FP16):
        precision = PRECISIONS[quant.compute_dtype]
    setup = Setup(
        adapter=adapter,
        method=METHODS[spec.method],
        lora_rank=int(_optional(lora, "rank", 16)),
        lora_targets=tuple(lora.target_modules) or ("all-linear",),
        lora_dropout=float(_optional(lora, "dropout", 0.05)),
        use_dora=bool(_optional(lora, "use_dora", False)),
        quantization_bits=int(_optional(quant, "bits", 4)),
        double_quantization=bool(_optional(quant, "double_quantization", True)),
        num_virtual_tokens=int(_optional(spec.prompt_tuning, "num_virtual_tokens", 20)),
        precision=precision,
        optimizer=OPTIMIZERS[hp.optimizer],
        batch_size=int(_optional(hp, "batch_size", 4)),
        gradient_accumulation_steps=int(_optional(hp, "gradient_accumulation_steps", 1)),
        max_seq_length=int(_optional(hp, "max_seq_length", 2048)),
        gradient_checkpointing=bool(_optional(hp, "gradient_checkpointing", False)),
        packing=bool(_optional(hp, "packing", False)),
        epochs=int(_optional(hp, "epochs", 3)),
        max_steps=int(_optional(hp, "max_steps", 0)),
        strategy=STRATEGIES[spec.hardware.strategy],
        gpu_count=int(_optional(spec.hardware, "gpu_count", 1)),
        node_count=int(_optional(spec.hardware, "node_count", 1)),
        num_generations=int(_optional(spec.grpo, "num_generations", 4)),
        max_completion_length=int(_optional(spec.grpo, "max_completion_length", 256)),
        kl_beta=float(_optional(spec.grpo, "kl_beta", 0.04)),
        teacher=teacher,
    )
    if adapter in ("lora", "qlora"):
        _, unknown = lora_targets(model.architecture, setup.lora_targets)
        if unknown:
            notes.append(f"LoRA target modules not recognised and not counted: {', '.join(unknown)}")
        if model.architecture.num_experts and setup.lora_dropout > 0:
            notes.append(
                "PEFT adapts a mixture's fused expert tensors only with spec.lora.dropout = 0; "
                "estimated as given"
            )
    if setup.method == "grpo":
        notes.append(
            "GRPO estimates are coarse: generating completions dominates and varies with the rewards"
        )
    hardware = catalog.hardware(spec.hardware.gpu_type) if spec.hardware.gpu_type else None
    return ResolvedSpec(model=model, setup=setup, hardware=hardware, notes=tuple(notes))
