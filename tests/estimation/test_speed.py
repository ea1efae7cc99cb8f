"""The estimator knows JobSpec.speed: each option moves the predicted memory and time the way it should
(Liger's fused cross-entropy drops the logits, offloading moves activations to the host, eager attention
adds the seq x seq scores FlashAttention/SDPA never hold; each option's throughput prior applies), and the
spec maps onto the `Setup` as the worker decides (ON counts, AUTO counts as the default, OFF never)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from google.protobuf import json_format
from tuneforge.v1 import job_pb2

from services.estimation.estimator import (
    OFFLOAD_LAYERS_ON_GPU,
    PRIORS,
    Memory,
    Setup,
    evaluate,
    memory_per_gpu,
    speed_factor,
)
from services.estimation.spec import to_setup
from tests.estimation.test_estimator import LLAMA_1B, LLAMA_8B, gpu
from tuneforge_core.spec import resolve_spec

H100 = gpu("nvidia-h100")
BASE = Setup(batch_size=4, max_seq_length=4096)


def _memory(**speed: object) -> tuple[Memory, Memory]:
    return memory_per_gpu(LLAMA_8B, BASE, H100), memory_per_gpu(LLAMA_8B, replace(BASE, **speed), H100)  # type: ignore[arg-type]


def test_liger_kernels_drop_the_logits_memory() -> None:
    plain, liger = _memory(liger_kernels=True)
    assert liger.logits < plain.logits / 10
    assert liger.total < plain.total
    # Everything else is the same.
    assert liger.activations == plain.activations
    assert liger.weights == plain.weights


def test_liger_kernels_leave_methods_that_need_the_logits_alone() -> None:
    """Distillation compares the student's logits with the teacher's: they are held either way."""
    setup = replace(BASE, method="distillation")
    assert (memory_per_gpu(LLAMA_8B, replace(setup, liger_kernels=True), H100).logits
            == memory_per_gpu(LLAMA_8B, setup, H100).logits)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_offloading_moves_activations_to_the_host(checkpointing: bool) -> None:
    setup = replace(BASE, gradient_checkpointing=checkpointing)
    plain = memory_per_gpu(LLAMA_8B, setup, H100)
    offloaded = memory_per_gpu(LLAMA_8B, replace(setup, activation_offloading=True), H100)
    assert offloaded.activations < plain.activations
    assert offloaded.offloaded_to_cpu == plain.activations - offloaded.activations > 0
    assert offloaded.total < plain.total
    if not checkpointing:  # about two layers stay on the GPU
        assert offloaded.activations == pytest.approx(plain.activations * OFFLOAD_LAYERS_ON_GPU / 32)


def test_eager_attention_holds_the_quadratic_scores_and_fused_does_not() -> None:
    def activations(length: int, attention: str) -> int:
        setup = replace(BASE, max_seq_length=length, attention=attention)  # type: ignore[arg-type]
        return memory_per_gpu(LLAMA_1B, setup, H100).activations

    for fused in ("auto", "sdpa", "flash_attention_2"):  # linear in the sequence length
        assert activations(4096, fused) == 2 * activations(2048, fused)
    assert activations(4096, "eager") > activations(4096, "sdpa")
    # Eager grows faster than linearly: the scores are seq x seq per head.
    assert activations(4096, "eager") > 2 * activations(2048, "eager")


def test_each_option_moves_the_time_by_its_prior() -> None:
    tokens, context = 10_000_000, 2048
    plain = evaluate(LLAMA_1B, BASE, H100, tokens, context).time
    assert plain is not None
    for option, change in [({"liger_kernels": True}, "faster"), ({"torch_compile": True}, "faster"),
                           ({"attention": "flash_attention_2"}, "faster"), ({"attention": "eager"}, "slower"),
                           ({"activation_offloading": True}, "slower"), ({"attention": "sdpa"}, "same")]:
        setup = replace(BASE, **option)  # type: ignore[arg-type]
        time = evaluate(LLAMA_1B, setup, H100, tokens, context).time
        assert time is not None
        ratio = plain.training_seconds / time.training_seconds
        assert ratio == pytest.approx(speed_factor(setup)), option
        assert {"faster": ratio > 1, "slower": ratio < 1, "same": ratio == 1}[change], (option, ratio)


def test_the_throughput_priors_are_stated_for_every_option() -> None:
    assert set(PRIORS.speed_throughput) == {"liger_kernels", "flash_attention_2", "eager", "torch_compile",
                                            "activation_offloading", "padding_free"}
    assert speed_factor(BASE) == 1.0


def _setup(speed: dict[str, str], **hp: object) -> Setup:
    spec = json_format.ParseDict({"base_model": "org/model", "hardware": {"gpu_type": "nvidia-h100"},
                                  "hyperparameters": hp, "speed": speed}, job_pb2.JobSpec())
    return to_setup(resolve_spec(spec, require_dataset=False))


def test_the_spec_maps_onto_the_setup() -> None:
    auto = _setup({})
    assert (auto.liger_kernels, auto.attention, auto.torch_compile, auto.activation_offloading,
            auto.padding_free) == (False, "auto", False, False, False)
    on = _setup({"liger_kernels": "SPEED_MODE_ON", "attention": "ATTENTION_IMPLEMENTATION_EAGER",
                 "torch_compile": "SPEED_MODE_ON", "activation_offloading": "SPEED_MODE_ON",
                 "padding_free": "SPEED_MODE_ON"}, packing=True)
    assert (on.liger_kernels, on.attention, on.torch_compile, on.activation_offloading,
            on.padding_free) == (True, "eager", True, True, True)
    assert _setup({}, packing=True).padding_free  # the worker's AUTO with packing
    assert not _setup({"padding_free": "SPEED_MODE_OFF"}, packing=True).padding_free
    off = _setup({"liger_kernels": "SPEED_MODE_OFF", "torch_compile": "SPEED_MODE_OFF"})
    assert not off.liger_kernels and not off.torch_compile
