"""What combines with what: methods, adapters, strategies, and the dataset families each method trains on.

The datasets service normalizes every accepted format to ONE row shape per family (for example OpenAI chat,
ShareGPT and Alpaca all become `{"messages": [...]}`); the jobs service refuses a job whose dataset's family
its method does not train on; the worker reads rows by family. All three read this table.
"""

from __future__ import annotations

from enum import StrEnum

from tuneforge.v1 import dataset_pb2, job_pb2

M = job_pb2.TrainingMethod
A = job_pb2.AdapterType
D = job_pb2.DistributedStrategy


class Family(StrEnum):
    """A normalized row shape; the value is how messages name it."""

    CHAT = "chat"
    PROMPT_COMPLETION = "prompt/completion"
    TEXT = "text"
    PREFERENCE = "preference"
    KTO = "KTO"
    PROMPT_ONLY = "prompt-only"


# The keys of each family's normalized rows, in the order a row is tested (the most specific first).
FAMILY_KEYS: dict[Family, tuple[str, ...]] = {
    Family.CHAT: ("messages",),
    Family.PREFERENCE: ("prompt", "chosen", "rejected"),
    Family.KTO: ("prompt", "completion", "label"),
    Family.PROMPT_COMPLETION: ("prompt", "completion"),
    Family.TEXT: ("text",),
    Family.PROMPT_ONLY: ("prompt",),
}

# Dataset format (the DatasetFormat value's name without its prefix) -> the family it is normalized to.
FORMAT_FAMILY: dict[str, Family] = {
    "OPENAI_CHAT": Family.CHAT,
    "SHAREGPT": Family.CHAT,
    "ALPACA": Family.CHAT,
    "PROMPT_COMPLETION": Family.PROMPT_COMPLETION,
    "TEXT": Family.TEXT,
    "PREFERENCE": Family.PREFERENCE,
    "OPENAI_PREFERENCE": Family.PREFERENCE,
    "KTO": Family.KTO,
    "PROMPT_ONLY": Family.PROMPT_ONLY,
}

# What the trainer workers of this release run; anything else is refused at CreateJob, so a job never
# waits in the queue only to fail on a worker.
METHOD_FAMILIES: dict[int, tuple[Family, ...]] = {
    M.TRAINING_METHOD_SFT: (Family.CHAT, Family.PROMPT_COMPLETION, Family.TEXT),
    M.TRAINING_METHOD_DISTILLATION: (Family.CHAT, Family.PROMPT_COMPLETION, Family.TEXT),
    M.TRAINING_METHOD_DPO: (Family.PREFERENCE,),
    M.TRAINING_METHOD_ORPO: (Family.PREFERENCE,),
    # KTO learns from unpaired labels; each preference pair gives one desirable and one undesirable example.
    M.TRAINING_METHOD_KTO: (Family.KTO, Family.PREFERENCE),
    M.TRAINING_METHOD_GRPO: (Family.PROMPT_ONLY,),
}
SUPPORTED_METHODS = frozenset(METHOD_FAMILIES)
SUPPORTED_ADAPTERS = frozenset({
    A.ADAPTER_TYPE_LORA, A.ADAPTER_TYPE_QLORA, A.ADAPTER_TYPE_FULL, A.ADAPTER_TYPE_PROMPT_TUNING,
})
LORA_ADAPTERS = frozenset({A.ADAPTER_TYPE_LORA, A.ADAPTER_TYPE_QLORA})
# Only a LoRA-family adapter folds into the base weights.
MERGEABLE_ADAPTERS = LORA_ADAPTERS
# A soft prompt suits the methods whose loss is next-token prediction on the data; the preference and RL
# trainers compare the policy with the frozen model, which a soft prompt does not give them.
PROMPT_TUNING_METHODS = frozenset({M.TRAINING_METHOD_SFT, M.TRAINING_METHOD_DISTILLATION})
SUPPORTED_STRATEGIES = frozenset({
    D.DISTRIBUTED_STRATEGY_NONE, D.DISTRIBUTED_STRATEGY_DDP, D.DISTRIBUTED_STRATEGY_ZERO1,
    D.DISTRIBUTED_STRATEGY_ZERO2, D.DISTRIBUTED_STRATEGY_ZERO2_OFFLOAD, D.DISTRIBUTED_STRATEGY_ZERO3,
    D.DISTRIBUTED_STRATEGY_ZERO3_OFFLOAD, D.DISTRIBUTED_STRATEGY_FSDP,
})
# Strategies that shard or wrap the weights: bitsandbytes' 4/8-bit weights cannot be sharded or flattened.
SHARDING_STRATEGIES = SUPPORTED_STRATEGIES - {D.DISTRIBUTED_STRATEGY_NONE, D.DISTRIBUTED_STRATEGY_DDP}


def format_name(value: int) -> str:
    """A DatasetFormat value's short name ("OPENAI_CHAT"), or its number when this build does not know it."""
    try:
        return dataset_pb2.DatasetFormat.Name(value).removeprefix("DATASET_FORMAT_")  # type: ignore[arg-type]
    except ValueError:
        return str(value)


def family_of_format(fmt: str | int) -> Family | None:
    """The family a dataset format (its short name or DatasetFormat value) is normalized to."""
    return FORMAT_FAMILY.get(format_name(fmt) if isinstance(fmt, int) else fmt)


def same_family(a: str | int, b: str | int) -> bool:
    """Whether two dataset formats normalize to the same rows (a validation set must match its train set)."""
    fa, fb = family_of_format(a), family_of_format(b)
    return fa is not None and fa == fb


def formats_for(method: int) -> list[str]:
    """The dataset formats (short names) a method trains on, sorted."""
    families = METHOD_FAMILIES.get(method, ())
    return sorted(name for name, family in FORMAT_FAMILY.items() if family in families)


def family_of_row(row: dict[str, object]) -> Family | None:
    """The family whose keys a normalized row has, or None."""
    for family, keys in FAMILY_KEYS.items():
        if all(key in row for key in keys):
            return family
    return None
