"""JobSpec.speed on a CPU worker: real tiny training runs with the options CPU supports set ON, the job's log
naming what was used and why the rest was not, and ON that a CPU cannot honour failing with
DEPENDENCY_ERROR naming the option (nothing trains in its place)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.worker.helpers import make_run_config, read_events
from trainer_worker.events import EventSink
from trainer_worker.stop import StopSignal
from trainer_worker.tiny import write_synthetic_dataset
from trainer_worker.train import run

HP: dict[str, Any] = {"max_steps": 3, "batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1,
                      "warmup_steps": 0, "save_steps": 1000, "max_seq_length": 128,
                      "precision": "PRECISION_FP32"}
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU worker's speed options")


def _run(
    tmp_path: Path, model: Path, spec: dict[str, Any], family: str = "chat"
) -> tuple[int, Any, list[str]]:
    data = write_synthetic_dataset(tmp_path / "train.jsonl", 24, family=family)
    cfg = make_run_config(tmp_path, model, data, {"evaluation": {"enabled": False}, **spec})
    sink = EventSink(cfg.events_file)
    try:
        code = run(cfg, sink, StopSignal())
    finally:
        sink.close()
    events = read_events(cfg.events_file)
    logs = [str(e.get("message", "")) for e in events if e.get("type") == "log"]
    return code, cfg, logs + [str(e) for e in events if e.get("type") != "log"]


def _speed_line(logs: list[str]) -> str:
    lines = [line for line in logs if line.startswith("Speed options used:")]
    assert len(lines) == 1, logs[:8]
    return lines[0]


def test_sft_trains_with_cpu_speed_options_on_and_the_log_names_them(
    tmp_path: Path, tiny_model: Path
) -> None:
    speed = {"attention": "ATTENTION_IMPLEMENTATION_EAGER", "padding_free": "SPEED_MODE_ON",
             "liger_kernels": "SPEED_MODE_OFF", "torch_compile": "SPEED_MODE_OFF"}
    code, cfg, logs = _run(tmp_path, tiny_model, {
        "method": "TRAINING_METHOD_SFT", "hyperparameters": {**HP, "packing": True}, "speed": speed})
    assert code == 0, logs[-5:]
    assert cfg.speed["attention"] == "eager"
    assert cfg.speed["padding_free"] is True and cfg.speed["activation_offloading"] is False
    assert cfg.speed["liger_kernels"] is False and cfg.speed["torch_compile"] is False
    line = _speed_line(logs)
    assert "attention=eager" in line and "padding_free" in line.split(" Not used:")[0]
    assert "liger_kernels (OFF in the spec)" in line and "torch_compile (OFF in the spec)" in line


def test_sft_trains_packed_without_padding_free(tmp_path: Path, tiny_model: Path) -> None:
    code, cfg, logs = _run(tmp_path, tiny_model, {
        "method": "TRAINING_METHOD_SFT", "hyperparameters": {**HP, "packing": True},
        "speed": {"padding_free": "SPEED_MODE_OFF"}})
    assert code == 0, logs[-5:]
    assert cfg.speed["padding_free"] is False
    assert "padding_free (OFF in the spec (packed rows share one causal attention))" in _speed_line(logs)


def test_auto_on_cpu_is_sdpa_and_nothing_else(tmp_path: Path, tiny_model: Path) -> None:
    code, cfg, logs = _run(tmp_path, tiny_model, {"method": "TRAINING_METHOD_SFT", "hyperparameters": HP})
    assert code == 0, logs[-5:]
    assert cfg.speed["attention"] == "sdpa"
    assert not any(cfg.speed[o] for o in ("liger_kernels", "torch_compile", "activation_offloading",
                                          "padding_free"))
    line = _speed_line(logs)
    assert "attention=sdpa" in line and "liger_kernels (AUTO: this worker has no GPU" in line


def test_dpo_trains_with_the_speed_options_auto_and_sdpa(tmp_path: Path, tiny_model: Path) -> None:
    code, cfg, logs = _run(tmp_path, tiny_model, {
        "method": "TRAINING_METHOD_DPO", "hyperparameters": HP,
        "speed": {"attention": "ATTENTION_IMPLEMENTATION_SDPA"}}, family="preference")
    assert code == 0, logs[-5:]
    assert cfg.speed["attention"] == "sdpa" and not cfg.speed["padding_free"]
    assert "padding_free (AUTO: needs packing with SFT or distillation)" in _speed_line(logs)


@pytest.mark.slow
def test_sft_trains_with_torch_compile_on(tmp_path: Path, tiny_model: Path) -> None:
    """torch.compile on the CPU (inductor, needs a C++ compiler): slow, since it compiles the tiny model."""
    code, cfg, logs = _run(tmp_path, tiny_model, {
        "method": "TRAINING_METHOD_SFT", "hyperparameters": HP, "speed": {"torch_compile": "SPEED_MODE_ON"}})
    assert code == 0, logs[-5:]
    assert cfg.speed["torch_compile"] is True
    assert "torch_compile" in _speed_line(logs).split(" Not used:")[0]


@pytest.mark.parametrize(("speed", "option"), [
    ({"liger_kernels": "SPEED_MODE_ON"}, "spec.speed.liger_kernels"),
    ({"attention": "ATTENTION_IMPLEMENTATION_FLASH_ATTENTION_2"}, "spec.speed.attention"),
    # TRL's offloading copies from an accelerator to the host; without one it fails (tried on CPU).
    ({"activation_offloading": "SPEED_MODE_ON"}, "spec.speed.activation_offloading"),
])
def test_on_that_a_cpu_cannot_honour_fails_naming_the_option(
    tmp_path: Path, tiny_model: Path, speed: dict[str, str], option: str
) -> None:
    """A spec with such an option ON that reaches a CPU worker without coming through CreateJob fails before
    anything loads, naming the option (the worker re-checks the spec with CreateJob's rules; on a GPU
    worker that lacks the package it is resolve_speed's DEPENDENCY_ERROR, tests/worker/test_speed.py)."""
    hp = {k: v for k, v in HP.items() if k != "precision"}
    data = write_synthetic_dataset(tmp_path / "train.jsonl", 8, family="chat")
    cfg = make_run_config(tmp_path, tiny_model, data, {"method": "TRAINING_METHOD_SFT", "hyperparameters": hp,
                                                       "evaluation": {"enabled": False}})
    cfg.spec["speed"] = speed
    sink = EventSink(cfg.events_file)
    try:
        code = run(cfg, sink, StopSignal())
    finally:
        sink.close()
    assert code != 0
    errors = [e for e in read_events(cfg.events_file) if e.get("type") == "error"]
    assert len(errors) == 1 and option in errors[0]["message"], errors
    assert not (cfg.output_dir / "adapter").exists()


@pytest.mark.parametrize(("padding_free", "strategy", "flag"), [
    ("SPEED_MODE_UNSPECIFIED", "bfd", True), ("SPEED_MODE_ON", "bfd", True),
    ("SPEED_MODE_OFF", "wrapped", False),
])
def test_padding_free_reaches_trls_sft_config(
    tmp_path: Path, tiny_model: Path, padding_free: str, strategy: str, flag: bool
) -> None:
    """With packing, padding-free is TRL's best-fit packing (each example attends within itself); OFF packs
    the classic way (rows concatenated and cut, attending across each other)."""
    from trainer_worker.recipes.sft import SFTRecipe

    data = write_synthetic_dataset(tmp_path / "train.jsonl", 8, family="chat")
    cfg = make_run_config(tmp_path, tiny_model, data, {
        "hyperparameters": {**HP, "packing": True}, "speed": {"padding_free": padding_free,
                                                             "torch_compile": "SPEED_MODE_ON"}})
    recipe = SFTRecipe(cfg, cfg.job_spec(), EventSink(cfg.events_file), StopSignal())
    config = recipe.trainer_config(recipe.training_args(has_validation=False))
    assert (config.packing_strategy, config.padding_free) == (strategy, flag)
    assert config.torch_compile and not config.use_liger_kernel and not config.activation_offloading
    assert cfg.speed is not None and cfg.speed["padding_free"] is flag


def test_the_training_process_writes_the_resolved_options_back_to_run_json(
    tmp_path: Path, tiny_model: Path
) -> None:
    """`python -m trainer_worker.train` (as the agent and the GPU benchmark start it): RUN.json comes back
    with RunConfig.speed filled in."""
    from trainer_worker.run_config import RunConfig
    from trainer_worker.train import train_rank

    data = write_synthetic_dataset(tmp_path / "train.jsonl", 8, family="chat")
    cfg = make_run_config(tmp_path, tiny_model, data, {
        "hyperparameters": {**HP, "max_steps": 1}, "evaluation": {"enabled": False},
        "speed": {"attention": "ATTENTION_IMPLEMENTATION_EAGER"}})
    config = cfg.dump(tmp_path / "RUN.json")
    assert RunConfig.load(config).speed is None
    assert train_rank(config, handle_signals=False) == 0
    speed = RunConfig.load(config).speed
    assert speed is not None and speed["attention"] == "eager"
    assert speed["reasons"]["attention"] == "asked for"
