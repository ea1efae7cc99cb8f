"""Converters from the estimator's and catalog's objects to the tuneforge.v1 estimation messages."""

from __future__ import annotations

from tuneforge.v1 import estimation_pb2, job_pb2

from services.estimation.catalog import CatalogModel
from services.estimation.estimator import Cost, Fit, Hardware, Memory, Time

MODEL_TYPES = {"llm": estimation_pb2.MODEL_TYPE_LLM, "vlm": estimation_pb2.MODEL_TYPE_VLM}
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
        type=MODEL_TYPES.get(model.model_type, estimation_pb2.MODEL_TYPE_UNSPECIFIED),
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


def memory_to_proto(memory: Memory) -> estimation_pb2.MemoryBreakdown:
    return estimation_pb2.MemoryBreakdown(
        weights=memory.weights,
        trainable_parameters=memory.trainable_parameters,
        gradients=memory.gradients,
        optimizer_states=memory.optimizer_states,
        activations=memory.activations,
        logits=memory.logits,
        framework_overhead=memory.framework_overhead,
        total=memory.total,
        reference_weights=memory.reference_weights,
        offloaded_to_cpu=memory.offloaded_to_cpu,
        quantization_constants=memory.quantization_constants,
        transient=memory.transient,
        calibration_adjustment=memory.calibration_adjustment,
    )


def time_to_proto(time: Time) -> estimation_pb2.TimeEstimate:
    return estimation_pb2.TimeEstimate(
        training_tokens=time.training_tokens,
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
