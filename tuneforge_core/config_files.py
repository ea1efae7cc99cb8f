"""Other platforms' fine-tuning config files, read into a TuneForge JobSpec.

Three formats from the seeds' documentation are read: the Synth SFT TOML (`[job]`, `[compute]`, `[data]`,
`[training]`, `[training.validation]`, `[hyperparameters]`, `[hyperparameters.parallelism]`), the ModelForge
training JSON (`task`, `model_name`, `strategy`, `lora_r`, `use_4bit`, ...) and NeMo Customizer's
hyperparameters JSON (`finetuning_type`, `training_type`, `lora.adapter_dim`, `dpo.*`, `grpo.*`, ...).

Every key of the file is accounted for: it maps to a JobSpec field (or to the dataset upload: first N rows,
validation split, a validation file), or it is a violation naming the key's path in the file and why
TuneForge cannot honour it (no such setting yet, a value out of range, a conflict with another key). A
handful of keys that have no effect on what is trained even on their own platform (Synth's `[algorithm]`,
ModelForge's `compute_specs`, ...) are accepted as notes, said out loud, never dropped in silence.

Keys a file leaves out take TuneForge's defaults (`tuneforge_core.spec.resolve_spec`), not the other
platform's, with one exception that decides what is trained: a Synth file without `training.use_qlora` asks
Synth for full fine-tuning, so it maps to ADAPTER_TYPE_FULL.

The mapping is data: one table per format from key path to a rule (`RULES`); adding a key that a newer
JobSpec can express is one line there. Nothing here imports torch or gRPC stubs beyond the generated
messages, so the CLI, the client and the services can all use it.
"""

from __future__ import annotations

import difflib
import json
import math
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.v1 import job_pb2

from tuneforge_core.errors import FieldViolation, InvalidArgument, Violations
from tuneforge_core.spec import resolve_spec

SYNTH = "synth-toml"
MODELFORGE = "modelforge-json"
NEMO = "nemo-customizer-json"
FORMAT_TITLES = {
    SYNTH: "Synth SFT TOML",
    MODELFORGE: "ModelForge training JSON",
    NEMO: "NeMo Customizer hyperparameters JSON",
}
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".zip")
MAX_CONFIG_BYTES = 1024 * 1024

NOT_YET = "no such setting in TuneForge yet"


@dataclass
class ConfigJob:
    """What a config file asks for, as TuneForge can say it."""

    format: str
    spec: job_pb2.JobSpec
    # The dataset: an id or name of a dataset on the platform, or (dataset_is_file) a local file to upload.
    dataset: str = ""
    dataset_is_file: bool = False
    # Where the dataset came from: the file's key path, or "--dataset".
    dataset_key: str = ""
    # A local file to upload as the validation dataset (spec.validation_dataset), and its key path.
    validation_file: str = ""
    validation_key: str = ""
    # Fraction of the uploaded file held out for validation (the upload's SplitConfig), and its key path.
    validation_fraction: float | None = None
    validation_fraction_key: str = ""
    # Train on the first N examples only (the upload's DatasetOptions.max_samples).
    max_samples: int | None = None
    name: str = ""
    description: str = ""
    violations: list[FieldViolation] = field(default_factory=list)
    # Keys accepted without effect, and why (they change nothing on their own platform either).
    notes: list[FieldViolation] = field(default_factory=list)
    # JobSpec field path ("spec.lora.rank") -> the file key it came from ("lora_r").
    sources: dict[str, str] = field(default_factory=dict)


# -- detection -------------------------------------------------------------------------------------

MODELFORGE_MARKERS = frozenset({"model_name", "task", "compute_specs", "strategy", "lora_r", "use_4bit"})
NEMO_MARKERS = frozenset({"finetuning_type", "training_type"})
SYNTH_TABLES = frozenset({"job", "compute", "data", "training", "hyperparameters", "algorithm"})


def parse_text(text: str, filename: str = "") -> tuple[str, dict[str, Any]]:
    """The format and the parsed document; InvalidArgument on "config" saying what was expected."""
    if len(text.encode()) > MAX_CONFIG_BYTES:
        raise _bad(f"is larger than {MAX_CONFIG_BYTES} bytes; a config file is a few kilobytes")
    stripped = text.lstrip()
    json_error = toml_error = ""
    if stripped.startswith(("{", "[")) and not stripped.startswith("[job]"):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            json_error = f"line {exc.lineno} column {exc.colno}: {exc.msg}"
        else:
            if not isinstance(doc, dict):
                raise _bad("is JSON but not an object: a ModelForge config or NeMo hyperparameters object")
            keys = set(doc)
            if keys & NEMO_MARKERS:
                return NEMO, doc
            if keys & MODELFORGE_MARKERS:
                return MODELFORGE, doc
            raise _bad(
                "is a JSON object but neither a ModelForge training config (model_name, task, strategy, ...) "
                "nor NeMo Customizer hyperparameters (finetuning_type, training_type, ...); top-level keys: "
                + ", ".join(sorted(keys)[:10])
            )
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        toml_error = str(exc)
    else:
        if set(doc) & SYNTH_TABLES:
            return SYNTH, doc
        if not json_error:
            raise _bad(
                "is TOML but not a Synth SFT config: it needs a [job] table (model, data) and "
                "[hyperparameters]; top-level keys: " + ", ".join(sorted(doc)[:10])
            )
    where = f" ({filename})" if filename else ""
    raise _bad(
        f"is not a config file TuneForge reads{where}: expected a Synth TOML ([job], [hyperparameters]), a "
        "ModelForge JSON (model_name, strategy) or NeMo Customizer hyperparameters JSON (finetuning_type). "
        + (f"As JSON: {json_error}. " if json_error else "")
        + (f"As TOML: {toml_error}." if toml_error else "")
    )


def _bad(description: str) -> InvalidArgument:
    return InvalidArgument(f"config file {description}", violations=[FieldViolation("config", description)])


# -- the mapper ------------------------------------------------------------------------------------

Rule = Callable[["Mapper", str, Any], None]


class Mapper:
    """Collects a spec, violations, notes and each spec field's source key while the rules run."""

    def __init__(self, fmt: str, base_dir: Path) -> None:
        self.job = ConfigJob(format=fmt, spec=job_pb2.JobSpec())
        self.base_dir = base_dir
        self.v = Violations()
        self.seen: dict[str, Any] = {}  # key path -> value, every key the file has

    @property
    def spec(self) -> job_pb2.JobSpec:
        return self.job.spec

    def bad(self, key: str, why: str) -> None:
        self.v.add(key, why)

    def note(self, key: str, why: str) -> None:
        self.job.notes.append(FieldViolation(key, why))

    def set(self, key: str, path: str, value: Any) -> None:
        """Sets spec field `path` ("hyperparameters.epochs"), remembering that `key` said so."""
        *parents, last = path.split(".")
        target: Any = self.spec
        for name in parents:
            target = getattr(target, name)
        current = getattr(target, last)
        if hasattr(current, "extend") and not isinstance(value, str):  # repeated
            del current[:]
            current.extend(value)
        else:
            setattr(target, last, value)
        self.job.sources[f"spec.{path}"] = key


def _typed(kind: type, key: str, value: Any, m: Mapper) -> Any:
    """The value when it has the kind asked for (ints pass as floats), else a violation and None."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float and ok and not math.isfinite(value):
        ok = False
    if not ok:
        m.bad(key, f"must be {_KIND_NAMES[kind]}, got {json.dumps(value, default=str)[:80]}")
        return None
    return value


_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list"}


def to(path: str, kind: type = int, convert: Callable[[Any], Any] | None = None) -> Rule:
    """The key sets spec field `path` (its value checked to be `kind`, then converted)."""

    def rule(m: Mapper, key: str, value: Any) -> None:
        value = _typed(kind, key, value, m)
        if value is not None:
            m.set(key, path, convert(value) if convert else value)

    return rule


def choice(path: str, values: Mapping[str, int]) -> Rule:
    """The key's string value picks an enum value of spec field `path`."""

    def rule(m: Mapper, key: str, value: Any) -> None:
        if _typed(str, key, value, m) is None:
            return
        if value.lower() not in values:
            m.bad(key, f"'{value}' is not one of: {', '.join(values)}")
            return
        m.set(key, path, values[value.lower()])

    return rule


def unsupported(why: str) -> Rule:
    """TuneForge has no setting for the key: a violation, whatever the value."""
    return lambda m, key, value: m.bad(key, f"{NOT_YET}: {why}")


def only(accepted: Any, why: str) -> Rule:
    """TuneForge always behaves as the key does with value `accepted`; any other value is a violation."""

    def rule(m: Mapper, key: str, value: Any) -> None:
        if value != accepted:
            m.bad(key, f"{NOT_YET}: {why} (only {json.dumps(accepted)} is honoured, got {json.dumps(value)})")

    return rule


def noted(why: str) -> Rule:
    return lambda m, key, value: m.note(key, why)


def later(m: Mapper, key: str, value: Any) -> None:
    """Read by the format's finishing step (a key that combines with others)."""


# -- shared conversions ----------------------------------------------------------------------------

PRECISIONS = {"float16": job_pb2.PRECISION_FP16, "fp16": job_pb2.PRECISION_FP16,
              "bfloat16": job_pb2.PRECISION_BF16, "bf16": job_pb2.PRECISION_BF16,
              "float32": job_pb2.PRECISION_FP32, "fp32": job_pb2.PRECISION_FP32}
SCHEDULERS = {"cosine": job_pb2.LR_SCHEDULER_COSINE, "linear": job_pb2.LR_SCHEDULER_LINEAR,
              "constant": job_pb2.LR_SCHEDULER_CONSTANT, "polynomial": job_pb2.LR_SCHEDULER_POLYNOMIAL,
              "cosine_with_min_lr": job_pb2.LR_SCHEDULER_COSINE_WITH_MIN_LR,
              "constant_with_warmup": job_pb2.LR_SCHEDULER_CONSTANT_WITH_WARMUP}
HF_OPTIMIZERS = {"adamw_torch": job_pb2.OPTIMIZER_ADAMW, "adamw_hf": job_pb2.OPTIMIZER_ADAMW,
                 "adamw_8bit": job_pb2.OPTIMIZER_ADAMW_8BIT, "adamw_bnb_8bit": job_pb2.OPTIMIZER_ADAMW_8BIT,
                 "paged_adamw_32bit": job_pb2.OPTIMIZER_PAGED_ADAMW,
                 "paged_adamw_8bit": job_pb2.OPTIMIZER_PAGED_ADAMW_8BIT, "sgd": job_pb2.OPTIMIZER_SGD,
                 "adafactor": job_pb2.OPTIMIZER_ADAFACTOR}
# NeMo's optimizer names: (optimizer, scheduler, decoupled weight decay). Plain Adam is AdamW without
# weight decay; "flat" is a constant rate after warmup.
NEMO_OPTIMIZERS = {
    "adamw_with_cosine_annealing": (job_pb2.OPTIMIZER_ADAMW, job_pb2.LR_SCHEDULER_COSINE_WITH_MIN_LR, True),
    "adamw_with_flat_lr": (job_pb2.OPTIMIZER_ADAMW, job_pb2.LR_SCHEDULER_CONSTANT_WITH_WARMUP, True),
    "adam_with_cosine_annealing": (job_pb2.OPTIMIZER_ADAMW, job_pb2.LR_SCHEDULER_COSINE_WITH_MIN_LR, False),
    "adam_with_flat_lr": (job_pb2.OPTIMIZER_ADAMW, job_pb2.LR_SCHEDULER_CONSTANT_WITH_WARMUP, False),
}
# Megatron module names NeMo uses -> the Hugging Face names TuneForge's models have.
NEMO_MODULES = {"linear_qkv": ["q_proj", "k_proj", "v_proj"], "linear_proj": ["o_proj"],
                "linear_fc1": ["gate_proj", "up_proj"], "linear_fc2": ["down_proj"]}
# GPU names as the seeds write them -> ListHardwareOptions' gpu_type. "A100" alone is ambiguous.
GPU_ALIASES = {"t4": "nvidia-t4", "l4": "nvidia-l4", "a10g": "nvidia-a10g", "l40s": "nvidia-l40s",
               "a100-40gb": "nvidia-a100-40gb", "a100-80gb": "nvidia-a100-80gb", "h100": "nvidia-h100",
               "h200": "nvidia-h200", "cpu": "cpu"}


def _gpu_type(m: Mapper, key: str, value: Any) -> None:
    if _typed(str, key, value, m) is None:
        return
    name = value.strip().lower().removeprefix("nvidia-").removeprefix("nvidia ")
    if name == "a100":
        m.bad(key, "'A100' comes in 40 and 80 GB: write A100-40GB or A100-80GB (nvidia-a100-40gb, -80gb)")
        return
    m.set(key, "hardware.gpu_type", GPU_ALIASES.get(name, f"nvidia-{name}" if name else ""))


def _local_path(m: Mapper, value: str) -> Path | None:
    """`value` as a local path, relative ones against the working directory (as the Synth CLI resolves
    them); None when it reads as a
    reference (hub id, s3:// URI, dataset name). Absolute and ./ ../ ~ paths always are paths."""
    if "://" in value:
        return None
    if value.startswith(("/", "./", "../", "~")):
        return (m.base_dir / Path(value).expanduser()).resolve()
    candidate = m.base_dir / value
    if candidate.exists():
        return candidate.resolve()
    return None


def _model(m: Mapper, key: str, value: Any) -> None:
    if _typed(str, key, value, m) is None:
        return
    if not value.strip():
        m.bad(key, "must not be empty")
        return
    local = _local_path(m, value)
    m.set(key, "base_model", str(local) if local is not None else value)


def _dataset(m: Mapper, key: str, value: Any) -> None:
    if _typed(str, key, value, m) is None:
        return
    if not value.strip():
        m.bad(key, "must not be empty")
        return
    set_dataset(m.job, value, key, m.base_dir)


def set_dataset(job: ConfigJob, value: str, key: str, base_dir: Path) -> None:
    """The dataset reference: a local file (anything path-like or with a data file suffix) or the id or
    name of a dataset on the platform. `base_dir` resolves relative paths."""
    path_like = value.startswith(("/", "./", "../", "~")) or value.endswith(DATA_SUFFIXES) or "/" in value
    if "://" in value:
        path_like = value.startswith("file://")
        value = value.removeprefix("file://")
    if path_like or (base_dir / value).is_file():
        job.dataset = str((base_dir / Path(value).expanduser()).resolve())
        job.dataset_is_file = True
    else:
        job.dataset, job.dataset_is_file = value, False
    job.dataset_key = key


def _positive_steps(path: str) -> Rule:
    """-1 (or 0) means "off" on the seeds' platforms, 0 in TuneForge."""

    def rule(m: Mapper, key: str, value: Any) -> None:
        value = _typed(int, key, value, m)
        if value is not None:
            m.set(key, path, max(value, 0))

    return rule


def _fraction(m: Mapper, key: str, value: Any) -> None:
    value = _typed(float, key, value, m)
    if value is None:
        return
    if not 0.0 <= value < 1.0:
        m.bad(key, f"must be in [0, 1), got {value:g}")
        return
    m.job.validation_fraction, m.job.validation_fraction_key = value, key


# -- ModelForge ------------------------------------------------------------------------------------

def _mf_task(m: Mapper, key: str, value: Any) -> None:
    if value != "text-generation":
        m.bad(key, f"{NOT_YET}: TuneForge trains causal language models on chat, prompt/completion or text "
                   f"data (task 'text-generation'); '{value}' has no equivalent")


def _mf_strategy(m: Mapper, key: str, value: Any) -> None:
    methods = {"sft": job_pb2.TRAINING_METHOD_SFT, "qlora": job_pb2.TRAINING_METHOD_SFT,
               "dpo": job_pb2.TRAINING_METHOD_DPO}
    if value == "rlhf":
        m.bad(key, f"{NOT_YET}: ModelForge's 'rlhf' (reward-model PPO) has no equivalent; use 'dpo', or GRPO "
                   "with TuneForge's reward functions")
    elif value in methods:
        m.set(key, "method", methods[value])
        if value == "qlora":
            m.set(key, "adapter", job_pb2.ADAPTER_TYPE_QLORA)
    else:
        m.bad(key, f"'{value}' is not one of: sft, qlora, rlhf, dpo")


def _mf_finish(m: Mapper, doc: dict[str, Any]) -> None:
    """use_4bit / use_8bit / bnb_* / fp16 / bf16 combine; the adapter is LoRA unless they say QLoRA."""
    four, eight = doc.get("use_4bit") is True, doc.get("use_8bit") is True
    if doc.get("strategy") == "qlora" and doc.get("use_4bit") is False and not eight:
        m.bad("use_4bit", "conflicts with strategy 'qlora', which quantizes the base model")
    if four and eight:
        m.bad("use_8bit", "conflicts with use_4bit: true; quantize in 4 or 8 bits, not both")
    elif four or eight:
        key = "use_4bit" if four else "use_8bit"
        m.set(key, "adapter", job_pb2.ADAPTER_TYPE_QLORA)
        m.set(key, "quantization.bits", 4 if four else 8)
        if eight:
            m.set(key, "quantization.type", job_pb2.QUANTIZATION_TYPE_INT8)
    elif m.spec.adapter == job_pb2.ADAPTER_TYPE_UNSPECIFIED:
        m.set("strategy" if "strategy" in doc else "use_4bit", "adapter", job_pb2.ADAPTER_TYPE_LORA)
    quantized = m.spec.adapter == job_pb2.ADAPTER_TYPE_QLORA and m.spec.quantization.bits != 8
    quant_keys: tuple[tuple[str, str, Mapping[str, int] | None], ...] = (
        ("bnb_4bit_compute_dtype", "quantization.compute_dtype", PRECISIONS),
        ("bnb_4bit_quant_type", "quantization.type",
         {"nf4": job_pb2.QUANTIZATION_TYPE_NF4, "fp4": job_pb2.QUANTIZATION_TYPE_FP4}),
        ("use_nested_quant", "quantization.double_quantization", None),
    )
    for name, path, values in quant_keys:
        if name not in doc:
            continue
        if not quantized:
            m.bad(name, "applies to 4-bit quantization only, but the file does not quantize in 4 bits "
                        "(use_4bit is not true)")
        elif values is None:
            to(path, bool)(m, name, doc[name])
        else:
            choice(path, values)(m, name, doc[name])
    _precision_pair(m, doc, "fp16", "bf16")


def _precision_pair(m: Mapper, doc: dict[str, Any], fp16_key: str, bf16_key: str,
                    prefix: str = "") -> None:
    """fp16 / bf16 flags: one true picks it; both present and false mean fp32; both true conflict."""
    fp16, bf16 = doc.get(fp16_key), doc.get(bf16_key)
    for key, value in ((fp16_key, fp16), (bf16_key, bf16)):
        if value is not None and not isinstance(value, bool):
            m.bad(prefix + key, f"must be true or false, got {json.dumps(value)}")
            return
    if fp16 and bf16:
        m.bad(prefix + bf16_key, f"conflicts with {prefix}{fp16_key}: true; train in one precision")
    elif fp16:
        m.set(prefix + fp16_key, "hyperparameters.precision", job_pb2.PRECISION_FP16)
    elif bf16:
        m.set(prefix + bf16_key, "hyperparameters.precision", job_pb2.PRECISION_BF16)
    elif fp16 is False and bf16 is False:
        m.set(prefix + bf16_key, "hyperparameters.precision", job_pb2.PRECISION_FP32)


def _mf_max_seq_length(m: Mapper, key: str, value: Any) -> None:
    if value is None or value == -1:
        return  # auto-detect: TuneForge's default length
    to("hyperparameters.max_seq_length")(m, key, value)


MODELFORGE_RULES: dict[str, Rule] = {
    "task": _mf_task,
    "model_name": _model,
    "provider": only("huggingface", "TuneForge loads models with transformers and PEFT; there is no "
                                     "unsloth provider"),
    "strategy": _mf_strategy,
    "dataset": _dataset,
    "compute_specs": noted("a ModelForge hardware profile that only picks its defaults; the values this "
                           "file sets, and TuneForge's defaults for the rest, are used"),
    "lora_r": to("lora.rank"),
    "lora_alpha": to("lora.alpha"),
    "lora_dropout": to("lora.dropout", float),
    "use_4bit": later, "use_8bit": later, "bnb_4bit_compute_dtype": later, "bnb_4bit_quant_type": later,
    "use_nested_quant": later, "fp16": later, "bf16": later,
    "num_train_epochs": to("hyperparameters.epochs"),
    "per_device_train_batch_size": to("hyperparameters.batch_size"),
    "per_device_eval_batch_size": to("hyperparameters.eval_batch_size"),
    "gradient_accumulation_steps": to("hyperparameters.gradient_accumulation_steps"),
    "gradient_checkpointing": to("hyperparameters.gradient_checkpointing", bool),
    "max_grad_norm": to("hyperparameters.max_grad_norm", float),
    "learning_rate": to("hyperparameters.learning_rate", float),
    "weight_decay": to("hyperparameters.weight_decay", float),
    "optim": choice("hyperparameters.optimizer", HF_OPTIMIZERS),
    "lr_scheduler_type": choice("hyperparameters.lr_scheduler", SCHEDULERS),
    "max_steps": _positive_steps("hyperparameters.max_steps"),
    "warmup_ratio": to("hyperparameters.warmup_ratio", float),
    "group_by_length": to("hyperparameters.group_by_length", bool),
    "packing": to("hyperparameters.packing", bool),
    "max_seq_length": _mf_max_seq_length,
    "eval_split": _fraction,
    "eval_steps": to("hyperparameters.eval_steps"),
}


# -- Synth -----------------------------------------------------------------------------------------

def _synth_validation_path(m: Mapper, key: str, value: Any) -> None:
    if _typed(str, key, value, m) is None:
        return
    m.job.validation_file = str((m.base_dir / Path(value).expanduser()).resolve())
    m.job.validation_key = key


def _synth_validation_enabled(m: Mapper, key: str, value: Any) -> None:
    if value is False:
        m.bad(key, f"{NOT_YET}: TuneForge evaluates on the validation split whenever the dataset has one "
                   "(once per epoch, or every hyperparameters.eval_steps)")
    elif value is not True:
        m.bad(key, f"must be true or false, got {json.dumps(value)}")


def _synth_eval_strategy(m: Mapper, key: str, value: Any) -> None:
    if value == "epoch":
        m.set(key, "hyperparameters.eval_steps", 0)
    elif value != "steps":
        m.bad(key, f"{NOT_YET}: TuneForge evaluates per 'steps' or per 'epoch', got {json.dumps(value)}")


def _metric_for_best_model(m: Mapper, key: str, value: Any) -> None:
    names = {"val.loss": "eval_loss", "val_loss": "eval_loss", "eval_loss": "eval_loss", "loss": "eval_loss"}
    if _typed(str, key, value, m) is None:
        return
    if value not in names:
        m.bad(key, f"{NOT_YET}: TuneForge picks the best model by the validation loss ('val.loss'), got "
                   f"{json.dumps(value)}")
        return
    m.set(key, "hyperparameters.metric_for_best_model", names[value])


def _synth_parallelism_bool(path_value: int) -> Rule:
    def rule(m: Mapper, key: str, value: Any) -> None:
        unset = m.spec.hardware.strategy == job_pb2.DISTRIBUTED_STRATEGY_UNSPECIFIED
        if _typed(bool, key, value, m) and unset:
            m.set(key, "hardware.strategy", path_value)

    return rule


def _synth_finish(m: Mapper, doc: dict[str, Any]) -> None:
    training, hp = doc.get("training", {}), doc.get("hyperparameters", {})
    if not isinstance(training, dict) or not isinstance(hp, dict):
        return
    use_qlora = training.get("use_qlora")
    if use_qlora is True:
        m.set("training.use_qlora", "adapter", job_pb2.ADAPTER_TYPE_QLORA)
    elif use_qlora in (False, None):  # Synth's SFT without use_qlora is full fine-tuning
        m.set("training.use_qlora", "adapter", job_pb2.ADAPTER_TYPE_FULL)
    else:
        m.bad("training.use_qlora", f"must be true or false, got {json.dumps(use_qlora)}")
    kind = hp.get("train_kind")
    if kind is not None:
        kinds = {"peft": True, "lora": True, "qlora": True, "fft": False, "full": False}
        if kind not in kinds:
            m.bad("hyperparameters.train_kind", f"'{kind}' is not one of: {', '.join(kinds)}")
        elif kinds[kind] != (use_qlora is True):
            m.bad("hyperparameters.train_kind",
                  f"'{kind}' conflicts with training.use_qlora = {str(use_qlora is True).lower()}")
    # batch_size and per_device_batch both name the per-device batch; global_batch fixes accumulation.
    per_device = [(k, hp[k]) for k in ("per_device_batch", "batch_size") if k in hp]
    if len(per_device) == 2 and per_device[0][1] != per_device[1][1]:
        m.bad("hyperparameters.batch_size", f"conflicts with hyperparameters.per_device_batch "
                                            f"({per_device[0][1]} vs {per_device[1][1]})")
    elif per_device:
        to("hyperparameters.batch_size")(m, f"hyperparameters.{per_device[0][0]}", per_device[0][1])
    if "gradient_accumulation_steps" in hp:
        to("hyperparameters.gradient_accumulation_steps")(
            m, "hyperparameters.gradient_accumulation_steps", hp["gradient_accumulation_steps"])
    if "global_batch" in hp:
        _synth_global_batch(m, hp)
    _precision_pair(m, hp.get("parallelism", {}) if isinstance(hp.get("parallelism"), dict) else {},
                    "fp16", "bf16", prefix="hyperparameters.parallelism.")


def _synth_global_batch(m: Mapper, hp: dict[str, Any]) -> None:
    key, value = "hyperparameters.global_batch", hp["global_batch"]
    if _typed(int, key, value, m) is None:
        return
    s = m.spec
    per_device = s.hyperparameters.batch_size if s.hyperparameters.HasField("batch_size") else None
    processes = (s.hardware.gpu_count if s.hardware.HasField("gpu_count") else 1) * (
        s.hardware.node_count if s.hardware.HasField("node_count") else 1)
    if per_device is None:
        m.bad(key, "needs hyperparameters.per_device_batch: TuneForge sets the batch per device and "
                   "accumulates to the global batch")
        return
    accumulation, rest = divmod(value, per_device * max(processes, 1))
    if rest or accumulation < 1:
        m.bad(key, f"{value} is not a multiple of per_device_batch x GPUs ({per_device} x {processes})")
    elif s.hyperparameters.HasField("gradient_accumulation_steps") and (
            s.hyperparameters.gradient_accumulation_steps != accumulation):
        m.bad(key, f"conflicts with hyperparameters.gradient_accumulation_steps "
                   f"({s.hyperparameters.gradient_accumulation_steps}); {value} needs {accumulation}")
    else:
        m.set(key, "hyperparameters.gradient_accumulation_steps", accumulation)


def _synth_deepspeed_stage(m: Mapper, key: str, value: Any) -> None:
    stages = {1: job_pb2.DISTRIBUTED_STRATEGY_ZERO1, 2: job_pb2.DISTRIBUTED_STRATEGY_ZERO2,
              3: job_pb2.DISTRIBUTED_STRATEGY_ZERO3}
    if _typed(int, key, value, m) is None:
        return
    if value not in stages:
        m.bad(key, f"must be 1, 2 or 3, got {value}")
    elif m.seen.get("hyperparameters.parallelism.use_deepspeed") is False:
        m.bad(key, "conflicts with hyperparameters.parallelism.use_deepspeed = false")
    else:
        m.set(key, "hardware.strategy", stages[value])


def _one_gpu_dimension(what: str) -> Rule:
    def rule(m: Mapper, key: str, value: Any) -> None:
        if _typed(int, key, value, m) is not None and value != 1:
            m.bad(key, f"{NOT_YET}: TuneForge has no {what} parallelism (data parallel DDP, DeepSpeed ZeRO "
                       f"or FSDP over hardware.gpu_count); only 1 is honoured, got {value}")

    return rule


SYNTH_TABLE_KEYS = frozenset({"job", "compute", "data", "training", "training.validation", "hyperparameters",
                              "hyperparameters.parallelism"})
SYNTH_RULES: dict[str, Rule] = {
    "job.model": _model,
    "job.data": _dataset,
    "job.data_path": _dataset,
    "job.poll_seconds": noted("legacy-only in Synth (its CLI polls with --poll-* flags); TuneForge's "
                              "`jobs watch` streams"),
    "compute.gpu_type": _gpu_type,
    "compute.gpu_count": to("hardware.gpu_count"),
    "compute.nodes": to("hardware.node_count"),
    "data.topology": noted("Synth forwards it for visibility only; TuneForge places processes from "
                           "[compute] gpu_count and nodes"),
    "data.validation_path": _synth_validation_path,
    "training.mode": noted("a documentation hint in Synth, copied into metadata only"),
    "training.use_qlora": later,
    "training.validation.enabled": _synth_validation_enabled,
    "training.validation.evaluation_strategy": _synth_eval_strategy,
    "training.validation.eval_steps": to("hyperparameters.eval_steps"),
    "training.validation.save_best_model_at_end": to("hyperparameters.keep_best_model", bool),
    "training.validation.metric_for_best_model": _metric_for_best_model,
    "training.validation.greater_is_better": only(False, "the validation loss is better when lower"),
    "hyperparameters.n_epochs": to("hyperparameters.epochs"),
    "hyperparameters.batch_size": later,
    "hyperparameters.per_device_batch": later,
    "hyperparameters.global_batch": later,
    "hyperparameters.gradient_accumulation_steps": later,
    "hyperparameters.sequence_length": to("hyperparameters.max_seq_length"),
    "hyperparameters.learning_rate": to("hyperparameters.learning_rate", float),
    "hyperparameters.warmup_ratio": to("hyperparameters.warmup_ratio", float),
    "hyperparameters.train_kind": later,
    "hyperparameters.world_size": noted("the Synth client does not forward it either; TuneForge counts "
                                        "processes from [compute] gpu_count x nodes"),
    "hyperparameters.parallelism.use_deepspeed": _synth_parallelism_bool(job_pb2.DISTRIBUTED_STRATEGY_ZERO2),
    "hyperparameters.parallelism.deepspeed_stage": _synth_deepspeed_stage,
    "hyperparameters.parallelism.fsdp": _synth_parallelism_bool(job_pb2.DISTRIBUTED_STRATEGY_FSDP),
    "hyperparameters.parallelism.bf16": later,
    "hyperparameters.parallelism.fp16": later,
    "hyperparameters.parallelism.tensor_parallel_size": _one_gpu_dimension("tensor"),
    "hyperparameters.parallelism.pipeline_parallel_size": _one_gpu_dimension("pipeline"),
    "algorithm": noted("ignored by the Synth client too; documentation only"),
}


# -- NeMo Customizer -------------------------------------------------------------------------------

NEMO_METHODS = {"sft": job_pb2.TRAINING_METHOD_SFT, "dpo": job_pb2.TRAINING_METHOD_DPO,
                "grpo": job_pb2.TRAINING_METHOD_GRPO, "distillation": job_pb2.TRAINING_METHOD_DISTILLATION}


def _nemo_finetuning_type(m: Mapper, key: str, value: Any) -> None:
    adapters = {"lora": job_pb2.ADAPTER_TYPE_LORA, "lora_merged": job_pb2.ADAPTER_TYPE_LORA,
                "all_weights": job_pb2.ADAPTER_TYPE_FULL}
    if value not in adapters:
        m.bad(key, f"'{value}' is not one of: {', '.join(adapters)}")
        return
    m.set(key, "adapter", adapters[value])
    if value == "lora_merged":
        m.set(key, "output.merge_adapter", True)


def _nemo_optimizer(m: Mapper, key: str, value: Any) -> None:
    if value not in NEMO_OPTIMIZERS:
        m.bad(key, f"'{value}' is not one of: {', '.join(NEMO_OPTIMIZERS)}")
        return
    optimizer, scheduler, decoupled = NEMO_OPTIMIZERS[value]
    m.set(key, "hyperparameters.optimizer", optimizer)
    m.set(key, "hyperparameters.lr_scheduler", scheduler)
    if not decoupled:  # Adam with no weight decay is AdamW with none
        if m.seen.get("weight_decay", 0) not in (0, 0.0):
            m.bad("weight_decay", f"conflicts with optimizer '{value}': TuneForge's AdamW decays weights "
                                  "decoupled; plain Adam is honoured only without weight decay")
        else:
            m.set(key, "hyperparameters.weight_decay", 0.0)


def _nemo_min_lr(m: Mapper, key: str, value: Any) -> None:
    if value not in (None, 0, 0.0):  # 0 or unset: 0.1 x learning_rate, TuneForge's default too
        to("hyperparameters.min_learning_rate", float)(m, key, value)


def _nemo_val_check(m: Mapper, key: str, value: Any) -> None:
    if isinstance(value, int) and not isinstance(value, bool):
        m.set(key, "hyperparameters.eval_steps", value)
    elif value == 1.0:
        m.set(key, "hyperparameters.eval_steps", 0)  # once per epoch
    elif isinstance(value, float):
        m.set(key, "hyperparameters.eval_epoch_fraction", value)  # every fraction of an epoch
    else:
        m.bad(key, f"must be a number, got {json.dumps(value)}")


def _nemo_batch(m: Mapper, key: str, value: Any) -> None:
    if m.seen.get("training_type") == "grpo":
        m.note(key, "ignored for GRPO by NeMo too: the batch is grpo.num_prompts_per_step x "
                    "num_generations_per_prompt")
        return
    # NeMo's batch_size is the global batch per step; on one GPU that is TuneForge's per-device batch
    # with no accumulation.
    to("hyperparameters.batch_size")(m, key, value)


def _nemo_target_modules(m: Mapper, key: str, value: Any) -> None:
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        m.bad(key, "must be a list of module names")
        return
    names: list[str] = []
    for name in value:
        for hf in NEMO_MODULES.get(name, [name]):
            if hf not in names:
                names.append(hf)
    m.set(key, "lora.target_modules", names)


def _nemo_generations(m: Mapper, key: str, value: Any) -> None:
    if _typed(int, key, value, m) is not None:
        m.set(key, "grpo.num_generations", value)


def _nemo_clip(m: Mapper, key: str, value: Any) -> None:
    """ratio_clip_min is TuneForge's clip_epsilon (the ratio's lower bound 1 - e), ratio_clip_max its
    clip_epsilon_high (the upper bound 1 + e)."""
    value = _typed(float, key, value, m)
    if value is None:
        return
    m.set(key, "grpo.clip_epsilon_high" if key.endswith("max") else "grpo.clip_epsilon", value)


def _nemo_optional(rule: Rule) -> Rule:
    """A key whose null means "the default": nothing to set."""

    def optional(m: Mapper, key: str, value: Any) -> None:
        if value is not None:
            rule(m, key, value)

    return optional


def _nemo_top_k(m: Mapper, key: str, value: Any) -> None:
    if value is None:
        m.set(key, "grpo.top_k", 0)
    else:
        to("grpo.top_k")(m, key, value)


def _nemo_none_only(why: str) -> Rule:
    def rule(m: Mapper, key: str, value: Any) -> None:
        if value is not None:
            m.bad(key, f"{NOT_YET}: {why}")

    return rule


def _nemo_sft_log_probs(m: Mapper, key: str, value: Any) -> None:
    if value is True and m.seen.get("dpo.sft_loss_weight", 0) not in (0, 0.0):
        m.bad(key, f"{NOT_YET}: how the added SFT loss averages (dpo.average_log_probs covers the "
                   "preference loss)")


def _teacher(m: Mapper, key: str, value: Any) -> None:
    if _typed(str, key, value, m) is None:
        return
    local = _local_path(m, value)
    m.set(key, "distillation.teacher_model", str(local) if local is not None else value)


NEMO_EARLY_STOPPING = (10, 0.001)  # patience (validations), min_delta
NEMO_SECTIONS = {"sft": "sft", "dpo": "dpo", "grpo": "grpo", "distillation": "distillation"}
NEMO_TABLE_KEYS = frozenset({"sft", "dpo", "grpo", "lora", "distillation"})
NEMO_RULES: dict[str, Rule] = {
    "finetuning_type": _nemo_finetuning_type,
    "training_type": choice("method", NEMO_METHODS),
    "warmup_steps": to("hyperparameters.warmup_steps"),
    "seed": to("hyperparameters.seed"),
    "max_steps": _positive_steps("hyperparameters.max_steps"),
    "optimizer": _nemo_optimizer,
    "adam_beta1": to("hyperparameters.adam_beta1", float),
    "adam_beta2": to("hyperparameters.adam_beta2", float),
    "min_learning_rate": _nemo_min_lr,
    "batch_size": _nemo_batch,
    "epochs": to("hyperparameters.epochs"),
    "learning_rate": to("hyperparameters.learning_rate", float),
    "log_every_n_steps": to("hyperparameters.logging_steps"),
    "val_check_interval": _nemo_val_check,
    "weight_decay": to("hyperparameters.weight_decay", float),
    "sequence_packing_enabled": to("hyperparameters.packing", bool),
    "sft.hidden_dropout": _nemo_optional(to("hyperparameters.hidden_dropout", float)),
    "sft.attention_dropout": _nemo_optional(to("hyperparameters.attention_dropout", float)),
    "dpo.max_grad_norm": to("hyperparameters.max_grad_norm", float),
    "dpo.ref_policy_kl_penalty": to("dpo.beta", float),
    "dpo.preference_loss_weight": to("dpo.preference_loss_weight", float),
    "dpo.preference_average_log_probs": to("dpo.average_log_probs", bool),
    "dpo.sft_loss_weight": to("dpo.sft_loss_weight", float),
    "dpo.sft_average_log_probs": _nemo_sft_log_probs,
    "grpo.environment": unsupported("NeMo Gym environments; TuneForge's GRPO scores with its reward "
                                    "functions (grpo.reward_functions: exact_match, regex, json_valid, "
                                    "length, user code)"),
    "grpo.normalize_rewards": to("grpo.normalize_rewards", bool),
    "grpo.use_rloo": to("grpo.use_rloo", bool),
    "grpo.overlong_filtering": to("grpo.overlong_filtering", bool),
    "grpo.num_prompts_per_step": later,
    "grpo.num_generations_per_prompt": _nemo_generations,
    "grpo.ref_policy_kl_penalty": to("grpo.kl_beta", float),
    "grpo.max_grad_norm": to("hyperparameters.max_grad_norm", float),
    "grpo.ratio_clip_min": _nemo_clip,
    "grpo.ratio_clip_max": _nemo_clip,
    "grpo.ratio_clip_c": _nemo_optional(to("grpo.ratio_clip_c", float)),
    "grpo.use_on_policy_kl_approximation": to("grpo.on_policy_kl_approximation", bool),
    "grpo.use_importance_sampling_correction": only(False, "generation and training run in the same "
                                                           "framework, so there is nothing to correct"),
    "grpo.token_level_loss": to("grpo.token_level_loss", bool),
    "grpo.logprob_chunk_size": noted("a memory/speed knob of NeMo's distributed loss; no effect on results"),
    "grpo.generation_batch_size": noted("a speed knob of NeMo's rollouts; no effect on results"),
    "grpo.generation_temperature": to("grpo.temperature", float),
    "grpo.generation_top_p": to("grpo.top_p", float),
    "grpo.generation_top_k": _nemo_top_k,
    "grpo.generation_pipeline_parallel_size": _one_gpu_dimension("pipeline"),
    "lora.adapter_dim": to("lora.rank"),
    "lora.alpha": to("lora.alpha"),
    "lora.adapter_dropout": to("lora.dropout", float),
    "lora.target_modules": _nemo_target_modules,
    "distillation.teacher": _teacher,
}


def _nemo_finish(m: Mapper, doc: dict[str, Any]) -> None:
    if "finetuning_type" not in doc:
        m.bad("finetuning_type", "is required: lora, lora_merged or all_weights")
    method = doc.get("training_type", "sft")
    for section, owner in NEMO_SECTIONS.items():
        if section in doc and owner != method:
            m.bad(section, f"conflicts with training_type '{method}': these settings are for '{owner}'")
    if "lora" in doc and doc.get("finetuning_type") == "all_weights":
        m.bad("lora", "conflicts with finetuning_type 'all_weights', which trains no adapter")
    # NeMo always stops early: "no improvement after 10 [validations] with a minimum delta of 0.001".
    key = "val_check_interval" if "val_check_interval" in doc else "training_type"
    m.set(key, "hyperparameters.early_stopping.enabled", True)
    m.set(key, "hyperparameters.early_stopping.patience", NEMO_EARLY_STOPPING[0])
    m.set(key, "hyperparameters.early_stopping.min_delta", NEMO_EARLY_STOPPING[1])
    m.note(key, "NeMo Customizer always stops early on the validation loss (10 validations without an "
                "improvement of 0.001): hyperparameters.early_stopping is on, so the dataset needs a "
                "validation split")
    grpo: dict[str, Any] = doc["grpo"] if isinstance(doc.get("grpo"), dict) else {}
    if "num_prompts_per_step" in grpo:
        key = "grpo.num_prompts_per_step"
        prompts = _typed(int, key, grpo["num_prompts_per_step"], m)
        if prompts is not None:
            generations = m.spec.grpo.num_generations if m.spec.grpo.HasField("num_generations") else 4
            # TuneForge's batch counts completions; NeMo's step takes prompts x generations.
            m.set(key, "hyperparameters.batch_size", prompts * generations)


# -- walking a document ----------------------------------------------------------------------------

FORMATS: dict[str, tuple[dict[str, Rule], frozenset[str], Callable[[Mapper, dict[str, Any]], None]]] = {
    SYNTH: (SYNTH_RULES, SYNTH_TABLE_KEYS, _synth_finish),
    MODELFORGE: (MODELFORGE_RULES, frozenset(), _mf_finish),
    NEMO: (NEMO_RULES, NEMO_TABLE_KEYS, _nemo_finish),
}


def _flatten(doc: dict[str, Any], tables: frozenset[str], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in doc.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and path in tables:
            yield from _flatten(value, tables, path + ".")
        else:
            yield path, value


def map_document(fmt: str, doc: dict[str, Any], base_dir: Path) -> ConfigJob:
    """Runs the format's rules over every key of `doc`; unknown keys are violations."""
    rules, tables, finish = FORMATS[fmt]
    m = Mapper(fmt, base_dir)
    items = list(_flatten(doc, tables))
    m.seen = dict(items)
    for key, value in items:
        rule = rules.get(key)
        if rule is None:
            m.bad(key, f"is not a {FORMAT_TITLES[fmt]} key TuneForge knows; {_near(key, rules)}")
        else:
            rule(m, key, value)
    finish(m, doc)
    m.job.violations = list(m.v.items)
    return m.job


def _near(key: str, rules: dict[str, Rule]) -> str:
    section = key.rpartition(".")[0]
    same = sorted(k.rpartition(".")[2] for k in rules if k.rpartition(".")[0] == section)
    if not same:
        return "no settings are read here"
    close = difflib.get_close_matches(key.rpartition(".")[2], same, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"{hint}keys here: {', '.join(same)}"


# -- the entry points ------------------------------------------------------------------------------

def read_config(path_or_text: str | Path, *, dataset: str | None = None, model: str | None = None,
                gpu_type: str | None = None, examples: int | None = None, validate: bool = True) -> ConfigJob:
    """A config file (a path, or the file's text) as a ConfigJob with every violation listed, not raised.

    `dataset` (a dataset id or name, or a local file relative to the working directory), `model` and
    `gpu_type` (which ModelForge and NeMo files cannot name) override the file, as Synth's `--dataset`
    does; `examples` keeps the first N rows of an uploaded file.
    `validate` also runs TuneForge's own checks (`resolve_spec`) and names the file's key for each.
    """
    text, base_dir, filename = _source(path_or_text)
    fmt, doc = parse_text(text, filename)
    job = map_document(fmt, doc, base_dir)
    extra = Violations()
    if model is not None:
        job.spec.base_model = model
        job.sources["spec.base_model"] = "--model"
    if gpu_type is not None:
        m = Mapper(fmt, base_dir)
        m.job = job
        _gpu_type(m, "--gpu-type", gpu_type)
        extra.items += m.v.items
    if dataset is not None:
        set_dataset(job, dataset, "--dataset", Path.cwd())
    if examples is not None:
        if extra.check(examples >= 1, "--examples", f"must be at least 1, got {examples}"):
            job.max_samples = examples
    job.violations += extra.items
    if validate:
        job.violations += _validate(job)
    return job


def load_config(path_or_text: str | Path, *, dataset: str | None = None, model: str | None = None,
                gpu_type: str | None = None, examples: int | None = None) -> ConfigJob:
    """`read_config`, raising InvalidArgument with one field violation per key it cannot honour."""
    job = read_config(path_or_text, dataset=dataset, model=model, gpu_type=gpu_type, examples=examples)
    if job.violations:
        v = Violations()
        v.items = list(job.violations)
        v.raise_if_any(f"the {FORMAT_TITLES[job.format]} cannot be run as it is")
    return job


def _source(path_or_text: str | Path) -> tuple[str, Path, str]:
    """(text, folder relative paths resolve against, file name). A str holding a newline, or starting
    like a document, is the text itself; anything else names a file."""
    if isinstance(path_or_text, str) and ("\n" in path_or_text or path_or_text.lstrip()[:1] in "{[") \
            and path_or_text.strip():
        return path_or_text, Path.cwd(), ""
    path = Path(path_or_text).expanduser()
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise _bad(f"{path} is larger than {MAX_CONFIG_BYTES} bytes")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = f"{path}: cannot be read ({exc})"
        raise InvalidArgument(f"config file {why}", violations=[FieldViolation("config", why)]) from exc
    # Relative paths in the file resolve against the working directory, not the file's folder: what the
    # Synth CLI does (its documentation says so), so a Synth user's file means the same files here.
    return text, Path.cwd(), path.name


def _validate(job: ConfigJob) -> list[FieldViolation]:
    """resolve_spec's problems, each named by the file key that set the field (or the spec path when no
    key did: something the format cannot say, like GRPO's reward functions)."""
    spec = job_pb2.JobSpec()
    spec.CopyFrom(job.spec)
    try:
        resolve_spec(spec, allow_user_reward_code=True, require_dataset=False)
    except InvalidArgument as err:
        out = []
        for item in err.violations:
            key = _source_key(job.sources, item.field)
            if item.field == "spec.base_model" and not job.spec.base_model:
                key, why = "spec.base_model", f"{FORMAT_TITLES[job.format]} names no base model here; pass " \
                                             "--model (or model=...)"
                out.append(FieldViolation(key, why))
                continue
            described = item.description if key == item.field else f"{item.description} ({item.field})"
            if "needs a GPU" in described:
                described += "; a config file that cannot name one takes --gpu-type (gpu_type=)"
            out.append(FieldViolation(key, described))
        return out
    return []


def _source_key(sources: dict[str, str], spec_field: str) -> str:
    path = spec_field
    while path:
        if path in sources:
            return sources[path]
        trimmed = path.rsplit("[", 1)[0] if path.endswith("]") else path.rpartition(".")[0]
        if trimmed == path:
            break
        path = trimmed
    return spec_field


__all__ = ["FORMAT_TITLES", "MODELFORGE", "NEMO", "SYNTH", "ConfigJob", "load_config", "map_document",
           "parse_text", "read_config"]
