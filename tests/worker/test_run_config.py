"""RUN.json round-trips and every unset spec field gets the default documented in job.proto."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf.json_format import ParseError
from tuneforge.v1 import job_pb2

from services.jobs.spec_rules import resolve_spec
from trainer_worker.run_config import RunConfig, with_defaults


def test_empty_spec_gets_documented_defaults() -> None:
    spec = with_defaults(job_pb2.JobSpec())
    hp = spec.hyperparameters

    assert spec.method == job_pb2.TRAINING_METHOD_SFT
    assert spec.adapter == job_pb2.ADAPTER_TYPE_LORA
    assert (spec.lora.rank, spec.lora.alpha, spec.lora.dropout) == (16, 32, 0.05)
    assert list(spec.lora.target_modules) == ["all-linear"]
    assert (hp.epochs, hp.batch_size, hp.learning_rate, hp.max_seq_length) == (3, 4, 2e-4, 2048)
    assert hp.warmup_ratio == 0.03 and not hp.HasField("warmup_steps")
    assert hp.lr_scheduler == job_pb2.LR_SCHEDULER_COSINE
    assert hp.optimizer == job_pb2.OPTIMIZER_ADAMW
    assert hp.assistant_only_loss and hp.seed == 42 and hp.logging_steps == 10


def test_values_sent_stay_even_when_zero_or_false() -> None:
    spec = job_pb2.JobSpec(adapter=job_pb2.ADAPTER_TYPE_FULL)
    spec.hyperparameters.warmup_steps = 0
    spec.hyperparameters.assistant_only_loss = False
    spec.lora.rank = 8

    out = with_defaults(spec)
    assert out.hyperparameters.learning_rate == 2e-5  # full fine-tuning default
    assert out.hyperparameters.HasField("warmup_steps") and not out.hyperparameters.HasField("warmup_ratio")
    assert out.hyperparameters.assistant_only_loss is False
    assert out.lora.alpha == 16


def test_run_config_round_trips_and_rejects_unknown_spec_fields(tmp_path: Path) -> None:
    spec = job_pb2.JobSpec(method=job_pb2.TRAINING_METHOD_SFT)
    spec.hyperparameters.lr_scheduler = job_pb2.LR_SCHEDULER_LINEAR
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


def test_method_adapter_defaults_match_the_jobs_service() -> None:
    """The worker's defaults and the jobs service's resolve_spec agree field by field."""
    for method in ("DPO", "GRPO", "DISTILLATION", "ORPO", "KTO"):
        for adapter in ("QLORA", "PROMPT_TUNING") if method == "DISTILLATION" else ("QLORA",):
            spec = job_pb2.JobSpec(
                base_model="org/model",
                dataset="ds_1",
                method=job_pb2.TrainingMethod.Value(f"TRAINING_METHOD_{method}"),
                adapter=job_pb2.AdapterType.Value(f"ADAPTER_TYPE_{adapter}"),
            )
            spec.distillation.teacher_model = "org/teacher"
            spec.grpo.reward_functions.append(job_pb2.REWARD_FUNCTION_JSON_VALID)
            resolved, worker = resolve_spec(spec), with_defaults(spec)
            config = method.lower()
            assert getattr(worker, config) == getattr(resolved, config), method
            if adapter == "QLORA":
                assert worker.quantization == resolved.quantization
            else:
                assert worker.prompt_tuning == resolved.prompt_tuning


def test_teacher_model_path_is_optional(tmp_path: Path) -> None:
    cfg = RunConfig(
        job_id="job_1",
        spec={"method": "TRAINING_METHOD_DISTILLATION", "distillation": {"teacher_model": "org/teacher"}},
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
