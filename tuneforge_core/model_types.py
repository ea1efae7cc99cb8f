"""What a base model is (text only or vision-language), and what a job on it may train: said once.

JobSpec.model_type says what a job trains. The jobs service fills in an UNSPECIFIED one from the base model
(`services.jobs.model_types`): the catalog's type for a hub id it lists, else a ``vision_config`` in the
model's config.json (local and stored models; the worker checks the same for a hub model it downloads).
The rules here need no I/O beyond reading the catalog file and a config.json:

- VLM trains the whole vision-language model (vision tower, projector and language model) on an image
  dataset, with SFT and LoRA or QLoRA only: TRL's vision path (a processor and image columns) is SFT's.
- LLM on a VLM base trains the language model's modules only (the LoRA targets are restricted to them), on
  text; the vision tower and projector stay as they are.
- An image dataset (a ZIP of images and train.jsonl) needs VLM: a text-only model cannot read images.

The catalog is the estimation service's data file (``services/estimation/catalog/models.json``, or the
folder ``TUNEFORGE_ESTIMATION_CATALOG_DIR`` names). It is read here as data, not through that service's
code, so that the jobs service and the worker can tell a catalog model's type without calling it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeAlias

from tuneforge.v1 import job_pb2, model_pb2

from tuneforge_core.errors import Violations

ModelType: TypeAlias = model_pb2.ModelType.ValueType
LLM = model_pb2.MODEL_TYPE_LLM
VLM = model_pb2.MODEL_TYPE_VLM
UNSPECIFIED = model_pb2.MODEL_TYPE_UNSPECIFIED

DEFAULT_CATALOG_DIR = Path(__file__).resolve().parent.parent / "services" / "estimation" / "catalog"
CATALOG_DIR_ENV = "TUNEFORGE_ESTIMATION_CATALOG_DIR"

# What a vision-language model trains with (TRL's vision path is SFTTrainer's).
VLM_METHODS = frozenset({job_pb2.TRAINING_METHOD_SFT})
VLM_ADAPTERS = frozenset({job_pb2.ADAPTER_TYPE_LORA, job_pb2.ADAPTER_TYPE_QLORA})



def _name(enum: Any, value: int) -> str:
    try:
        return str(enum.Name(value))
    except ValueError:
        return str(value)


def name(model_type: int) -> str:
    return _name(model_pb2.ModelType, model_type)


def config_model_type(config: Mapping[str, Any]) -> ModelType:
    """VLM when the model's config.json has a vision tower (``vision_config``), else LLM."""
    return VLM if isinstance(config.get("vision_config"), Mapping) else LLM


def folder_model_type(path: Path) -> ModelType | None:
    """The type of the model saved in ``path`` (its config.json), or None when there is none to read."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config_model_type(config) if isinstance(config, dict) else None


def catalog_dir() -> Path:
    return Path(os.environ.get(CATALOG_DIR_ENV) or DEFAULT_CATALOG_DIR)


@lru_cache(maxsize=4)
def _catalog_types(directory: str) -> dict[str, ModelType]:
    try:
        doc = json.loads((Path(directory) / "models.json").read_text(encoding="utf-8"))
        entries = doc["models"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    types: dict[str, ModelType] = {}
    for entry in entries:
        kind = VLM if entry.get("type") == "vlm" else LLM
        for model_id in [entry.get("id", ""), *entry.get("variants", [])]:
            if model_id:
                types[str(model_id).lower()] = kind
    return types


def catalog_model_type(model_id: str) -> ModelType | None:
    """The catalog's type of a hub id (or one of its variants), or None when the catalog does not list it."""
    return _catalog_types(str(catalog_dir())).get(model_id.lower())


def check_model_type(v: Violations, spec: job_pb2.JobSpec, base: int | None = None) -> None:
    """What a job on a vision-language model may not ask for, each naming its field: resolve_spec (from
    spec.model_type alone), and CreateJob once it knows the base model's type (`base`). On a VLM base the
    same holds for MODEL_TYPE_LLM: the worker trains a VLM's language model alone with SFT and LoRA too."""
    if spec.model_type != VLM and base != VLM:
        return
    why = (
        "vision-language models (model_type MODEL_TYPE_VLM) train with" if spec.model_type == VLM
        else f"{spec.base_model} is a vision-language model; its language model alone trains with"
    )
    if spec.method not in VLM_METHODS:
        method = _name(job_pb2.TrainingMethod, spec.method)
        v.add("spec.method", f"{why} TRAINING_METHOD_SFT only, not {method}; other methods need a "
                             "text-only base model (MODEL_TYPE_LLM)")
    if spec.adapter not in VLM_ADAPTERS:
        v.add("spec.adapter", f"{why} ADAPTER_TYPE_LORA or ADAPTER_TYPE_QLORA only, not "
                              f"{_name(job_pb2.AdapterType, spec.adapter)}")
    if spec.model_type == VLM and spec.hyperparameters.packing:
        v.add("spec.hyperparameters.packing",
              "cannot be used with a vision-language model: image batches are padded, never packed")
