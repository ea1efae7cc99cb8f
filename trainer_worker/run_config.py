"""RUN.json: everything one training process needs, written by the agent and read by ``trainer_worker.train``.

The spec travels as the JSON form of ``tuneforge.v1.JobSpec`` (proto field names, enum value names), as the
jobs service resolved it (``tuneforge_core.spec.resolve_spec``): every default is already filled in, and the
worker fills in none (``trainer_worker.recipes.check_supported`` refuses a spec that is not resolved).
The estimate the job was admitted with travels the same way (a ``tuneforge.v1.HardwareFit``), so that an
out-of-memory failure can say what was expected without the worker importing the estimation service.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from google.protobuf import json_format
from pydantic import BaseModel, ConfigDict
from tuneforge.v1 import estimation_pb2, job_pb2

from trainer_worker.warm_start import WarmStart


class RunConfig(BaseModel):
    """One attempt of one job, with every input already on local disk."""

    model_config = ConfigDict(extra="forbid")

    job_id: str
    attempt: int = 1
    spec: dict[str, Any]
    # A local model folder (or a hub id where the worker may download).
    model_path: str
    # Distillation: the teacher's local folder; None means spec.distillation.teacher_model as given.
    teacher_model_path: str | None = None
    # DPO: spec.dpo.reference_model's local folder; GRPO: spec.grpo.reward_model's. None: as given (or unset).
    reference_model_path: str | None = None
    reward_model_path: str | None = None
    train_file: Path
    validation_file: Path | None = None
    # The test split the evaluation after training reads; None when the dataset has none or it is disabled.
    test_file: Path | None = None
    output_dir: Path
    events_file: Path
    # JobAssignment.admission_estimate as JSON (proto field names); None when CreateJob checked no hardware.
    admission_estimate: dict[str, Any] | None = None
    # JobAssignment.warm_start, downloaded by the agent (trainer_worker.warm_start); None: a fresh start.
    warm_start: WarmStart | None = None
    # JobSpec.speed as this worker resolved it (trainer_worker.speed.ResolvedSpeed.to_dict: each option used
    # or not, and why): None in the RUN.json the agent writes; the recipe fills it in at setup, so that
    # whoever runs the worker (benchmarks/bench_worker.py) reads back which options were used.
    speed: dict[str, Any] | None = None

    @classmethod
    def load(cls, path: Path) -> RunConfig:
        return cls.model_validate_json(path.read_text(encoding="utf-8"))

    def dump(self, path: Path) -> Path:
        path.write_text(self.model_dump_json(indent=2), encoding="utf-8")
        return path

    def job_spec(self) -> job_pb2.JobSpec:
        """The resolved spec as a proto; unknown fields are an error, not silently dropped."""
        return json_format.ParseDict(self.spec, job_pb2.JobSpec())

    @staticmethod
    def spec_to_dict(spec: job_pb2.JobSpec) -> dict[str, Any]:
        return json_format.MessageToDict(spec, preserving_proto_field_name=True)

    def admitted_fit(self) -> estimation_pb2.HardwareFit | None:
        """The estimate the job was admitted with, as a proto; None when there is none."""
        if self.admission_estimate is None:
            return None
        return json_format.ParseDict(
            self.admission_estimate, estimation_pb2.HardwareFit(), ignore_unknown_fields=True
        )

    @staticmethod
    def fit_to_dict(fit: estimation_pb2.HardwareFit) -> dict[str, Any]:
        return json_format.MessageToDict(fit, preserving_proto_field_name=True)
