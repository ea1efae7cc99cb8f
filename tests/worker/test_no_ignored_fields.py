"""No JobSpec or DatasetOptions field is accepted and then ignored.

Every field of JobSpec (walked recursively through the descriptor) and of DatasetOptions must, for each
method it applies to, either change what the recipe builds (the TRL config, the PEFT config, the model
overrides and quantization config at load, the early-stopping callback, the trainer's extras such as the
reward functions, the prepared data), or be refused: by `resolve_spec` at CreateJob, by
`check_dataset_options`, or by the recipe before anything loads. Fields that are metadata or are read
outside the recipe (routing, outputs, the evaluation after training) are listed in ALLOWED with the reason.

Nothing trains here: each configuration is built as the recipe's setup builds it, minus the model load.
A field added to the protos without a test value below fails `test_every_field_has_a_test_value`; one
given a value but no mapping fails `test_every_field_changes_the_configuration_or_is_refused`.
"""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor
from tuneforge.v1 import dataset_pb2, job_pb2

from trainer_worker.errors import TrainingError
from trainer_worker.events import EventSink
from trainer_worker.recipes import RECIPES, rewards
from trainer_worker.recipes.base import BaseRecipe
from trainer_worker.run_config import RunConfig
from trainer_worker.stop import StopSignal
from trainer_worker.tiny import write_synthetic_dataset
from tuneforge_core.errors import InvalidArgument
from tuneforge_core.spec import check_dataset_options, resolve_spec

M = job_pb2
ALL = ("SFT", "DPO", "GRPO", "DISTILLATION", "ORPO", "KTO")
REFUSED = "refused"

# Fields read outside the recipe's trainer configuration, with where they are honoured (one line each).
ALLOWED: dict[str, str] = {
    "base_model": "the model the worker loads (RunConfig.model_path); checked by ModelPolicy at CreateJob",
    "dataset": "resolved to the split files by the jobs service (train_uri/validation_uri)",
    "validation_dataset": "resolved to validation_uri by the jobs service",
    "model_type": "LLM/VLM: resolved by the jobs service, picks the VLM recipe (tuneforge_core.model_types)",
    "hardware.gpu_type": "routing: which worker takes the job (agent), refused on a CPU worker",
    "hardware.gpu_count": "the launcher's process count (tests/worker/test_distributed.py)",
    "hardware.node_count": "the launcher's node count (tests/worker/test_distributed.py)",
    "hardware.strategy": "distributed.trainer_kwargs (deepspeed/fsdp), tests/worker/test_distributed.py",
    "hardware.pool": "routing: only that pool's workers pull it, others refuse it (test_pools_worker.py)",
    "output.merge_adapter": "BaseRecipe.save merges (tests/worker/test_recipe.py)",
    "output.keep_optimizer_state": "the agent prunes checkpoints after the job (test_checkpointing.py)",
    "evaluation.enabled": "trainer_worker.evaluation after training (tests/worker/test_evaluation.py)",
    "evaluation.max_examples": "trainer_worker.evaluation after training (tests/worker/test_evaluation.py)",
    "evaluation.num_samples": "trainer_worker.evaluation after training (tests/worker/test_evaluation.py)",
    "evaluation.max_new_tokens": "trainer_worker.evaluation after training (tests/worker/test_evaluation.py)",
    "warm_start.job": "resolved by services.jobs.warm_start, loaded by trainer_worker.warm_start",
    "warm_start.checkpoint_step": "resolved by services.jobs.warm_start, loaded by trainer_worker.warm_start",
    "warm_start.restore_optimizer_state": "trainer_worker.warm_start.restore_optimizer_state",
    "method": "picks the recipe; every other case here builds one",
    "adapter": "picks the PEFT config; the lora/quantization/prompt_tuning cases build each",
    # Experiment trackers: TrainingArguments.report_to plus the runs trainer_worker.trackers starts from the
    # training process's environment; each read back from the tracker in tests/worker/test_trackers.py and
    # tests/e2e/test_trackers.py.
    **{f"integrations.{field}": "trainer_worker.trackers (tests/worker/test_trackers.py)" for field in (
        "wandb.project", "wandb.entity", "wandb.name", "wandb.tags", "wandb.base_url",
        "mlflow.tracking_uri", "mlflow.experiment_name", "mlflow.run_name")},
    "integrations.wandb.api_key": "taken out at CreateJob, sealed, handed to the job's worker only "
    "(tests/e2e/test_trackers.py: W&B receives it)",
    "integrations.mlflow.token": "as wandb.api_key; MLFLOW_TRACKING_TOKEN in the training process",
}
# (field, method) pairs that are accepted without a trainer setting, with why. Keep this short.
ALLOWED_FOR_METHOD: dict[tuple[str, str], str] = {
    ("hyperparameters.max_seq_length", "GRPO"): "TRL 1.16's GRPO has no length cut besides "
    "grpo.max_completion_length; the value bounds prompt + completion in the estimator's memory plan only",
}

REGEX, LENGTH = "REWARD_FUNCTION_REGEX", "REWARD_FUNCTION_LENGTH"
EARLY_STOPPING = {"hyperparameters": {"early_stopping": {"enabled": True}}}
USER_CODE = "def reward(prompts, completions, **columns):\n    return [{} for _ in completions]\n"
# Each field: its test value (proto JSON) and the context both the baseline and the variant carry (what
# the field needs to matter at all, such as the scheduler that reads min_learning_rate).
VALUES: dict[str, tuple[Any, dict[str, Any]]] = {
    "lora.rank": (8, {}),
    "lora.alpha": (7, {}),
    "lora.dropout": (0.2, {}),
    "lora.target_modules": (["*.q_proj", "v_proj"], {}),
    "lora.use_dora": (True, {}),
    "quantization.bits": (8, {"adapter": "ADAPTER_TYPE_QLORA"}),
    "quantization.type": ("QUANTIZATION_TYPE_FP4", {"adapter": "ADAPTER_TYPE_QLORA"}),
    "quantization.double_quantization": (False, {"adapter": "ADAPTER_TYPE_QLORA"}),
    "quantization.compute_dtype": ("PRECISION_FP32", {"adapter": "ADAPTER_TYPE_QLORA"}),
    "prompt_tuning.num_virtual_tokens": (5, {"adapter": "ADAPTER_TYPE_PROMPT_TUNING"}),
    "prompt_tuning.init_text": ("hello", {"adapter": "ADAPTER_TYPE_PROMPT_TUNING"}),
    "hyperparameters.epochs": (2, {}),
    "hyperparameters.max_steps": (7, {}),
    "hyperparameters.batch_size": (8, {}),
    "hyperparameters.gradient_accumulation_steps": (2, {}),
    "hyperparameters.learning_rate": (1e-4, {}),
    "hyperparameters.min_learning_rate": (
        1e-6, {"hyperparameters": {"lr_scheduler": "LR_SCHEDULER_COSINE_WITH_MIN_LR"}}
    ),
    "hyperparameters.warmup_steps": (5, {}),
    "hyperparameters.warmup_ratio": (0.1, {}),
    "hyperparameters.lr_scheduler": ("LR_SCHEDULER_LINEAR", {}),
    "hyperparameters.optimizer": ("OPTIMIZER_SGD", {}),
    "hyperparameters.adam_beta1": (0.8, {}),
    "hyperparameters.adam_beta2": (0.99, {}),
    "hyperparameters.weight_decay": (0.1, {}),
    "hyperparameters.max_grad_norm": (0.5, {}),
    "hyperparameters.precision": ("PRECISION_FP32", {}),
    "hyperparameters.gradient_checkpointing": (True, {}),
    "hyperparameters.packing": (True, {}),
    "hyperparameters.group_by_length": (True, {}),
    "hyperparameters.max_seq_length": (512, {}),
    "hyperparameters.seed": (7, {}),
    "hyperparameters.dataloader_workers": (2, {}),
    "hyperparameters.logging_steps": (3, {}),
    "hyperparameters.eval_steps": (4, {}),
    "hyperparameters.save_steps": (4, {}),
    "hyperparameters.save_total_limit": (5, {}),
    "hyperparameters.early_stopping.enabled": (True, {}),
    "hyperparameters.early_stopping.patience": (5, EARLY_STOPPING),
    "hyperparameters.early_stopping.min_delta": (0.1, EARLY_STOPPING),
    "hyperparameters.assistant_only_loss": (False, {}),
    "hyperparameters.eval_batch_size": (8, {}),
    "hyperparameters.hidden_dropout": (0.1, {}),
    "hyperparameters.attention_dropout": (0.1, {}),
    "hyperparameters.eval_epoch_fraction": (0.5, {}),
    "hyperparameters.keep_best_model": (True, {}),
    "hyperparameters.metric_for_best_model": (
        "eval_rewards/margins", {"hyperparameters": {"keep_best_model": True}}
    ),
    "hyperparameters.global_batch_size": (16, {}),
    "dpo.beta": (0.3, {}),
    "dpo.preference_loss_weight": (0.5, {}),
    "dpo.sft_loss_weight": (0.5, {}),
    "dpo.average_log_probs": (True, {}),
    "dpo.reference_model": ("org/other-reference", {}),
    "grpo.num_generations": (2, {}),
    "grpo.temperature": (0.7, {}),
    "grpo.top_p": (0.9, {}),
    "grpo.top_k": (50, {}),
    "grpo.kl_beta": (0.01, {}),
    "grpo.clip_epsilon": (0.1, {}),
    "grpo.max_completion_length": (64, {}),
    "grpo.reward_functions": (["REWARD_FUNCTION_LENGTH"], {"grpo": {"target_length": 5}}),
    "grpo.reward_regex": ("^a", {"grpo": {"reward_functions": [REGEX], "reward_regex": "b"}}),
    "grpo.target_length": (50, {"grpo": {"reward_functions": [LENGTH], "target_length": 5}}),
    "grpo.reward_code": (
        USER_CODE.format(2.0),
        {"grpo": {"reward_functions": ["REWARD_FUNCTION_USER_CODE"], "reward_code": USER_CODE.format(1.0)}},
    ),
    "grpo.normalize_rewards": (False, {}),
    "grpo.use_rloo": (True, {}),
    "grpo.overlong_filtering": (True, {}),
    "grpo.clip_epsilon_high": (0.28, {}),
    "grpo.ratio_clip_c": (3.0, {}),
    "grpo.token_level_loss": (False, {}),
    "grpo.num_prompts_per_step": (2, {}),
    "grpo.generation_batch_size": (16, {}),
    "grpo.importance_sampling_correction": (True, {}),
    "grpo.on_policy_kl_approximation": (False, {}),
    "grpo.reward_model": (
        "org/other-reward-model",
        {"grpo": {"reward_functions": ["REWARD_FUNCTION_REWARD_MODEL"], "reward_model": "org/reward-model"}},
    ),
    "distillation.teacher_model": ("org/other-teacher", {}),
    "distillation.temperature": (4.0, {}),
    "distillation.alpha": (0.9, {}),
    "orpo.beta": (0.3, {}),
    "kto.beta": (0.3, {}),
    "kto.desirable_weight": (2.0, {}),
    "kto.undesirable_weight": (2.0, {}),
    # JobSpec.speed (trainer_worker.speed): AUTO on this CPU is SDPA and nothing else; what a CPU pool cannot
    # honour (Liger, offloading) and padding-free without packing are refused at CreateJob.
    "speed.liger_kernels": ("SPEED_MODE_ON", {}),
    "speed.attention": ("ATTENTION_IMPLEMENTATION_EAGER", {}),
    "speed.torch_compile": ("SPEED_MODE_ON", {}),
    "speed.activation_offloading": ("SPEED_MODE_ON", {}),
    "speed.padding_free": ("SPEED_MODE_ON", {}),
}
# Which methods read a section; top-level sections missing here apply to every method.
SECTION_METHODS = {
    "dpo": ("DPO",), "grpo": ("GRPO",), "orpo": ("ORPO",), "kto": ("KTO",),
    "distillation": ("DISTILLATION",), "prompt_tuning": ("SFT", "DISTILLATION"),
}
FAMILY = {"SFT": "chat", "DISTILLATION": "chat", "DPO": "preference", "ORPO": "preference",
          "KTO": "kto", "GRPO": "prompt-only"}
# DatasetOptions: honoured by the datasets service when it writes the splits, or refused at CreateJob.
DATASET_OPTIONS_APPLIED_AT_UPLOAD = {
    "max_samples": "the datasets service keeps the first N examples before splitting (test_splitting.py)",
    "system_prompt": "the datasets service writes it into every example (tests/datasets)",
    "prompt_template": "the datasets service wraps every prompt with it (tests/datasets)",
}


def leaf_fields(descriptor: Descriptor, prefix: str = "") -> list[str]:
    out: list[str] = []
    for field in descriptor.fields:
        nested = field.message_type
        if nested is not None and not nested.GetOptions().map_entry:
            out += leaf_fields(nested, f"{prefix}{field.name}.")
        else:
            out.append(prefix + field.name)
    return out


def _nested(path: str, value: Any) -> dict[str, Any]:
    head, _, rest = path.partition(".")
    return {head: _nested(rest, value) if rest else value}


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for key, value in b.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both else value
    return out


def _base(method: str, model: Path) -> dict[str, Any]:
    spec: dict[str, Any] = {"method": f"TRAINING_METHOD_{method}", "base_model": str(model)}
    if method == "GRPO":
        spec["grpo"] = {"reward_functions": ["REWARD_FUNCTION_JSON_VALID"]}
    if method == "DISTILLATION":
        spec["distillation"] = {"teacher_model": str(model)}
    return spec


class Builder:
    """What a recipe's setup builds for a spec, without loading the model or training."""

    def __init__(self, model: Path, root: Path) -> None:
        self.model, self.root = model, root
        self.files = {
            f: write_synthetic_dataset(root / f"{f}.jsonl", 8, family=f) for f in set(FAMILY.values())
        }
        self.tokenizer: Any = None
        self.built: dict[str, Any] = {}

    def build(self, spec_dict: dict[str, Any]) -> Any:
        key = json.dumps(spec_dict, sort_keys=True)  # baselines repeat across fields
        if key not in self.built:
            self.built[key] = self._build(spec_dict)
        return self.built[key]

    def _build(self, spec_dict: dict[str, Any]) -> Any:
        try:
            spec = resolve_spec(json_format.ParseDict(spec_dict, job_pb2.JobSpec()),
                                allow_user_reward_code=True, require_dataset=False)
        except InvalidArgument:
            return REFUSED
        method = job_pb2.TrainingMethod.Name(spec.method).removeprefix("TRAINING_METHOD_")
        module, name = RECIPES[spec.method].split(":")
        recipe_class: type[BaseRecipe] = getattr(
            importlib.import_module(f"trainer_worker.recipes.{module}"), name
        )
        data = self.files[FAMILY[method]]
        cfg = RunConfig(job_id="job_fields", spec=RunConfig.spec_to_dict(spec), model_path=str(self.model),
                        train_file=data, validation_file=data, output_dir=self.root / "out",
                        events_file=self.root / "events.jsonl")
        recipe = recipe_class(cfg, spec, EventSink(cfg.events_file), StopSignal())
        if self.tokenizer is None:
            self.tokenizer = recipe.load_tokenizer(str(self.model))
        recipe.tokenizer = self.tokenizer
        # The teacher, DPO's reference model, GRPO's reward model by their paths: nothing loads.
        recipe.load_model = lambda path=None, *, trainable=True, **_: f"{path} trainable={trainable}"  # type: ignore
        recipe._check_same_tokenizer = lambda path, role: None  # type: ignore[method-assign]
        try:
            recipe.check_hardware()
            train, _ = recipe.load_data()
            config = recipe.trainer_config(recipe.training_args(has_validation=True))
            peft = recipe.peft_config()
            early = recipe.early_stopping_callback()
            extras = recipe.trainer_extras(train)
            built = {
                "config": type(config).__name__,
                "args": config.to_dict(),
                "peft": peft.to_dict() if peft is not None else None,
                "model": recipe.model_overrides(),
                "dtype": str(recipe.model_dtype()),
                "quantization": recipe._quantization_config().to_dict() if recipe.quantized else None,
                "early_stopping": None if early is None else (early.early_stopping_patience,
                                                              early.early_stopping_threshold),
                "extras": {k: _describe(v) for k, v in extras.items()},
                "data": train.to_list()[:4],
            }
        except TrainingError:
            return REFUSED
        return json.loads(json.dumps(built, default=str))


def _describe(value: Any) -> Any:
    """Reward functions by what they return on fixed completions (a reward model, stubbed, by its path;
    a reward processing class by its type); anything else as it is."""
    if isinstance(value, list) and value and any(inspect.isfunction(f) for f in value):
        completions = ['{"a": 1}', "abc", "b" * 40, "a" * 60]
        prompts = ["q"] * len(completions)
        return [list(f(prompts=prompts, completions=completions, answer=["abc"] * 4))
                if inspect.isfunction(f) else f for f in value]
    if isinstance(value, list):
        return [v if v is None or isinstance(v, (str, int, float)) else type(v).__name__ for v in value]
    return value


@pytest.fixture(scope="module")
def builder(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Builder:
    return Builder(tiny_model, tmp_path_factory.mktemp("fields"))


@pytest.fixture(autouse=True)
def _bf16_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default precision is bf16 where the CPU has it: pretend it has, so that an explicit FP32 differs
    from the default on every machine. User reward code is built as on a worker that allows it."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setenv(rewards.ALLOW_USER_CODE_ENV, "true")  # grpo.reward_code is built, not refused


def _cases() -> list[tuple[str, str]]:
    cases = []
    for path in leaf_fields(job_pb2.JobSpec.DESCRIPTOR):
        if path in ALLOWED:
            continue
        section = path.split(".")[0]
        for method in SECTION_METHODS.get(section, ALL):
            cases.append((path, method))
    return cases


def test_every_field_has_a_test_value() -> None:
    missing = [p for p in leaf_fields(job_pb2.JobSpec.DESCRIPTOR) if p not in ALLOWED and p not in VALUES]
    assert not missing, (
        f"JobSpec fields with no test value: {missing}. Map each one in a recipe (or refuse it in "
        "tuneforge_core.spec) and add a value to VALUES, or add it to ALLOWED with the reason."
    )
    stale = [p for p in list(VALUES) + list(ALLOWED) if p not in leaf_fields(job_pb2.JobSpec.DESCRIPTOR)]
    assert not stale, f"no such JobSpec fields: {stale}"


@pytest.mark.parametrize(("path", "method"), [c for c in _cases() if c[0] in VALUES],
                         ids=lambda x: str(x))
def test_every_field_changes_the_configuration_or_is_refused(
    builder: Builder, tiny_model: Path, path: str, method: str
) -> None:
    value, context = VALUES[path]
    baseline_spec = _merge(_base(method, tiny_model), context)
    baseline = builder.build(baseline_spec)
    assert baseline != REFUSED, f"the baseline spec for {path} on {method} is refused"
    variant = builder.build(_merge(baseline_spec, _nested(path, value)))
    if (path, method) in ALLOWED_FOR_METHOD:
        return
    assert variant == REFUSED or variant != baseline, (
        f"spec.{path} = {value!r} on {method} is accepted but changes nothing the recipe builds: map it, "
        "or refuse it in tuneforge_core.spec"
    )


def test_every_dataset_option_is_applied_or_refused() -> None:
    values = {"max_prompt_length": 512, "lazy_tokenize": True, "streaming": True}
    for field in dataset_pb2.DatasetOptions.DESCRIPTOR.fields:
        if field.name in DATASET_OPTIONS_APPLIED_AT_UPLOAD:
            continue
        assert field.name in values, f"DatasetOptions.{field.name}: apply it at upload or refuse it"
        options = dataset_pb2.DatasetOptions(**{field.name: values[field.name]})
        with pytest.raises(InvalidArgument) as caught:
            check_dataset_options(options)
        assert f"options.{field.name}" in str(caught.value)
    check_dataset_options(dataset_pb2.DatasetOptions(max_samples=3, system_prompt="s"))  # nothing to refuse


# The seeds' GRPO knobs as the recipe hands them to TRL: (spec.grpo values, config attribute, expected).
GRPO_KNOBS = [
    ({"normalize_rewards": False}, "scale_rewards", "none"),
    ({"normalize_rewards": True}, "scale_rewards", "group"),
    ({"overlong_filtering": True}, "mask_truncated_completions", True),
    ({"clip_epsilon": 0.1, "clip_epsilon_high": 0.28}, "epsilon", 0.1),
    ({"clip_epsilon": 0.1, "clip_epsilon_high": 0.28}, "epsilon_high", 0.28),
    ({}, "epsilon_high", 0.2),  # symmetric by default
    ({"ratio_clip_c": 3.0}, "delta", 3.0),
    ({}, "delta", None),
    ({"token_level_loss": True}, "loss_type", "dapo"),
    ({"token_level_loss": False}, "loss_type", "grpo"),
    ({"num_prompts_per_step": 4}, "generation_batch_size", 16),
    ({"generation_batch_size": 8}, "generation_batch_size", 8),
    ({"generation_batch_size": 8}, "steps_per_generation", 2),
    ({}, "vllm_importance_sampling_correction", False),
    ({}, "use_bias_correction_kl", True),  # TRL's default, where there is a KL term
    ({"on_policy_kl_approximation": False}, "use_bias_correction_kl", False),
    ({"kl_beta": 0.0}, "use_bias_correction_kl", False),
    ({"use_rloo": True}, "normalize_advantages", True),
    ({"use_rloo": True, "normalize_rewards": False}, "normalize_advantages", False),
    ({"use_rloo": True, "overlong_filtering": True}, "mask_truncated_completions", True),
]


@pytest.mark.parametrize(("knobs", "attribute", "expected"), GRPO_KNOBS, ids=lambda x: str(x))
def test_grpo_knob_reaches_the_trl_config(
    builder: Builder, tiny_model: Path, knobs: dict[str, Any], attribute: str, expected: Any
) -> None:
    spec = _merge(_base("GRPO", tiny_model), {"grpo": knobs})
    built = builder.build(spec)
    assert built != REFUSED
    assert built["config"] == ("RLOOConfig" if knobs.get("use_rloo") else "GRPOConfig")
    assert built["args"][attribute] == expected


@pytest.mark.parametrize(
    ("knobs", "field"),
    [
        ({"importance_sampling_correction": True}, "spec.grpo.importance_sampling_correction"),
        ({"ratio_clip_c": 1.1}, "spec.grpo.ratio_clip_c"),  # must exceed 1 + clip_epsilon_high
        ({"use_rloo": True, "ratio_clip_c": 3.0}, "spec.grpo.ratio_clip_c"),
        ({"use_rloo": True, "token_level_loss": True}, "spec.grpo.token_level_loss"),
        ({"num_prompts_per_step": 2, "generation_batch_size": 16}, "spec.grpo.generation_batch_size"),
        ({"generation_batch_size": 6}, "spec.grpo.generation_batch_size"),  # not whole steps of 4
        ({"clip_epsilon_high": 0.0}, "spec.grpo.clip_epsilon_high"),
        ({"kl_beta": 0.0, "on_policy_kl_approximation": True}, "spec.grpo.on_policy_kl_approximation"),
        ({"use_rloo": True, "on_policy_kl_approximation": True}, "spec.grpo.on_policy_kl_approximation"),
    ],
    ids=lambda x: str(x),
)
def test_grpo_knobs_out_of_range_are_refused_naming_the_field(knobs: dict[str, Any], field: str) -> None:
    spec = _merge(_base("GRPO", Path("/models/m")), {"grpo": knobs})
    with pytest.raises(InvalidArgument) as caught:
        resolve_spec(json_format.ParseDict(spec, job_pb2.JobSpec()), require_dataset=False)
    assert field in [item.field for item in caught.value.violations]
