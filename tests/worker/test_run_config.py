"""RUN.json round-trips, and the worker trains only specs the jobs service resolved."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf.json_format import ParseError
from tuneforge.v1 import job_pb2

from trainer_worker.errors import TrainingError
from trainer_worker.recipes import check_supported
from trainer_worker.run_config import RunConfig
from tuneforge_core.reasons import Reason
from tuneforge_core.spec import resolve_spec


def test_run_config_round_trips_and_rejects_unknown_spec_fields(tmp_path: Path) -> None:
    spec = job_pb2.JobSpec(base_model="/models/x", method=job_pb2.TRAINING_METHOD_SFT)
    spec.hyperparameters.lr_scheduler = job_pb2.LR_SCHEDULER_LINEAR
    spec = resolve_spec(spec, require_dataset=False)
    cfg = RunConfig(
        job_id="job_1",
        attempt=2,
        spec=RunConfig.spec_to_dict(spec),
        model_path="/models/x",
        train_file=tmp_path / "train.jsonl",
        output_dir=tmp_path / "out",
        events_file=tmp_path / "events.jsonl",
    )
    loaded = RunConfig.load(cfg.dump(tmp_path / "RUN.json"))

    assert loaded == cfg
    assert loaded.spec["hyperparameters"]["lr_scheduler"] == "LR_SCHEDULER_LINEAR"
    assert loaded.job_spec().hyperparameters.lr_scheduler == job_pb2.LR_SCHEDULER_LINEAR
    with pytest.raises(ParseError):
        loaded.model_copy(update={"spec": {"no_such_field": 1}}).job_spec()


def test_the_worker_refuses_a_spec_that_was_not_resolved() -> None:
    """The worker fills in no default: a spec that skipped CreateJob's resolution fails at once, by name."""
    partial = job_pb2.JobSpec(base_model="/models/x", method=job_pb2.TRAINING_METHOD_SFT)
    with pytest.raises(TrainingError) as info:
        check_supported(partial)
    assert info.value.reason == Reason.TRAINING_FAILED
    assert "not resolved" in info.value.message and "hyperparameters" in info.value.message

    check_supported(resolve_spec(partial, require_dataset=False))  # the resolved one is accepted


def test_teacher_model_path_is_optional(tmp_path: Path) -> None:
    distillation = job_pb2.JobSpec(base_model="/models/x", method=job_pb2.TRAINING_METHOD_DISTILLATION)
    distillation.distillation.teacher_model = "org/teacher"
    cfg = RunConfig(
        job_id="job_1",
        spec=RunConfig.spec_to_dict(resolve_spec(distillation, require_dataset=False)),
        model_path="/models/x",
        teacher_model_path="/models/teacher",
        train_file=tmp_path / "train.jsonl",
        output_dir=tmp_path / "out",
        events_file=tmp_path / "events.jsonl",
    )
    loaded = RunConfig.load(cfg.dump(tmp_path / "RUN.json"))
    assert loaded.teacher_model_path == "/models/teacher"
    assert loaded.job_spec().distillation.temperature == 2.0
    assert (
        RunConfig.model_validate({**cfg.model_dump(), "teacher_model_path": None}).teacher_model_path is None
    )
