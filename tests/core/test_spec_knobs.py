"""The seeds' knobs in the JobSpec (issue 12, part B): defaults, ranges, and what is refused with which field.

The recipes' side (each field reaching the TRL/PEFT config) is tests/worker/test_no_ignored_fields.py.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from google.protobuf import json_format
from tuneforge.v1 import dataset_pb2, job_pb2

from tuneforge_core.errors import InvalidArgument
from tuneforge_core.spec import (
    check_dataset_options,
    ensure_resolved,
    resolve_spec,
    target_modules_for_peft,
)


def _resolve(spec: dict[str, Any]) -> job_pb2.JobSpec:
    base = {"base_model": "org/model", "dataset": "ds"}
    return resolve_spec(json_format.ParseDict({**base, **spec}, job_pb2.JobSpec()))


def _refused(spec: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as caught:
        _resolve(spec)
    return {item.field: item.description for item in caught.value.violations}


GRPO = {"method": "TRAINING_METHOD_GRPO", "grpo": {"reward_functions": ["REWARD_FUNCTION_JSON_VALID"]}}


def test_defaults_are_filled_and_resolving_again_changes_nothing() -> None:
    spec = _resolve(GRPO)
    hp, g = spec.hyperparameters, spec.grpo
    assert (hp.eval_batch_size, hp.global_batch_size, hp.keep_best_model) == (4, 4, False)
    assert hp.metric_for_best_model == "eval_loss"
    assert not hp.HasField("hidden_dropout") and not hp.HasField("eval_epoch_fraction")
    flags = (g.normalize_rewards, g.use_rloo, g.overlong_filtering, g.token_level_loss)
    assert flags == (True, False, False, True)
    assert (g.clip_epsilon_high, g.generation_batch_size, g.num_prompts_per_step) == (0.2, 4, 1)
    assert not g.HasField("ratio_clip_c") and not g.importance_sampling_correction
    ensure_resolved(spec)  # idempotent: what the worker checks
    rloo = _resolve({**GRPO, "grpo": {**GRPO["grpo"], "use_rloo": True}})
    assert rloo.grpo.token_level_loss is False  # RLOO's loss is per sequence


def test_global_batch_size_derives_gradient_accumulation_or_must_agree_with_it() -> None:
    hp = _resolve({"hyperparameters": {"batch_size": 4, "global_batch_size": 32},
                   "hardware": {"gpu_type": "nvidia-h100", "gpu_count": 2}}).hyperparameters
    assert hp.gradient_accumulation_steps == 4  # 32 / (4 x 2 GPUs)
    agreed = _resolve({"hyperparameters": {"batch_size": 4, "gradient_accumulation_steps": 2,
                                           "global_batch_size": 8}})
    assert agreed.hyperparameters.global_batch_size == 8
    errors = _refused({"hyperparameters": {"batch_size": 4, "gradient_accumulation_steps": 2,
                                           "global_batch_size": 16}})
    assert "4 x 2 x 1 = 8" in errors["spec.hyperparameters.global_batch_size"]
    errors = _refused({"hyperparameters": {"batch_size": 4, "global_batch_size": 10}})
    assert "multiple of batch_size x GPUs" in errors["spec.hyperparameters.global_batch_size"]


@pytest.mark.parametrize(
    ("hyperparameters", "field", "words"),
    [
        ({"eval_batch_size": 0}, "eval_batch_size", "must be in [1, 256]"),
        ({"hidden_dropout": 1.0}, "hidden_dropout", "[0, 1)"),
        ({"attention_dropout": -0.1}, "attention_dropout", "[0, 1)"),
        ({"eval_epoch_fraction": 0.05}, "eval_epoch_fraction", "[0.1, 1]"),
        ({"eval_epoch_fraction": 0.5, "eval_steps": 10}, "eval_epoch_fraction", "not both"),
        ({"eval_epoch_fraction": 0.5, "max_steps": 10}, "eval_epoch_fraction", "max_steps"),
        ({"metric_for_best_model": "eval_accuracy", "keep_best_model": True}, "metric_for_best_model",
         "not a metric this method evaluates"),
        ({"global_batch_size": 0}, "global_batch_size", "[1, 65536]"),
    ],
)
def test_hyperparameter_knobs_out_of_range_name_their_field(
    hyperparameters: dict[str, Any], field: str, words: str
) -> None:
    assert words in _refused({"hyperparameters": hyperparameters})[f"spec.hyperparameters.{field}"]


def test_a_best_model_metric_other_than_loss_needs_something_that_watches_it() -> None:
    dpo = {"method": "TRAINING_METHOD_DPO"}
    errors = _refused({**dpo, "hyperparameters": {"metric_for_best_model": "eval_rewards/accuracies"}})
    assert "keep_best_model or early_stopping" in errors["spec.hyperparameters.metric_for_best_model"]
    kept = _resolve({**dpo, "hyperparameters": {"metric_for_best_model": "eval_rewards/accuracies",
                                                "keep_best_model": True}})
    assert kept.hyperparameters.metric_for_best_model == "eval_rewards/accuracies"


@pytest.mark.parametrize("method", ["DPO", "ORPO", "KTO", "GRPO"])
def test_packing_and_completion_only_loss_are_refused_where_the_trainer_cannot_honour_them(
    method: str,
) -> None:
    spec: dict[str, Any] = {**GRPO} if method == "GRPO" else {"method": f"TRAINING_METHOD_{method}"}
    errors = _refused({**spec, "hyperparameters": {"packing": True, "assistant_only_loss": False}})
    assert "does not pack" in errors["spec.hyperparameters.packing"]
    assert "completions only" in errors["spec.hyperparameters.assistant_only_loss"]


@pytest.mark.parametrize("method", ["KTO", "GRPO"])
def test_group_by_length_is_refused_where_the_sampler_ignores_it(method: str) -> None:
    spec: dict[str, Any] = {**GRPO} if method == "GRPO" else {"method": f"TRAINING_METHOD_{method}"}
    errors = _refused({**spec, "hyperparameters": {"group_by_length": True}})
    assert "does not apply" in errors["spec.hyperparameters.group_by_length"]


def test_grpo_eval_batch_must_hold_whole_groups() -> None:
    errors = _refused({**GRPO, "hyperparameters": {"eval_batch_size": 2}})
    assert "num_generations" in errors["spec.hyperparameters.eval_batch_size"]


@pytest.mark.parametrize(
    ("modules", "matches", "misses"),
    [
        (["*.q_proj"], ["model.layers.0.self_attn.q_proj"], ["model.layers.0.self_attn.k_proj", "q_proj_x"]),
        (["model.layers.*.self_attn.*"], ["model.layers.1.self_attn.o_proj"], ["model.layers.1.mlp.up_proj"]),
        (["*_proj"], ["model.layers.0.mlp.gate_proj"], ["lm_head", "model.embed_tokens"]),
        (["*.layers.0.*.q_proj", "v_proj"],
         ["model.layers.0.self_attn.q_proj", "model.layers.3.self_attn.v_proj"],
         ["model.layers.1.self_attn.q_proj"]),
    ],
)
def test_wildcard_target_modules_become_one_peft_regex(
    modules: list[str], matches: list[str], misses: list[str]
) -> None:
    _resolve({"lora": {"target_modules": modules}})  # accepted
    pattern = target_modules_for_peft(modules)
    assert isinstance(pattern, str)
    assert all(re.fullmatch(pattern, name) for name in matches)
    assert not any(re.fullmatch(pattern, name) for name in misses)
    assert target_modules_for_peft(["q_proj", "v_proj"]) == ["q_proj", "v_proj"]  # PEFT's own list form
    assert target_modules_for_peft(["all-linear"]) == "all-linear"


@pytest.mark.parametrize(
    ("module", "words"),
    [("*", "matches every module"), ("*.*", "matches every module"), ("model..q_proj", "empty name"),
     ("**.q_proj", "one '*'"), ("model.layers.[0-3].q_proj", "is not a module name")],
)
def test_bad_module_patterns_are_refused(module: str, words: str) -> None:
    assert words in _refused({"lora": {"target_modules": [module]}})["spec.lora.target_modules[0]"]


@pytest.mark.parametrize(
    ("options", "name"),
    [({"max_prompt_length": 2048}, "max_prompt_length"), ({"lazy_tokenize": True}, "lazy_tokenize"),
     ({"streaming": True}, "streaming")],
)
def test_dataset_options_training_cannot_honour_are_refused(options: dict[str, Any], name: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_dataset_options(dataset_pb2.DatasetOptions(**options), "spec.validation_dataset")
    [violation] = caught.value.violations
    assert violation.field == "spec.validation_dataset" and f"options.{name}" in violation.description
    check_dataset_options(dataset_pb2.DatasetOptions(max_samples=10, system_prompt="Be brief."))
