"""Which architecture a spec's `base_model` has: a catalog id, a local folder's config.json, or a guess from
a size in its name ("...-7B-..."). Reads JSON only; this service never imports torch or transformers."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from services.estimation.catalog import Catalog
from services.estimation.estimator import Architecture
from tuneforge_core.errors import FieldViolation, InvalidArgument

MAX_CONFIG_BYTES = 4 * 1024 * 1024
# "7B", "0.5b", "135M", and mixtures of experts "8x7B" (counted as all experts: memory needs them all).
_SIZE_RE = re.compile(r"(?:(\d+)x)?(\d+(?:\.\d+)?)([bm])(?![a-z])", re.IGNORECASE)
GUESS_VOCAB = 128_256


@dataclass(frozen=True)
class ResolvedModel:
    id: str
    family: str
    model_type: str
    architecture: Architecture
    max_context_length: int
    license: str
    # How the architecture was found, for EstimateJobResponse.notes; empty for a catalog model.
    note: str


def resolve_model(catalog: Catalog, ref: str, field: str = "spec.base_model") -> ResolvedModel:
    entry = catalog.model(ref)
    if entry is not None:
        return ResolvedModel(
            entry.id,
            entry.family,
            entry.model_type,
            entry.architecture,
            entry.max_context_length,
            entry.license,
            "",
        )
    folder = _local_folder(ref)
    if folder is not None and (folder / "config.json").is_file():
        return _from_config(folder / "config.json", ref, field)
    guessed = guess_from_name(ref)
    if guessed is not None:
        params = guessed.parameter_count
        return ResolvedModel(
            ref,
            "unknown",
            "llm",
            guessed,
            0,
            "",
            f"architecture of '{ref}' is unknown: estimated as a Llama-like model of "
            f"~{params / 1e9:.2f}B parameters guessed from its name",
        )
    raise InvalidArgument(
        f"{field}: model '{ref}' is unknown",
        violations=[
            FieldViolation(
                field,
                "is not in the catalog (see ListBaseModels), not a local folder with a config.json, "
                "and has no parameter count in its name (like '7B') to estimate from",
            )
        ],
    )


def _local_folder(ref: str) -> Path | None:
    if ref.startswith("file://"):
        return Path(unquote(urlparse(ref).path))
    if "://" in ref:
        return None  # s3:// and the like: not readable here
    path = Path(ref).expanduser()
    return path if path.is_absolute() or ref.startswith(".") else None


def _from_config(path: Path, ref: str, field: str) -> ResolvedModel:
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ValueError("config.json is larger than 4 MiB")
        config = json.loads(path.read_text(encoding="utf-8"))
        arch, model_type = architecture_from_config(config)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise InvalidArgument(
            f"{field}: cannot read the architecture from {path}",
            violations=[FieldViolation(field, f"{path} is not a usable config.json: {exc}")],
        ) from exc
    family = str(config.get("model_type", "unknown"))
    context = int(config.get("max_position_embeddings") or 0)
    return ResolvedModel(
        ref,
        family,
        model_type,
        arch,
        context,
        "",
        f"architecture read from {path} ({arch.parameter_count / 1e6:.1f}M parameters)",
    )


def architecture_from_config(config: dict[str, Any]) -> tuple[Architecture, str]:
    """Figures of a Hugging Face config.json (LlamaConfig-style keys, with the common aliases). A VLM's
    language model is its text_config."""
    model_type = "llm"
    if isinstance(config.get("text_config"), dict):
        config, model_type = {**config["text_config"]}, "vlm"

    def first(*keys: str, default: Any = None) -> Any:
        for key in keys:
            if config.get(key) is not None:
                return config[key]
        if default is None:
            raise KeyError(f"none of {', '.join(keys)}")
        return default

    hidden = int(first("hidden_size", "n_embd", "d_model"))
    heads = int(first("num_attention_heads", "n_head", "num_heads"))
    kv_default = 1 if config.get("multi_query") else heads
    kv_heads = int(first("num_key_value_heads", "num_kv_heads", default=kv_default))
    if hidden <= 0 or heads <= 0 or kv_heads <= 0:
        raise ValueError("hidden_size and head counts must be positive")
    # Gemma ties by default; Llama-style configs write the key out.
    tied_default = str(config.get("model_type", "")).startswith("gemma")
    arch = Architecture(
        num_layers=int(first("num_hidden_layers", "n_layer", "num_layers")),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=int(first("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)),
        vocab_size=int(first("vocab_size")),
        tied_embeddings=bool(config.get("tie_word_embeddings", tied_default)),
        head_dim=int(config.get("head_dim") or 0),
        num_experts=int(first("num_local_experts", "num_experts", default=0) or 0),
        num_experts_per_token=int(first("num_experts_per_tok", default=0) or 0),
        attention_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
    )
    return arch, model_type


def guess_from_name(ref: str) -> Architecture | None:
    """A Llama-shaped dense model with the parameter count the name states, or None without one.

    Width follows the usual depth/width ratio (layers ~ hidden/128, so N ~ 12 x hidden^3 / 128); depth is
    then what makes the count come out right.
    """
    name = ref.rstrip("/").rsplit("/", 1)[-1]
    matches = list(_SIZE_RE.finditer(name))
    if not matches:
        return None
    match = matches[-1]
    experts = int(match.group(1) or 1)
    size = float(match.group(2)) * (1e9 if match.group(3).lower() == "b" else 1e6) * experts
    if size <= 0:
        return None
    hidden = max(512, round((size * 128 / 12) ** (1 / 3) / 256) * 256)
    heads = hidden // 128
    kv_heads = heads // 4 if heads % 4 == 0 else heads
    intermediate = math.ceil(3.5 * hidden / 256) * 256
    vocab = GUESS_VOCAB if size > 2 * GUESS_VOCAB * hidden else 32_000
    one_layer = Architecture(1, hidden, heads, kv_heads, intermediate, vocab, False)
    per_layer = one_layer.parameter_count - 2 * vocab * hidden - hidden
    layers = max(1, round((size - 2 * vocab * hidden) / per_layer))
    return Architecture(layers, hidden, heads, kv_heads, intermediate, vocab, False)
