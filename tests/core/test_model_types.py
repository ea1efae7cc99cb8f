"""JobSpec.model_type's rules (tuneforge_core.model_types): what a vision-language job may ask for, and how a
base model's type is told (the catalog for hub ids, a vision_config in config.json for folders)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tuneforge.v1 import job_pb2, model_pb2

from tuneforge_core import model_types as mt
from tuneforge_core.errors import InvalidArgument
from tuneforge_core.spec import ensure_resolved, resolve_spec

VLM = model_pb2.MODEL_TYPE_VLM


def _fields(spec: job_pb2.JobSpec) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as info:
        resolve_spec(spec)
    return {v.field: v.description for v in info.value.violations}


def test_a_vlm_trains_with_sft_and_lora_or_qlora_only() -> None:
    base = {"base_model": "Qwen/Qwen2.5-VL-7B-Instruct", "dataset": "pics", "model_type": VLM}
    fields = _fields(job_pb2.JobSpec(**base, method=job_pb2.TRAINING_METHOD_DPO))
    assert list(fields) == ["spec.method"] and "TRAINING_METHOD_SFT only" in fields["spec.method"]
    for adapter in (job_pb2.ADAPTER_TYPE_FULL, job_pb2.ADAPTER_TYPE_PROMPT_TUNING):
        fields = _fields(job_pb2.JobSpec(**base, adapter=adapter))
        assert "ADAPTER_TYPE_LORA or ADAPTER_TYPE_QLORA only" in fields["spec.adapter"]
    packed = job_pb2.JobSpec(**base, hyperparameters=job_pb2.Hyperparameters(packing=True))
    assert "spec.hyperparameters.packing" in _fields(packed)
    for adapter in (job_pb2.ADAPTER_TYPE_LORA, job_pb2.ADAPTER_TYPE_QLORA):
        resolved = resolve_spec(job_pb2.JobSpec(**base, adapter=adapter))
        assert resolved.model_type == VLM
        ensure_resolved(resolved)  # the worker's check: model_type is kept as sent
    assert "spec.model_type" in _fields(job_pb2.JobSpec(base_model="a/b", dataset="d", model_type=7))


def test_the_catalog_and_the_config_tell_the_type(tmp_path: Path) -> None:
    assert mt.catalog_model_type("Qwen/Qwen2.5-VL-7B-Instruct") == VLM
    assert mt.catalog_model_type("meta-llama/llama-3.2-11b-vision-instruct") == VLM  # a variant, any case
    assert mt.catalog_model_type("meta-llama/Llama-3.1-8B-Instruct") == model_pb2.MODEL_TYPE_LLM
    assert mt.catalog_model_type("someone/unknown") is None
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava", "vision_config": {}}))
    assert mt.folder_model_type(tmp_path) == VLM
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert mt.folder_model_type(tmp_path) == model_pb2.MODEL_TYPE_LLM
    assert mt.folder_model_type(tmp_path / "missing") is None
