"""The estimator's arithmetic against numbers worked out by hand (each expected value is written as the sum
it comes from), and against the figures competitors publish (seeds/001: VRAM table and cost examples)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from services.estimation.catalog import Catalog
from services.estimation.estimator import (
    GIB,
    PRIORS,
    Architecture,
    Hardware,
    Setup,
    activation_elements_per_token_layer,
    evaluate,
    flops_per_token,
    lora_parameters,
    lora_targets,
    memory_per_gpu,
    quantized_weight_bytes,
    smallest_fit,
    trainable_parameters,
    training_tokens,
)

CATALOG = Catalog.load()


def model(model_id: str) -> Architecture:
    entry = CATALOG.model(model_id)
    assert entry is not None
    return entry.architecture


def gpu(gpu_type: str) -> Hardware:
    hardware = CATALOG.hardware(gpu_type)
    assert hardware is not None
    return hardware


MISTRAL_7B = model("mistralai/Mistral-7B-v0.3")
LLAMA_8B = model("meta-llama/Llama-3.1-8B")
LLAMA_1B = model("meta-llama/Llama-3.2-1B")
A100_40, A100_80, T4 = gpu("nvidia-a100-40gb"), gpu("nvidia-a100-80gb"), gpu("nvidia-t4")
TINY = Architecture(num_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=128, vocab_size=1000, tied_embeddings=True)


def test_every_catalog_architecture_adds_up_to_its_published_parameter_count() -> None:
    for model in CATALOG.models():
        assert model.architecture.parameter_count == model.parameter_count, model.id


def test_llama_3_1_8b_parameter_count_by_hand() -> None:
    embeddings = 128256 * 4096
    attention = 2 * 4096 * 4096 + 2 * 4096 * (8 * 128)  # q, o full width; k, v at 8 KV heads
    mlp = 3 * 4096 * 14336
    layer = attention + mlp + 2 * 4096  # two RMSNorms
    assert LLAMA_8B.parameter_count == 32 * layer + 2 * embeddings + 4096 == 8_030_261_248


def test_lora_trainable_parameters_by_hand() -> None:
    rank = 16
    # all-linear: r x (in + out) for q, o (4096 -> 4096), k, v (4096 -> 1024), gate, up, down (4096 <-> 14336)
    per_layer = rank * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))
    assert per_layer == 1_310_720
    assert lora_parameters(LLAMA_8B, rank, ("all-linear",)) == 32 * per_layer == 41_943_040
    # q_proj + v_proj only: the 6,815,744 PEFT prints for Llama-3-8B at r=16.
    assert lora_parameters(LLAMA_8B, rank, ("q_proj", "v_proj")) == 32 * rank * (8192 + 5120) == 6_815_744
    # DoRA adds one magnitude per output feature of each adapted matrix.
    dora = lora_parameters(LLAMA_8B, rank, ("q_proj", "v_proj"), use_dora=True)
    assert dora == 6_815_744 + 32 * (4096 + 1024)
    assert lora_targets(LLAMA_8B, ("qkv_proj", "mlp.fc9")) == ({"q_proj", "k_proj", "v_proj"}, ["mlp.fc9"])
    assert trainable_parameters(LLAMA_8B, Setup(adapter="prompt_tuning", num_virtual_tokens=20)) == 20 * 4096
    assert trainable_parameters(LLAMA_8B, Setup(adapter="full")) == 8_030_261_248


def test_7b_weights_by_method_against_the_seed_vram_table() -> None:
    """Seed 001 gives 7B: QLoRA ~4GB, LoRA ~8GB, Full ~28GB. Those are bytes per parameter of ~0.5, ~1 and
    ~4 applied to the weights alone.

    - QLoRA agrees: NF4 at 4 bits plus its quantisation constants, embeddings and lm_head left in 16-bit,
      comes to 4.14 GB.
    - LoRA differs: the seed's 8GB is an 8-bit base; TuneForge's worker loads the base in bf16 for LoRA,
      so the weights alone are 14.5 GB.
    - Full differs most: 28GB is fp32 weights with nothing else. Training also holds gradients and AdamW's
      two moments; with mixed precision that is 16 bytes per parameter (ZeRO paper): 116 GB before any
      activation, in line with the seed's own "4-8x model size total".
    Activations come on top in every case and dominate at the default batch 4 x 2048 tokens.
    """
    n = 7_248_023_552
    assert MISTRAL_7B.parameter_count == n
    lora = memory_per_gpu(MISTRAL_7B, Setup(adapter="lora"), A100_80)
    assert lora.weights == 2 * n == 14_496_047_104

    quantized = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)  # the layers' linears
    rest = n - quantized  # embeddings, lm_head, norms: 16-bit
    nf4_double_quant = quantized // 2 + quantized / 64 * (1 + 4 / 256) + 2 * rest
    assert quantized_weight_bytes(MISTRAL_7B, 4, True) == int(nf4_double_quant) == 4_137_820_160
    assert quantized_weight_bytes(MISTRAL_7B, 4, False) == quantized // 2 + quantized // 64 * 4 + 2 * rest
    qlora = memory_per_gpu(MISTRAL_7B, Setup(adapter="qlora"), A100_80)
    assert qlora.weights == 4_137_820_160
    assert qlora.weights == pytest.approx(4e9, rel=0.05)  # the seed's ~4GB

    full = memory_per_gpu(MISTRAL_7B, Setup(adapter="full"), A100_80)
    states = full.weights + full.trainable_parameters + full.gradients + full.optimizer_states
    assert (full.weights, full.trainable_parameters, full.gradients, full.optimizer_states) == (
        2 * n, 4 * n, 2 * n, 8 * n)
    assert states == 16 * n == 115_968_376_832
    assert states > 4 * 28e9  # far beyond the seed's 28GB: optimizer states are most of it


def test_adapter_states_and_optimizers() -> None:
    trainable = 41_943_040  # rank-16 all-linear LoRA on a Mistral-7B
    lora = memory_per_gpu(MISTRAL_7B, Setup(adapter="lora"), A100_80)
    assert (lora.trainable_parameters, lora.gradients, lora.optimizer_states) == (
        4 * trainable, 4 * trainable, 8 * trainable)  # fp32 adapter, fp32 grads, AdamW's two moments
    n = MISTRAL_7B.parameter_count
    for optimizer, per_parameter in (("adamw_8bit", 2), ("paged_adamw", 8), ("sgd", 0)):
        memory = memory_per_gpu(MISTRAL_7B, Setup(adapter="full", optimizer=optimizer), A100_80)
        assert memory.optimizer_states == per_parameter * n
    fp32 = memory_per_gpu(MISTRAL_7B, Setup(adapter="full", precision="fp32"), A100_80)
    assert (fp32.weights, fp32.trainable_parameters, fp32.gradients) == (4 * n, 0, 4 * n)  # no master copy


def test_activations_and_logits_by_hand() -> None:
    # Per token and layer: 4 x hidden (residuals, norm outputs) + 2 x attention width (q, attention output)
    # + 2 x kv width (k, v) + 4 x intermediate (gate, up, activation, product) = 960 elements.
    base = 4 * 64 + 2 * 64 + 2 * 32 + 4 * 128
    assert activation_elements_per_token_layer(TINY, Setup(adapter="full")) == base == 960
    # LoRA (dropout 0.05) also keeps each adapted module's input: q, k, v, gate, up, o read 64; down 128.
    lora_extra = 6 * 64 + 128
    assert activation_elements_per_token_layer(TINY, Setup()) == base + lora_extra

    setup = Setup(batch_size=2, max_seq_length=100)
    tokens = 2 * 100
    memory = memory_per_gpu(TINY, setup, A100_80)
    assert memory.activations == tokens * 2 * (base + lora_extra) * 2  # tokens x layers x elements x bf16
    assert memory.logits == tokens * 1000 * 4  # fp32 logits
    checkpointed = memory_per_gpu(TINY, replace(setup, gradient_checkpointing=True), A100_80)
    assert checkpointed.activations == tokens * (2 * 64 * 2 + (base + lora_extra) * 2)
    fp32 = memory_per_gpu(TINY, replace(setup, adapter="full", precision="fp32"), A100_80)
    assert fp32.activations == tokens * 2 * base * 4
    dpo = memory_per_gpu(TINY, replace(setup, method="dpo"), A100_80)
    assert dpo.activations == 2 * memory.activations  # chosen and rejected sequences
    assert memory.framework_overhead == GIB and memory.total == sum(
        getattr(memory, f) for f in ("weights", "trainable_parameters", "gradients", "optimizer_states",
                                     "activations", "logits", "framework_overhead"))


def test_zero_sharding_divides_the_sharded_parts() -> None:
    n = MISTRAL_7B.parameter_count
    base = Setup(adapter="full", gpu_count=8, gradient_checkpointing=True)
    ddp = memory_per_gpu(MISTRAL_7B, replace(base, strategy="ddp"), A100_80)
    zero1 = memory_per_gpu(MISTRAL_7B, replace(base, strategy="zero1"), A100_80)
    zero2 = memory_per_gpu(MISTRAL_7B, replace(base, strategy="zero2"), A100_80)
    zero3 = memory_per_gpu(MISTRAL_7B, replace(base, strategy="zero3"), A100_80)
    offload = memory_per_gpu(MISTRAL_7B, replace(base, strategy="zero3_offload"), A100_80)
    assert (ddp.weights, ddp.trainable_parameters, ddp.gradients, ddp.optimizer_states) == (
        2 * n, 4 * n, 2 * n, 8 * n)
    assert (zero1.weights, zero1.trainable_parameters, zero1.gradients, zero1.optimizer_states) == (
        2 * n, 4 * n // 8, 2 * n, 8 * n // 8)
    assert zero2.gradients == 2 * n // 8 and zero2.weights == 2 * n
    assert (zero3.weights, zero3.gradients) == (2 * n // 8, 2 * n // 8)
    assert (offload.optimizer_states, offload.trainable_parameters) == (0, 0)
    assert not ddp.total <= A100_80.memory_bytes and zero3.total <= A100_80.memory_bytes
    # The fewest A100s that take a full 7B fine-tune with ZeRO-3 (and checkpointing).
    # Two: 16 bytes x 7.25B / 2 = 54 GiB of states, plus checkpointed activations, logits and overhead.
    fit = smallest_fit(MISTRAL_7B, replace(base, strategy="zero3"), A100_80, None)
    assert fit.fits and fit.gpu_count == 2
    m = fit.memory
    assert m.total == 16 * n // 2 + m.activations + m.logits + m.framework_overhead


def test_flops_per_token_by_hand() -> None:
    # Parameters a token multiplies through: the layers' linears and the lm_head (not the lookup).
    matmul = 16 * (2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192) + 128256 * 2048
    assert LLAMA_1B.matmul_parameters == matmul == 1_235_746_816
    context = 1024
    forward = 2 * matmul + 2 * 16 * context * 2048  # plus causal attention over the context
    assert flops_per_token(LLAMA_1B, Setup(adapter="full"), context) == 3 * forward  # 6N + attention
    lora = lora_parameters(LLAMA_1B, 16, ("all-linear",))
    assert flops_per_token(LLAMA_1B, Setup(), context) == 2 * forward + 6 * lora  # ~4N: frozen base
    assert flops_per_token(LLAMA_1B, Setup(gradient_checkpointing=True), context) == 3 * forward + 6 * lora
    assert flops_per_token(LLAMA_1B, Setup(method="dpo"), context) == 3 * forward + 6 * lora  # + reference


def test_time_and_cost_by_hand() -> None:
    setup = Setup()  # LoRA, one GPU
    tokens, context = 10_000_000, 1024
    fit = evaluate(LLAMA_1B, setup, A100_40, tokens, context)
    per_token = flops_per_token(LLAMA_1B, setup, context)
    training = tokens * per_token / (312e12 * 0.35)  # peak x the LoRA utilisation prior
    overhead = 0.2 * training + 60 + 2 * 1_235_814_400 / (250 * 1024**2)
    assert fit.time is not None
    assert fit.time.training_seconds == pytest.approx(training) == pytest.approx(471.1, abs=0.1)
    assert fit.time.overhead_seconds == pytest.approx(overhead)
    assert fit.cost.total_usd == pytest.approx((training + overhead) / 3600 * 3.30)
    assert fit.fits and fit.reason == ""

    # Two GPUs: twice the peak at 90% scaling efficiency, twice the hourly rate.
    two = evaluate(LLAMA_1B, replace(setup, gpu_count=2, strategy="ddp"), A100_40, tokens, context)
    assert two.time is not None
    assert two.time.training_seconds == pytest.approx(training / (2 * 0.9))
    assert two.cost.gpu_count == 2 and two.cost.hourly_usd == 3.30


def test_training_tokens() -> None:
    assert training_tokens(Setup(), 1_000_000, None) == 3 * 1_000_000
    # 100 examples cannot hold more than 100 x 2048 tokens after truncation.
    assert training_tokens(Setup(), 1_000_000, 100) == 3 * 100 * 2048
    # max_steps: steps x batch x accumulation x GPUs x mean example length.
    steps = Setup(max_steps=100, gradient_accumulation_steps=2)
    assert training_tokens(steps, 50_000, 100) == 100 * 4 * 2 * 1 * 500
    assert training_tokens(replace(steps, packing=True), 50_000, 100) == 100 * 4 * 2 * 2048
    grpo = Setup(method="grpo", epochs=1, num_generations=4, max_completion_length=256)
    assert training_tokens(grpo, 10_000, 100) == 4 * (10_000 + 100 * 256)


def test_the_seed_cost_examples_are_of_the_same_order() -> None:
    """Seed 001: "7B LoRA, 1K examples, 3 epochs, T4, ~1h, ~$1". A 7B LoRA does not fit a T4's 15 GiB by our
    arithmetic (bf16 weights alone are 13.5 GiB), so we compare with what does fit there, QLoRA with
    gradient checkpointing, at ~512 tokens an example. The seed's "7B Full, A100 40GB, ~4h, ~$13" gives
    the same $3.30/h we price an A100 40GB at; a full 7B fine-tune does not fit one 40GB card (116 GB of
    states)."""
    setup = Setup(adapter="qlora", gradient_checkpointing=True, batch_size=1)
    fit = evaluate(MISTRAL_7B, setup, T4, training_tokens(setup, 1000 * 512, 1000), 512)
    assert fit.fits and fit.time is not None
    assert 0.5 <= fit.time.total_seconds / 3600 <= 2.0
    assert 0.5 <= fit.cost.total_usd <= 2.0
    assert not evaluate(MISTRAL_7B, Setup(adapter="lora"), T4, None).fits
    assert not evaluate(MISTRAL_7B, Setup(adapter="full"), A100_40, None).fits
    assert A100_40.hourly_usd * 4 == pytest.approx(13.2)
    assert PRIORS.overhead_fraction == 0.2  # the seed's "20-30% for setup, evaluation and export"
