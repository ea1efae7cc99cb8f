"""Job spec validation: defaults filled, every bad field named."""

from __future__ import annotations

import pytest
from tuneforge.v1 import dataset_pb2, job_pb2

from tuneforge_core.errors import InvalidArgument
from tuneforge_core.spec import check_dataset_fit, resolve_spec


def valid_spec() -> job_pb2.JobSpec:
    return job_pb2.JobSpec(base_model="meta-llama/Llama-3.2-1B-Instruct", dataset="ds_x")


def fields_of(err: InvalidArgument) -> set[str]:
    return {v.field for v in err.violations}


def test_defaults_are_filled_in() -> None:
    spec = resolve_spec(valid_spec())
    assert spec.method == job_pb2.TRAINING_METHOD_SFT
    assert spec.adapter == job_pb2.ADAPTER_TYPE_LORA
    assert (spec.lora.rank, spec.lora.alpha, list(spec.lora.target_modules)) == (16, 32, ["all-linear"])
    hp = spec.hyperparameters
    assert (hp.epochs, hp.batch_size, hp.learning_rate, hp.max_seq_length) == (3, 4, 2e-4, 2048)
    assert hp.lr_scheduler == job_pb2.LR_SCHEDULER_COSINE and hp.optimizer == job_pb2.OPTIMIZER_ADAMW
    assert spec.hardware.gpu_count == 1 and spec.hardware.strategy == job_pb2.DISTRIBUTED_STRATEGY_NONE


def test_user_values_are_kept() -> None:
    spec = valid_spec()
    spec.lora.rank = 8
    spec.hyperparameters.learning_rate = 1e-3
    resolved = resolve_spec(spec)
    assert resolved.lora.rank == 8 and resolved.lora.alpha == 16
    assert resolved.hyperparameters.learning_rate == 1e-3


def test_full_fine_tuning_gets_a_lower_learning_rate() -> None:
    spec = valid_spec()
    spec.adapter = job_pb2.ADAPTER_TYPE_FULL
    assert resolve_spec(spec).hyperparameters.learning_rate == 2e-5


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda s: setattr(s.lora, "rank", 0), "spec.lora.rank"),
        (lambda s: setattr(s.lora, "rank", 512), "spec.lora.rank"),
        (lambda s: setattr(s.lora, "dropout", 0.9), "spec.lora.dropout"),
        (lambda s: s.lora.target_modules.append("bad module!"), "spec.lora.target_modules[0]"),
        (lambda s: setattr(s.hyperparameters, "learning_rate", 0.5), "spec.hyperparameters.learning_rate"),
        (lambda s: setattr(s.hyperparameters, "epochs", 0), "spec.hyperparameters.epochs"),
        (lambda s: setattr(s.hyperparameters, "batch_size", 0), "spec.hyperparameters.batch_size"),
        (lambda s: setattr(s.hyperparameters, "max_seq_length", 8), "spec.hyperparameters.max_seq_length"),
        (lambda s: setattr(s.hyperparameters, "weight_decay", -1), "spec.hyperparameters.weight_decay"),
        (lambda s: setattr(s.hyperparameters, "adam_beta1", 1.0), "spec.hyperparameters.adam_beta1"),
        (lambda s: setattr(s.hardware, "gpu_count", 9), "spec.hardware.gpu_count"),
        (lambda s: setattr(s, "base_model", ""), "spec.base_model"),
        (lambda s: setattr(s, "base_model", "not a model"), "spec.base_model"),
        (lambda s: setattr(s, "dataset", ""), "spec.dataset"),
        (lambda s: setattr(s, "method", 99), "spec.method"),
        (lambda s: setattr(s, "adapter", 99), "spec.adapter"),
    ],
)
def test_bad_fields_are_named(mutate, field: str) -> None:
    spec = valid_spec()
    mutate(spec)
    with pytest.raises(InvalidArgument) as info:
        resolve_spec(spec)
    assert field in fields_of(info.value)
    assert info.value.code.name == "INVALID_ARGUMENT"


def test_every_problem_is_reported_at_once() -> None:
    spec = valid_spec()
    spec.lora.rank = 0
    spec.hyperparameters.epochs = 0
    spec.hyperparameters.learning_rate = 1.0
    with pytest.raises(InvalidArgument) as info:
        resolve_spec(spec)
    assert {
        "spec.lora.rank",
        "spec.hyperparameters.epochs",
        "spec.hyperparameters.learning_rate",
    } <= fields_of(info.value)


@pytest.mark.parametrize("learning_rate", [-1.0, 0.5, float("nan"), float("inf")])
def test_a_bad_learning_rate_is_named_alone(learning_rate: float) -> None:
    """min_learning_rate, left to its default (a tenth of learning_rate), is not also refused for it."""
    spec = valid_spec()
    spec.hyperparameters.learning_rate = learning_rate
    with pytest.raises(InvalidArgument) as info:
        resolve_spec(spec)
    assert fields_of(info.value) == {"spec.hyperparameters.learning_rate"}


def test_min_learning_rate_is_checked_against_a_valid_learning_rate_and_on_its_own() -> None:
    spec = valid_spec()
    spec.hyperparameters.learning_rate = 1e-4
    spec.hyperparameters.min_learning_rate = 2e-4
    with pytest.raises(InvalidArgument) as info:
        resolve_spec(spec)
    assert fields_of(info.value) == {"spec.hyperparameters.min_learning_rate"}
    # With learning_rate wrong too, a min_learning_rate the caller set is still judged on its own.
    spec.hyperparameters.learning_rate = -1.0
    spec.hyperparameters.min_learning_rate = -1e-5
    with pytest.raises(InvalidArgument) as info:
        resolve_spec(spec)
    assert fields_of(info.value) == {"spec.hyperparameters.learning_rate",
                                     "spec.hyperparameters.min_learning_rate"}
    spec.hyperparameters.min_learning_rate = 1e-5
    with pytest.raises(InvalidArgument) as info:
        resolve_spec(spec)
    assert fields_of(info.value) == {"spec.hyperparameters.learning_rate"}


def test_warmup_steps_and_ratio_are_exclusive() -> None:
    spec = valid_spec()
    spec.hyperparameters.warmup_steps = 10
    spec.hyperparameters.warmup_ratio = 0.1
    with pytest.raises(InvalidArgument) as info:
        resolve_spec(spec)
    assert "spec.hyperparameters.warmup_ratio" in fields_of(info.value)


def test_keeping_optimizer_state_is_an_output_option_off_by_default() -> None:
    assert not resolve_spec(valid_spec()).output.keep_optimizer_state
    spec = valid_spec()
    spec.output.keep_optimizer_state = True
    assert resolve_spec(spec).output.keep_optimizer_state


def test_merging_needs_lora() -> None:
    spec = valid_spec()
    spec.adapter = job_pb2.ADAPTER_TYPE_FULL
    spec.output.merge_adapter = True
    with pytest.raises(InvalidArgument) as info:
        resolve_spec(spec)
    assert "spec.output.merge_adapter" in fields_of(info.value)


@pytest.mark.parametrize(
    "model", ["org/name", "/abs/path/model", "file:///abs/path/model", "s3://bucket/models/x"]
)
def test_model_forms_accepted(model: str) -> None:
    """The form only: which paths and URIs a deployment lets an organization use is
    tuneforge_core.models' rule (tests/core/test_models.py), applied at CreateJob and by the worker."""
    spec = valid_spec()
    spec.base_model = model
    assert resolve_spec(spec).base_model == model


@pytest.mark.parametrize("model", ["./rel", "../../etc", "file://host/etc", "gpt2"])
def test_relative_and_malformed_models_are_refused(model: str) -> None:
    spec = valid_spec()
    spec.base_model = model
    with pytest.raises(InvalidArgument) as info:
        resolve_spec(spec)
    assert fields_of(info.value) == {"spec.base_model"}


@pytest.mark.parametrize("gpu_type", ["", "cpu", "CPU"])
@pytest.mark.parametrize("precision", [job_pb2.PRECISION_FP16, job_pb2.PRECISION_BF16])
def test_half_precision_is_refused_on_a_spec_that_may_train_on_a_cpu(gpu_type: str, precision: int) -> None:
    spec = valid_spec()
    spec.hardware.gpu_type = gpu_type
    spec.hyperparameters.precision = precision  # type: ignore[assignment]
    with pytest.raises(InvalidArgument) as info:
        resolve_spec(spec)
    assert fields_of(info.value) == {"spec.hyperparameters.precision"}
    assert "needs a GPU" in info.value.violations[0].description

    qlora = valid_spec()
    qlora.hardware.gpu_type = gpu_type
    qlora.adapter = job_pb2.ADAPTER_TYPE_QLORA
    qlora.quantization.compute_dtype = precision  # type: ignore[assignment]
    with pytest.raises(InvalidArgument) as info:
        resolve_spec(qlora)
    assert fields_of(info.value) == {"spec.quantization.compute_dtype"}


def test_half_precision_on_a_named_gpu_and_fp32_anywhere_are_accepted() -> None:
    spec = valid_spec()
    spec.hardware.gpu_type = "nvidia-t4"
    spec.hyperparameters.precision = job_pb2.PRECISION_FP16
    assert resolve_spec(spec).hyperparameters.precision == job_pb2.PRECISION_FP16
    cpu = valid_spec()
    cpu.hardware.gpu_type = "cpu"
    cpu.hyperparameters.precision = job_pb2.PRECISION_FP32
    assert resolve_spec(cpu).hyperparameters.precision == job_pb2.PRECISION_FP32
    assert resolve_spec(valid_spec()).hyperparameters.precision == job_pb2.PRECISION_UNSPECIFIED


def spec_for(method: str, adapter: str = "LORA", **fields: object) -> job_pb2.JobSpec:
    spec = valid_spec()
    spec.method = job_pb2.TrainingMethod.Value(f"TRAINING_METHOD_{method}")
    spec.adapter = job_pb2.AdapterType.Value(f"ADAPTER_TYPE_{adapter}")
    if method == "GRPO":
        spec.grpo.reward_functions.append(job_pb2.REWARD_FUNCTION_JSON_VALID)
    if method == "DISTILLATION":
        spec.distillation.teacher_model = "org/teacher"
    for name, value in fields.items():
        spec.MergeFrom(job_pb2.JobSpec(**{name: value}))
    return spec


@pytest.mark.parametrize(
    ("method", "adapter"),
    [(m, a) for m in ("SFT", "DPO", "GRPO", "DISTILLATION", "ORPO", "KTO") for a in ("LORA", "QLORA", "FULL")]
    + [("SFT", "PROMPT_TUNING"), ("DISTILLATION", "PROMPT_TUNING")],
)
def test_every_trained_combination_is_accepted(method: str, adapter: str) -> None:
    assert resolve_spec(spec_for(method, adapter)).method == job_pb2.TrainingMethod.Value(
        f"TRAINING_METHOD_{method}"
    )


def test_method_defaults_follow_job_proto() -> None:
    dpo = resolve_spec(spec_for("DPO")).dpo
    assert (dpo.beta, dpo.preference_loss_weight, dpo.sft_loss_weight, dpo.average_log_probs) == (
        0.1,
        1,
        0,
        False,
    )
    grpo = resolve_spec(spec_for("GRPO")).grpo
    assert (grpo.num_generations, grpo.temperature, grpo.top_p, grpo.top_k) == (4, 1.0, 1.0, 0)
    assert (grpo.kl_beta, grpo.clip_epsilon, grpo.max_completion_length) == (0.04, 0.2, 256)
    distillation = resolve_spec(spec_for("DISTILLATION")).distillation
    assert (distillation.temperature, distillation.alpha) == (2.0, 0.5)
    assert resolve_spec(spec_for("ORPO")).orpo.beta == 0.1
    kto = resolve_spec(spec_for("KTO")).kto
    assert (kto.beta, kto.desirable_weight, kto.undesirable_weight) == (0.1, 1.0, 1.0)
    quantization = resolve_spec(spec_for("SFT", "QLORA")).quantization
    assert (quantization.bits, quantization.type, quantization.double_quantization) == (
        4,
        job_pb2.QUANTIZATION_TYPE_NF4,
        True,
    )
    assert (
        resolve_spec(
            spec_for("SFT", "QLORA", quantization=job_pb2.QuantizationConfig(bits=8))
        ).quantization.type
        == job_pb2.QUANTIZATION_TYPE_INT8
    )
    assert resolve_spec(spec_for("SFT", "PROMPT_TUNING")).prompt_tuning.num_virtual_tokens == 20
    # Another method's settings are not filled in.
    assert not resolve_spec(spec_for("SFT")).dpo.HasField("beta")


def _grpo(**fields: object) -> job_pb2.GrpoConfig:
    return job_pb2.GrpoConfig(**fields)


def _hardware(strategy: str, gpus: int = 2) -> job_pb2.HardwareConfig:
    return job_pb2.HardwareConfig(
        gpu_count=gpus, strategy=job_pb2.DistributedStrategy.Value(f"DISTRIBUTED_STRATEGY_{strategy}")
    )


@pytest.mark.parametrize(
    ("spec", "field", "why"),
    [
        (
            spec_for("SFT", "PROMPT_TUNING", hyperparameters=job_pb2.Hyperparameters(packing=True)),
            "spec.hyperparameters.packing",
            "cannot be used with prompt tuning",
        ),
        (spec_for("DPO", "PROMPT_TUNING"), "spec.adapter", "prompt tuning works with TRAINING_METHOD_SFT"),
        (spec_for("GRPO", "PROMPT_TUNING"), "spec.adapter", "use LoRA"),
        (
            spec_for("SFT", "PROMPT_TUNING", output=job_pb2.OutputConfig(merge_adapter=True)),
            "spec.output.merge_adapter",
            "a soft prompt cannot be folded",
        ),
        (
            spec_for("SFT", "PROMPT_TUNING", prompt_tuning=job_pb2.PromptTuningConfig(num_virtual_tokens=0)),
            "spec.prompt_tuning.num_virtual_tokens",
            "[1, 512]",
        ),
        (
            spec_for("SFT", "QLORA", quantization=job_pb2.QuantizationConfig(bits=3)),
            "spec.quantization.bits",
            "4 or 8",
        ),
        (
            spec_for(
                "SFT",
                "QLORA",
                quantization=job_pb2.QuantizationConfig(bits=8, type=job_pb2.QUANTIZATION_TYPE_NF4),
            ),
            "spec.quantization.type",
            "needs bits = 4",
        ),
        (
            spec_for(
                "SFT",
                "QLORA",
                quantization=job_pb2.QuantizationConfig(bits=4, type=job_pb2.QUANTIZATION_TYPE_INT8),
            ),
            "spec.quantization.type",
            "INT8 needs bits = 8",
        ),
        (
            spec_for("SFT", "QLORA", hardware=_hardware("ZERO3")),
            "spec.hardware.strategy",
            "DISTRIBUTED_STRATEGY_ZERO3 cannot train QLoRA",
        ),
        (
            spec_for("SFT", "QLORA", hardware=_hardware("FSDP")),
            "spec.hardware.strategy",
            "cannot train QLoRA",
        ),
        (spec_for("DPO", dpo=job_pb2.DpoConfig(beta=0)), "spec.dpo.beta", "(0, 10]"),
        (
            spec_for("DPO", dpo=job_pb2.DpoConfig(preference_loss_weight=0)),
            "spec.dpo.preference_loss_weight",
            "cannot both be 0",
        ),
        (spec_for("ORPO", orpo=job_pb2.OrpoConfig(beta=11)), "spec.orpo.beta", "(0, 10]"),
        (spec_for("KTO", kto=job_pb2.KtoConfig(desirable_weight=0)), "spec.kto.desirable_weight", "(0, 10]"),
        (
            spec_for("KTO", hyperparameters=job_pb2.Hyperparameters(batch_size=1)),
            "spec.hyperparameters.batch_size",
            "at least 2 examples",
        ),
        (
            spec_for("DISTILLATION", distillation=job_pb2.DistillationConfig(teacher_model="not a model")),
            "spec.distillation.teacher_model",
            "is not a hub id (org/name)",
        ),
        (
            spec_for("DISTILLATION", distillation=job_pb2.DistillationConfig(temperature=0)),
            "spec.distillation.temperature",
            "(0, 20]",
        ),
        (
            spec_for("DISTILLATION", distillation=job_pb2.DistillationConfig(alpha=1.5)),
            "spec.distillation.alpha",
            "[0, 1]",
        ),
        (spec_for("GRPO", grpo=_grpo(num_generations=1)), "spec.grpo.num_generations", "[2, 64]"),
        (spec_for("GRPO", grpo=_grpo(temperature=0)), "spec.grpo.temperature", "(0, 2]"),
        (spec_for("GRPO", grpo=_grpo(top_p=1.5)), "spec.grpo.top_p", "(0, 1]"),
        (spec_for("GRPO", grpo=_grpo(top_k=-1)), "spec.grpo.top_k", "must not be negative"),
        (spec_for("GRPO", grpo=_grpo(clip_epsilon=1.0)), "spec.grpo.clip_epsilon", "below 1"),
        (
            spec_for("GRPO", grpo=_grpo(max_completion_length=0)),
            "spec.grpo.max_completion_length",
            "[1, 8192]",
        ),
        (
            spec_for("GRPO", grpo=_grpo(num_generations=3)),
            "spec.hyperparameters.batch_size",
            "multiple of grpo.num_generations (3)",
        ),
        (
            spec_for("GRPO", grpo=_grpo(reward_functions=[job_pb2.REWARD_FUNCTION_JSON_VALID])),
            "spec.grpo.reward_functions[1]",
            "listed twice",
        ),
        (
            spec_for("GRPO", grpo=_grpo(reward_functions=[job_pb2.REWARD_FUNCTION_REGEX], reward_regex="(")),
            "spec.grpo.reward_regex",
            "not a valid regular expression",
        ),
        (
            spec_for("GRPO", grpo=_grpo(reward_functions=[job_pb2.REWARD_FUNCTION_LENGTH])),
            "spec.grpo.target_length",
            "required by REWARD_FUNCTION_LENGTH",
        ),
        (
            spec_for(
                "GRPO",
                grpo=_grpo(reward_functions=[job_pb2.REWARD_FUNCTION_USER_CODE], reward_code="def reward("),
            ),
            "spec.grpo.reward_functions[1]",
            "user reward code is disabled",
        ),
        (
            spec_for("GRPO", grpo=_grpo(reward_code="def reward(p, c): return []")),
            "spec.grpo.reward_code",
            "only used with REWARD_FUNCTION_USER_CODE",
        ),
    ],
)
def test_method_settings_are_checked(spec: job_pb2.JobSpec, field: str, why: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        resolve_spec(spec)
    descriptions = {v.field: v.description for v in info.value.violations}
    assert field in descriptions, descriptions
    assert why in descriptions[field]


def test_grpo_without_reward_functions_is_refused() -> None:
    spec = spec_for("GRPO")
    spec.grpo.ClearField("reward_functions")
    with pytest.raises(InvalidArgument) as info:
        resolve_spec(spec)
    assert "spec.grpo.reward_functions" in fields_of(info.value)


@pytest.mark.parametrize(
    ("code", "why"),
    [
        ("def reward(prompts, completions:\n", "line 1"),
        ("def score(prompts, completions, **columns):\n    return []\n", "must define `def reward("),
    ],
)
def test_user_reward_code_is_checked_where_the_deployment_allows_it(code: str, why: str) -> None:
    spec = spec_for("GRPO", grpo=_grpo(reward_code=code))
    spec.grpo.reward_functions[:] = [job_pb2.REWARD_FUNCTION_USER_CODE]
    with pytest.raises(InvalidArgument) as info:
        resolve_spec(spec, allow_user_reward_code=True)
    (violation,) = info.value.violations
    assert violation.field == "spec.grpo.reward_code" and why in violation.description
    spec.grpo.reward_code = (
        "def reward(prompts, completions, **columns):\n    return [0.0] * len(completions)\n"
    )
    assert resolve_spec(spec, allow_user_reward_code=True).grpo.reward_code == spec.grpo.reward_code


@pytest.mark.parametrize(
    "strategy", ["DDP", "ZERO1", "ZERO2", "ZERO2_OFFLOAD", "ZERO3", "ZERO3_OFFLOAD", "FSDP"]
)
def test_multi_process_strategies_are_accepted_even_on_one_gpu(strategy: str) -> None:
    for gpus in (1, 4):
        assert resolve_spec(spec_for("SFT", hardware=_hardware(strategy, gpus))).hardware.gpu_count == gpus
    assert (
        resolve_spec(spec_for("SFT", "QLORA", hardware=_hardware("DDP"))).adapter
        == job_pb2.ADAPTER_TYPE_QLORA
    )


F = dataset_pb2.DatasetFormat


@pytest.mark.parametrize(
    ("method", "fits", "misfits"),
    [
        (
            "SFT",
            ["OPENAI_CHAT", "SHAREGPT", "ALPACA", "PROMPT_COMPLETION", "TEXT"],
            ["PREFERENCE", "PROMPT_ONLY", "KTO"],
        ),
        ("DISTILLATION", ["OPENAI_CHAT", "TEXT"], ["OPENAI_PREFERENCE"]),
        ("DPO", ["PREFERENCE", "OPENAI_PREFERENCE"], ["OPENAI_CHAT", "KTO", "PROMPT_ONLY"]),
        ("ORPO", ["PREFERENCE"], ["TEXT"]),
        ("KTO", ["KTO", "PREFERENCE", "OPENAI_PREFERENCE"], ["OPENAI_CHAT"]),
        ("GRPO", ["PROMPT_ONLY"], ["OPENAI_CHAT", "PREFERENCE", "PROMPT_COMPLETION"]),
    ],
)
def test_dataset_must_fit_the_method(method: str, fits: list[str], misfits: list[str]) -> None:
    spec = resolve_spec(spec_for(method))
    for name in [*fits, "UNSPECIFIED"]:
        check_dataset_fit(spec, F.Value(f"DATASET_FORMAT_{name}"))
    for name in misfits:
        with pytest.raises(InvalidArgument) as info:
            check_dataset_fit(spec, F.Value(f"DATASET_FORMAT_{name}"))
        (violation,) = info.value.violations
        assert violation.field == "spec.dataset"
        assert (
            f"the dataset is DATASET_FORMAT_{name} but TRAINING_METHOD_{method} trains on"
            in violation.description
        )
def test_empty_spec_gets_documented_defaults() -> None:
    spec = resolve_spec(job_pb2.JobSpec(base_model="org/model"), require_dataset=False)
    hp = spec.hyperparameters

    assert spec.method == job_pb2.TRAINING_METHOD_SFT
    assert spec.adapter == job_pb2.ADAPTER_TYPE_LORA
    assert (spec.lora.rank, spec.lora.alpha, spec.lora.dropout) == (16, 32, 0.05)
    assert list(spec.lora.target_modules) == ["all-linear"]
    assert (hp.epochs, hp.batch_size, hp.learning_rate, hp.max_seq_length) == (3, 4, 2e-4, 2048)
    assert hp.warmup_ratio == 0.03 and not hp.HasField("warmup_steps")
    assert hp.lr_scheduler == job_pb2.LR_SCHEDULER_COSINE
    assert hp.optimizer == job_pb2.OPTIMIZER_ADAMW
    assert hp.assistant_only_loss and hp.seed == 42 and hp.logging_steps == 10


def test_values_sent_stay_even_when_zero_or_false() -> None:
    spec = job_pb2.JobSpec(adapter=job_pb2.ADAPTER_TYPE_FULL)
    spec.hyperparameters.warmup_steps = 0
    spec.hyperparameters.assistant_only_loss = False
    spec.lora.rank = 8

    spec.base_model = "org/model"
    out = resolve_spec(spec, require_dataset=False)
    assert out.hyperparameters.learning_rate == 2e-5  # full fine-tuning default
    assert out.hyperparameters.HasField("warmup_steps") and not out.hyperparameters.HasField("warmup_ratio")
    assert out.hyperparameters.assistant_only_loss is False
    assert not out.lora.HasField("alpha")  # a full fine-tune's LoRA settings stay as sent
    lora = job_pb2.JobSpec(base_model="org/model")
    lora.lora.rank = 8
    assert resolve_spec(lora, require_dataset=False).lora.alpha == 16




def test_a_spec_is_bounded_so_its_events_fit_nats() -> None:
    big = job_pb2.JobSpec(base_model="org/model", dataset="ds_1")
    big.lora.target_modules.append("q" * (1 << 20))
    with pytest.raises(InvalidArgument) as info:
        resolve_spec(big)
    assert [v.field for v in info.value.violations] == ["spec"]
    many = job_pb2.JobSpec(base_model="org/model", dataset="ds_1")
    many.lora.target_modules.extend(["q_proj"] * 65 + ["x" * 129])
    with pytest.raises(InvalidArgument) as info:
        resolve_spec(many)
    assert [v.field for v in info.value.violations] == ["spec.lora.target_modules"]
