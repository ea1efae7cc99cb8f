"""RUN.json round-trips and every unset spec field gets the default documented in job.proto."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf.json_format import ParseError
from tuneforge.v1 import job_pb2

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
