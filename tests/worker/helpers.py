"""Helpers for the worker tests: run configs, the recipe as a subprocess, reading events back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from tuneforge.v1 import job_pb2

from trainer_worker.run_config import RunConfig
from tuneforge_core.spec import resolve_spec

# A learning rate that moves the tiny random-init model visibly within a couple of short epochs.
FAST_HYPERPARAMETERS: dict[str, Any] = {
    "epochs": 2,
    "batch_size": 8,
    "learning_rate": 2e-3,
    "logging_steps": 5,
    "warmup_steps": 0,
    "save_steps": 1000,
}


def resolved(spec: dict[str, Any], model: Path | str) -> dict[str, Any]:
    """A partial spec as the jobs service queues it: resolved, with the model as its base model."""
    proto = json_format.ParseDict(spec, job_pb2.JobSpec())
    proto.base_model = proto.base_model or str(Path(model).absolute())
    out = resolve_spec(proto, allow_user_reward_code=True, require_dataset=False)
    return RunConfig.spec_to_dict(out)


def make_run_config(
    tmp_path: Path, model: Path | str, train_file: Path, spec: dict[str, Any] | None = None
) -> RunConfig:
    spec = spec or {"method": "TRAINING_METHOD_SFT", "hyperparameters": FAST_HYPERPARAMETERS}
    return RunConfig(
        job_id="job_test",
        spec=resolved(spec, model),
        model_path=str(model),
        train_file=train_file,
        output_dir=tmp_path / "out",
        events_file=tmp_path / "events.jsonl",
    )


def read_events(path: Path) -> list[dict[str, Any]]:
    """The events written so far: each ends with a newline, so a last line without one is still being
    written (read while a rank appends it) and is left for the next read."""
    if not path.exists():
        return []
    text = path.read_text()
    complete = text[:text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.strip()]


def start_recipe(cfg: RunConfig, tmp_path: Path) -> subprocess.Popen[bytes]:
    """Start ``python -m trainer_worker.train`` exactly as the agent does, output in tmp_path/train.log."""
    config = cfg.dump(tmp_path / "RUN.json")
    with (tmp_path / "train.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "trainer_worker.train", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
