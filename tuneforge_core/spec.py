"""Job spec resolution: every default and every range of a JobSpec, said once.

`resolve_spec` returns a copy of the spec with every default filled in and every field checked, each
problem naming its field, all of them at once. It is the single source: the jobs service resolves a spec at
CreateJob and stores and queues the resolved copy; the estimation service resolves the drafts it is asked
about with the same function; the worker trains the resolved spec it is handed and fills in nothing
(`ensure_resolved` refuses one that is not). Resolving a resolved spec changes nothing.

Defaults follow the seeds' platforms (LoRA r=16, alpha=2r, lr 2e-4, batch 4, 3 epochs, max length 2048)
where they agree, and the TRL/PEFT defaults where they do not.
"""

from __future__ import annotations

import math
import re
from urllib.parse import urlsplit

from google.protobuf.message import Message
from tuneforge.v1 import dataset_pb2, job_pb2

from tuneforge_core import subjects
from tuneforge_core.compat import (
    LORA_ADAPTERS,
    MERGEABLE_ADAPTERS,
    METHOD_FAMILIES,
    PROMPT_TUNING_METHODS,
    SHARDING_STRATEGIES,
    SUPPORTED_ADAPTERS,
    SUPPORTED_METHODS,
    SUPPORTED_STRATEGIES,
    family_of_format,
    format_name,
    formats_for,
)
from tuneforge_core.errors import InvalidArgument, Violations
from tuneforge_core.model_types import check_model_type
from tuneforge_core.models import ref_problem

# Upper bounds that keep every number a worker is handed meaningful (and within 32-bit counters).
MAX_STEPS = 10_000_000
MAX_SEED = 2**32 - 1
# learning_rate is in (0, MAX_LEARNING_RATE].
MAX_LEARNING_RATE = 1e-2
MAX_SPEC_BYTES = 64 * 1024
MAX_TARGET_MODULES = 64
MODULE_RE = re.compile(r"^[A-Za-z0-9_.*\-]+\Z")

def _range(v: Violations, field: str, value: float, lo: float, hi: float, *, lo_open: bool = False) -> None:
    ok = (value > lo if lo_open else value >= lo) and value <= hi
    bracket = "(" if lo_open else "["
    v.check(ok, field, f"must be in {bracket}{lo:g}, {hi:g}], got {value:g}")


def _check_base_model(v: Violations, value: str, field: str) -> None:
    """The form of a model reference only (hub id, absolute path, file:// or s3:// URI). Whether this
    deployment lets an organization use it (model roots, its own outputs in storage) needs the settings and
    the organization: `tuneforge_core.models.ModelPolicy`, which CreateJob, the estimator and the worker
    apply."""
    problem = ref_problem(value)
    if problem is not None:
        v.add(field, problem)


def resolve_spec(
    spec: job_pb2.JobSpec, *, allow_user_reward_code: bool = False, require_dataset: bool = True
) -> job_pb2.JobSpec:
    """Validates `spec`, returns it with defaults filled in; raises InvalidArgument listing every problem.

    `allow_user_reward_code` is the deployment's choice to run GRPO reward code written by users (off unless
    the operator turns it on; the workers have their own switch too). `require_dataset` is off for the
    estimation service's drafts, which may count tokens without naming a dataset.
    """
    v = Violations()
    size = spec.ByteSize()
    if size > MAX_SPEC_BYTES:  # a job's spec travels in every JobChanged event, below NATS' 1 MiB limit
        v.add("spec", f"is {size} bytes; a job spec may be at most {MAX_SPEC_BYTES} bytes")
        v.raise_if_any("job spec is invalid")
    out = job_pb2.JobSpec()
    out.CopyFrom(spec)

    _check_base_model(v, out.base_model, "spec.base_model")
    if require_dataset:
        v.check(bool(out.dataset), "spec.dataset", "is required: the id or name of a READY dataset")

    if out.method == job_pb2.TRAINING_METHOD_UNSPECIFIED:
        out.method = job_pb2.TRAINING_METHOD_SFT
    if out.adapter == job_pb2.ADAPTER_TYPE_UNSPECIFIED:
        out.adapter = job_pb2.ADAPTER_TYPE_LORA
    method_ok = v.check(
        out.method in SUPPORTED_METHODS,
        "spec.method",
        f"{_name(job_pb2.TrainingMethod, out.method)} is not a training method this deployment "
        f"runs (supported: {', '.join(sorted(_name(job_pb2.TrainingMethod, m) for m in SUPPORTED_METHODS))})",
    )
    v.check(
        out.adapter in SUPPORTED_ADAPTERS,
        "spec.adapter",
        f"{_name(job_pb2.AdapterType, out.adapter)} is not an adapter type this deployment trains",
    )
    if out.adapter == job_pb2.ADAPTER_TYPE_PROMPT_TUNING and method_ok:
        v.check(
            out.method in PROMPT_TUNING_METHODS,
            "spec.adapter",
            f"prompt tuning works with TRAINING_METHOD_SFT and TRAINING_METHOD_DISTILLATION only, not "
            f"{_name(job_pb2.TrainingMethod, out.method)}; use LoRA",
        )

    _resolve_lora(v, out)
    _resolve_quantization(v, out)
    _resolve_prompt_tuning(v, out)
    _resolve_hyperparameters(v, out)
    _resolve_hardware(v, out)
    _resolve_global_batch(v, out)
    _resolve_method(v, out, allow_user_reward_code=allow_user_reward_code)
    _resolve_evaluation(v, out)
    _check_warm_start(v, out)
    _check_integrations(v, out)
    check_model_type(v, out)  # VLM: SFT with LoRA/QLoRA only (tuneforge_core.model_types)
    _check_precision_on_cpu(v, out)
    _check_speed(v, out)
    if out.output.merge_adapter and out.adapter not in MERGEABLE_ADAPTERS:
        why = (
            "full fine-tuning already produces a whole model"
            if out.adapter == job_pb2.ADAPTER_TYPE_FULL
            else "a soft prompt cannot be folded into the weights"
        )
        v.add(
            "spec.output.merge_adapter",
            f"only a LoRA or QLoRA adapter can be merged into the base weights: {why}",
        )
    _check_enums(v, spec, "spec")
    v.raise_if_any("job spec is invalid")
    return out


def check_dataset_fit(spec: job_pb2.JobSpec, dataset_format: int, field: str = "spec.dataset") -> None:
    """Raises InvalidArgument on `field` when the dataset's format is not one the spec's method trains on.

    Runs at CreateJob once the dataset is known, so a DPO job on chat data fails there, not on a worker.
    """
    families = METHOD_FAMILIES.get(spec.method)
    if families is None or dataset_format == 0 or family_of_format(dataset_format) in families:
        return
    v = Violations()
    v.add(
        field,
        f"the dataset is DATASET_FORMAT_{format_name(dataset_format)} but "
        f"{_name(job_pb2.TrainingMethod, spec.method)} trains on "
        + " or ".join(f"DATASET_FORMAT_{f}" for f in formats_for(spec.method)),
    )
    v.raise_if_any("the dataset does not fit the training method")


# DatasetOptions training cannot honour, with why: refused at upload (datasets service) and, for datasets
# stored before that, at CreateJob. They used to be stored with the dataset and never reach the worker.
# - max_prompt_length: TRL 1.16's DPO, ORPO and KTO configs have no prompt limit (only max_length on the
#   whole sequence, spec.hyperparameters.max_seq_length), and SFT and GRPO never had one.
# - lazy_tokenize, streaming: the worker reads a split's normalized file into memory and the trainer
#   tokenizes it up front; neither mode is implemented.
UNHONOURED_DATASET_OPTIONS: dict[str, str] = {
    "max_prompt_length": "has no prompt length limit in this trainer (TRL 1.16 truncates the whole "
    "sequence at spec.hyperparameters.max_seq_length)",
    "lazy_tokenize": "is not implemented: the trainer tokenizes the split up front",
    "streaming": "is not implemented: the worker loads the split into memory",
}


def check_dataset_options(options: dataset_pb2.DatasetOptions, field: str = "spec.dataset") -> None:
    """Raises InvalidArgument on `field` for DatasetOptions (set at upload) that training cannot honour
    (UNHONOURED_DATASET_OPTIONS). Runs at CreateJob once the dataset is known."""
    v = Violations()
    for name, why in UNHONOURED_DATASET_OPTIONS.items():
        value = getattr(options, name)
        if value:
            v.add(field, f"the dataset sets options.{name} ({value}), which training {why}; upload it "
                         f"without options.{name}")
    v.raise_if_any("the dataset's options cannot be honoured")


# JobSpec fields added after the first release (2026-11-21), by path. A job created before an upgrade and
# trained after it was resolved without them: its spec has none of them set. `upgrade_resolved` fills their
# defaults for such a spec, each default being what training did before the field existed (the TRL value,
# or off), so the job trains as it was admitted. A field added later goes here too.
ADDED_SINCE_FIRST_RELEASE: frozenset[str] = frozenset({
    "hyperparameters.eval_batch_size", "hyperparameters.hidden_dropout", "hyperparameters.attention_dropout",
    "hyperparameters.eval_epoch_fraction", "hyperparameters.keep_best_model",
    "hyperparameters.metric_for_best_model", "hyperparameters.global_batch_size",
    "dpo.reference_model",
    "grpo.normalize_rewards", "grpo.use_rloo", "grpo.overlong_filtering", "grpo.clip_epsilon_high",
    "grpo.ratio_clip_c", "grpo.token_level_loss", "grpo.num_prompts_per_step", "grpo.generation_batch_size",
    "grpo.importance_sampling_correction", "grpo.reward_model", "grpo.on_policy_kl_approximation",
    "output.keep_optimizer_state", "hardware.pool",
    "evaluation", "warm_start", "model_type", "integrations", "speed",
})


def differing_fields(a: Message, b: Message, prefix: str = "") -> set[str]:
    """Paths of the fields whose values differ between two messages of one type (into singular submessages;
    a difference inside a message field named in ADDED_SINCE_FIRST_RELEASE is reported as that field)."""
    out: set[str] = set()
    for field in a.DESCRIPTOR.fields:
        path = prefix + field.name
        if field.message_type is not None and not field.is_repeated and path not in ADDED_SINCE_FIRST_RELEASE:
            if a.HasField(field.name) or b.HasField(field.name):
                out |= differing_fields(getattr(a, field.name), getattr(b, field.name), path + ".")
        elif getattr(a, field.name) != getattr(b, field.name) or (
                field.has_presence and a.HasField(field.name) != b.HasField(field.name)):
            out.add(path)
    return out


def upgrade_resolved(spec: job_pb2.JobSpec) -> job_pb2.JobSpec:
    """The spec a worker trains: `spec` itself when it is resolved (see `ensure_resolved`); when it was
    resolved before the fields of ADDED_SINCE_FIRST_RELEASE existed (a job queued across an upgrade), a copy
    with only those fields' defaults filled. Anything else is left as it is, for `ensure_resolved` to refuse.
    """
    try:
        resolved = resolve_spec(spec, allow_user_reward_code=True, require_dataset=False)
    except InvalidArgument:
        return spec
    if resolved == spec:
        return spec
    first_release = not any(_is_set(spec, path) for path in ADDED_SINCE_FIRST_RELEASE)
    if first_release and differing_fields(spec, resolved) <= ADDED_SINCE_FIRST_RELEASE:
        return resolved
    return spec


def _is_set(message: Message, path: str) -> bool:
    head, _, rest = path.partition(".")
    field = message.DESCRIPTOR.fields_by_name[head]
    if rest:
        return message.HasField(head) and _is_set(getattr(message, head), rest)
    if field.is_repeated:
        return len(getattr(message, head)) > 0
    if field.has_presence:
        return message.HasField(head)
    return bool(getattr(message, head))


def ensure_resolved(spec: job_pb2.JobSpec) -> None:
    """Raises InvalidArgument unless `spec` is what `resolve_spec` returns for it (every default filled).

    The worker calls this instead of filling defaults itself: a spec that did not come through CreateJob's
    resolution is refused, never trained with guessed values.
    """
    resolved = resolve_spec(spec, allow_user_reward_code=True, require_dataset=False)
    if resolved != spec:
        missing = sorted({f.name for f, _ in resolved.ListFields()} - {f.name for f, _ in spec.ListFields()})
        raise InvalidArgument(
            "the job spec was not resolved by the jobs service"
            + (f" (unset: {', '.join(missing)})" if missing else " (some defaults are unset)")
        )


def _name(enum: object, value: int) -> str:
    """The enum value's name, or its number when it has none (a newer client's value)."""
    try:
        return enum.Name(value)  # type: ignore[attr-defined]
    except ValueError:
        return str(value)


def _check_enums(v: Violations, message: Message, path: str) -> None:
    """Names every enum field of `message`, at any depth, set to a number its enum does not define (a
    newer client's value, or garbage), even in settings the chosen method or adapter ignores: such a spec
    is refused, never trained or estimated with the number read as something else. A field some rule
    above has already named is left to that rule's sentence."""
    named = {item.field for item in v.items}
    for field, value in message.ListFields():
        where = f"{path}.{field.name}"
        items = list(value) if field.is_repeated else [value]
        enum, nested = field.enum_type, field.message_type
        if enum is not None:
            for i, number in enumerate(items):
                at = f"{where}[{i}]" if field.is_repeated else where
                if number not in enum.values_by_number and at not in named:
                    v.add(at, f"{number} is not a known {enum.name} value")
        elif nested is not None and not nested.GetOptions().map_entry:
            for i, item in enumerate(items):
                _check_enums(v, item, f"{where}[{i}]" if field.is_repeated else where)


def _resolve_lora(v: Violations, out: job_pb2.JobSpec) -> None:
    lora = out.lora
    if out.adapter not in LORA_ADAPTERS:
        return
    if not lora.HasField("rank"):
        lora.rank = 16
    _range(v, "spec.lora.rank", lora.rank, 1, 256)
    if not lora.HasField("alpha"):
        # 2 x rank, saturated to the int32 field: 2 x 2**31-1 does not fit it (a rank out of range is
        # reported on rank, and on the alpha it implies, as for any other rank out of range).
        lora.alpha = max(-(2**31), min(2 * lora.rank, 2**31 - 1))
    _range(v, "spec.lora.alpha", lora.alpha, 1, 512)
    if not lora.HasField("dropout"):
        lora.dropout = 0.05
    _range(v, "spec.lora.dropout", lora.dropout, 0.0, 0.5)
    if not lora.target_modules:
        lora.target_modules.append("all-linear")
    v.check(len(lora.target_modules) <= MAX_TARGET_MODULES, "spec.lora.target_modules",
            f"at most {MAX_TARGET_MODULES} module names, got {len(lora.target_modules)}")
    for i, module in enumerate(lora.target_modules[:MAX_TARGET_MODULES]):
        v.check(
            len(module) <= 128 and bool(MODULE_RE.match(module)),
            f"spec.lora.target_modules[{i}]",
            f"'{module[:128]}' is not a module name (at most 128 letters, digits, '_', '.', '-', '*') or "
            "'all-linear'",
        )
    for i, module in enumerate(lora.target_modules[:MAX_TARGET_MODULES]):
        problem = _module_pattern_problem(module) if MODULE_RE.match(module) else None
        if problem:
            v.add(f"spec.lora.target_modules[{i}]", problem)
    if "all-linear" in lora.target_modules and len(lora.target_modules) > 1:
        v.add("spec.lora.target_modules", "'all-linear' cannot be combined with other module names")
    if not lora.HasField("use_dora"):
        lora.use_dora = False


def _module_pattern_problem(module: str) -> str | None:
    """Why a module name or NeMo-style wildcard pattern ('*.q_proj', 'model.layers.*.self_attn.*') cannot
    be used, or None. A name without '*' is a plain module name (PEFT matches it as a name suffix)."""
    parts = module.split(".")
    if any(not part for part in parts):
        return f"'{module}' has an empty name between dots"
    if "*" not in module:
        return None
    if all(set(part) <= {"*"} for part in parts):
        return (f"'{module}' matches every module (embeddings, norms and whole blocks too); name the "
                "layers, e.g. '*.q_proj' or 'model.layers.*.self_attn.*', or use 'all-linear'")
    if "**" in module:
        return f"'{module}': write one '*' (it already matches dots)"
    return None


def target_modules_for_peft(modules: list[str]) -> str | list[str]:
    """LoraConfig.target_modules: "all-linear", the names as a list, or, when any entry is a wildcard
    pattern, one regular expression (PEFT full-matches a string against each module's dotted name). '*'
    matches any characters, dots included; a plain name matches that module name at any depth, as PEFT's
    own list form does."""
    if modules == ["all-linear"]:
        return "all-linear"
    if not any("*" in m for m in modules):
        return list(modules)
    alternatives = [
        re.escape(m).replace(r"\*", ".*") if "*" in m else r"(?:.*\.)?" + re.escape(m) for m in modules
    ]
    return "(?:" + "|".join(alternatives) + ")"


def _resolve_quantization(v: Violations, out: job_pb2.JobSpec) -> None:
    if out.adapter != job_pb2.ADAPTER_TYPE_QLORA:
        return
    q, f = out.quantization, "spec.quantization."
    if not q.HasField("bits"):
        q.bits = 8 if q.type == job_pb2.QUANTIZATION_TYPE_INT8 else 4
    if not v.check(q.bits in (4, 8), f + "bits", f"must be 4 or 8, got {q.bits}"):
        return
    if q.type == job_pb2.QUANTIZATION_TYPE_UNSPECIFIED:
        q.type = job_pb2.QUANTIZATION_TYPE_NF4 if q.bits == 4 else job_pb2.QUANTIZATION_TYPE_INT8
    if q.type not in job_pb2.QuantizationType.values():
        pass  # an unknown number: _check_enums names it
    elif q.bits == 4:
        v.check(
            q.type != job_pb2.QUANTIZATION_TYPE_INT8, f + "type", "INT8 needs bits = 8; 4-bit is NF4 or FP4"
        )
    else:
        v.check(
            q.type == job_pb2.QUANTIZATION_TYPE_INT8,
            f + "type",
            f"{job_pb2.QuantizationType.Name(q.type)} needs bits = 4; 8-bit is INT8",
        )
    if not q.HasField("double_quantization"):
        q.double_quantization = True


def _resolve_prompt_tuning(v: Violations, out: job_pb2.JobSpec) -> None:
    if out.adapter != job_pb2.ADAPTER_TYPE_PROMPT_TUNING:
        return
    pt = out.prompt_tuning
    if not pt.HasField("num_virtual_tokens"):
        pt.num_virtual_tokens = 20
    _range(v, "spec.prompt_tuning.num_virtual_tokens", pt.num_virtual_tokens, 1, 512)
    v.check(
        not out.hyperparameters.packing,
        "spec.hyperparameters.packing",
        "cannot be used with prompt tuning: the soft prompt is prepended once per sequence, so packed "
        "examples after the first would train without it",
    )
    v.check(
        len(pt.init_text) <= 2000,
        "spec.prompt_tuning.init_text",
        f"must be at most 2000 characters, got {len(pt.init_text)}",
    )


def _resolve_method(v: Violations, out: job_pb2.JobSpec, *, allow_user_reward_code: bool) -> None:
    """Defaults and ranges of the chosen method's own settings; other methods' settings are left as sent."""
    if out.method == job_pb2.TRAINING_METHOD_DPO:
        dpo, f = out.dpo, "spec.dpo."
        _defaults(dpo, beta=0.1, preference_loss_weight=1.0, sft_loss_weight=0.0, average_log_probs=False)
        _range(v, f + "beta", dpo.beta, 0.0, 10.0, lo_open=True)
        _range(v, f + "preference_loss_weight", dpo.preference_loss_weight, 0.0, 10.0)
        _range(v, f + "sft_loss_weight", dpo.sft_loss_weight, 0.0, 10.0)
        v.check(
            dpo.preference_loss_weight > 0 or dpo.sft_loss_weight > 0,
            f + "preference_loss_weight",
            "preference_loss_weight and sft_loss_weight cannot both be 0",
        )
        if dpo.reference_model:  # unset: the base model is the reference
            _check_base_model(v, dpo.reference_model, f + "reference_model")
    elif out.method == job_pb2.TRAINING_METHOD_ORPO:
        _defaults(out.orpo, beta=0.1)
        _range(v, "spec.orpo.beta", out.orpo.beta, 0.0, 10.0, lo_open=True)
    elif out.method == job_pb2.TRAINING_METHOD_KTO:
        kto, f = out.kto, "spec.kto."
        _defaults(kto, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0)
        for name in ("beta", "desirable_weight", "undesirable_weight"):
            _range(v, f + name, getattr(kto, name), 0.0, 10.0, lo_open=True)
        v.check(
            out.hyperparameters.batch_size >= 2,
            "spec.hyperparameters.batch_size",
            "KTO needs at least 2 examples per batch: it estimates its KL term from mismatched pairs",
        )
    elif out.method == job_pb2.TRAINING_METHOD_DISTILLATION:
        d, f = out.distillation, "spec.distillation."
        _check_base_model(v, d.teacher_model, f + "teacher_model")
        _defaults(d, temperature=2.0, alpha=0.5)
        _range(v, f + "temperature", d.temperature, 0.0, 20.0, lo_open=True)
        _range(v, f + "alpha", d.alpha, 0.0, 1.0)
    elif out.method == job_pb2.TRAINING_METHOD_GRPO:
        _resolve_grpo(v, out, allow_user_reward_code=allow_user_reward_code)
    # A model another method would load is refused, not silently left out: it costs a download.
    method = _name(job_pb2.TrainingMethod, out.method)
    if out.dpo.reference_model and out.method != job_pb2.TRAINING_METHOD_DPO:
        v.add("spec.dpo.reference_model", f"is only used by TRAINING_METHOD_DPO, not {method}")
    if out.grpo.reward_model and out.method != job_pb2.TRAINING_METHOD_GRPO:
        v.add("spec.grpo.reward_model", f"is only used by TRAINING_METHOD_GRPO, not {method}")
    if out.distillation.teacher_model and out.method != job_pb2.TRAINING_METHOD_DISTILLATION:
        v.add("spec.distillation.teacher_model",
              f"is only used by TRAINING_METHOD_DISTILLATION, not {method}")
    # Code is never kept where nothing would run it.
    if out.grpo.reward_code and out.method != job_pb2.TRAINING_METHOD_GRPO:
        v.add("spec.grpo.reward_code", f"is only used by TRAINING_METHOD_GRPO, not {method}")


def _resolve_grpo(v: Violations, out: job_pb2.JobSpec, *, allow_user_reward_code: bool) -> None:
    g, f = out.grpo, "spec.grpo."
    _defaults(
        g,
        num_generations=4,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        kl_beta=0.04,
        clip_epsilon=0.2,
        max_completion_length=256,
    )
    _range(v, f + "num_generations", g.num_generations, 2, 64)
    _range(v, f + "temperature", g.temperature, 0.0, 2.0, lo_open=True)
    _range(v, f + "top_p", g.top_p, 0.0, 1.0, lo_open=True)
    v.check(g.top_k >= 0, f + "top_k", "must not be negative (0 disables top-k)")
    _range(v, f + "kl_beta", g.kl_beta, 0.0, 10.0)
    _range(v, f + "clip_epsilon", g.clip_epsilon, 0.0, 1.0, lo_open=True)
    v.check(g.clip_epsilon < 1.0, f + "clip_epsilon", "must be below 1")
    _range(v, f + "max_completion_length", g.max_completion_length, 1, 8192)
    hp, hw = out.hyperparameters, out.hardware
    processes = hw.gpu_count * hw.node_count
    groups_ok = True
    if g.num_generations >= 2 and hp.batch_size >= 1 and (hp.batch_size * processes) % g.num_generations:
        groups_ok = False
        v.add(
            "spec.hyperparameters.batch_size",
            f"for GRPO, batch_size x GPUs ({hp.batch_size} x {processes}) must be a multiple of "
            f"grpo.num_generations ({g.num_generations}): every batch holds whole groups of completions",
        )
    eval_batch = hp.eval_batch_size * processes
    if (g.num_generations >= 2 and hp.eval_batch_size >= 1 and hp.eval_batch_size != hp.batch_size
            and eval_batch % g.num_generations):  # equal to batch_size: checked on batch_size above
        v.add(
            "spec.hyperparameters.eval_batch_size",
            f"for GRPO, eval_batch_size x GPUs ({hp.eval_batch_size} x {processes}) must be a multiple of "
            f"grpo.num_generations ({g.num_generations}): evaluation also scores whole groups",
        )
    _resolve_grpo_knobs(v, out, groups_ok=groups_ok)
    kinds = list(g.reward_functions)
    if not kinds:
        v.add(f + "reward_functions", "GRPO needs at least one reward function")
    for i, kind in enumerate(kinds):
        field = f"{f}reward_functions[{i}]"
        if kind not in job_pb2.RewardFunction.values() or kind == job_pb2.REWARD_FUNCTION_UNSPECIFIED:
            v.add(field, "is not a known reward function")
        elif kinds.index(kind) != i:
            v.add(field, f"{job_pb2.RewardFunction.Name(kind)} is listed twice")
    if job_pb2.REWARD_FUNCTION_REGEX in kinds:
        try:
            re.compile(g.reward_regex)
        except re.error as exc:
            v.add(f + "reward_regex", f"is not a valid regular expression: {exc}")
        else:
            v.check(bool(g.reward_regex), f + "reward_regex", "is required by REWARD_FUNCTION_REGEX")
    if job_pb2.REWARD_FUNCTION_LENGTH in kinds:
        if v.check(g.HasField("target_length"), f + "target_length", "is required by REWARD_FUNCTION_LENGTH"):
            _range(v, f + "target_length", g.target_length, 1, 100_000)
    if job_pb2.REWARD_FUNCTION_USER_CODE in kinds:
        if not allow_user_reward_code:
            v.add(
                f"{f}reward_functions[{kinds.index(job_pb2.REWARD_FUNCTION_USER_CODE)}]",
                "user reward code is disabled in this deployment; use the built-in reward functions",
            )
        elif v.check(
            bool(g.reward_code.strip()), f + "reward_code", "is required by REWARD_FUNCTION_USER_CODE"
        ):
            try:
                compile(g.reward_code, "<reward_code>", "exec")  # syntax only: nothing runs here
            except SyntaxError as exc:
                v.add(f + "reward_code", f"line {exc.lineno}: {exc.msg}")
            else:
                v.check(
                    re.search(r"^def reward\(", g.reward_code, re.MULTILINE) is not None,
                    f + "reward_code",
                    "must define `def reward(prompts, completions, **columns)`",
                )
    elif g.reward_code:
        v.add(f + "reward_code", "is only used with REWARD_FUNCTION_USER_CODE")
    if job_pb2.REWARD_FUNCTION_REWARD_MODEL in kinds:
        if v.check(bool(g.reward_model), f + "reward_model", "is required by REWARD_FUNCTION_REWARD_MODEL"):
            _check_base_model(v, g.reward_model, f + "reward_model")
    elif g.reward_model:
        v.add(f + "reward_model", "is only used with REWARD_FUNCTION_REWARD_MODEL")


def _resolve_grpo_knobs(v: Violations, out: job_pb2.JobSpec, *, groups_ok: bool) -> None:
    """The seeds' (NeMo Customizer's) GRPO knobs: advantage baseline and scaling, clipping, loss
    aggregation, truncated completions, and how many completions one generation round makes."""
    g, f, hp, hw = out.grpo, "spec.grpo.", out.hyperparameters, out.hardware
    _defaults(g, use_rloo=False)
    _defaults(g, normalize_rewards=True, overlong_filtering=False, token_level_loss=not g.use_rloo,
              importance_sampling_correction=False)
    if not g.HasField("clip_epsilon_high"):
        g.clip_epsilon_high = g.clip_epsilon
    _range(v, f + "clip_epsilon_high", g.clip_epsilon_high, 0.0, 10.0, lo_open=True)
    v.check(g.clip_epsilon_high < 10.0, f + "clip_epsilon_high", "must be below 10")
    if g.HasField("ratio_clip_c"):
        if g.use_rloo:
            v.add(f + "ratio_clip_c", "TRL's RLOO trainer has no dual clip; unset it or use_rloo")
        else:
            v.check(1.0 + g.clip_epsilon_high < g.ratio_clip_c <= 100.0, f + "ratio_clip_c",
                    f"must be above 1 + clip_epsilon_high ({1.0 + g.clip_epsilon_high:g}) and at most 100, "
                    f"got {g.ratio_clip_c:g}")
    if g.use_rloo and g.token_level_loss:
        v.add(f + "token_level_loss", "RLOO's loss is per sequence; leave token_level_loss unset (false) "
                                      "with use_rloo")
    if g.HasField("on_policy_kl_approximation") and g.on_policy_kl_approximation:
        if g.kl_beta == 0:
            v.add(f + "on_policy_kl_approximation", "corrects the KL term, and kl_beta is 0 (no KL term); "
                                                    "set kl_beta above 0 or leave it unset")
        elif g.use_rloo:
            v.add(f + "on_policy_kl_approximation", "TRL's RLOO trainer has no KL correction; leave it unset "
                                                    "with use_rloo")
    _defaults(g, on_policy_kl_approximation=g.kl_beta > 0 and not g.use_rloo)
    v.check(not g.importance_sampling_correction, f + "importance_sampling_correction",
            "corrects for a separate inference engine (vLLM); these workers generate with the trained model "
            "itself, so there is no mismatch to correct")
    per_step = hp.batch_size * hw.gpu_count * hw.node_count
    in_range = (1 <= hp.batch_size <= 256 and 1 <= hp.gradient_accumulation_steps <= 256
                and 2 <= g.num_generations <= 64 and 1 <= hw.gpu_count * hw.node_count <= 512)
    if not groups_ok or not in_range:
        return  # named on batch_size, gradient_accumulation_steps, num_generations or hardware already
    if g.HasField("num_prompts_per_step"):
        if not v.check(1 <= g.num_prompts_per_step <= 4096, f + "num_prompts_per_step",
                       f"must be in [1, 4096], got {g.num_prompts_per_step}"):
            return
        implied = g.num_prompts_per_step * g.num_generations
        if g.HasField("generation_batch_size"):
            v.check(g.generation_batch_size == implied, f + "generation_batch_size",
                    f"is {g.generation_batch_size}, but num_prompts_per_step x num_generations is "
                    f"{g.num_prompts_per_step} x {g.num_generations} = {implied}; set one, or make them "
                    "agree")
        else:
            g.generation_batch_size = implied
    elif not g.HasField("generation_batch_size"):
        accumulation = hp.gradient_accumulation_steps if hp.gradient_accumulation_steps >= 1 else 1
        g.generation_batch_size = per_step * accumulation  # TRL's own default
    if not v.check(1 <= g.generation_batch_size <= 65536, f + "generation_batch_size",
                   f"must be in [1, 65536], got {g.generation_batch_size}"):
        return
    v.check(g.generation_batch_size % per_step == 0, f + "generation_batch_size",
            f"{g.generation_batch_size} completions per round must be a multiple of batch_size x GPUs "
            f"({per_step}): each round is split into whole training steps")
    v.check(g.generation_batch_size % g.num_generations == 0, f + "generation_batch_size",
            f"{g.generation_batch_size} completions per round must be a multiple of num_generations "
            f"({g.num_generations}): whole groups")
    if not g.HasField("num_prompts_per_step") and g.generation_batch_size % g.num_generations == 0:
        g.num_prompts_per_step = g.generation_batch_size // g.num_generations


def _resolve_evaluation(v: Violations, out: job_pb2.JobSpec) -> None:
    """EvaluationConfig: the evaluation after training (job.proto's defaults and ranges)."""
    e, f = out.evaluation, "spec.evaluation."
    _defaults(e, enabled=True, max_examples=200, num_samples=3, max_new_tokens=128)
    _range(v, f + "max_examples", e.max_examples, 1, 10_000)
    _range(v, f + "num_samples", e.num_samples, 0, 20)
    _range(v, f + "max_new_tokens", e.max_new_tokens, 1, 2048)


def _check_warm_start(v: Violations, out: job_pb2.JobSpec) -> None:
    """WarmStartConfig's own fields; the source job is resolved by the jobs service (same organization,
    matching model and adapter; services.jobs.warm_start)."""
    w, f = out.warm_start, "spec.warm_start."
    if not out.HasField("warm_start"):
        return
    v.check(bool(w.job) or (not w.HasField("checkpoint_step") and not w.restore_optimizer_state), f + "job",
            "is required when warm_start sets checkpoint_step or restore_optimizer_state: a job id or name")
    if w.HasField("checkpoint_step"):
        v.check(w.checkpoint_step >= 1, f + "checkpoint_step", f"must be at least 1, got {w.checkpoint_step}")
    elif w.restore_optimizer_state:
        v.add(f + "restore_optimizer_state", "needs spec.warm_start.checkpoint_step: only a checkpoint "
                                             "stores optimizer state")


# Experiment trackers (JobSpec.integrations): W&B's own limits on names, and what the worker hands over.
WANDB_NAME_RE = re.compile(r"^[^/\\#?%:\s][^/\\#?%:]{0,127}\Z")
MAX_TRACKER_TAGS = 20
MAX_TRACKER_SECRET = 512


def _check_url(v: Violations, value: str, field: str) -> None:
    """An http(s) URL with a host and no user info (secrets go in their own fields)."""
    parsed = urlsplit(value)
    v.check(len(value) <= 2048 and parsed.scheme in ("http", "https") and bool(parsed.hostname)
            and not parsed.username and not parsed.password and not any(c.isspace() for c in value),
            field, f"'{value[:128]}' is not an http:// or https:// URL with a host (and no user info)")


def _check_secret(v: Violations, value: str, field: str) -> None:
    """A token's shape only; never echoed back in the message."""
    v.check(len(value) <= MAX_TRACKER_SECRET and value.isprintable() and not any(c.isspace() for c in value),
            field, f"must be at most {MAX_TRACKER_SECRET} printable characters without spaces")


def _check_integrations(v: Violations, out: job_pb2.JobSpec) -> None:
    """JobSpec.integrations: one of each tracker at most, each with what it needs (job.proto)."""
    seen: dict[str, int] = {}
    for i, integration in enumerate(out.integrations):
        f = f"spec.integrations[{i}]"
        kind = integration.WhichOneof("integration")
        if kind is None:
            v.add(f, "set one of wandb, mlflow or tensorboard")
            continue
        if kind in seen:
            v.add(f, f"{kind} is already spec.integrations[{seen[kind]}]; at most one {kind} integration")
            continue
        seen[kind] = i
        if kind == "wandb":
            w, f = integration.wandb, f + ".wandb."
            if not w.project:
                v.add(f + "project", "is required: the W&B project the run logs to")
            else:
                v.check(bool(WANDB_NAME_RE.match(w.project)), f + "project",
                        f"'{w.project[:128]}' is not a W&B project name: 1-128 characters, none of "
                        "/ \\ # ? % : and no leading space")
            v.check(not w.entity or bool(WANDB_NAME_RE.match(w.entity)), f + "entity",
                    f"'{w.entity[:128]}' is not a W&B entity: 1-128 characters, none of / \\ # ? % :")
            v.check(len(w.name) <= 128 and w.name.isprintable(), f + "name",
                    "must be at most 128 printable characters")
            v.check(len(w.tags) <= MAX_TRACKER_TAGS, f + "tags",
                    f"at most {MAX_TRACKER_TAGS} tags, got {len(w.tags)}")
            for j, tag in enumerate(w.tags[:MAX_TRACKER_TAGS]):
                v.check(0 < len(tag) <= 64 and tag.isprintable(), f"{f}tags[{j}]",
                        "must be 1-64 printable characters")
            _check_secret(v, w.api_key, f + "api_key")
            if w.base_url:
                _check_url(v, w.base_url, f + "base_url")
        elif kind == "mlflow":
            m, f = integration.mlflow, f + ".mlflow."
            if m.tracking_uri:  # empty: the workers' TUNEFORGE_MLFLOW_TRACKING_URI
                _check_url(v, m.tracking_uri, f + "tracking_uri")
            v.check(len(m.experiment_name) <= 250 and m.experiment_name.isprintable(), f + "experiment_name",
                    "must be at most 250 printable characters")
            v.check(len(m.run_name) <= 250 and m.run_name.isprintable(), f + "run_name",
                    "must be at most 250 printable characters")
            _check_secret(v, m.token, f + "token")


def _defaults(message: object, **values: float | int | bool) -> None:
    """Set each `optional` field the sender left unset (0 and false stay as sent)."""
    for name, value in values.items():
        if not message.HasField(name):  # type: ignore[attr-defined]
            setattr(message, name, value)


# What keep_best_model and early stopping may watch, by method (as the TRL trainers log it at evaluation);
# loss is lower-is-better, the others higher-is-better (`greater_is_better`).
BEST_MODEL_METRICS = {
    job_pb2.TRAINING_METHOD_DPO: ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"),
}


def greater_is_better(metric: str) -> bool:
    return metric != "eval_loss"


def _check_method_hyperparameters(v: Violations, out: job_pb2.JobSpec) -> None:
    """Hyperparameters a method's trainer cannot honour are refused, never accepted and dropped."""
    hp, f = out.hyperparameters, "spec.hyperparameters."
    method = _name(job_pb2.TrainingMethod, out.method)
    sft_like = out.method in (job_pb2.TRAINING_METHOD_SFT, job_pb2.TRAINING_METHOD_DISTILLATION)
    if not sft_like:
        v.check(not hp.packing, f + "packing",
                f"{method} does not pack examples (TRL packs for SFT only); leave packing off")
        v.check(hp.assistant_only_loss, f + "assistant_only_loss",
                f"{method} trains on the completions only by construction; false cannot be honoured")
    if out.method in (job_pb2.TRAINING_METHOD_KTO, job_pb2.TRAINING_METHOD_GRPO):
        why = ("KTO reads its rows in a fixed shuffled order to estimate its KL term"
               if out.method == job_pb2.TRAINING_METHOD_KTO
               else "GRPO samples whole groups of prompts with its own sampler")
        v.check(not hp.group_by_length, f + "group_by_length", f"does not apply: {why}")


def _resolve_global_batch(v: Violations, out: job_pb2.JobSpec) -> None:
    """global_batch_size = batch_size x gradient_accumulation_steps x GPUs: one derived from the other, or
    both checked against each other. Runs after the hardware is resolved (GPUs count)."""
    hp, hw, f = out.hyperparameters, out.hardware, "spec.hyperparameters."
    per_step = hp.batch_size * max(hw.gpu_count, 1) * max(hw.node_count, 1)
    if hp.HasField("global_batch_size"):
        if not v.check(1 <= hp.global_batch_size <= 65536, f + "global_batch_size",
                       f"must be in [1, 65536], got {hp.global_batch_size}") or per_step < 1:
            return
        if not hp.HasField("gradient_accumulation_steps"):
            if v.check(hp.global_batch_size % per_step == 0, f + "global_batch_size",
                       f"must be a multiple of batch_size x GPUs ({hp.batch_size} x "
                       f"{per_step // hp.batch_size} = {per_step}): gradient_accumulation_steps is derived "
                       "from it"):
                hp.gradient_accumulation_steps = hp.global_batch_size // per_step
                _range(v, f + "gradient_accumulation_steps", hp.gradient_accumulation_steps, 1, 256)
        else:
            v.check(hp.global_batch_size == per_step * hp.gradient_accumulation_steps,
                    f + "global_batch_size",
                    f"is {hp.global_batch_size}, but batch_size x gradient_accumulation_steps x GPUs is "
                    f"{hp.batch_size} x {hp.gradient_accumulation_steps} x {per_step // hp.batch_size} = "
                    f"{per_step * hp.gradient_accumulation_steps}; set one of them, or make them agree")
    elif hp.HasField("gradient_accumulation_steps"):
        hp.global_batch_size = max(-(2**31), min(per_step * hp.gradient_accumulation_steps, 2**31 - 1))


def _resolve_hyperparameters(v: Violations, out: job_pb2.JobSpec) -> None:
    hp = out.hyperparameters
    f = "spec.hyperparameters."
    full = out.adapter == job_pb2.ADAPTER_TYPE_FULL
    defaults: dict[str, float | int | bool] = {
        "epochs": 3,
        "max_steps": 0,
        "batch_size": 4,
        "learning_rate": 2e-5 if full else 2e-4,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "weight_decay": 0.01,
        "max_grad_norm": 1.0,
        "gradient_checkpointing": False,
        "packing": False,
        "group_by_length": False,
        "max_seq_length": 2048,
        "seed": 42,
        "dataloader_workers": 0,
        "logging_steps": 10,
        "eval_steps": 0,
        "save_steps": 0,
        "save_total_limit": 2,
        "assistant_only_loss": True,
    }
    if not hp.HasField("global_batch_size"):  # else derived from it (_resolve_global_batch)
        defaults["gradient_accumulation_steps"] = 1
    eval_batch_derived = not hp.HasField("eval_batch_size")  # from batch_size, which is checked itself
    defaults["eval_batch_size"] = hp.batch_size if hp.HasField("batch_size") else defaults["batch_size"]
    defaults["keep_best_model"] = False
    _defaults(hp, **defaults)
    if not hp.metric_for_best_model:
        hp.metric_for_best_model = "eval_loss"
    if hp.HasField("warmup_steps") and hp.HasField("warmup_ratio"):
        v.add(f + "warmup_ratio", "set warmup_steps or warmup_ratio, not both")
    if not hp.HasField("warmup_steps") and not hp.HasField("warmup_ratio"):
        hp.warmup_ratio = 0.03
    min_lr_derived = not hp.HasField("min_learning_rate")
    if min_lr_derived:
        hp.min_learning_rate = 0.1 * hp.learning_rate
    if hp.lr_scheduler == job_pb2.LR_SCHEDULER_UNSPECIFIED:
        hp.lr_scheduler = job_pb2.LR_SCHEDULER_COSINE
    if hp.optimizer == job_pb2.OPTIMIZER_UNSPECIFIED:
        hp.optimizer = job_pb2.OPTIMIZER_ADAMW

    _range(v, f + "epochs", hp.epochs, 1, 50)
    _range(v, f + "max_steps", hp.max_steps, 0, MAX_STEPS)
    _range(v, f + "batch_size", hp.batch_size, 1, 256)
    if hp.HasField("gradient_accumulation_steps"):
        _range(v, f + "gradient_accumulation_steps", hp.gradient_accumulation_steps, 1, 256)
    if not eval_batch_derived or 1 <= hp.batch_size <= 256:
        _range(v, f + "eval_batch_size", hp.eval_batch_size, 1, 256)
    for name in ("hidden_dropout", "attention_dropout"):
        if hp.HasField(name):
            value = getattr(hp, name)
            v.check(0.0 <= value < 1.0, f + name, f"must be in [0, 1), got {value:g}")
    if hp.HasField("eval_epoch_fraction"):
        _range(v, f + "eval_epoch_fraction", hp.eval_epoch_fraction, 0.1, 1.0)
        v.check(hp.eval_steps == 0, f + "eval_epoch_fraction",
                "set eval_steps or eval_epoch_fraction, not both")
        v.check(hp.max_steps == 0, f + "eval_epoch_fraction",
                "needs epoch-based training (max_steps 0): with max_steps, set eval_steps instead")
    metrics = BEST_MODEL_METRICS.get(out.method, ("eval_loss",))
    v.check(hp.metric_for_best_model in metrics, f + "metric_for_best_model",
            f"'{hp.metric_for_best_model[:64]}' is not a metric this method evaluates; one of: "
            + ", ".join(metrics))
    v.check(hp.metric_for_best_model == "eval_loss" or hp.keep_best_model or hp.early_stopping.enabled,
            f + "metric_for_best_model",
            "is only used with keep_best_model or early_stopping; set one of them")
    _check_method_hyperparameters(v, out)
    _range(v, f + "learning_rate", hp.learning_rate, 0.0, MAX_LEARNING_RATE, lo_open=True)
    # Compared with learning_rate only when that is valid, and not judged at all when it was derived from an
    # invalid one: the learning_rate violation alone says what to fix.
    lr_valid = 0.0 < hp.learning_rate <= MAX_LEARNING_RATE
    if lr_valid or not min_lr_derived:
        v.check(
            math.isfinite(hp.min_learning_rate) and 0 <= hp.min_learning_rate
            and (not lr_valid or hp.min_learning_rate < hp.learning_rate),
            f + "min_learning_rate",
            "must be at least 0 and lower than learning_rate",
        )
    if hp.HasField("warmup_steps"):
        _range(v, f + "warmup_steps", hp.warmup_steps, 0, MAX_STEPS)
    if hp.HasField("warmup_ratio"):
        _range(v, f + "warmup_ratio", hp.warmup_ratio, 0.0, 0.5)
    _range(v, f + "adam_beta1", hp.adam_beta1, 0.0, 1.0, lo_open=True)
    v.check(hp.adam_beta1 < 1.0, f + "adam_beta1", "must be below 1")
    _range(v, f + "adam_beta2", hp.adam_beta2, 0.0, 1.0, lo_open=True)
    v.check(hp.adam_beta2 < 1.0, f + "adam_beta2", "must be below 1")
    _range(v, f + "weight_decay", hp.weight_decay, 0.0, 1.0)
    _range(v, f + "max_grad_norm", hp.max_grad_norm, 0.0, 1e4, lo_open=True)
    _range(v, f + "max_seq_length", hp.max_seq_length, 16, 131072)
    _range(v, f + "seed", hp.seed, 0, MAX_SEED)
    _range(v, f + "dataloader_workers", hp.dataloader_workers, 0, 16)
    _range(v, f + "logging_steps", hp.logging_steps, 1, MAX_STEPS)
    _range(v, f + "eval_steps", hp.eval_steps, 0, MAX_STEPS)  # 0: once per epoch
    _range(v, f + "save_steps", hp.save_steps, 0, MAX_STEPS)  # 0: once per epoch
    _range(v, f + "save_total_limit", hp.save_total_limit, 1, 100)
    es = hp.early_stopping
    if es.enabled:
        if not es.HasField("patience"):
            es.patience = 3
        if not es.HasField("min_delta"):
            es.min_delta = 0.0
        _range(v, f + "early_stopping.patience", es.patience, 1, 1000)
        _range(v, f + "early_stopping.min_delta", es.min_delta, 0.0, 1e3)


# GPU types that promise no GPU: "cpu", and none at all (any worker takes the job, CPU workers included).
CPU_ONLY_GPU_TYPES = frozenset({"", "cpu"})
GPU_PRECISIONS = frozenset({job_pb2.PRECISION_FP16, job_pb2.PRECISION_BF16})


def _check_precision_on_cpu(v: Violations, out: job_pb2.JobSpec) -> None:
    """A stated half precision needs a GPU: refused on a spec that may land on a CPU worker.

    Workers used to train such a job in fp32 with a warning, which is not what was asked for. A spec with
    no gpu_type may go to any worker, CPU ones included, so it cannot promise fp16/bf16 either; naming a
    GPU type (or leaving precision unset: bf16 where the hardware has it) is the way out. The worker
    refuses the same case (`trainer_worker.recipes.base`), for specs that did not come through here.
    """
    if out.hardware.gpu_type.strip().lower() not in CPU_ONLY_GPU_TYPES:
        return
    stated = [("spec.hyperparameters.precision", out.hyperparameters.precision)]
    if out.adapter == job_pb2.ADAPTER_TYPE_QLORA:
        stated.append(("spec.quantization.compute_dtype", out.quantization.compute_dtype))
    for field, precision in stated:
        if precision in GPU_PRECISIONS:
            where = "'cpu'" if out.hardware.gpu_type else "empty (any worker, CPU ones included)"
            v.add(
                field,
                f"{_name(job_pb2.Precision, precision)} needs a GPU, but spec.hardware.gpu_type is {where}; "
                "name a GPU type, or leave the precision unset (bf16 where the hardware has it)",
            )


# JobSpec.speed: the methods whose TRL trainers have activation offloading (SFTConfig, DPOConfig, KTOConfig;
# distillation trains with an SFTTrainer) and padding-free packing (SFT's packing).
OFFLOADING_METHODS = frozenset({
    job_pb2.TRAINING_METHOD_SFT, job_pb2.TRAINING_METHOD_DISTILLATION, job_pb2.TRAINING_METHOD_DPO,
    job_pb2.TRAINING_METHOD_KTO,
})
PADDING_FREE_METHODS = frozenset({job_pb2.TRAINING_METHOD_SFT, job_pb2.TRAINING_METHOD_DISTILLATION})


def _check_speed(v: Violations, out: job_pb2.JobSpec) -> None:
    """What CreateJob can tell in advance about JobSpec.speed: an option set ON that no worker could honour
    for this spec. What depends on the worker (a package not installed, an older GPU) fails the job there
    with DEPENDENCY_ERROR naming the option (trainer_worker.speed)."""
    speed, f = out.speed, "spec.speed."
    on = job_pb2.SPEED_MODE_ON
    method = _name(job_pb2.TrainingMethod, out.method)
    cpu_pool = out.hardware.gpu_type.strip().lower() in CPU_ONLY_GPU_TYPES
    where = "'cpu'" if out.hardware.gpu_type else "empty (any worker, CPU ones included)"
    if speed.padding_free == on:
        v.check(out.method in PADDING_FREE_METHODS, f + "padding_free",
                f"is ON, but padding-free batches are for SFT and distillation only, not {method}")
        v.check(out.hyperparameters.packing, f + "padding_free",
                "is ON, which needs spec.hyperparameters.packing = true (it packs examples without padding)")
    if speed.activation_offloading == on:
        v.check(out.method in OFFLOADING_METHODS, f + "activation_offloading",
                f"is ON, but TRL offloads activations for SFT, distillation, DPO and KTO only, not {method}")
        v.check(not cpu_pool, f + "activation_offloading",
                f"is ON, which moves activations from a GPU to host memory, but spec.hardware.gpu_type is "
                f"{where}; name a GPU type, or leave it unset (the worker chooses)")
    if speed.attention == job_pb2.ATTENTION_IMPLEMENTATION_FLASH_ATTENTION_2:
        precisions = [("spec.hyperparameters.precision", out.hyperparameters.precision)]
        if out.adapter == job_pb2.ADAPTER_TYPE_QLORA and out.quantization.compute_dtype:
            precisions = [("spec.quantization.compute_dtype", out.quantization.compute_dtype)]
        for field, precision in precisions:
            v.check(precision != job_pb2.PRECISION_FP32, f + "attention",
                    f"FLASH_ATTENTION_2 takes fp16 or bf16 only, but {field} is PRECISION_FP32; use SDPA, or "
                    "leave the precision unset")
        v.check(not cpu_pool, f + "attention",
                f"FLASH_ATTENTION_2 needs a GPU, but spec.hardware.gpu_type is {where}; name a GPU type, or "
                "use SDPA (or leave it unset: the worker chooses)")
    if speed.liger_kernels == on:
        v.check(not cpu_pool, f + "liger_kernels",
                f"is ON, but Liger's kernels run on CUDA GPUs only and spec.hardware.gpu_type is {where}; "
                "name a GPU type, or leave it unset (the worker chooses)")


def _resolve_hardware(v: Violations, out: job_pb2.JobSpec) -> None:
    hw = out.hardware
    if not hw.HasField("gpu_count"):
        hw.gpu_count = 1
    if not hw.HasField("node_count"):
        hw.node_count = 1
    _range(v, "spec.hardware.gpu_count", hw.gpu_count, 1, 8)
    _range(v, "spec.hardware.node_count", hw.node_count, 1, 64)
    # A pool name is one NATS subject token of the job's route (subjects.pooled_route).
    v.check(not hw.pool or subjects.valid_pool(hw.pool), "spec.hardware.pool",
            f"'{hw.pool[:64]}' is not a worker pool name: 1-40 characters of a-z, 0-9 and single '-' "
            "between them")
    if hw.strategy == job_pb2.DISTRIBUTED_STRATEGY_UNSPECIFIED:
        hw.strategy = (
            job_pb2.DISTRIBUTED_STRATEGY_NONE
            if hw.gpu_count * hw.node_count == 1
            else job_pb2.DISTRIBUTED_STRATEGY_DDP
        )
    if not v.check(hw.strategy in SUPPORTED_STRATEGIES, "spec.hardware.strategy", "is not a known value"):
        return
    processes = hw.gpu_count * hw.node_count
    v.check(
        hw.strategy != job_pb2.DISTRIBUTED_STRATEGY_NONE or processes == 1,
        "spec.hardware.strategy",
        f"DISTRIBUTED_STRATEGY_NONE trains in one process, but the job asks for {processes} GPUs; use "
        "DISTRIBUTED_STRATEGY_DDP (or leave it unset)",
    )
    if out.adapter == job_pb2.ADAPTER_TYPE_QLORA and hw.strategy in SHARDING_STRATEGIES:
        v.add(
            "spec.hardware.strategy",
            f"{job_pb2.DistributedStrategy.Name(hw.strategy)} cannot train QLoRA: DeepSpeed ZeRO and FSDP "
            "shard or flatten the weights, and bitsandbytes' 4/8-bit weights cannot be; use DDP or LoRA",
        )
