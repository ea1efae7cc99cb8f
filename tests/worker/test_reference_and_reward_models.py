"""DPO's own reference model (spec.dpo.reference_model) and GRPO's reward model (spec.grpo.reward_model)
train the tiny model on CPU: each is loaded frozen, reaches TRL, and changes what training sees.

A reference model is the tiny model with perturbed weights, so it scores the preference pairs differently
from the base; at the first step of a LoRA run (LoRA's B starts at 0, so the policy is the base) DPO's
rewards are then nonzero, where TRL's own reference (the base, adapter off) gives exactly zero.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from google.protobuf import json_format
from transformers import AutoModelForCausalLM, PreTrainedModel
from tuneforge.v1 import evaluation_pb2

from tests.worker.helpers import make_run_config, read_events
from trainer_worker.events import EventSink
from trainer_worker.recipes.dpo import DPORecipe
from trainer_worker.recipes.grpo import REWARD_MODEL_NAME, GRPORecipe
from trainer_worker.run_config import RunConfig
from trainer_worker.stop import StopSignal
from trainer_worker.tiny import build_tiny_chat_model, build_tiny_reward_model, write_synthetic_dataset
from trainer_worker.train import run

pytestmark = pytest.mark.slow

HYPERPARAMETERS = {
    "max_steps": 2,
    "batch_size": 4,
    "learning_rate": 1e-3,
    "logging_steps": 1,
    "warmup_steps": 0,
    "save_steps": 1000,
    "max_seq_length": 64,
    "seed": 3,
}


@pytest.fixture(scope="module")
def reference(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with every weight perturbed, and its tokenizer: a reference that is not the base."""
    out = tmp_path_factory.mktemp("reference") / "model"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tiny_model / name).is_file():
            shutil.copy(tiny_model / name, out / name)
    return out


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_reward_model(tmp_path_factory.mktemp("reward") / "model")


def _dpo_spec(adapter: str, reference: Path | None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "method": "TRAINING_METHOD_DPO",
        "adapter": f"ADAPTER_TYPE_{adapter}",
        "lora": {"rank": 4},
        "hyperparameters": HYPERPARAMETERS,
    }
    if reference is not None:
        spec["dpo"] = {"reference_model": str(reference)}
    return spec


def _train(cfg: RunConfig) -> list[dict[str, Any]]:
    sink = EventSink(cfg.events_file)
    try:
        assert run(cfg, sink, StopSignal()) == 0, read_events(cfg.events_file)[-3:]
    finally:
        sink.close()
    return [e for e in read_events(cfg.events_file) if e["type"] == "metric" and e["kind"] == "train"]


@pytest.mark.parametrize("adapter", ["LORA", "FULL"])
def test_dpo_hands_the_reference_model_to_trl_frozen(
    tmp_path: Path, tiny_model: Path, reference: Path, adapter: str
) -> None:
    data = write_synthetic_dataset(tmp_path / "train.jsonl", 8, family="preference")
    cfg = make_run_config(tmp_path, tiny_model, data, _dpo_spec(adapter, reference))
    cfg.reference_model_path = str(reference)  # what the agent writes into RUN.json
    spec = cfg.job_spec()
    recipe = DPORecipe(cfg, spec, EventSink(cfg.events_file), StopSignal())
    try:
        recipe.setup()
        ref = recipe.trainer.ref_model  # type: ignore[attr-defined]
        assert isinstance(ref, PreTrainedModel)
        assert Path(ref.config._name_or_path) == reference
        assert not ref.training and not any(p.requires_grad for p in ref.parameters())
        policy = next(p for p in recipe.trainer.model.parameters() if p.is_floating_point())
        assert next(ref.parameters()).dtype == policy.dtype
    finally:
        recipe.cleanup()


def test_dpo_trains_against_the_reference_model(tmp_path: Path, tiny_model: Path, reference: Path) -> None:
    data = write_synthetic_dataset(tmp_path / "train.jsonl", 16, family="preference")
    first: dict[str, dict[str, float]] = {}
    for name, ref in (("base", None), ("named", reference)):
        cfg = make_run_config(tmp_path / name, tiny_model, data, _dpo_spec("LORA", ref))
        train = _train(cfg)
        assert [p["step"] for p in train] == [1, 2]
        first[name] = train[0]["values"]
    # Step 1: the policy is the base model (LoRA's B is 0). Against itself it earns no reward at all.
    assert abs(first["base"]["rewards/chosen"]) < 1e-4 and abs(first["base"]["rewards/rejected"]) < 1e-4
    assert abs(first["named"]["rewards/chosen"]) > 1e-3 and abs(first["named"]["rewards/rejected"]) > 1e-3
    assert first["named"]["logps/chosen"] == pytest.approx(first["base"]["logps/chosen"])  # same policy


def test_dpo_refuses_a_reference_model_with_another_tokenizer(
    tmp_path: Path, tiny_model: Path
) -> None:
    stranger = build_tiny_chat_model(tmp_path / "stranger", seed=1)  # another seed trains another tokenizer
    data = write_synthetic_dataset(tmp_path / "train.jsonl", 8, family="preference")
    cfg = make_run_config(tmp_path, tiny_model, data, _dpo_spec("LORA", stranger))
    sink = EventSink(cfg.events_file)
    try:
        assert run(cfg, sink, StopSignal()) == 1
    finally:
        sink.close()
    error = read_events(cfg.events_file)[-1]
    assert error["type"] == "error" and error["reason"] == "TRAINING_FAILED"
    assert "reference model" in error["message"]
    assert "does not share the base model's tokenizer" in error["message"]


def _grpo_spec(reward_model: Path) -> dict[str, Any]:
    return {
        "method": "TRAINING_METHOD_GRPO",
        "adapter": "ADAPTER_TYPE_LORA",
        "lora": {"rank": 4},
        "hyperparameters": HYPERPARAMETERS,
        "grpo": {
            "num_generations": 4,
            "max_completion_length": 8,
            "reward_functions": ["REWARD_FUNCTION_REWARD_MODEL", "REWARD_FUNCTION_LENGTH"],
            "target_length": 16,
            "reward_model": str(reward_model),
        },
    }


@pytest.mark.parametrize("use_rloo", [False, True], ids=["grpo", "rloo"])
def test_grpo_scores_with_the_reward_model(
    tmp_path: Path, tiny_model: Path, reward_model: Path, use_rloo: bool
) -> None:
    data = write_synthetic_dataset(tmp_path / "train.jsonl", 16, family="prompt-only")
    spec = _grpo_spec(reward_model)
    spec["grpo"]["use_rloo"] = use_rloo
    spec["evaluation"] = {"max_examples": 8, "num_samples": 1, "max_new_tokens": 8}
    cfg = make_run_config(tmp_path, tiny_model, data, spec)
    cfg.reward_model_path = str(reward_model)
    cfg.test_file = write_synthetic_dataset(tmp_path / "test.jsonl", 8, seed=7, family="prompt-only")

    recipe = GRPORecipe(cfg, cfg.job_spec(), EventSink(tmp_path / "setup-events.jsonl"), StopSignal())
    recipe.tokenizer = recipe.load_tokenizer(str(tiny_model))
    train_rows, _ = recipe.load_data()
    extras = recipe.trainer_extras(train_rows)
    scorer = extras["reward_funcs"][0]
    assert isinstance(scorer, PreTrainedModel) and scorer.config.num_labels == 1 and not scorer.training
    assert extras["reward_processing_classes"][0] is recipe.tokenizer
    assert extras["reward_processing_classes"][1] is None

    sink = EventSink(cfg.events_file)
    try:
        assert run(cfg, sink, StopSignal()) == 0, read_events(cfg.events_file)[-3:]
    finally:
        sink.close()
    events = read_events(cfg.events_file)
    train = [e for e in events if e["type"] == "metric" and e["kind"] == "train"]
    assert [p["step"] for p in train] == [1, 2]
    values = train[-1]["values"]
    assert f"rewards/{REWARD_MODEL_NAME}/mean" in values, sorted(values)
    assert "rewards/length_closeness/mean" in values
    scores = [p["values"][f"rewards/{REWARD_MODEL_NAME}/mean"] for p in train]
    assert all(s == s and abs(s) < 1e6 for s in scores)  # finite, not NaN
    assert values[f"rewards/{REWARD_MODEL_NAME}/std"] > 0  # it scores completions differently
    # The evaluation after training scores with the reward model too.
    report = json_format.ParseDict(events[-1]["evaluation"], evaluation_pb2.EvaluationReport())
    assert report.status == evaluation_pb2.EVALUATION_STATUS_SUCCEEDED, report.message
    for metrics in (report.base_metrics, report.tuned_metrics):
        assert metrics["mean_reward"] == pytest.approx(
            metrics["reward_reward_model"] + metrics["reward_length_closeness"]
        )


def test_grpo_refuses_a_reward_model_with_another_tokenizer(tmp_path: Path, tiny_model: Path) -> None:
    stranger = build_tiny_reward_model(tmp_path / "stranger", seed=1)
    data = write_synthetic_dataset(tmp_path / "train.jsonl", 8, family="prompt-only")
    cfg = make_run_config(tmp_path, tiny_model, data, _grpo_spec(stranger))
    sink = EventSink(cfg.events_file)
    try:
        assert run(cfg, sink, StopSignal()) == 1
    finally:
        sink.close()
    error = read_events(cfg.events_file)[-1]
    assert error["type"] == "error" and "reward model" in error["message"]
    assert "does not share the base model's tokenizer" in error["message"]
