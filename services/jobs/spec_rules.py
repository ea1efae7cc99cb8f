"""Job spec validation and defaults: every field checked at submission, every problem reported at once.

`resolve_spec` returns a copy of the spec with every default filled in, so the worker, the estimate and the
stored job all see the same numbers. Defaults follow the seeds' platforms (LoRA r=16, alpha=2r, lr 2e-4,
batch 4, 3 epochs, max length 2048) where they agree, and the TRL/PEFT defaults where they do not.
"""

from __future__ import annotations

import re

from tuneforge.v1 import job_pb2

from services.kit.errors import Violations

MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
MODULE_RE = re.compile(r"^[A-Za-z0-9_.*\-]+$")

# What the trainer workers of this release run; the rest of the API is designed but refused up front, so a
# job never waits in the queue only to fail on a worker.
SUPPORTED_METHODS = {job_pb2.TRAINING_METHOD_SFT}
SUPPORTED_ADAPTERS = {job_pb2.ADAPTER_TYPE_LORA, job_pb2.ADAPTER_TYPE_FULL}
SUPPORTED_STRATEGIES = {job_pb2.DISTRIBUTED_STRATEGY_NONE}


def _range(v: Violations, field: str, value: float, lo: float, hi: float, *, lo_open: bool = False) -> None:
    ok = (value > lo if lo_open else value >= lo) and value <= hi
    bracket = "(" if lo_open else "["
    v.check(ok, field, f"must be in {bracket}{lo:g}, {hi:g}], got {value:g}")


def _check_base_model(v: Violations, value: str, field: str) -> None:
    if not value:
        v.add(field, "is required: a Hugging Face model id (org/name), a local path or an s3:// URI")
    elif value.startswith("s3://"):
        v.check(bool(value[5:].strip("/")), field, "an s3:// URI must name a bucket and a folder")
    elif value.startswith(("/", "./", "../", "file://")):
        pass
    elif not MODEL_ID_RE.match(value):
        v.add(field, f"'{value}' is neither a Hugging Face id (org/name), an absolute path nor an s3:// URI")


def resolve_spec(spec: job_pb2.JobSpec) -> job_pb2.JobSpec:
    """Validates `spec`, returns it with defaults filled in; raises InvalidArgument listing every problem."""
    v = Violations()
    out = job_pb2.JobSpec()
    out.CopyFrom(spec)

    _check_base_model(v, out.base_model, "spec.base_model")
    v.check(bool(out.dataset), "spec.dataset", "is required: the id or name of a READY dataset")

    if out.method == job_pb2.TRAINING_METHOD_UNSPECIFIED:
        out.method = job_pb2.TRAINING_METHOD_SFT
    if out.adapter == job_pb2.ADAPTER_TYPE_UNSPECIFIED:
        out.adapter = job_pb2.ADAPTER_TYPE_LORA
    method_name = job_pb2.TrainingMethod.Name(out.method) if out.method in job_pb2.TrainingMethod.values() \
        else str(out.method)
    adapter_name = job_pb2.AdapterType.Name(out.adapter) if out.adapter in job_pb2.AdapterType.values() \
        else str(out.adapter)
    v.check(out.method in SUPPORTED_METHODS, "spec.method",
            f"{method_name} is not supported by this deployment yet (supported: TRAINING_METHOD_SFT)")
    v.check(out.adapter in SUPPORTED_ADAPTERS, "spec.adapter",
            f"{adapter_name} is not supported by this deployment yet "
            "(supported: ADAPTER_TYPE_LORA, ADAPTER_TYPE_FULL)")

    _resolve_lora(v, out)
    _resolve_hyperparameters(v, out)
    _resolve_hardware(v, out)
    if out.output.merge_adapter and out.adapter != job_pb2.ADAPTER_TYPE_LORA:
        v.add("spec.output.merge_adapter", "only a LoRA adapter can be merged into the base weights")
    v.raise_if_any("job spec is invalid")
    return out


def _resolve_lora(v: Violations, out: job_pb2.JobSpec) -> None:
    lora = out.lora
    if out.adapter not in (job_pb2.ADAPTER_TYPE_LORA, job_pb2.ADAPTER_TYPE_QLORA):
        return
    if not lora.HasField("rank"):
        lora.rank = 16
    _range(v, "spec.lora.rank", lora.rank, 1, 256)
    if not lora.HasField("alpha"):
        lora.alpha = 2 * lora.rank
    _range(v, "spec.lora.alpha", lora.alpha, 1, 512)
    if not lora.HasField("dropout"):
        lora.dropout = 0.05
    _range(v, "spec.lora.dropout", lora.dropout, 0.0, 0.5)
    if not lora.target_modules:
        lora.target_modules.append("all-linear")
    for i, module in enumerate(lora.target_modules):
        v.check(bool(MODULE_RE.match(module)), f"spec.lora.target_modules[{i}]",
                f"'{module}' is not a module name (letters, digits, '_', '.', '-', '*') or 'all-linear'")
    if "all-linear" in lora.target_modules and len(lora.target_modules) > 1:
        v.add("spec.lora.target_modules", "'all-linear' cannot be combined with other module names")
    if not lora.HasField("use_dora"):
        lora.use_dora = False


def _resolve_hyperparameters(v: Violations, out: job_pb2.JobSpec) -> None:
    hp = out.hyperparameters
    f = "spec.hyperparameters."
    full = out.adapter == job_pb2.ADAPTER_TYPE_FULL
    defaults: dict[str, float | int | bool] = {
        "epochs": 3, "max_steps": 0, "batch_size": 4, "gradient_accumulation_steps": 1,
        "learning_rate": 2e-5 if full else 2e-4, "adam_beta1": 0.9, "adam_beta2": 0.999,
        "weight_decay": 0.01, "max_grad_norm": 1.0, "gradient_checkpointing": False, "packing": False,
        "group_by_length": False, "max_seq_length": 2048, "seed": 42, "dataloader_workers": 0,
        "logging_steps": 10, "eval_steps": 0, "save_steps": 0, "save_total_limit": 2,
        "assistant_only_loss": True,
    }
    for name, value in defaults.items():
        if not hp.HasField(name):
            setattr(hp, name, value)
    if hp.HasField("warmup_steps") and hp.HasField("warmup_ratio"):
        v.add(f + "warmup_ratio", "set warmup_steps or warmup_ratio, not both")
    if not hp.HasField("warmup_steps") and not hp.HasField("warmup_ratio"):
        hp.warmup_ratio = 0.03
    if not hp.HasField("min_learning_rate"):
        hp.min_learning_rate = 0.1 * hp.learning_rate
    if hp.lr_scheduler == job_pb2.LR_SCHEDULER_UNSPECIFIED:
        hp.lr_scheduler = job_pb2.LR_SCHEDULER_COSINE
    if hp.optimizer == job_pb2.OPTIMIZER_UNSPECIFIED:
        hp.optimizer = job_pb2.OPTIMIZER_ADAMW

    _range(v, f + "epochs", hp.epochs, 1, 50)
    v.check(hp.max_steps >= 0, f + "max_steps", "must not be negative (0 means: run all epochs)")
    _range(v, f + "batch_size", hp.batch_size, 1, 256)
    _range(v, f + "gradient_accumulation_steps", hp.gradient_accumulation_steps, 1, 256)
    _range(v, f + "learning_rate", hp.learning_rate, 0.0, 1e-2, lo_open=True)
    v.check(0 <= hp.min_learning_rate < hp.learning_rate, f + "min_learning_rate",
            "must be at least 0 and lower than learning_rate")
    if hp.HasField("warmup_steps"):
        v.check(hp.warmup_steps >= 0, f + "warmup_steps", "must not be negative")
    if hp.HasField("warmup_ratio"):
        _range(v, f + "warmup_ratio", hp.warmup_ratio, 0.0, 0.5)
    _range(v, f + "adam_beta1", hp.adam_beta1, 0.0, 1.0, lo_open=True)
    v.check(hp.adam_beta1 < 1.0, f + "adam_beta1", "must be below 1")
    _range(v, f + "adam_beta2", hp.adam_beta2, 0.0, 1.0, lo_open=True)
    v.check(hp.adam_beta2 < 1.0, f + "adam_beta2", "must be below 1")
    _range(v, f + "weight_decay", hp.weight_decay, 0.0, 1.0)
    v.check(hp.max_grad_norm > 0, f + "max_grad_norm", "must be positive")
    _range(v, f + "max_seq_length", hp.max_seq_length, 16, 131072)
    v.check(hp.seed >= 0, f + "seed", "must not be negative")
    _range(v, f + "dataloader_workers", hp.dataloader_workers, 0, 16)
    v.check(hp.logging_steps >= 1, f + "logging_steps", "must be at least 1")
    v.check(hp.eval_steps >= 0, f + "eval_steps", "must not be negative (0 means once per epoch)")
    v.check(hp.save_steps >= 0, f + "save_steps", "must not be negative (0 means once per epoch)")
    _range(v, f + "save_total_limit", hp.save_total_limit, 1, 100)
    for name, enum in (("lr_scheduler", job_pb2.LrScheduler), ("optimizer", job_pb2.Optimizer),
                       ("precision", job_pb2.Precision)):
        v.check(getattr(hp, name) in enum.values(), f + name, "is not a known value")
    if hp.optimizer not in (job_pb2.OPTIMIZER_ADAMW, job_pb2.OPTIMIZER_SGD, job_pb2.OPTIMIZER_ADAFACTOR):
        v.add(f + "optimizer", "8-bit and paged optimizers need a GPU worker and are not supported yet")
    es = hp.early_stopping
    if es.enabled:
        if not es.HasField("patience"):
            es.patience = 3
        if not es.HasField("min_delta"):
            es.min_delta = 0.0
        v.check(es.patience >= 1, f + "early_stopping.patience", "must be at least 1")
        v.check(es.min_delta >= 0, f + "early_stopping.min_delta", "must not be negative")


def _resolve_hardware(v: Violations, out: job_pb2.JobSpec) -> None:
    hw = out.hardware
    if not hw.HasField("gpu_count"):
        hw.gpu_count = 1
    if not hw.HasField("node_count"):
        hw.node_count = 1
    _range(v, "spec.hardware.gpu_count", hw.gpu_count, 1, 8)
    _range(v, "spec.hardware.node_count", hw.node_count, 1, 64)
    if hw.strategy == job_pb2.DISTRIBUTED_STRATEGY_UNSPECIFIED:
        hw.strategy = job_pb2.DISTRIBUTED_STRATEGY_NONE if hw.gpu_count * hw.node_count == 1 \
            else job_pb2.DISTRIBUTED_STRATEGY_DDP
    v.check(hw.strategy in SUPPORTED_STRATEGIES, "spec.hardware.strategy",
            "multi-process training is not supported by this deployment yet; use one GPU and one node")
