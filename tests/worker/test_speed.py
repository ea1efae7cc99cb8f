"""trainer_worker.speed.resolve_speed: each option AUTO/ON/OFF on each kind of worker (a table of cases), ON
that cannot be honoured failing with DEPENDENCY_ERROR naming spec.speed.<option>, and CreateJob's refusals
(tuneforge_core.spec) naming the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from tuneforge.v1 import job_pb2

from trainer_worker.errors import TrainingError
from trainer_worker.speed import ResolvedSpeed, SpeedHardware, resolve_speed
from tuneforge_core.errors import InvalidArgument
from tuneforge_core.reasons import Reason
from tuneforge_core.spec import resolve_spec

CPU = SpeedHardware(cuda=False, dtype="fp32", model_type="llama")
CPU_NO_COMPILER = SpeedHardware(cuda=False, dtype="fp32", model_type="llama", compiler_available=False)
# A bare GPU worker: CUDA, nothing optional installed.
GPU_BARE = SpeedHardware(cuda=True, capability=(9, 0), dtype="bf16", model_type="llama")
# A GPU worker with liger-kernel and flash-attn.
GPU_FULL = SpeedHardware(cuda=True, capability=(9, 0), dtype="bf16", model_type="llama", liger_installed=True,
                         flash_attn_installed=True)
T4 = SpeedHardware(cuda=True, capability=(7, 5), dtype="fp16", model_type="llama", liger_installed=True,
                   flash_attn_installed=True)
GPU_FP32 = SpeedHardware(cuda=True, capability=(8, 0), dtype="fp32", model_type="llama", liger_installed=True,
                         flash_attn_installed=True)
GPU_GPT2 = SpeedHardware(cuda=True, capability=(9, 0), dtype="bf16", model_type="gpt2", liger_installed=True,
                         flash_attn_installed=True)
NO_SDPA = SpeedHardware(cuda=False, dtype="fp32", model_type="old", supports_sdpa=False)


def spec(method: str = "SFT", speed: dict[str, str] | None = None, **hp: Any) -> job_pb2.JobSpec:
    out = job_pb2.JobSpec(method=getattr(job_pb2, f"TRAINING_METHOD_{method}"), base_model="org/model")
    json_format.ParseDict({"hyperparameters": {"max_seq_length": 2048, **hp}, "speed": speed or {}}, out)
    return out


# (case id, spec, hardware, expected: option -> value)
CASES: list[tuple[str, job_pb2.JobSpec, SpeedHardware, dict[str, Any]]] = [
    ("cpu-auto", spec(), CPU, {"attention": "sdpa", "liger_kernels": False, "torch_compile": False,
                               "activation_offloading": False, "padding_free": False}),
    ("cpu-auto-packing", spec(packing=True), CPU, {"padding_free": True}),
    ("cpu-compile-on", spec(speed={"torch_compile": "SPEED_MODE_ON"}), CPU, {"torch_compile": True}),
    ("cpu-eager", spec(speed={"attention": "ATTENTION_IMPLEMENTATION_EAGER"}), CPU, {"attention": "eager"}),
    ("cpu-model-without-sdpa", spec(), NO_SDPA, {"attention": "eager"}),
    ("gpu-bare-auto", spec(), GPU_BARE, {"attention": "sdpa", "liger_kernels": False}),
    ("gpu-full-auto-sft", spec(), GPU_FULL, {"attention": "flash_attention_2", "liger_kernels": True,
                                             "torch_compile": False, "activation_offloading": False}),
    ("gpu-full-auto-dpo", spec("DPO"), GPU_FULL, {"attention": "flash_attention_2", "liger_kernels": False}),
    ("gpu-full-dpo-liger-on", spec("DPO", {"liger_kernels": "SPEED_MODE_ON"}), GPU_FULL,
     {"liger_kernels": True}),
    ("gpu-full-off", spec(speed={"liger_kernels": "SPEED_MODE_OFF", "padding_free": "SPEED_MODE_OFF",
                                 "attention": "ATTENTION_IMPLEMENTATION_SDPA"}, packing=True), GPU_FULL,
     {"liger_kernels": False, "padding_free": False, "attention": "sdpa"}),
    ("t4-auto", spec(), T4, {"attention": "sdpa", "liger_kernels": True}),
    ("gpu-fp32-auto", spec(), GPU_FP32, {"attention": "sdpa"}),
    ("gpu-unsupported-architecture", spec(), GPU_GPT2, {"liger_kernels": False}),
    ("gpu-long-sequences", spec(max_seq_length=16384), GPU_FULL, {"activation_offloading": True}),
    ("gpu-long-grpo", spec("GRPO", max_seq_length=16384), GPU_FULL, {"activation_offloading": False}),
    ("gpu-offload-on", spec(speed={"activation_offloading": "SPEED_MODE_ON"}), GPU_BARE,
     {"activation_offloading": True}),
    ("gpu-long-offload-off", spec(speed={"activation_offloading": "SPEED_MODE_OFF"}, max_seq_length=16384),
     GPU_FULL, {"activation_offloading": False}),
    ("distillation-packing", spec("DISTILLATION", packing=True), CPU, {"padding_free": True}),
]


@pytest.mark.parametrize(("case", "job", "hw", "expected"), CASES, ids=[c[0] for c in CASES])
def test_resolve_speed(case: str, job: job_pb2.JobSpec, hw: SpeedHardware, expected: dict[str, Any]) -> None:
    resolved = resolve_speed(job, hw)
    got = {option: getattr(resolved, option) for option in expected}
    assert got == expected
    assert set(resolved.reasons) == {"liger_kernels", "attention", "torch_compile", "activation_offloading",
                                     "padding_free"}  # every option says why


FA2 = {"attention": "ATTENTION_IMPLEMENTATION_FLASH_ATTENTION_2"}
REFUSED: list[tuple[str, job_pb2.JobSpec, SpeedHardware, str, str]] = [
    ("liger-on-cpu", spec(speed={"liger_kernels": "SPEED_MODE_ON"}), CPU, "liger_kernels", "no GPU"),
    ("liger-on-not-installed", spec(speed={"liger_kernels": "SPEED_MODE_ON"}), GPU_BARE, "liger_kernels",
     "not installed"),
    ("liger-on-gpt2", spec(speed={"liger_kernels": "SPEED_MODE_ON"}), GPU_GPT2, "liger_kernels", "gpt2"),
    ("fa2-cpu", spec(speed=FA2), CPU, "attention", "no GPU"),
    ("fa2-not-installed", spec(speed=FA2), GPU_BARE, "attention", "flash-attn"),
    ("fa2-t4", spec(speed=FA2), T4, "attention", "7.5"),
    ("fa2-fp32", spec(speed=FA2), GPU_FP32, "attention", "fp32"),
    ("sdpa-unsupported", spec(speed={"attention": "ATTENTION_IMPLEMENTATION_SDPA"}), NO_SDPA, "attention",
     "SDPA"),
    ("compile-no-compiler", spec(speed={"torch_compile": "SPEED_MODE_ON"}), CPU_NO_COMPILER, "torch_compile",
     "compiler"),
    ("offload-cpu", spec(speed={"activation_offloading": "SPEED_MODE_ON"}), CPU, "activation_offloading",
     "no GPU"),
    ("offload-grpo", spec("GRPO", {"activation_offloading": "SPEED_MODE_ON"}), GPU_FULL,
     "activation_offloading", "this method"),
    ("padding-free-without-packing", spec(speed={"padding_free": "SPEED_MODE_ON"}), GPU_FULL, "padding_free",
     "packing"),
]


@pytest.mark.parametrize(("case", "job", "hw", "option", "why"), REFUSED, ids=[c[0] for c in REFUSED])
def test_on_that_cannot_be_honoured_is_a_dependency_error(
    case: str, job: job_pb2.JobSpec, hw: SpeedHardware, option: str, why: str
) -> None:
    with pytest.raises(TrainingError) as caught:
        resolve_speed(job, hw)
    assert caught.value.reason == Reason.DEPENDENCY_ERROR
    assert f"spec.speed.{option}" in caught.value.message and why in caught.value.message


def test_log_line_names_used_options_and_why_the_others_are_not() -> None:
    line = resolve_speed(spec(packing=True), GPU_FULL).log_line()
    used, _, not_used = line.partition(" Not used: ")
    assert used.startswith("Speed options used: attention=flash_attention_2, liger_kernels, padding_free")
    assert "torch_compile (AUTO: not chosen automatically" in not_used
    assert "activation_offloading (AUTO: sequences of 2048 tokens" in not_used


def test_resolved_speed_round_trips_as_a_dict() -> None:
    resolved = resolve_speed(spec(packing=True), GPU_FULL)
    assert ResolvedSpeed.from_dict(resolved.to_dict()) == resolved


def test_detect_on_this_host_matches_torch(tiny_model: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model)
    hw = SpeedHardware.detect(dtype="fp32", model_config=config, model_class=AutoModelForCausalLM)
    assert (hw.model_type, hw.supports_sdpa, hw.supports_flash_attn) == ("llama", True, True)
    assert hw.cuda == torch.cuda.is_available()
    resolved = resolve_speed(spec(), hw)  # AUTO never fails, whatever the host
    assert resolved.attention in ("sdpa", "flash_attention_2", "eager")


# CreateJob: what can be known in advance is INVALID_ARGUMENT naming spec.speed.<field>.
CREATE_REFUSED: list[tuple[dict[str, Any], str, str]] = [
    ({"speed": {"padding_free": "SPEED_MODE_ON"}}, "spec.speed.padding_free", "packing"),
    ({"method": "TRAINING_METHOD_DPO", "speed": {"padding_free": "SPEED_MODE_ON"},
      "hardware": {"gpu_type": "nvidia-h100"}}, "spec.speed.padding_free", "SFT and distillation"),
    ({"method": "TRAINING_METHOD_GRPO", "grpo": {"reward_functions": ["REWARD_FUNCTION_LENGTH"]},
      "speed": {"activation_offloading": "SPEED_MODE_ON"}, "hardware": {"gpu_type": "nvidia-h100"}},
     "spec.speed.activation_offloading", "not TRAINING_METHOD_GRPO"),
    ({"speed": {"activation_offloading": "SPEED_MODE_ON"}}, "spec.speed.activation_offloading", "gpu_type"),
    ({"speed": FA2, "hardware": {"gpu_type": "nvidia-h100"},
      "hyperparameters": {"precision": "PRECISION_FP32"}}, "spec.speed.attention", "PRECISION_FP32"),
    ({"speed": FA2, "hardware": {"gpu_type": "cpu"}}, "spec.speed.attention", "needs a GPU"),
    ({"speed": {"liger_kernels": "SPEED_MODE_ON"}}, "spec.speed.liger_kernels", "CUDA GPUs only"),
    ({"speed": {"torch_compile": 7}}, "spec.speed.torch_compile", ""),
]


@pytest.mark.parametrize(("partial", "field", "why"), CREATE_REFUSED,
                         ids=[c[1] + c[2] for c in CREATE_REFUSED])
def test_create_job_refuses_what_no_worker_could_honour(
    partial: dict[str, Any], field: str, why: str
) -> None:
    job = json_format.ParseDict({"base_model": "org/model", **partial}, job_pb2.JobSpec())
    with pytest.raises(InvalidArgument) as caught:
        resolve_spec(job, require_dataset=False)
    named = [(v.field, v.description) for v in caught.value.violations if v.field == field]
    assert named and why in named[0][1], caught.value.violations


def test_create_job_accepts_speed_options_a_gpu_pool_may_honour() -> None:
    job = json_format.ParseDict({
        "base_model": "org/model", "hardware": {"gpu_type": "nvidia-h100"},
        "hyperparameters": {"packing": True},
        "speed": {**FA2, "liger_kernels": "SPEED_MODE_ON", "torch_compile": "SPEED_MODE_ON",
                  "activation_offloading": "SPEED_MODE_ON", "padding_free": "SPEED_MODE_ON"},
    }, job_pb2.JobSpec())
    out = resolve_spec(job, require_dataset=False)
    assert out.speed == job.speed  # nothing to fill in: unset is AUTO
    assert resolve_spec(out, require_dataset=False) == out
