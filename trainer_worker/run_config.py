"""RUN.json: everything one training process needs, written by the agent and read by ``trainer_worker.train``.

The spec travels as the JSON form of ``tuneforge.v1.JobSpec`` (proto field names, enum value names), as the
jobs service resolved it (``tuneforge_core.spec.resolve_spec``): every default is already filled in, and the
worker fills in none (``trainer_worker.recipes.check_supported`` refuses a spec that is not resolved).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from google.protobuf import json_format
from pydantic import BaseModel, ConfigDict
from tuneforge.v1 import job_pb2


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
    train_file: Path
    validation_file: Path | None = None
    output_dir: Path
    events_file: Path

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
