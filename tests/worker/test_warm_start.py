"""Warm start in the recipe, on the tiny model: a LoRA job that starts from another job's adapter trains that
adapter on (the same tensors at step 0, its first loss where the source's ended), and restore_optimizer_state
continues the source checkpoint's optimizer and scheduler; the agent's download half is tested against a
real local object store."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file
from tuneforge.events.v1 import events_pb2

from tests.worker.helpers import FAST_HYPERPARAMETERS, make_run_config, read_events
from trainer_worker import warm_start
from trainer_worker.errors import TrainingError
from trainer_worker.events import EventSink
from trainer_worker.recipes.sft import SFTRecipe
from trainer_worker.run_config import RunConfig
from trainer_worker.stop import StopSignal
from trainer_worker.warm_start import WarmStart
from tuneforge_core.storage import LocalObjectStore

LORA = {"rank": 8, "target_modules": ["all-linear"]}


def spec(max_steps: int, **hp: Any) -> dict[str, Any]:
    return {"method": "TRAINING_METHOD_SFT", "adapter": "ADAPTER_TYPE_LORA", "lora": LORA,
            "evaluation": {"enabled": False},
            "hyperparameters": {**FAST_HYPERPARAMETERS, "max_steps": max_steps, "logging_steps": 1, **hp}}


def train_losses(cfg: RunConfig) -> list[float]:
    return [e["loss"] for e in read_events(cfg.events_file)
            if e["type"] == "metric" and e["kind"] == "train" and e.get("loss") is not None]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, chat_data: Path) -> RunConfig:
    """A finished LoRA run of 20 steps with a checkpoint at step 10 (and 20)."""
    tmp = tmp_path_factory.mktemp("source")
    cfg = make_run_config(tmp, tiny_model, chat_data, spec(20, save_steps=10))
    recipe = SFTRecipe(cfg, cfg.job_spec(), EventSink(cfg.events_file), StopSignal())
    adapter, _, _ = recipe.run()
    assert (adapter / "adapter_model.safetensors").is_file()
    ADAPTERS[cfg.job_id] = adapter
    return cfg


ADAPTERS: dict[str, Path] = {}


def adapter_dir(cfg: RunConfig) -> Path:
    return ADAPTERS[cfg.job_id]


def warm(tmp_path: Path, tiny_model: Path, chat_data: Path, path: Path, *, steps: int = 3, step: int = 0,
         restore: bool = False) -> SFTRecipe:
    cfg = make_run_config(tmp_path, tiny_model, chat_data, spec(steps))
    cfg.warm_start = WarmStart(job_id="job_src", uri="file:///src", path=path, step=step,
                               restore_optimizer_state=restore)
    return SFTRecipe(cfg, cfg.job_spec(), EventSink(cfg.events_file), StopSignal())


def test_a_warm_started_lora_run_trains_the_source_adapter_on(
    tmp_path: Path, tiny_model: Path, chat_data: Path, source: RunConfig
) -> None:
    folder = Path(adapter_dir(source))
    recipe = warm(tmp_path, tiny_model, chat_data, folder)
    recipe.setup()
    assert recipe.trainer is not None
    saved = load_file(str(folder / "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(recipe.trainer.model)
    assert saved.keys() == loaded.keys() and saved
    for key, tensor in saved.items():
        torch.testing.assert_close(loaded[key].float(), tensor.float(), msg=key)
    model = recipe.trainer.model
    assert model is not None
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable), "the adapter trains, the base stays frozen"

    recipe.train()
    first, fresh_first, source_last = (train_losses(recipe.cfg)[0], train_losses(source)[0],
                                       train_losses(source)[-1])
    assert abs(first - source_last) < 0.5 * (fresh_first - source_last), (first, source_last, fresh_first)
    logs = [e["message"] for e in read_events(recipe.cfg.events_file) if e["type"] == "log"]
    assert any("Starting from job job_src's final weights" in m for m in logs), logs


def test_restore_optimizer_state_continues_the_checkpoints_optimizer(
    tmp_path: Path, tiny_model: Path, chat_data: Path, source: RunConfig
) -> None:
    checkpoint = source.output_dir / "checkpoints" / "checkpoint-10"  # as the worker uploads it
    assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / "adapter_model.safetensors").is_file()
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    recipe = warm(tmp_path, tiny_model, chat_data, checkpoint, steps=2, step=10, restore=True)
    recipe.setup()
    recipe.train()
    trainer = recipe.trainer
    assert trainer is not None and trainer.lr_scheduler is not None and trainer.optimizer is not None
    assert trainer.lr_scheduler.last_epoch == 12, "the source's schedule at step 10, then 2 more steps"
    state = trainer.optimizer.state_dict()["state"]
    assert {int(s["step"]) for s in state.values()} == {12}
    assert saved["state"].keys() == state.keys()
    logs = [e["message"] for e in read_events(recipe.cfg.events_file) if e["type"] == "log"]
    assert any(m.startswith("Restored the optimizer and learning-rate scheduler state of job job_src's "
                            "checkpoint of step 10") for m in logs), logs

    # Without it: the weights only, a fresh optimizer.
    fresh = warm(tmp_path / "fresh", tiny_model, chat_data, checkpoint, steps=2, step=10)
    fresh.setup()
    fresh.train()
    assert fresh.trainer is not None and fresh.trainer.lr_scheduler is not None
    assert fresh.trainer.lr_scheduler.last_epoch == 2


def test_restore_needs_the_optimizer_files(tmp_path: Path, tiny_model: Path, chat_data: Path,
                                           source: RunConfig) -> None:
    recipe = warm(tmp_path, tiny_model, chat_data, Path(adapter_dir(source)), restore=True)
    with pytest.raises(TrainingError, match=r"has no optimizer\.pt or scheduler\.pt"):
        recipe.setup()


def test_the_agent_downloads_the_folder_and_needs_no_source_afterwards(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    store.put_bytes("jobs/acme/job_src/checkpoints/checkpoint-10/adapter_model.safetensors", b"w")
    store.put_bytes("jobs/acme/job_src/checkpoints/checkpoint-10/optimizer.pt", b"o")
    uri = store.uri("jobs/acme/job_src/checkpoints/checkpoint-10")
    source = events_pb2.WarmStartSource(job_id="job_src", uri=uri, step=10, restore_optimizer_state=True)
    lines: list[str] = []
    got = asyncio.run(warm_start.fetch(source, lambda u: (store, store.key_of(u)), tmp_path / "work",
                                       lines.append))
    assert got is not None and got.step == 10 and got.restore_optimizer_state
    assert sorted(p.name for p in got.path.iterdir()) == ["adapter_model.safetensors", "optimizer.pt"]
    store.delete_prefix("jobs/acme/job_src/")  # the source job deleted: the copy is all training reads
    assert (got.path / "optimizer.pt").read_bytes() == b"o"
    assert asyncio.run(warm_start.fetch(events_pb2.WarmStartSource(), lambda u: (store, u), tmp_path,
                                        lines.append)) is None
    gone = events_pb2.WarmStartSource(job_id="job_gone", uri=store.uri("jobs/acme/job_gone/adapter"))
    with pytest.raises(TrainingError, match="no longer stored"):
        asyncio.run(warm_start.fetch(gone, lambda u: (store, store.key_of(u)), tmp_path / "w2", lines.append))


def test_full_fine_tuning_starts_from_the_source_model(
    tmp_path: Path, tiny_model: Path, chat_data: Path
) -> None:
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01)
    source = tmp_path / "source-model"
    trained.save_pretrained(source)
    cfg = make_run_config(tmp_path, tiny_model, chat_data, {
        "method": "TRAINING_METHOD_SFT", "adapter": "ADAPTER_TYPE_FULL", "evaluation": {"enabled": False},
        "hyperparameters": {**FAST_HYPERPARAMETERS, "max_steps": 1}})
    cfg.warm_start = WarmStart(job_id="job_full", uri="file:///full", path=source)
    recipe = SFTRecipe(cfg, cfg.job_spec(), EventSink(cfg.events_file), StopSignal())
    recipe.setup()
    assert recipe.trainer is not None and recipe.trainer.model is not None
    for (name, got), want in zip(recipe.trainer.model.named_parameters(), trained.parameters(), strict=True):
        torch.testing.assert_close(got.detach().float(), want.detach().float(), msg=name)
    logs = [e["message"] for e in read_events(cfg.events_file) if e["type"] == "log"]
    assert any(f"Loading the base model from {source}" in m for m in logs), logs
