"""Multi-node estimates (hardware.node_count > 1): memory shards over every node's GPUs, and the time adds
the inter-node traffic of the strategy at the hardware's stated bandwidth, which the notes say. The unit
tests work the traffic out by hand; the service test reads the note through the real gRPC API."""

from __future__ import annotations

from dataclasses import replace

import pytest
from tuneforge.v1 import estimation_service_pb2, job_pb2

from services.estimation.catalog import Catalog
from services.estimation.estimator import (
    PRECISION_BYTES,
    Architecture,
    Hardware,
    Setup,
    Strategy,
    evaluate,
    inter_node_bytes,
    memory_per_gpu,
    multi_node_note,
    trainable_parameters,
)
from tests.estimation.conftest import ORG, EstimationStack

CATALOG = Catalog.load()
TOKENS, CONTEXT = 50_000_000, 2048


def gpu(gpu_type: str) -> Hardware:
    hardware = CATALOG.hardware(gpu_type)
    assert hardware is not None
    return hardware


def model(model_id: str) -> Architecture:
    entry = CATALOG.model(model_id)
    assert entry is not None
    return entry.architecture


H100, A100_80, T4 = gpu("nvidia-h100"), gpu("nvidia-a100-80gb"), gpu("nvidia-t4")
LLAMA_8B = model("meta-llama/Llama-3.1-8B")
FULL_ZERO3 = Setup(adapter="full", strategy="zero3", gpu_count=8, gradient_checkpointing=True)


def test_the_catalog_states_each_gpus_inter_node_bandwidth() -> None:
    """400 Gb/s InfiniBand for H100-class nodes, 100 Gb/s Ethernet for the rest (catalog/hardware.json)."""
    for hardware in CATALOG.gpus():
        if hardware.gpu_type in ("nvidia-h100", "nvidia-h200"):
            assert (hardware.inter_node_gbps, hardware.inter_node_network) == (400.0, "InfiniBand NDR")
        else:
            assert (hardware.inter_node_gbps, hardware.inter_node_network) == (100.0, "Ethernet")


@pytest.mark.parametrize("strategy", ["zero3", "fsdp", "zero3_offload"])
def test_two_nodes_shard_memory_over_all_sixteen_gpus(strategy: Strategy) -> None:
    one = memory_per_gpu(LLAMA_8B, replace(FULL_ZERO3, strategy=strategy), H100)
    two = memory_per_gpu(LLAMA_8B, replace(FULL_ZERO3, strategy=strategy, node_count=2), H100)
    assert two.total < one.total
    # The weights are split 16 ways instead of 8.
    assert two.weights == pytest.approx(one.weights / 2, rel=1e-6)
    # Without sharding (DDP) every GPU holds the whole model: a second node saves no memory.
    ddp = Setup(adapter="lora", strategy="ddp", gpu_count=8)
    assert memory_per_gpu(LLAMA_8B, replace(ddp, node_count=2), H100) == memory_per_gpu(LLAMA_8B, ddp, H100)


def test_inter_node_bytes_by_hand() -> None:
    n, width = LLAMA_8B.parameter_count, PRECISION_BYTES["bf16"]
    # ZeRO-3 with checkpointing, 2 nodes: half of the weights cross the network three times (forward,
    # recomputed forward, backward) and half of the gradients once, every micro-batch.
    per_micro, per_step = inter_node_bytes(LLAMA_8B, replace(FULL_ZERO3, node_count=2), H100)
    assert per_micro == pytest.approx(0.5 * (3 * n * width + n * width))
    assert per_step == 0
    # 4 nodes: (4 - 1) / 4 of it.
    four, _ = inter_node_bytes(LLAMA_8B, replace(FULL_ZERO3, node_count=4), H100)
    assert four == pytest.approx(0.75 * (3 * n * width + n * width))
    # DDP with LoRA: one all-reduce of the adapter's gradients per optimizer step.
    lora = Setup(adapter="lora", strategy="ddp", gpu_count=8, node_count=2)
    adapter = trainable_parameters(LLAMA_8B, lora)
    assert inter_node_bytes(LLAMA_8B, lora, H100) == pytest.approx((0, 0.5 * 2 * adapter * width))
    # ZeRO-2: gradients reduce-scattered each micro-batch, updated parameters gathered each step.
    zero2 = replace(FULL_ZERO3, strategy="zero2", node_count=2)
    assert inter_node_bytes(LLAMA_8B, zero2, H100) == pytest.approx((0.5 * n * width, 0.5 * n * width))
    # One node: nothing crosses a network.
    assert inter_node_bytes(LLAMA_8B, FULL_ZERO3, H100) == (0, 0)


@pytest.mark.parametrize("hardware", [H100, A100_80], ids=lambda h: h.gpu_type)
def test_two_nodes_train_faster_than_one_but_not_twice_as_fast(hardware: Hardware) -> None:
    one = evaluate(LLAMA_8B, FULL_ZERO3, hardware, TOKENS, CONTEXT)
    two = evaluate(LLAMA_8B, replace(FULL_ZERO3, node_count=2), hardware, TOKENS, CONTEXT)
    assert one.time is not None and two.time is not None
    assert one.time.communication_seconds == 0
    assert 0 < two.time.communication_seconds < two.time.training_seconds
    # Twice the GPUs compute in half the time; the network's share is on top of that half.
    assert two.time.training_seconds == pytest.approx(
        one.time.training_seconds / 2 + two.time.communication_seconds)
    assert one.time.training_seconds / 2 < two.time.training_seconds < one.time.training_seconds
    assert two.time.total_seconds < one.time.total_seconds
    assert two.time.tokens_per_second == pytest.approx(TOKENS / two.time.training_seconds)
    # Twice the GPUs billed.
    assert two.cost.gpu_count == 16 and one.cost.gpu_count == 8


def test_the_traffic_takes_the_time_the_stated_bandwidth_gives() -> None:
    """Four times the bandwidth, a quarter of the communication time (same GPU otherwise)."""
    setup = replace(FULL_ZERO3, node_count=2)
    slow = evaluate(LLAMA_8B, setup, replace(H100, inter_node_gbps=100.0), TOKENS, CONTEXT)
    fast = evaluate(LLAMA_8B, setup, H100, TOKENS, CONTEXT)
    assert slow.time is not None and fast.time is not None
    assert slow.time.communication_seconds == pytest.approx(4 * fast.time.communication_seconds)
    # By hand: micro-batches over the job x bytes each / (400 Gb/s in bytes).
    per_micro, _ = inter_node_bytes(LLAMA_8B, setup, H100)
    micro_batches = TOKENS / (16 * setup.batch_size * CONTEXT)
    assert fast.time.communication_seconds == pytest.approx(micro_batches * per_micro / (400e9 / 8))


def test_the_note_states_the_sharding_and_the_bandwidth() -> None:
    setup = replace(FULL_ZERO3, node_count=2)
    fit = evaluate(LLAMA_8B, setup, H100, TOKENS, CONTEXT)
    note = multi_node_note(setup, fit)
    assert note is not None and fit.time is not None
    assert note.startswith(
        "2 nodes x 8 GPUs: weights, gradients and optimizer states sharded over all 16 GPUs")
    assert "400 Gb/s per node (InfiniBand NDR)" in note
    assert f"{fit.time.communication_seconds:.0f} s of the {fit.time.training_seconds:.0f} s" in note
    ddp = Setup(strategy="ddp", gpu_count=4, node_count=3)
    note = multi_node_note(ddp, evaluate(LLAMA_8B, ddp, T4, None))
    assert note == ("3 nodes x 4 GPUs: no sharding (each GPU holds a copy); inter-node bandwidth assumed "
                    "100 Gb/s per node (Ethernet), its traffic not overlapped with computation")
    assert multi_node_note(FULL_ZERO3, evaluate(LLAMA_8B, FULL_ZERO3, H100, TOKENS)) is None


async def test_the_service_notes_the_multi_node_assumptions(estimation_stack: EstimationStack) -> None:
    spec = job_pb2.JobSpec(base_model="meta-llama/Llama-3.1-8B", dataset="support-chats",
                           adapter=job_pb2.ADAPTER_TYPE_FULL)
    spec.hyperparameters.gradient_checkpointing = True
    spec.hardware.gpu_type = "nvidia-h100"
    spec.hardware.gpu_count = 8
    spec.hardware.strategy = job_pb2.DISTRIBUTED_STRATEGY_ZERO3
    one = await estimation_stack.estimation.EstimateJob(
        estimation_service_pb2.EstimateJobRequest(organization=ORG, spec=spec, tokens_per_epoch=10_000_000))
    spec.hardware.node_count = 2
    two = await estimation_stack.estimation.EstimateJob(
        estimation_service_pb2.EstimateJobRequest(organization=ORG, spec=spec, tokens_per_epoch=10_000_000))
    assert not any("inter-node" in note for note in one.notes)
    (note,) = [note for note in two.notes if "inter-node" in note]
    assert "2 nodes x 8 GPUs" in note and "400 Gb/s" in note
    assert two.estimate.gpu_count == 16
    assert two.estimate.memory_per_gpu.total < one.estimate.memory_per_gpu.total
    assert one.estimate.time.training_seconds / 2 < two.estimate.time.training_seconds \
        < one.estimate.time.training_seconds
    # ValidateHardware says the same of the requested configuration.
    request = estimation_service_pb2.ValidateHardwareRequest(organization=ORG, spec=spec,
                                                             tokens_per_epoch=10_000_000)
    check = await estimation_stack.estimation.ValidateHardware(request)
    assert any("inter-node bandwidth assumed 400 Gb/s" in note for note in check.notes)
