"""From a JobSpec to the estimator's `Setup`.

Defaults and ranges are not said here: the spec is resolved first by `tuneforge_core.spec.resolve_spec`, the
function whose result CreateJob stores and queues, and `Setup` is built from the resolved fields only. So an
estimate, the admission check and the job the worker trains can never disagree about a default (they did: an
INT8 QLoRA spec without `bits` was 8-bit at CreateJob and 4-bit here). What is added here needs the catalog:
the GPU type must be a hardware option, the GPU count one that option allows, and the model (and a
distillation teacher, a DPO reference model, a GRPO reward model) must resolve to an architecture.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, replace
from typing import Literal, cast, get_args

from tuneforge.v1 import job_pb2

from services.estimation.catalog import Catalog
from services.estimation.estimator import (
    OPTIMIZER_BYTES,
    Adapter,
    Architecture,
    Hardware,
    Method,
    Precision,
    Setup,
    Strategy,
    lora_targets,
)
from services.estimation.resolver import NO_LOCAL_MODELS, ResolvedModel, is_location, resolve_model
from tuneforge_core.compat import LORA_ADAPTERS, SUPPORTED_ADAPTERS, SUPPORTED_METHODS, SUPPORTED_STRATEGIES
from tuneforge_core.errors import InvalidArgument, TuneForgeError, Violations
from tuneforge_core.models import ModelPolicy, other_models
from tuneforge_core.spec import resolve_spec


def _names(
    members: Iterable[tuple[str, int]], prefix: str, names: Collection[str], supported: Collection[int] = ()
) -> dict[int, str]:
    """Enum value -> the estimator's name for it: the value's name less its prefix, in lower case
    (ADAPTER_TYPE_PROMPT_TUNING -> "prompt_tuning"), for the `supported` values (all but the zero one when
    none are given). A value the estimator has no name for fails at import, so a new enum value cannot
    reach the arithmetic unnoticed."""
    out: dict[int, str] = {}
    for member, value in members:
        if value == 0 or (supported and value not in supported):
            continue
        name = member.removeprefix(prefix).lower()
        if name not in names:
            raise RuntimeError(f"{member} has no counterpart in the estimator ({sorted(names)})")
        out[value] = name
    return out


# Which values are supported is tuneforge_core.compat's table; the names are the estimator's. The resolver
# fills every zero value but the precision's, so only PRECISIONS maps one.
ADAPTERS = cast(
    dict[int, Adapter],
    _names(job_pb2.AdapterType.items(), "ADAPTER_TYPE_", get_args(Adapter), SUPPORTED_ADAPTERS),
)
METHODS = cast(
    dict[int, Method],
    _names(job_pb2.TrainingMethod.items(), "TRAINING_METHOD_", get_args(Method), SUPPORTED_METHODS),
)
STRATEGIES = cast(
    dict[int, Strategy],
    _names(
        job_pb2.DistributedStrategy.items(), "DISTRIBUTED_STRATEGY_", get_args(Strategy), SUPPORTED_STRATEGIES
    ),
)
OPTIMIZERS = _names(job_pb2.Optimizer.items(), "OPTIMIZER_", OPTIMIZER_BYTES.keys())
# An unspecified precision stays unspecified: bf16 where the hardware has it, else fp16.
PRECISIONS: dict[int, Precision | None] = {
    job_pb2.PRECISION_UNSPECIFIED: None,
    **cast(dict[int, Precision], _names(job_pb2.Precision.items(), "PRECISION_", get_args(Precision))),
}


@dataclass(frozen=True)
class ResolvedSetup:
    """A spec as the estimator sees it."""

    model: ResolvedModel
    setup: Setup
    # The spec's GPU type; None when it left the choice to the scheduler.
    hardware: Hardware | None
    notes: tuple[str, ...]
    # Whether a model's architecture was read from a path or URI (its config.json, which may change on
    # disk): such a resolution is done again for each request, never remembered.
    from_files: bool = False


def check_hardware(v: Violations, hardware: job_pb2.HardwareConfig, catalog: Catalog) -> None:
    """Adds a violation when the GPU type is not a hardware option, or the option does not come with that
    many GPUs (the range 1-8 itself is resolve_spec's to check)."""
    path = "spec.hardware"
    option = catalog.hardware(hardware.gpu_type) if hardware.gpu_type else None
    if hardware.gpu_type and option is None:
        known = ", ".join(h.gpu_type for h in catalog.hardware_options())
        v.add(f"{path}.gpu_type", f"'{hardware.gpu_type}' is not a hardware option (one of: {known})")
    count = hardware.gpu_count if hardware.HasField("gpu_count") else 1
    if option is not None and 1 <= count <= 8 and count not in option.allowed_gpu_counts:
        allowed = ", ".join(str(c) for c in option.allowed_gpu_counts)
        v.add(f"{path}.gpu_count", f"{option.display_name} allows {allowed} GPUs, got {count}")

# What a note calls each of the other models a job loads.
ROLES = {"spec.distillation.teacher_model": "teacher", "spec.dpo.reference_model": "reference model",
         "spec.grpo.reward_model": "reward model"}


def resolve_setup(
    spec: job_pb2.JobSpec, catalog: Catalog, *, models: ModelPolicy | None = None, organization: str = ""
) -> ResolvedSetup:
    """Resolves the spec (tuneforge_core.spec.resolve_spec, for a draft: no dataset needed, user reward code
    allowed since nothing runs here), checks it against the catalog, and builds the estimator's `Setup`.

    Raises InvalidArgument listing every problem, the resolver's and the catalog's together, each naming its
    `spec.…` field. Resolving an already resolved spec (what CreateJob stored) gives the same `Setup`.
    Models are looked up under `models`' rule for `organization` (no local or stored model without one).
    """
    v = Violations()
    resolved: job_pb2.JobSpec | None = None
    try:
        resolved = resolve_spec(spec, allow_user_reward_code=True, require_dataset=False)
    except InvalidArgument as exc:
        v.items.extend(exc.violations)
    check_hardware(v, (resolved or spec).hardware, catalog)
    v.raise_if_any("job spec is invalid")
    assert resolved is not None

    notes: list[str] = []
    policy = models or NO_LOCAL_MODELS
    model = resolve_model(catalog, resolved.base_model, "spec.base_model", models=policy,
                          organization=organization)
    if model.note:
        notes.append(model.note)
    # The other models a job loads (tuneforge_core.models.other_models): a teacher, a DPO reference model,
    # a GRPO reward model. A refused one is an error, not a guess; an unknown one is the student's size.
    others: dict[str, Architecture] = {}
    for field, ref in other_models(resolved):
        policy.source(ref, organization, field)
        role = ROLES[field]
        try:
            found = resolve_model(catalog, ref, field, models=policy, organization=organization)
            others[field] = found.architecture
            if found.note:
                notes.append(found.note)
        except TuneForgeError:
            notes.append(f"{role} '{ref}' is unknown: assumed the size of the student")
            others[field] = model.architecture
    setup = to_setup(resolved)
    setup = replace(
        setup,
        teacher=others.get("spec.distillation.teacher_model"),
        reference=others.get("spec.dpo.reference_model"),
        reward_model=others.get("spec.grpo.reward_model"),
    )
    if setup.adapter in ("lora", "qlora"):
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
    hardware = catalog.hardware(resolved.hardware.gpu_type) if resolved.hardware.gpu_type else None
    refs = [resolved.base_model, *(ref for _, ref in other_models(resolved))]
    return ResolvedSetup(model=model, setup=setup, hardware=hardware, notes=tuple(notes),
                         from_files=any(is_location(ref) for ref in refs))


ATTENTION: dict[int, Literal["auto", "eager", "sdpa", "flash_attention_2"]] = {
    job_pb2.ATTENTION_IMPLEMENTATION_UNSPECIFIED: "auto",
    job_pb2.ATTENTION_IMPLEMENTATION_EAGER: "eager",
    job_pb2.ATTENTION_IMPLEMENTATION_SDPA: "sdpa",
    job_pb2.ATTENTION_IMPLEMENTATION_FLASH_ATTENTION_2: "flash_attention_2",
}


def with_speed(setup: Setup, resolved: job_pb2.JobSpec) -> Setup:
    """JobSpec.speed as `Setup` counts it: an option counts where the spec turns it ON (AUTO depends on
    what the worker has installed, so the estimate does not bank on it), padding-free also where the worker
    always uses it (AUTO with packing, for SFT and distillation: trainer_worker.speed)."""
    speed, on = resolved.speed, job_pb2.SPEED_MODE_ON
    packs = (resolved.hyperparameters.packing and resolved.adapter != job_pb2.ADAPTER_TYPE_PROMPT_TUNING
             and resolved.method in (job_pb2.TRAINING_METHOD_SFT, job_pb2.TRAINING_METHOD_DISTILLATION))
    return replace(
        setup,
        liger_kernels=speed.liger_kernels == on,
        attention=ATTENTION.get(speed.attention, "auto"),
        torch_compile=speed.torch_compile == on,
        activation_offloading=speed.activation_offloading == on,
        padding_free=packs and speed.padding_free != job_pb2.SPEED_MODE_OFF,
    )


def to_setup(resolved: job_pb2.JobSpec) -> Setup:
    """The `Setup` of a spec `resolve_spec` returned: every value read from it, none defaulted here.

    Settings of an adapter or method the spec does not use are not filled by the resolver, and the
    arithmetic does not read them either; they keep `Setup`'s placeholders.
    """
    hp, hw = resolved.hyperparameters, resolved.hardware
    precision = PRECISIONS[hp.precision]
    quantization = resolved.quantization
    is_qlora = resolved.adapter == job_pb2.ADAPTER_TYPE_QLORA
    if is_qlora and quantization.compute_dtype in (job_pb2.PRECISION_BF16, job_pb2.PRECISION_FP16):
        precision = PRECISIONS[quantization.compute_dtype]
    setup = Setup(
        adapter=ADAPTERS[resolved.adapter],
        method=METHODS[resolved.method],
        precision=precision,
        optimizer=OPTIMIZERS[hp.optimizer],
        batch_size=hp.batch_size,
        gradient_accumulation_steps=hp.gradient_accumulation_steps,
        max_seq_length=hp.max_seq_length,
        gradient_checkpointing=hp.gradient_checkpointing,
        packing=hp.packing,
        epochs=hp.epochs,
        max_steps=hp.max_steps,
        strategy=STRATEGIES[hw.strategy],
        gpu_count=hw.gpu_count,
        node_count=hw.node_count,
    )
    setup = with_speed(setup, resolved)
    if resolved.adapter in LORA_ADAPTERS:
        lora = resolved.lora
        setup = replace(
            setup,
            lora_rank=lora.rank,
            lora_targets=tuple(lora.target_modules),
            lora_dropout=lora.dropout,
            use_dora=lora.use_dora,
        )
    if is_qlora:
        setup = replace(
            setup,
            quantization_bits=quantization.bits,
            double_quantization=quantization.double_quantization,
        )
    if resolved.adapter == job_pb2.ADAPTER_TYPE_PROMPT_TUNING:
        setup = replace(setup, num_virtual_tokens=resolved.prompt_tuning.num_virtual_tokens)
    if resolved.method == job_pb2.TRAINING_METHOD_GRPO:
        grpo = resolved.grpo
        setup = replace(
            setup,
            num_generations=grpo.num_generations,
            max_completion_length=grpo.max_completion_length,
            kl_beta=grpo.kl_beta,
        )
    return setup
