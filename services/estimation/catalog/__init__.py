"""The catalog: hardware options and base models, read from the JSON files beside this module.

Data, not code, so that adding a GPU or a model is a reviewed one-line change, and a deployment can point
`TUNEFORGE_ESTIMATION_CATALOG_DIR` at its own copy or override prices alone.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.estimation.estimator import MIB, Architecture, Hardware

CATALOG_DIR = Path(__file__).parent
_ARCHITECTURE_KEYS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "tied_embeddings",
    "head_dim",
    "num_experts",
    "num_experts_per_token",
    "attention_bias",
    "norms_per_layer",
    "gated_mlp",
    "norm_bias",
    "vision_parameters",
    "fused_qkv",
    "fused_gate_up",
    "attention_score_bytes",
    "fp32_norm_scale",
    "logit_softcapping",
)


@dataclass(frozen=True)
class CatalogModel:
    id: str
    family: str
    model_type: str  # "llm" or "vlm"
    parameter_count: int
    architecture: Architecture
    max_context_length: int
    license: str


class CatalogError(ValueError):
    """The catalog files are malformed: a deployment error, raised at start."""


class Catalog:
    def __init__(self, hardware: list[Hardware], models: list[CatalogModel], version: str) -> None:
        self.version = version
        self._hardware = {h.gpu_type: h for h in hardware}
        self._models = sorted(models, key=lambda m: m.id.lower())
        self._by_id = {m.id.lower(): m for m in self._models}

    @classmethod
    def load(cls, directory: Path | None = None, hourly_usd: Mapping[str, float] | None = None) -> Catalog:
        directory = directory or CATALOG_DIR
        try:
            hw_doc = json.loads((directory / "hardware.json").read_text(encoding="utf-8"))
            model_doc = json.loads((directory / "models.json").read_text(encoding="utf-8"))
            hardware = [
                _hardware(entry, hw_doc.get("defaults", {}), hourly_usd or {}) for entry in hw_doc["options"]
            ]
            models = [m for entry in model_doc["models"] for m in _models(entry)]
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise CatalogError(f"catalog in {directory} is invalid: {exc!r}") from exc
        unknown = set(hourly_usd or {}) - {h.gpu_type for h in hardware}
        if unknown:
            raise CatalogError(f"hourly prices given for unknown GPU types: {sorted(unknown)}")
        return cls(hardware, models, str(hw_doc.get("version", "")))

    def hardware_options(self) -> list[Hardware]:
        return list(self._hardware.values())

    def gpus(self) -> list[Hardware]:
        return [h for h in self._hardware.values() if not h.is_cpu]

    def hardware(self, gpu_type: str) -> Hardware | None:
        return self._hardware.get(gpu_type.lower())

    def models(self) -> list[CatalogModel]:
        return list(self._models)

    def model(self, model_id: str) -> CatalogModel | None:
        """Case-insensitive, as the Hub treats ids."""
        return self._by_id.get(model_id.strip().lower())


def _hardware(entry: dict[str, Any], defaults: dict[str, Any], prices: Mapping[str, float]) -> Hardware:
    merged = {**defaults, **entry}
    return Hardware(
        gpu_type=merged["gpu_type"],
        display_name=merged["display_name"],
        memory_bytes=int(merged["memory_mib"]) * MIB,
        peak_tflops=float(merged["peak_tflops"]),
        supports_bf16=bool(merged["supports_bf16"]),
        hourly_usd=float(prices.get(merged["gpu_type"], merged["hourly_usd"])),
        allowed_gpu_counts=tuple(int(c) for c in merged["allowed_gpu_counts"]),
        min_storage_gb=int(merged["min_storage_gb"]),
        max_storage_gb=int(merged["max_storage_gb"]),
        # A catalog copy written before these keys existed keeps the estimator's defaults.
        inter_node_gbps=float(merged.get("inter_node_gbps", Hardware.inter_node_gbps)),
        inter_node_network=str(merged.get("inter_node_network", Hardware.inter_node_network)),
    )


def _models(entry: dict[str, Any]) -> list[CatalogModel]:
    arch = Architecture(**{k: entry[k] for k in _ARCHITECTURE_KEYS if k in entry})
    base = CatalogModel(
        id=entry["id"],
        family=entry["family"],
        model_type=entry.get("type", "llm"),
        parameter_count=int(entry["parameter_count"]),
        architecture=arch,
        max_context_length=int(entry["max_context_length"]),
        license=entry["license"],
    )
    variants = [
        CatalogModel(
            id=v,
            family=base.family,
            model_type=base.model_type,
            parameter_count=base.parameter_count,
            architecture=arch,
            max_context_length=base.max_context_length,
            license=base.license,
        )
        for v in entry.get("variants", [])
    ]
    return [base, *variants]
