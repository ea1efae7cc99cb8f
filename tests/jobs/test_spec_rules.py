"""Job spec validation: defaults filled, every bad field named."""

from __future__ import annotations

import pytest
from tuneforge.v1 import job_pb2

from services.jobs.spec_rules import resolve_spec
from services.kit.errors import InvalidArgument


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


@pytest.mark.parametrize(("mutate", "field"), [
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
    (lambda s: setattr(s, "method", job_pb2.TRAINING_METHOD_DPO), "spec.method"),
    (lambda s: setattr(s, "adapter", job_pb2.ADAPTER_TYPE_QLORA), "spec.adapter"),
])
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
    assert {"spec.lora.rank", "spec.hyperparameters.epochs",
            "spec.hyperparameters.learning_rate"} <= fields_of(info.value)


def test_warmup_steps_and_ratio_are_exclusive() -> None:
    spec = valid_spec()
    spec.hyperparameters.warmup_steps = 10
    spec.hyperparameters.warmup_ratio = 0.1
    with pytest.raises(InvalidArgument) as info:
        resolve_spec(spec)
    assert "spec.hyperparameters.warmup_ratio" in fields_of(info.value)


def test_merging_needs_lora() -> None:
    spec = valid_spec()
    spec.adapter = job_pb2.ADAPTER_TYPE_FULL
    spec.output.merge_adapter = True
    with pytest.raises(InvalidArgument) as info:
        resolve_spec(spec)
    assert "spec.output.merge_adapter" in fields_of(info.value)


@pytest.mark.parametrize("model", ["org/name", "/abs/path/model", "s3://bucket/models/x", "./rel"])
def test_model_forms_accepted(model: str) -> None:
    spec = valid_spec()
    spec.base_model = model
    assert resolve_spec(spec).base_model == model
