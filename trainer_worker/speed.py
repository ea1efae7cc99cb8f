"""JobSpec.speed: which speed options a training run uses, and why the others are not used.

`resolve_speed` is a pure function of the resolved spec and a `SpeedHardware` (what the worker has:
CUDA and the GPU's compute capability, the training dtype, whether liger-kernel and flash-attn are
installed, the model's architecture and which attention kernels its transformers class supports). Each
option is honoured as the spec says:

- ON is used, or the job fails with DEPENDENCY_ERROR naming ``spec.speed.<option>`` and what is missing
  (CreateJob already refuses what it can know in advance: `tuneforge_core.spec`);
- OFF is never used;
- AUTO (unspecified) is used where it is available and expected to pay on this hardware, else not, with
  the reason in the job's log (`ResolvedSpeed.log_line`).

The recipe (`trainer_worker.recipes.base`) maps the result onto the model load (``attn_implementation``),
TrainingArguments (``use_liger_kernel``, ``torch_compile``) and TRL's SFT/DPO/KTO configs
(``activation_offloading``, ``padding_free``), and stores it in ``RunConfig.speed`` so that whoever ran the
worker (the GPU benchmark) can read back what was used.

The AUTO rules are priors until benchmarks/bench_worker.py --cuda measures them (see the README's "Speed
options"): torch.compile stays off under AUTO everywhere (it compiles for tens of seconds and recompiles
when the sequence length changes; not yet shown to pay), Liger kernels go on for SFT on CUDA where the
architecture is supported, FlashAttention-2 where installed on an Ampere-or-newer GPU in fp16/bf16,
activation offloading on CUDA from AUTO_OFFLOAD_MIN_SEQ_LEN tokens per sequence.
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
from dataclasses import dataclass, field
from typing import Any

from tuneforge.v1 import job_pb2

from trainer_worker.errors import TrainingError
from tuneforge_core.reasons import Reason
from tuneforge_core.spec import OFFLOADING_METHODS, PADDING_FREE_METHODS

ON, OFF, AUTO = job_pb2.SPEED_MODE_ON, job_pb2.SPEED_MODE_OFF, job_pb2.SPEED_MODE_UNSPECIFIED
EAGER, SDPA, FLASH_ATTENTION_2 = "eager", "sdpa", "flash_attention_2"
ATTENTION_NAMES = {
    job_pb2.ATTENTION_IMPLEMENTATION_EAGER: EAGER,
    job_pb2.ATTENTION_IMPLEMENTATION_SDPA: SDPA,
    job_pb2.ATTENTION_IMPLEMENTATION_FLASH_ATTENTION_2: FLASH_ATTENTION_2,
}
# Architectures (config.model_type) liger-kernel 0.8 patches through transformers' use_liger_kernel
# (liger_kernel.transformers.monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN); the installed package's own table
# is read instead where it is installed.
LIGER_MODEL_TYPES = frozenset({
    "llama", "mllama", "mistral", "mixtral", "gemma", "gemma2", "gemma3", "gemma3_text", "qwen2", "qwen2_vl",
    "qwen2_5_vl", "qwen3", "qwen3_moe", "phi3", "olmo2", "glm4", "granite", "paligemma", "llava",
})
# AUTO turns activation offloading on from this many tokens per sequence (on CUDA): below it the
# activations are small next to the weights and the copies cost more than they save. A prior.
AUTO_OFFLOAD_MIN_SEQ_LEN = 8192
OPTIONS = ("liger_kernels", "attention", "torch_compile", "activation_offloading", "padding_free")


@dataclass(frozen=True)
class SpeedHardware:
    """What `resolve_speed` decides from, beside the spec: everything it needs to know about the worker."""

    cuda: bool
    # The first visible GPU's compute capability (major, minor); None without CUDA.
    capability: tuple[int, int] | None = None
    # The training (compute) dtype: "bf16", "fp16" or "fp32".
    dtype: str = "fp32"
    liger_installed: bool = False
    flash_attn_installed: bool = False
    # A C++ compiler for torch.compile's CPU backend (inductor); triton for its CUDA backend.
    compiler_available: bool = True
    # config.model_type of the base model ("llama", "qwen2", ...); "" when unknown.
    model_type: str = ""
    # What the model's transformers class supports (its _supports_sdpa / _supports_flash_attn).
    supports_sdpa: bool = True
    supports_flash_attn: bool = True
    # Architectures liger-kernel patches; by default LIGER_MODEL_TYPES.
    liger_model_types: frozenset[str] = LIGER_MODEL_TYPES

    @classmethod
    def detect(cls, *, dtype: str, model_config: Any = None, model_class: Any = None) -> SpeedHardware:
        """This process's hardware and installed packages (importing torch; nothing is loaded)."""
        import torch

        cuda = torch.cuda.is_available()
        capability = tuple(torch.cuda.get_device_capability(0)) if cuda else None
        liger = importlib.util.find_spec("liger_kernel") is not None
        liger_types = LIGER_MODEL_TYPES
        if liger:
            try:
                patch = importlib.import_module("liger_kernel.transformers.monkey_patch")
                liger_types = frozenset(patch.MODEL_TYPE_TO_APPLY_LIGER_FN)
            except Exception:  # a broken install: ON fails on liger_installed=False below
                liger = False
        if cuda:
            compiler = importlib.util.find_spec("triton") is not None
        else:
            compiler = any(shutil.which(c) for c in ("c++", "g++", "clang++"))
        model_class = _model_class(model_config, model_class)
        return cls(
            cuda=cuda,
            capability=(capability[0], capability[1]) if capability else None,
            dtype=dtype,
            liger_installed=liger,
            flash_attn_installed=importlib.util.find_spec("flash_attn") is not None,
            compiler_available=compiler,
            model_type=str(getattr(model_config, "model_type", "") or ""),
            supports_sdpa=bool(getattr(model_class, "_supports_sdpa", True)),
            supports_flash_attn=bool(getattr(model_class, "_supports_flash_attn", True)),
            liger_model_types=liger_types,
        )


def _model_class(config: Any, model_class: Any) -> Any:
    """The transformers class `model_class` (an Auto class) resolves `config` to; None when unknown."""
    if config is None or model_class is None:
        return None
    mapping = getattr(model_class, "_model_mapping", None)
    try:
        return mapping[type(config)] if mapping is not None else None
    except (KeyError, ValueError):
        return None


@dataclass
class ResolvedSpeed:
    """The options a run uses, and one reason per option (why it is on, or why it is off)."""

    liger_kernels: bool = False
    attention: str = SDPA
    torch_compile: bool = False
    activation_offloading: bool = False
    padding_free: bool = False
    reasons: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in (*OPTIONS, "reasons")}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ResolvedSpeed:
        return cls(**{k: v for k, v in data.items() if k in (*OPTIONS, "reasons")})

    def used(self) -> list[str]:
        on = [name for name in OPTIONS if name != "attention" and getattr(self, name)]
        return [f"attention={self.attention}", *on]

    def log_line(self) -> str:
        """One line for the job's log: the options used, then why each other one is not."""
        used = ", ".join(self.used())
        off = [f"{name} ({self.reasons[name]})" for name in OPTIONS
               if name != "attention" and not getattr(self, name) and name in self.reasons]
        line = f"Speed options used: {used} ({self.reasons.get('attention', '')})."
        return line + (f" Not used: {'; '.join(off)}." if off else "")


def _mode_name(mode: int) -> str:
    return "AUTO" if mode == AUTO else job_pb2.SpeedMode.Name(job_pb2.SpeedMode.ValueType(mode)).removeprefix(
        "SPEED_MODE_")


def _refuse(option: str, why: str) -> TrainingError:
    return TrainingError(
        Reason.DEPENDENCY_ERROR,
        f"spec.speed.{option} is ON, but {why}; set it to AUTO (the worker decides) or OFF.",
    )


def resolve_speed(spec: job_pb2.JobSpec, hw: SpeedHardware) -> ResolvedSpeed:
    """Each option of ``spec.speed`` for this hardware; raises TrainingError (DEPENDENCY_ERROR, naming the
    option) where an option set ON cannot be honoured."""
    speed, out = spec.speed, ResolvedSpeed()
    out.attention, out.reasons["attention"] = _attention(speed.attention, hw)
    out.liger_kernels, out.reasons["liger_kernels"] = _liger(speed.liger_kernels, spec, hw)
    out.torch_compile, out.reasons["torch_compile"] = _compile(speed.torch_compile, hw)
    out.activation_offloading, out.reasons["activation_offloading"] = _offloading(
        speed.activation_offloading, spec, hw)
    out.padding_free, out.reasons["padding_free"] = _padding_free(speed.padding_free, spec)
    return out


def _attention(wanted: int, hw: SpeedHardware) -> tuple[str, str]:
    if wanted == job_pb2.ATTENTION_IMPLEMENTATION_FLASH_ATTENTION_2:
        problem = _flash_attention_problem(hw)
        if problem:
            raise TrainingError(
                Reason.DEPENDENCY_ERROR,
                f"spec.speed.attention is FLASH_ATTENTION_2, but {problem}; use SDPA or leave it unset "
                "(AUTO).",
            )
        return FLASH_ATTENTION_2, "asked for"
    if wanted == job_pb2.ATTENTION_IMPLEMENTATION_SDPA:
        if not hw.supports_sdpa:
            raise TrainingError(
                Reason.DEPENDENCY_ERROR,
                f"spec.speed.attention is SDPA, but the model ({hw.model_type or 'this architecture'}) "
                "has no SDPA attention in transformers; use EAGER or leave it unset (AUTO).",
            )
        return SDPA, "asked for"
    if wanted == job_pb2.ATTENTION_IMPLEMENTATION_EAGER:
        return EAGER, "asked for"
    problem = _flash_attention_problem(hw)
    if problem is None:
        return FLASH_ATTENTION_2, "AUTO: flash-attn is installed and the GPU and dtype allow it"
    if hw.supports_sdpa:
        return SDPA, f"AUTO: FlashAttention-2 not used since {problem}"
    return EAGER, "AUTO: the model has no SDPA or FlashAttention-2 attention in transformers"


def _flash_attention_problem(hw: SpeedHardware) -> str | None:
    if not hw.cuda:
        return "this worker has no GPU (FlashAttention-2 runs on CUDA only)"
    if not hw.flash_attn_installed:
        return "the flash-attn package is not installed on this worker"
    if hw.capability is not None and hw.capability < (8, 0):
        major, minor = hw.capability
        return f"the GPU's compute capability is {major}.{minor} (it needs 8.0 or newer)"
    if hw.dtype not in ("bf16", "fp16"):
        return f"the job trains in {hw.dtype} (FlashAttention-2 takes fp16 or bf16 only)"
    if not hw.supports_flash_attn:
        model = hw.model_type or "this architecture"
        return f"the model ({model}) has no FlashAttention-2 path in transformers"
    return None


def _liger(wanted: int, spec: job_pb2.JobSpec, hw: SpeedHardware) -> tuple[bool, str]:
    if wanted == OFF:
        return False, "OFF in the spec"
    problem = None
    if not hw.cuda:
        problem = "this worker has no GPU (Liger's Triton kernels run on CUDA only)"
    elif not hw.liger_installed:
        problem = "the liger-kernel package is not installed on this worker"
    elif hw.model_type not in hw.liger_model_types:
        problem = f"liger-kernel has no kernels for the model's architecture ({hw.model_type or 'unknown'})"
    if wanted == ON:
        if problem:
            raise _refuse("liger_kernels", problem)
        return True, "asked for"
    if problem:
        return False, f"AUTO: {problem}"
    if spec.method != job_pb2.TRAINING_METHOD_SFT:
        method = job_pb2.TrainingMethod.Name(spec.method).removeprefix("TRAINING_METHOD_")
        return False, f"AUTO: chosen for SFT only (no gain measured for {method})"
    return True, "AUTO: CUDA, liger-kernel installed, architecture supported, SFT"


def _compile(wanted: int, hw: SpeedHardware) -> tuple[bool, str]:
    if wanted == OFF:
        return False, "OFF in the spec"
    if wanted == ON:
        if not hw.compiler_available:
            what = "triton" if hw.cuda else "a C++ compiler"
            raise _refuse("torch_compile", f"this worker has no {what} for torch.compile's backend")
        return True, "asked for"
    return False, ("AUTO: not chosen automatically (compiling takes tens of seconds and recompiles on new "
                   "sequence lengths; not yet measured to pay)")


def _offloading(wanted: int, spec: job_pb2.JobSpec, hw: SpeedHardware) -> tuple[bool, str]:
    if wanted == OFF:
        return False, "OFF in the spec"
    supported = spec.method in OFFLOADING_METHODS
    if wanted == ON:
        if not supported:  # CreateJob refuses this; a spec that did not come through it
            raise _refuse("activation_offloading", "TRL has no activation offloading for this method")
        if not hw.cuda:  # TRL's offloading copies to the host from an accelerator, and fails without one
            raise _refuse("activation_offloading", "this worker has no GPU to offload activations from")
        return True, "asked for"
    if not supported:
        return False, "AUTO: TRL has no activation offloading for this method"
    if not hw.cuda:
        return False, "AUTO: no GPU (the activations are in host memory already)"
    length = spec.hyperparameters.max_seq_length
    if length < AUTO_OFFLOAD_MIN_SEQ_LEN:
        return False, f"AUTO: sequences of {length} tokens (chosen from {AUTO_OFFLOAD_MIN_SEQ_LEN})"
    return True, f"AUTO: sequences of {length} tokens on a GPU"


def _padding_free(wanted: int, spec: job_pb2.JobSpec) -> tuple[bool, str]:
    packing = spec.hyperparameters.packing and spec.adapter != job_pb2.ADAPTER_TYPE_PROMPT_TUNING
    supported = spec.method in PADDING_FREE_METHODS and packing
    if wanted == OFF:
        return False, "OFF in the spec" + (" (packed rows share one causal attention)" if supported else "")
    if wanted == ON:
        if not supported:  # CreateJob refuses this; a spec that did not come through it
            raise _refuse("padding_free", "it needs packing with SFT or distillation")
        return True, "asked for"
    if not supported:
        return False, "AUTO: needs packing with SFT or distillation"
    return True, "AUTO: packing, each example attends within itself"


def describe_modes(spec: job_pb2.JobSpec) -> str:
    """The spec's settings, e.g. 'liger_kernels=AUTO, attention=AUTO, ...' (for messages)."""
    speed = spec.speed
    attention = ("AUTO" if not speed.attention else
                 job_pb2.AttentionImplementation.Name(speed.attention).removeprefix("ATTENTION_IMPLEMENTATION_"))
    modes = [f"{name}={_mode_name(getattr(speed, name))}" for name in OPTIONS if name != "attention"]
    return ", ".join([f"attention={attention}", *modes])
