"""Which architecture a spec's `base_model` has: a catalog id, a model folder's config.json, or a guess from
a size in its name ("...-7B-..."). Reads JSON only; this service never imports torch or transformers.

A config.json is read only where `tuneforge_core.models.ModelPolicy` lets the organization use the model
(a folder under a model root, or its own outputs in object storage), the file itself resolved and checked
too, so a link inside a model folder does not lead out. Errors say what is wrong with the file, never what
it holds.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from services.estimation.catalog import Catalog
from services.estimation.estimator import Architecture
from tuneforge_core.errors import FieldViolation, InvalidArgument
from tuneforge_core.models import ModelKind, ModelPolicy, ModelSource

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


# No model roots and no storage: what a caller that passes no policy gets (hub ids only).
NO_LOCAL_MODELS = ModelPolicy()


def resolve_model(
    catalog: Catalog,
    ref: str,
    field: str = "spec.base_model",
    *,
    models: ModelPolicy | None = None,
    organization: str = "",
) -> ResolvedModel:
    """The architecture of `ref`. A reference `models` refuses for `organization` is INVALID_ARGUMENT on
    `field` before anything is read; without `models`, no local or stored model is read at all."""
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
    if is_location(ref):  # a path or URI: only where the rule lets the organization read it
        policy = models or NO_LOCAL_MODELS
        config = _read_config(policy, policy.source(ref, organization, field), organization, field)
        if config is not None:
            return _from_config(config, ref, field)
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


def is_location(ref: str) -> bool:
    """Whether `ref` is a path or URI (its architecture is read from a file), not a catalog or hub id."""
    return ref.startswith(("/", ".", "~", "file:")) or "://" in ref


def _read_config(policy: ModelPolicy, source: ModelSource, organization: str, field: str) -> bytes | None:
    """The bytes of the model's config.json (at most MAX_CONFIG_BYTES), or None when it has none."""
    if source.kind is ModelKind.LOCAL:
        assert source.path is not None
        path = source.path / "config.json"
        if not path.is_file():
            return None
        # The file, resolved, must pass the same rule: a config.json linking out of the roots is refused.
        real = policy.source(str(path.resolve()), organization, field).path
        assert real is not None
        try:
            with real.open("rb") as f:
                data = f.read(MAX_CONFIG_BYTES + 1)
        except OSError as exc:
            raise _unusable(source.ref, field, f"cannot be read ({type(exc).__name__})") from None
    elif source.kind is ModelKind.STORED:
        assert policy.store is not None
        key = f"{source.key}/config.json"
        try:
            if not policy.store.exists(key):
                return None
            data = policy.store.get_bytes(key)
        except OSError as exc:
            raise _unusable(source.ref, field, f"cannot be read ({type(exc).__name__})") from None
    else:
        return None
    if len(data) > MAX_CONFIG_BYTES:
        raise _unusable(source.ref, field, "is larger than 4 MiB")
    return data


def _unusable(ref: str, field: str, why: str) -> InvalidArgument:
    description = f"the config.json of '{ref}' {why}"
    return InvalidArgument(f"{field}: cannot read the architecture of '{ref}'",
                           violations=[FieldViolation(field, description)])


def _from_config(data: bytes, ref: str, field: str) -> ResolvedModel:
    """The architecture in a config.json; a problem is described by kind and key name, never by value."""
    try:
        config = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise _unusable(ref, field, "is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise _unusable(ref, field, f"is not valid JSON (line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(config, dict):
        raise _unusable(ref, field, "is not a JSON object")
    try:
        arch, model_type = architecture_from_config(config)
        family = str(config.get("model_type", "unknown"))[:64]
        context = int(config.get("max_position_embeddings") or 0)
    except KeyError as exc:  # the keys are ours: "none of hidden_size, n_embd, d_model"
        raise _unusable(ref, field, f"has {exc.args[0] if exc.args else 'a missing key'}") from None
    except (ValueError, TypeError, OverflowError):
        raise _unusable(
            ref, field, "holds a value that is not a usable number where the architecture needs one"
        ) from None
    return ResolvedModel(
        ref,
        family,
        model_type,
        arch,
        context,
        "",
        f"architecture read from the config.json of '{ref}' ({arch.parameter_count / 1e6:.1f}M parameters)",
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
