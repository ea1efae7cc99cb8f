"""The SFT recipe end to end on the tiny model: as a real subprocess where the process boundary matters
(exit codes, SIGTERM), in-process for the error mapping."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from tuneforge.v1 import job_pb2

from tests.worker.helpers import FAST_HYPERPARAMETERS, make_run_config, read_events, resolved, start_recipe
from trainer_worker.errors import TrainingError
from trainer_worker.events import EventSink, MetricEvent, ProgressEvent, decode
from trainer_worker.recipes.sft import SFTRecipe
from trainer_worker.reporting import advance_progress, metric_point, progress_of
from trainer_worker.stop import EXIT_CANCELLED, StopSignal
from trainer_worker.tiny import write_synthetic_chat_dataset
from trainer_worker.train import EXIT_FAILED, run


def _errors(path: Path) -> list[dict]:
    return [e for e in read_events(path) if e["type"] == "error"]


@pytest.mark.slow
def test_lora_run_trains_saves_and_merges(tmp_path: Path, tiny_model: Path, chat_data: Path) -> None:
    spec = {
        "method": "TRAINING_METHOD_SFT",
        "adapter": "ADAPTER_TYPE_LORA",
        "lora": {"rank": 8, "target_modules": ["all-linear"]},
        "hyperparameters": FAST_HYPERPARAMETERS,
        "output": {"merge_adapter": True},
    }
    cfg = make_run_config(tmp_path, tiny_model, chat_data, spec)
    cfg.validation_file = write_synthetic_chat_dataset(tmp_path / "validation.jsonl", 16, seed=9)

    assert start_recipe(cfg, tmp_path).wait(timeout=90) == 0, (tmp_path / "train.log").read_text()

    events = read_events(cfg.events_file)
    types = [e["type"] for e in events]
    assert types.index("state") < types.index("metric") and types[-1] == "result"
    train = [e for e in events if e["type"] == "metric" and e["kind"] == "train"]
    evals = [e for e in events if e["type"] == "metric" and e["kind"] == "eval"]
    assert train[0]["step"] == 1 and train[-1]["step"] == train[-1]["total_steps"] == 40
    assert train[-1]["loss"] < 0.6 * train[0]["loss"], [p["loss"] for p in train]
    assert all(p["tokens_per_second"] > 0 and p["eta_seconds"] is not None for p in train)
    assert len(evals) == 2 and evals[-1]["eval_loss"] < evals[0]["eval_loss"]

    result = events[-1]
    adapter, merged = Path(result["adapter_dir"]), Path(result["merged_dir"])
    assert result["final_metrics"]["train_loss"] > 0 and "eval_loss" in result["final_metrics"]
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "tokenizer.json").is_file()
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter)
        base_logits = AutoModelForCausalLM.from_pretrained(tiny_model)(ids).logits
        tuned_logits = tuned(ids).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(merged)(ids).logits
    assert not torch.allclose(tuned_logits, base_logits, atol=1e-3)
    torch.testing.assert_close(merged_logits, tuned_logits, atol=1e-4, rtol=1e-4)
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer.json").is_file()


@pytest.mark.slow
def test_sigterm_stops_training_between_steps(tmp_path: Path, tiny_model: Path, chat_data: Path) -> None:
    spec = {"hyperparameters": {**FAST_HYPERPARAMETERS, "max_steps": 100_000, "logging_steps": 1}}
    cfg = make_run_config(tmp_path, tiny_model, chat_data, spec)
    process = start_recipe(cfg, tmp_path)
    deadline = time.monotonic() + 60
    while not any(e["type"] == "metric" for e in read_events(cfg.events_file)):
        assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "train.log").read_text()
        time.sleep(0.1)

    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) == EXIT_CANCELLED
    assert time.monotonic() - sent < 10
    events = read_events(cfg.events_file)
    assert events[-1] == {**events[-1], "type": "state", "state": "cancelled"}
    assert not any(e["type"] in ("result", "error") for e in events)


@pytest.mark.slow
def test_sigterm_before_training_interrupts_setup(tmp_path: Path, tiny_model: Path, chat_data: Path) -> None:
    cfg = make_run_config(tmp_path, tiny_model, chat_data)
    process = start_recipe(cfg, tmp_path)
    while not cfg.events_file.exists():
        time.sleep(0.05)
    time.sleep(0.5)  # inside the imports of the training stack

    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) == EXIT_CANCELLED
    # The handler runs at the next Python bytecode: a C extension's module init (pyarrow's, say) can hold
    # it for a few seconds on a loaded machine, so the proof is what did not happen, with a loose bound.
    assert time.monotonic() - sent < 15
    events = read_events(cfg.events_file)
    assert events[-1] == {**events[-1], "type": "state", "state": "cancelled"}
    assert not any(e["type"] == "state" and e["state"] == "running" for e in events), (
        "setup is interrupted, not waited for: training never started"
    )
    assert not any(e["type"] == "metric" for e in events)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        # Specs that never came through CreateJob's resolution: refused, by field, before anything loads.
        (
            {"base_model": "/no-model", "method": "TRAINING_METHOD_DISTILLATION"},
            "The job spec cannot be trained: job spec is invalid: spec.distillation.teacher_model: is "
            "required",
        ),
        (
            {"base_model": "/no-model", "method": "TRAINING_METHOD_DPO",
             "adapter": "ADAPTER_TYPE_PROMPT_TUNING"},
            "The job spec cannot be trained: job spec is invalid: spec.adapter: prompt tuning works with",
        ),
        # A resolved spec this worker will not run.
        (
            resolved(
                {
                    "method": "TRAINING_METHOD_GRPO",
                    "grpo": {
                        "reward_functions": ["REWARD_FUNCTION_USER_CODE"],
                        "reward_code": "def reward(prompts, completions, **columns):\n    return [0.0]\n",
                    },
                    "hyperparameters": {"batch_size": 4},
                },
                "/no-model",
            ),
            "This worker does not run user reward code; set TUNEFORGE_WORKER_ALLOW_USER_REWARD_CODE=true "
            "to allow it.",
        ),
    ],
)
def test_unsupported_spec_fails_before_loading_anything(
    tmp_path: Path, chat_data: Path, spec: dict, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TUNEFORGE_WORKER_ALLOW_USER_REWARD_CODE", raising=False)
    cfg = make_run_config(tmp_path, tmp_path / "no-model", chat_data).model_copy(update={"spec": spec})
    started = time.monotonic()
    assert start_recipe(cfg, tmp_path).wait(timeout=60) == EXIT_FAILED
    assert time.monotonic() - started < 15

    (error,) = _errors(cfg.events_file)
    assert error["reason"] == "TRAINING_FAILED"
    assert error["message"].startswith(message), error["message"]


def _run_in_process(cfg) -> int:
    sink = EventSink(cfg.events_file)
    try:
        return run(cfg, sink, StopSignal())
    finally:
        sink.close()


def test_missing_model_is_model_not_found(tmp_path: Path, chat_data: Path) -> None:
    cfg = make_run_config(tmp_path, tmp_path / "no-model", chat_data)
    assert _run_in_process(cfg) == EXIT_FAILED
    assert _errors(cfg.events_file)[0]["reason"] == "MODEL_NOT_FOUND"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"messages": []}\nnot json\n', "line 2 is not JSON"),
        ('{"question": "a", "answer": "b"}\n', "line 1 has none of"),
        ("\n", "holds no examples"),
    ],
)
def test_bad_rows_are_bad_training_data(
    tmp_path: Path, tiny_model: Path, content: str, expected: str
) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text(content)
    cfg = make_run_config(tmp_path, tiny_model, train)
    assert _run_in_process(cfg) == EXIT_FAILED
    (error,) = _errors(cfg.events_file)
    assert error["reason"] == "BAD_TRAINING_DATA" and expected in error["message"]


def test_nan_loss_is_loss_diverged(tmp_path: Path, tiny_model: Path, chat_data: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    broken = tmp_path / "broken"
    model.save_pretrained(broken)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (broken / name).write_bytes((tiny_model / name).read_bytes())
    spec = {"hyperparameters": {**FAST_HYPERPARAMETERS, "max_steps": 20}}
    cfg = make_run_config(tmp_path, broken, chat_data, spec)

    assert _run_in_process(cfg) == EXIT_FAILED
    (error,) = _errors(cfg.events_file)
    assert error["reason"] == "LOSS_DIVERGED"
    steps = [e["step"] for e in read_events(cfg.events_file) if e["type"] == "metric"]
    assert steps == [1], "training stops at the first logged NaN"
    assert not (cfg.output_dir / "adapter").exists()


def test_full_fine_tuning_saves_a_whole_model(tmp_path: Path, tiny_model: Path, chat_data: Path) -> None:
    spec = {
        "adapter": "ADAPTER_TYPE_FULL",
        "hyperparameters": {**FAST_HYPERPARAMETERS, "max_steps": 3},
    }
    cfg = make_run_config(tmp_path, tiny_model, chat_data, spec)
    assert _run_in_process(cfg) == 0
    result = read_events(cfg.events_file)[-1]
    assert result["type"] == "result" and result["merged_dir"] is None
    model = AutoModelForCausalLM.from_pretrained(result["adapter_dir"])
    assert model.config.vocab_size == json.loads((tiny_model / "config.json").read_text())["vocab_size"]


def test_a_run_shorter_than_a_logging_step_ends_with_its_last_step_as_progress(
    tmp_path: Path, tiny_model: Path, chat_data: Path
) -> None:
    """max_steps 5 < logging_steps 10: the only train point is step 1, yet the job shows 5/5."""
    spec = {"hyperparameters": {**FAST_HYPERPARAMETERS, "max_steps": 5, "logging_steps": 10}}
    cfg = make_run_config(tmp_path, tiny_model, chat_data, spec)
    assert _run_in_process(cfg) == 0
    events = read_events(cfg.events_file)
    assert [e["step"] for e in events if e["type"] == "metric" and e["kind"] == "train"] == [1]
    last = [e for e in events if e["type"] == "progress"][-1]
    assert (last["step"], last["total_steps"]) == (5, 5)

    progress = None  # as the agent folds the events into Job.progress
    for event in map(decode, (json.dumps(e).encode() for e in events)):
        if isinstance(event, MetricEvent) and event.kind == "train":
            progress = progress_of(metric_point(event, "job_test", 1))
        elif isinstance(event, ProgressEvent):
            progress = advance_progress(progress, event)
    assert progress is not None and (progress.step, progress.total_steps) == (5, 5)
    assert progress.HasField("loss") and progress.eta_seconds == 0


@pytest.mark.slow
def test_recipe_stops_when_its_parent_dies(tmp_path: Path, tiny_model: Path, chat_data: Path) -> None:
    spec = {"hyperparameters": {**FAST_HYPERPARAMETERS, "max_steps": 100_000, "logging_steps": 1}}
    cfg = make_run_config(tmp_path, tiny_model, chat_data, spec)
    config = cfg.dump(tmp_path / "RUN.json")
    # A stand-in for the agent: starts the recipe, reports its pid, then waits to be killed.
    command = [sys.executable, "-m", "trainer_worker.train", "--config", str(config)]
    script = f"import subprocess, time; print(subprocess.Popen({command!r}).pid, flush=True); time.sleep(600)"
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    deadline = time.monotonic() + 60
    while not any(e["type"] == "metric" for e in read_events(cfg.events_file)):
        assert time.monotonic() < deadline
        time.sleep(0.1)

    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 30  # stops between steps; a loaded CI machine makes steps slow
    while _alive(child):
        assert time.monotonic() < deadline, "the orphaned recipe kept training"
        time.sleep(0.1)
    assert read_events(cfg.events_file)[-1]["state"] == "cancelled"


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_zero_weight_assistant_messages_are_not_trained(tmp_path: Path, tiny_model: Path) -> None:
    conversation = [
        {"role": "user", "content": "What is 1 plus 1?"},
        {"role": "assistant", "content": "1 plus 1 is 3.", "weight": 0},
        {"role": "user", "content": "Try again."},
        {"role": "assistant", "content": "1 plus 1 is 2.", "weight": 1},
    ]
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"messages": conversation}) + "\n")
    cfg = make_run_config(tmp_path, tiny_model, train)
    recipe = SFTRecipe(cfg, cfg.job_spec(), EventSink(cfg.events_file), StopSignal())
    recipe.setup()

    assert recipe.trainer is not None
    row = recipe.trainer.train_dataset[0]
    trained = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
    assert recipe.tokenizer.decode(trained) == "1 plus 1 is 2.<|im_end|>"


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "What is 2 plus 2?", "completion": "2 plus 2 is 4."},
        {"text": "The capital of Peru is Lima."},
    ],
)
def test_prompt_completion_and_text_rows_train(tmp_path: Path, tiny_model: Path, row: dict) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text((json.dumps(row) + "\n") * 16)
    cfg = make_run_config(
        tmp_path, tiny_model, train, {"hyperparameters": {**FAST_HYPERPARAMETERS, "max_steps": 2}}
    )

    assert _run_in_process(cfg) == 0
    events = read_events(cfg.events_file)
    assert events[-1]["type"] == "result"
    assert any(e["type"] == "log" and e["level"] == "warning" and "chat data" in e["message"] for e in events)


def test_every_knob_together_builds_and_trains(tmp_path: Path, tiny_model: Path, chat_data: Path) -> None:
    hyperparameters = {
        **FAST_HYPERPARAMETERS,
        "epochs": 1,
        "packing": True,
        "max_seq_length": 128,
        "batch_size": 2,
        "gradient_accumulation_steps": 2,
        "gradient_checkpointing": True,
        "lr_scheduler": "LR_SCHEDULER_COSINE_WITH_MIN_LR",
        "optimizer": "OPTIMIZER_SGD",
        "group_by_length": False,
        "eval_steps": 2,
        "logging_steps": 1,
        "early_stopping": {"enabled": True, "patience": 1},
    }
    spec = {
        "lora": {"rank": 4, "target_modules": ["q_proj", "v_proj"], "use_dora": True},
        "hyperparameters": hyperparameters,
    }
    cfg = make_run_config(tmp_path, tiny_model, chat_data, spec)
    cfg.validation_file = write_synthetic_chat_dataset(tmp_path / "validation.jsonl", 8, seed=5)

    assert _run_in_process(cfg) == 0, read_events(cfg.events_file)
    events = read_events(cfg.events_file)
    evals = [e["step"] for e in events if e["type"] == "metric" and e["kind"] == "eval"]
    assert evals and all(step % 2 == 0 for step in evals)
    assert "eval_loss" in events[-1]["final_metrics"]


@pytest.mark.parametrize(
    ("method", "rows", "expected"),
    [
        (
            "TRAINING_METHOD_DPO",
            [{"messages": [{"role": "user", "content": "hi"}]}],
            "train.jsonl line 1 is chat data; DPO trains on rows with 'prompt'+'chosen'+'rejected'.",
        ),
        (
            "TRAINING_METHOD_GRPO",
            [{"prompt": "a", "chosen": "b", "rejected": "c"}],
            "train.jsonl line 1 is preference data; GRPO trains on rows with 'prompt'.",
        ),
        (
            "TRAINING_METHOD_SFT",
            [{"text": "a"}, {"prompt": "q", "completion": "a"}],
            "train.jsonl line 2 is prompt/completion data; earlier lines are text.",
        ),
    ],
)
def test_rows_of_the_wrong_family_are_bad_training_data(
    tmp_path: Path, tiny_model: Path, method: str, rows: list[dict], expected: str
) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = {"method": method, "grpo": {"reward_functions": ["REWARD_FUNCTION_JSON_VALID"]}}
    cfg = make_run_config(tmp_path, tiny_model, train, spec)
    assert _run_in_process(cfg) == EXIT_FAILED
    (error,) = _errors(cfg.events_file)
    assert (error["reason"], error["message"]) == ("BAD_TRAINING_DATA", expected)


# -- what a job states is honoured or refused, never quietly changed -------------------------------------


def test_early_stopping_without_validation_data_is_refused_not_dropped(
    tmp_path: Path, tiny_model: Path, chat_data: Path
) -> None:
    """It used to be switched off with a warning; CreateJob refuses such jobs, and so does the worker."""
    spec = {"hyperparameters": {**FAST_HYPERPARAMETERS, "early_stopping": {"enabled": True}}}
    cfg = make_run_config(tmp_path, tiny_model, chat_data, spec)
    assert cfg.validation_file is None
    assert _run_in_process(cfg) == EXIT_FAILED
    (error,) = _errors(cfg.events_file)
    assert error["reason"] == "TRAINING_FAILED"
    assert error["message"].startswith("spec.hyperparameters.early_stopping.enabled needs validation data")
    assert not any(e["type"] == "metric" for e in read_events(cfg.events_file))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU worker's refusal")
def test_unsupported_gpu_type_is_refused_on_a_cpu_worker(tmp_path: Path, chat_data: Path) -> None:
    """A job for an H100 is not trained on a CPU (the agent hands it back; the recipe refuses it too),
    before the model or the data are read."""
    spec = {"hyperparameters": FAST_HYPERPARAMETERS, "hardware": {"gpu_type": "nvidia-h100"}}
    cfg = make_run_config(tmp_path, tmp_path / "no-model", chat_data, spec)
    assert _run_in_process(cfg) == EXIT_FAILED
    (error,) = _errors(cfg.events_file)
    assert error["reason"] == "TRAINING_FAILED"
    assert error["message"].startswith("spec.hardware.gpu_type is nvidia-h100, but this worker has no GPU")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU worker's refusal")
@pytest.mark.parametrize("precision", ["PRECISION_FP16", "PRECISION_BF16"])
def test_stated_half_precision_is_refused_on_a_cpu_worker_not_downgraded(
    tmp_path: Path, tiny_model: Path, chat_data: Path, precision: str
) -> None:
    # A spec that claims to be resolved but was not resolved as CreateJob resolves it now.
    cfg = make_run_config(tmp_path, tiny_model, chat_data)
    raw = {**cfg.spec, "hyperparameters": {**cfg.spec["hyperparameters"], "precision": precision}}
    refused = cfg.model_copy(update={"spec": raw})
    assert _run_in_process(refused) == EXIT_FAILED
    (error,) = _errors(refused.events_file)
    assert error["reason"] == "TRAINING_FAILED" and "spec.hyperparameters.precision" in error["message"]

    # The recipe's own check, for a spec that got past resolution: fp16/bf16 never becomes fp32.
    recipe = SFTRecipe(refused, refused.job_spec(), EventSink(tmp_path / "unit.jsonl"), StopSignal())
    with pytest.raises(TrainingError) as info:
        recipe.check_hardware()
    wanted = f"spec.hyperparameters.precision is {precision.removeprefix('PRECISION_')}, which needs a GPU"
    assert info.value.message.startswith(wanted)
    qlora = refused.job_spec()
    qlora.hyperparameters.precision = job_pb2.PRECISION_FP32
    qlora.adapter = job_pb2.ADAPTER_TYPE_QLORA
    qlora.quantization.compute_dtype = job_pb2.Precision.Value(precision)
    recipe = SFTRecipe(refused, qlora, EventSink(tmp_path / "unit.jsonl"), StopSignal())
    with pytest.raises(TrainingError) as info:
        recipe.check_hardware()
    assert info.value.message.startswith("spec.quantization.compute_dtype")
