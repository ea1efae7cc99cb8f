"""Converters from the estimator's and catalog's objects to the tuneforge.v1 estimation messages."""

from __future__ import annotations

from tuneforge.v1 import estimation_pb2, job_pb2, model_pb2

from services.estimation.catalog import CatalogModel
from services.estimation.estimator import Cost, Fit, Hardware, Memory, Time

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MODEL_TYPES = {"llm": model_pb2.MODEL_TYPE_LLM, "vlm": model_pb2.MODEL_TYPE_VLM}
STRATEGIES = {
    "none": job_pb2.DISTRIBUTED_STRATEGY_NONE,
    "ddp": job_pb2.DISTRIBUTED_STRATEGY_DDP,
    "zero1": job_pb2.DISTRIBUTED_STRATEGY_ZERO1,
    "zero2": job_pb2.DISTRIBUTED_STRATEGY_ZERO2,
    "zero2_offload": job_pb2.DISTRIBUTED_STRATEGY_ZERO2_OFFLOAD,
    "zero3": job_pb2.DISTRIBUTED_STRATEGY_ZERO3,
    "zero3_offload": job_pb2.DISTRIBUTED_STRATEGY_ZERO3_OFFLOAD,
    "fsdp": job_pb2.DISTRIBUTED_STRATEGY_FSDP,
}


def hardware_to_proto(hw: Hardware) -> estimation_pb2.HardwareOption:
    return estimation_pb2.HardwareOption(
        gpu_type=hw.gpu_type,
        display_name=hw.display_name,
        memory_bytes=hw.memory_bytes,
        peak_tflops=hw.peak_tflops,
        supports_bf16=hw.supports_bf16,
        hourly_usd=hw.hourly_usd,
        allowed_gpu_counts=list(hw.allowed_gpu_counts),
        min_storage_gb=hw.min_storage_gb,
        max_storage_gb=hw.max_storage_gb,
    )


def model_to_proto(model: CatalogModel) -> estimation_pb2.BaseModel:
    arch = model.architecture
    return estimation_pb2.BaseModel(
        id=model.id,
        family=model.family,
        type=MODEL_TYPES.get(model.model_type, model_pb2.MODEL_TYPE_UNSPECIFIED),
        parameter_count=model.parameter_count,
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads,
        intermediate_size=arch.intermediate_size,
        vocab_size=arch.vocab_size,
        tied_embeddings=arch.tied_embeddings,
        num_experts=arch.num_experts,
        num_experts_per_token=arch.num_experts_per_token,
        max_context_length=model.max_context_length,
        license=model.license,
        head_dim=arch.head_size,
        vision_parameter_count=arch.vision_parameters,
        gated_mlp=arch.gated_mlp,
    )


def int64(value: int) -> int:
    """A byte or token figure as an int64 field holds it: saturated at the int64 bounds.

    Only specs whose fields are each within range but absurd together get there (max_steps x a global
    batch of millions x 131k-token sequences, or a client's tokens_per_epoch near 2**63): the estimate then
    says what is true (it does not fit, it takes forever) instead of failing the call.
    """
    return max(INT64_MIN, min(INT64_MAX, int(value)))


def memory_to_proto(memory: Memory) -> estimation_pb2.MemoryBreakdown:
    return estimation_pb2.MemoryBreakdown(
        weights=int64(memory.weights),
        trainable_parameters=int64(memory.trainable_parameters),
        gradients=int64(memory.gradients),
        optimizer_states=int64(memory.optimizer_states),
        activations=int64(memory.activations),
        logits=int64(memory.logits),
        framework_overhead=int64(memory.framework_overhead),
        total=int64(memory.total),
        reference_weights=int64(memory.reference_weights),
        offloaded_to_cpu=int64(memory.offloaded_to_cpu),
        quantization_constants=int64(memory.quantization_constants),
        transient=int64(memory.transient),
        calibration_adjustment=int64(memory.calibration_adjustment),
    )


def time_to_proto(time: Time) -> estimation_pb2.TimeEstimate:
    return estimation_pb2.TimeEstimate(
        training_tokens=int64(time.training_tokens),
        flops_per_token=time.flops_per_token,
        utilization=time.utilization,
        training_seconds=time.training_seconds,
        overhead_seconds=time.overhead_seconds,
        total_seconds=time.total_seconds,
        tokens_per_second=time.tokens_per_second,
    )


def cost_to_proto(cost: Cost) -> estimation_pb2.CostEstimate:
    return estimation_pb2.CostEstimate(
        hourly_usd=cost.hourly_usd, gpu_count=cost.gpu_count, total_usd=cost.total_usd
    )


def source_of(fit: Fit) -> estimation_pb2.EstimateSource.ValueType:
    calibrated = fit.calibration is not None and fit.calibration.jobs > 0
    return estimation_pb2.ESTIMATE_SOURCE_CALIBRATED if calibrated else estimation_pb2.ESTIMATE_SOURCE_PRIOR


def fit_to_proto(fit: Fit) -> estimation_pb2.HardwareFit:
    """Time, and the cost's total, are left unset when the token count was not known."""
    out = estimation_pb2.HardwareFit(
        gpu_type=fit.hardware.gpu_type,
        gpu_count=fit.gpu_count,
        fits=fit.fits,
        memory_per_gpu=memory_to_proto(fit.memory),
        reason=fit.reason,
        cost=cost_to_proto(fit.cost),
        strategy=STRATEGIES[fit.strategy],
        source=source_of(fit),
        calibration_jobs=fit.calibration.jobs if fit.calibration else 0,
    )
    if fit.time is not None:
        out.time.CopyFrom(time_to_proto(fit.time))
    return out
