"""Every method x adapter combination the jobs service accepts trains the tiny model on CPU and its output
loads back: adapters through PEFT, full and merged models through AutoModelForCausalLM.

Two optimizer steps each on 16 rows, in-process on one tiny model built once per session: the 20 combinations
take about a minute of CPU (two to three minutes of wall time on the shared two-core machine).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from google.protobuf.json_format import ParseDict
from peft import PeftConfig, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from tuneforge.v1 import job_pb2

from tests.worker.helpers import make_run_config, read_events, start_recipe
from trainer_worker.events import EventSink
from trainer_worker.stop import StopSignal
from trainer_worker.tiny import build_tiny_chat_model, write_synthetic_dataset
from trainer_worker.train import run
from tuneforge_core.spec import resolve_spec

pytestmark = pytest.mark.slow

FAMILY = {
    "SFT": "chat",
    "DISTILLATION": "chat",
    "DPO": "preference",
    "ORPO": "preference",
    "KTO": "kto",
    "GRPO": "prompt-only",
}
ADAPTERS = {
    "SFT": ("LORA", "QLORA", "FULL", "PROMPT_TUNING"),
    "DISTILLATION": ("LORA", "QLORA", "FULL", "PROMPT_TUNING"),
    "DPO": ("LORA", "QLORA", "FULL"),
    "ORPO": ("LORA", "QLORA", "FULL"),
    "KTO": ("LORA", "QLORA", "FULL"),
    "GRPO": ("LORA", "QLORA", "FULL"),
}
MATRIX = [(method, adapter) for method, adapters in ADAPTERS.items() for adapter in adapters]
HYPERPARAMETERS = {
    "max_steps": 2,
    "batch_size": 4,
    "learning_rate": 1e-3,
    "logging_steps": 1,
    "warmup_steps": 0,
    "save_steps": 1000,
    "max_seq_length": 64,
}
PROBE = torch.tensor([[5, 17, 42, 99, 7, 3]])


def _spec(method: str, adapter: str, teacher: Path) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "base_model": "/models/tiny",
        "dataset": "ds_test",
        "method": f"TRAINING_METHOD_{method}",
        "adapter": f"ADAPTER_TYPE_{adapter}",
        "lora": {"rank": 4},
        "prompt_tuning": {"num_virtual_tokens": 4, "init_text": "Answer the question."},
        "hyperparameters": HYPERPARAMETERS,
        "grpo": {
            "num_generations": 4,
            "max_completion_length": 8,
            "reward_functions": ["REWARD_FUNCTION_EXACT_MATCH", "REWARD_FUNCTION_LENGTH"],
            "target_length": 16,
        },
        "output": {"merge_adapter": adapter in ("LORA", "QLORA")},
    }
    if method == "DISTILLATION":  # another method's teacher is refused
        spec["distillation"] = {"teacher_model": str(teacher), "temperature": 2.0, "alpha": 0.5}
    resolve_spec(ParseDict(spec, job_pb2.JobSpec()))  # the matrix is what the jobs service accepts
    return spec


@pytest.fixture(scope="module")
def teacher(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wider model with the tiny model's tokenizer (same seed, same tokenizer; other weights)."""
    return build_tiny_chat_model(tmp_path_factory.mktemp("teacher") / "model", hidden_size=96)


@pytest.mark.parametrize(("method", "adapter"), MATRIX, ids=[f"{m}-{a}" for m, a in MATRIX])
def test_method_trains_and_its_output_loads_back(
    tmp_path: Path, tiny_model: Path, teacher: Path, method: str, adapter: str
) -> None:
    data = write_synthetic_dataset(tmp_path / "train.jsonl", 16, family=FAMILY[method])
    cfg = make_run_config(tmp_path, tiny_model, data, _spec(method, adapter, teacher))
    sink = EventSink(cfg.events_file)
    try:
        assert run(cfg, sink, StopSignal()) == 0, read_events(cfg.events_file)[-3:]
    finally:
        sink.close()

    events = read_events(cfg.events_file)
    train = [e for e in events if e["type"] == "metric" and e["kind"] == "train"]
    assert [p["step"] for p in train] == [1, 2] and all(p["loss"] is not None for p in train)
    result = events[-1]
    assert result["type"] == "result" and result["final_metrics"]["global_step"] == 2
    output = Path(result["adapter_dir"])
    assert (output / "tokenizer.json").is_file() and not list(output.glob("*.bin"))

    with torch.no_grad():
        base_logits = AutoModelForCausalLM.from_pretrained(tiny_model)(PROBE).logits
        if adapter == "FULL":
            assert output.name == "model" and (output / "model.safetensors").is_file()
            tuned_logits = AutoModelForCausalLM.from_pretrained(output)(PROBE).logits
        else:
            assert (output / "adapter_model.safetensors").is_file()
            peft_type = PeftConfig.from_pretrained(output).peft_type
            assert peft_type == ("PROMPT_TUNING" if adapter == "PROMPT_TUNING" else "LORA")
            tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), output)
            tuned_logits = tuned(PROBE).logits[:, -PROBE.shape[1] :]
    assert tuned_logits.shape == base_logits.shape and torch.isfinite(tuned_logits).all()
    if adapter != "PROMPT_TUNING":  # a soft prompt changes the input, not the weights these logits probe
        assert not torch.allclose(tuned_logits, base_logits, atol=1e-5), "training changed nothing"

    if adapter in ("LORA", "QLORA"):
        merged = Path(result["merged_dir"])
        assert (merged / "model.safetensors").is_file()
        with torch.no_grad():
            merged_logits = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(PROBE).logits
        # QLoRA merges into the base dequantized to its compute dtype (bf16 on CPUs that have it).
        tolerance = 1e-4 if adapter == "LORA" else 0.1
        torch.testing.assert_close(merged_logits, tuned_logits, atol=tolerance, rtol=0)
    else:
        assert result["merged_dir"] is None


def test_dpo_runs_through_the_training_entry_point(tmp_path: Path, tiny_model: Path, teacher: Path) -> None:
    """The agent's path: ``python -m trainer_worker.train --config RUN.json`` in its own process."""
    data = write_synthetic_dataset(tmp_path / "train.jsonl", 16, family="preference")
    spec = _spec("DPO", "LORA", teacher)
    spec["dpo"] = {"beta": 0.2, "sft_loss_weight": 0.5, "average_log_probs": True}
    cfg = make_run_config(tmp_path, tiny_model, data, spec)
    cfg.validation_file = write_synthetic_dataset(
        tmp_path / "validation.jsonl", 4, seed=3, family="preference"
    )

    assert start_recipe(cfg, tmp_path).wait(timeout=120) == 0, (tmp_path / "train.log").read_text()[-3000:]
    events = read_events(cfg.events_file)
    assert events[-1]["type"] == "result" and events[-1]["merged_dir"]
    train = [e for e in events if e["type"] == "metric" and e["kind"] == "train"]
    # DPO's own metrics travel with the loss (MetricPoint.values).
    assert {"rewards/margins", "rewards/accuracies"} <= train[-1]["values"].keys()
    assert any(e["type"] == "metric" and e["kind"] == "eval" for e in events)


def test_grpo_runs_user_reward_code_where_the_worker_allows_it(
    tmp_path: Path, tiny_model: Path, teacher: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNEFORGE_WORKER_ALLOW_USER_REWARD_CODE", "true")
    calls = tmp_path / "calls.txt"
    spec = _spec("GRPO", "LORA", teacher)
    spec["grpo"] = {
        **spec["grpo"],
        "reward_functions": ["REWARD_FUNCTION_USER_CODE"],
        "reward_code": (
            "def reward(prompts, completions, answer, **_):\n"
            f"    open({str(calls)!r}, 'a').write(f'{{len(completions)}}\\n')\n"
            "    return [float(len(c[0]['content'])) for c in completions]\n"
        ),
    }
    resolve_spec(ParseDict(spec, job_pb2.JobSpec()), allow_user_reward_code=True)
    data = write_synthetic_dataset(tmp_path / "train.jsonl", 16, family="prompt-only")
    cfg = make_run_config(tmp_path, tiny_model, data, spec)
    sink = EventSink(cfg.events_file)
    try:
        assert run(cfg, sink, StopSignal()) == 0, read_events(cfg.events_file)[-3:]
    finally:
        sink.close()
    assert calls.read_text().split() == ["4", "4"], "one call per generation batch of 4 completions"
    train = [e for e in read_events(cfg.events_file) if e["type"] == "metric" and e["kind"] == "train"]
    assert "rewards/user_reward/mean" in train[-1]["values"]


def test_distillation_refuses_a_teacher_with_another_tokenizer(
    tmp_path: Path, tiny_model: Path, chat_data: Path
) -> None:
    stranger = build_tiny_chat_model(tmp_path / "stranger", seed=1)  # another seed trains another tokenizer
    cfg = make_run_config(tmp_path, tiny_model, chat_data, _spec("DISTILLATION", "LORA", stranger))
    sink = EventSink(cfg.events_file)
    try:
        assert run(cfg, sink, StopSignal()) == 1
    finally:
        sink.close()
    error = read_events(cfg.events_file)[-1]
    assert error["type"] == "error" and error["reason"] == "TRAINING_FAILED"
    assert "does not share the base model's tokenizer" in error["message"]
    assert not any(e["type"] == "metric" for e in read_events(cfg.events_file))


@pytest.mark.parametrize(
    "optimizer",
    ["OPTIMIZER_ADAMW_8BIT", "OPTIMIZER_PAGED_ADAMW", "OPTIMIZER_PAGED_ADAMW_8BIT", "OPTIMIZER_ADAFACTOR"],
)
def test_bitsandbytes_and_adafactor_optimizers_train(
    tmp_path: Path, tiny_model: Path, chat_data: Path, optimizer: str
) -> None:
    """bitsandbytes 0.50 runs its 8-bit and paged optimizers on CPU too, so the jobs service accepts them."""
    spec = {"hyperparameters": {**HYPERPARAMETERS, "optimizer": optimizer}, "lora": {"rank": 4}}
    resolve_spec(ParseDict({**spec, "base_model": "org/model", "dataset": "ds_1"}, job_pb2.JobSpec()))
    cfg = make_run_config(tmp_path, tiny_model, chat_data, spec)
    sink = EventSink(cfg.events_file)
    try:
        assert run(cfg, sink, StopSignal()) == 0, read_events(cfg.events_file)[-3:]
    finally:
        sink.close()
    adapter = load_file(Path(read_events(cfg.events_file)[-1]["adapter_dir"]) / "adapter_model.safetensors")
    lora_b = [tensor for name, tensor in adapter.items() if "lora_B" in name]
    assert lora_b and any(tensor.abs().sum() > 0 for tensor in lora_b), (
        "LoRA B starts at 0; the optimizer moved it"
    )
