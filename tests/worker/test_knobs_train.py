"""The seeds' new knobs train: a few steps of GRPO (and RLOO) and SFT on the tiny model with them set.

The per-field mapping is tests/worker/test_no_ignored_fields.py; this proves the configurations it checks
also run: TRL accepts them together, the wildcard LoRA targets select the modules they name, a fraction of
an epoch evaluates at the steps it should, and the best model is kept.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from tests.worker.helpers import make_run_config, read_events
from trainer_worker.events import EventSink
from trainer_worker.recipes import rewards
from trainer_worker.stop import StopSignal
from trainer_worker.tiny import write_synthetic_dataset
from trainer_worker.train import run

pytestmark = pytest.mark.slow


def _train(cfg: Any) -> list[dict[str, Any]]:
    sink = EventSink(cfg.events_file)
    try:
        assert run(cfg, sink, StopSignal()) == 0, read_events(cfg.events_file)[-3:]
    finally:
        sink.close()
    return read_events(cfg.events_file)


def _grpo_spec(**grpo: Any) -> dict[str, Any]:
    return {
        "method": "TRAINING_METHOD_GRPO",
        "lora": {"rank": 4, "target_modules": ["model.layers.*.self_attn.*"]},
        "hyperparameters": {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1,
                            "warmup_steps": 0, "save_steps": 1000, "attention_dropout": 0.1},
        "evaluation": {"enabled": False},
        "grpo": {"num_generations": 4, "max_completion_length": 8,
                 "reward_functions": ["REWARD_FUNCTION_LENGTH"], "target_length": 16, **grpo},
    }


@pytest.mark.parametrize(
    "grpo",
    [
        {"clip_epsilon_high": 0.28, "ratio_clip_c": 3.0, "overlong_filtering": True,
         "token_level_loss": False, "normalize_rewards": False, "num_prompts_per_step": 2},
        {"use_rloo": True, "normalize_rewards": True, "overlong_filtering": True},
    ],
    ids=["grpo", "rloo"],
)
def test_grpo_trains_with_the_seed_knobs(tmp_path: Path, tiny_model: Path, grpo: dict[str, Any],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(rewards.ALLOW_USER_CODE_ENV, raising=False)
    data = write_synthetic_dataset(tmp_path / "train.jsonl", 16, family="prompt-only")
    cfg = make_run_config(tmp_path, tiny_model, data, _grpo_spec(**grpo))
    events = _train(cfg)
    train = [e for e in events if e["type"] == "metric" and e["kind"] == "train"]
    assert [e["step"] for e in train][-1] == 2
    adapter = cfg.output_dir / "adapter"
    targets = json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    assert isinstance(targets, str) and "self_attn" in targets  # the wildcard went to PEFT as a regex
    names = list(load_file(str(adapter / "adapter_model.safetensors")))
    assert names and all(".self_attn." in name for name in names), names  # attention only, no MLP


def test_sft_evaluates_every_half_epoch_keeps_the_best_and_derives_accumulation(
    tmp_path: Path, tiny_model: Path, chat_data: Path
) -> None:
    spec = {
        "lora": {"rank": 4, "target_modules": ["*.q_proj", "*.v_proj"]},
        "hyperparameters": {"epochs": 1, "batch_size": 4, "global_batch_size": 8, "eval_batch_size": 2,
                            "eval_epoch_fraction": 0.5, "keep_best_model": True, "learning_rate": 2e-3,
                            "logging_steps": 1, "warmup_steps": 0, "max_seq_length": 64,
                            "attention_dropout": 0.1},
        "evaluation": {"enabled": False},
    }
    data = write_synthetic_dataset(tmp_path / "train.jsonl", 32, family="chat")
    cfg = make_run_config(tmp_path, tiny_model, data, spec)
    cfg.validation_file = write_synthetic_dataset(tmp_path / "validation.jsonl", 4, seed=3, family="chat")
    assert cfg.spec["hyperparameters"]["gradient_accumulation_steps"] == 2  # 8 / 4
    events = _train(cfg)
    train_steps = [e["step"] for e in events if e["type"] == "metric" and e["kind"] == "train"]
    assert max(train_steps) == 4  # 32 rows / 8 per optimizer step
    evals = sorted({e["step"] for e in events if e["type"] == "metric" and e["kind"] == "eval"})
    assert evals[:2] == [2, 4], evals  # every half epoch (2 steps)
    result = events[-1]
    assert "eval_loss" in result["final_metrics"]
    assert result["kept_step"] in (2, 4)  # the best evaluation's step (keep_best_model)
    names = list(load_file(str(cfg.output_dir / "adapter" / "adapter_model.safetensors")))
    assert names and all(n.split(".lora_")[0].endswith(("q_proj", "v_proj")) for n in names), names


def test_dpo_keeps_the_best_by_reward_margin(tmp_path: Path, tiny_model: Path) -> None:
    spec = {
        "method": "TRAINING_METHOD_DPO",
        "lora": {"rank": 4, "target_modules": ["*.q_proj"]},
        "hyperparameters": {"max_steps": 2, "batch_size": 4, "eval_steps": 1, "keep_best_model": True,
                            "metric_for_best_model": "eval_rewards/margins", "learning_rate": 1e-3,
                            "logging_steps": 1, "warmup_steps": 0, "max_seq_length": 64},
        "evaluation": {"enabled": False},
    }
    data = write_synthetic_dataset(tmp_path / "train.jsonl", 8, family="preference")
    cfg = make_run_config(tmp_path, tiny_model, data, spec)
    cfg.validation_file = write_synthetic_dataset(tmp_path / "validation.jsonl", 4, seed=3,
                                                  family="preference")
    events = _train(cfg)
    evals = [e for e in events if e["type"] == "metric" and e["kind"] == "eval"]
    assert {e["step"] for e in evals} >= {1, 2}
    assert all("eval_rewards/margins" in e["values"] for e in evals)
    margins = {e["step"]: e["values"]["eval_rewards/margins"] for e in evals}
    assert events[-1]["kept_step"] == max(margins, key=lambda step: margins[step])  # higher is better
