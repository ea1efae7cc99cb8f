"""The arithmetic of an estimate: parameters, memory per GPU, FLOPs, time and cost. Pure functions, no I/O.

A PRIOR is architecture arithmetic plus the published rules of thumb below, so the numbers can be checked
by hand; a `Calibration` from finished jobs (services.estimation.calibration) scales the throughput and the
peak memory of the same model family on the same GPU type, never the formulas.

Memory follows the usual accounting (ZeRO paper, Korthikanti et al. 2022) for one optimizer step, in the
layout the trainer worker really uses:
  weights + trainable copies + gradients + optimizer states + activations + logits + transient buffers
  + framework overhead,
with ZeRO/FSDP dividing the sharded parts by the number of GPUs of every node (gpu_count x node_count). The
peak is the larger of the backward pass (activations alive) and the optimizer step (its temporaries alive),
not their sum. On several nodes the time adds the traffic between them at the hardware's stated bandwidth.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from types import MappingProxyType
from typing import Literal

GIB = 1024**3
MIB = 1024**2

Adapter = Literal["lora", "qlora", "full", "prompt_tuning"]
Method = Literal["sft", "dpo", "grpo", "distillation", "orpo", "kto"]
Precision = Literal["bf16", "fp16", "fp32"]
Strategy = Literal["none", "ddp", "zero1", "zero2", "zero2_offload", "zero3", "zero3_offload", "fsdp"]

PRECISION_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp32": 4}
# Optimizer state bytes per trainable parameter. AdamW keeps two fp32 moments (8); bitsandbytes' 8-bit
# variants two 1-byte moments plus an fp32 absmax per 256-value block of each (2 + 8/256); HF's "sgd" has
# no momentum buffer (0); Adafactor keeps factored second moments, a few bytes per row and column of each
# matrix (well under 1 byte per parameter; 0.5 is a bound). Paged variants hold the same bytes in memory the
# driver can evict to the host under pressure: counted on the GPU, as that is where they are when it fits.
EIGHT_BIT_STATE_BYTES = 2 + 2 * 4 / 256
OPTIMIZER_BYTES: dict[str, float] = {
    "adamw": 8.0,
    "paged_adamw": 8.0,
    "adamw_8bit": EIGHT_BIT_STATE_BYTES,
    "paged_adamw_8bit": EIGHT_BIT_STATE_BYTES,
    "sgd": 0.0,
    "adafactor": 0.5,
}
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MLP_MODULES = frozenset({"gate_proj", "up_proj", "down_proj"})
# Other names users give LoRA targets for the same matrices (fused Phi-3 projections, Mixtral experts).
MODULE_ALIASES: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "w1": ("gate_proj",),
    "w3": ("up_proj",),
    "w2": ("down_proj",),
    "query_key_value": ("q_proj", "k_proj", "v_proj"),
    "dense": ("o_proj",),
    "dense_h_to_4h": ("up_proj",),
    "dense_4h_to_h": ("down_proj",),
    "fc1": ("up_proj",),
    "fc2": ("down_proj",),
}


@dataclass(frozen=True)
class Priors:
    """The rules of thumb, in one place so calibration can replace them."""

    # CUDA context and library workspaces per GPU, which torch.cuda.max_memory_allocated does not see ...
    framework_overhead_bytes: int = 768 * MIB
    # ... and the caching allocator's slack (reserved but not allocated), as a fraction of the rest. Together
    # they are the margin that keeps an admitted job from running out of memory when the prior is a little
    # short (the CPU measurement's largest under-estimate was 12%).
    allocator_slack: float = 0.15
    # Model FLOPs utilisation per method on one GPU (HF Trainer-class stacks). QLoRA pays for dequantising.
    utilization: dict[str, float] = field(
        default_factory=lambda: {"full": 0.40, "lora": 0.35, "qlora": 0.25, "prompt_tuning": 0.35}
    )
    # GRPO spends most of its time generating, far below peak.
    grpo_utilization_factor: float = 0.4
    # Throughput kept per GPU when training on several (communication within a node), by strategy family.
    # Between nodes the time is counted, not guessed: `inter_node_seconds_per_token`.
    scaling_efficiency: dict[str, float] = field(
        default_factory=lambda: {
            "none": 0.90,
            "ddp": 0.90,
            "zero1": 0.90,
            "zero2": 0.88,
            "zero3": 0.80,
            "fsdp": 0.80,
            "zero2_offload": 0.50,
            "zero3_offload": 0.45,
        }
    )
    # Setup, evaluation and export on top of the training time (the 20-30% competitors quote) ...
    overhead_fraction: float = 0.20
    # ... plus a fixed start: worker claim, dataset fetch, process start ...
    setup_seconds: float = 60.0
    # ... and loading the base weights at this rate.
    load_bytes_per_second: float = 250 * 1024**2
    # Throughput factor of each speed option (JobSpec.speed) a spec sets explicitly, on top of
    # `utilization` (measured with the worker's defaults: SDPA attention, nothing else). UNMEASURED PRIORS
    # from the peers' published claims, discounted (TRL's Liger integration +20%, FlashAttention-2 over SDPA
    # +10-20% at 2k tokens, torch.compile +10-30% once compiled, offloading's copies not fully overlapped,
    # eager attention's materialised scores): benchmarks/bench_worker.py --cuda is to calibrate them.
    speed_throughput: dict[str, float] = field(
        default_factory=lambda: {
            "liger_kernels": 1.10,
            "flash_attention_2": 1.10,
            "eager": 0.85,
            "torch_compile": 1.10,
            "activation_offloading": 0.90,
            "padding_free": 1.0,  # its gain (no padding) is in the token count, not the rate
        }
    )


PRIORS = Priors()


@dataclass(frozen=True)
class Architecture:
    """A decoder-only transformer in Llama terms (GQA attention, gated MLP), which covers the catalog."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    num_experts: int = 0
    num_experts_per_token: int = 0
    attention_bias: bool = False
    norms_per_layer: int = 2
    # False for a plain up/down MLP (Falcon), True for SwiGLU/GeGLU (gate, up, down).
    gated_mlp: bool = True
    # LayerNorm with a bias (Falcon) instead of RMSNorm: two vectors per norm.
    norm_bias: bool = False
    # A VLM's vision tower and projector: counted in memory, never quantised, not multiplied by text tokens.
    vision_parameters: int = 0
    # One projection for q, k and v (Phi-3, Falcon), one for gate and up (Phi-3): what LoRA adapts.
    fused_qkv: bool = False
    fused_gate_up: bool = False
    # Bytes per head and key position each query keeps when transformers runs the attention without a fused
    # kernel (Gemma 2's logit soft-capping runs eager; Falcon passes SDPA a materialised float mask).
    attention_score_bytes: int = 0
    # Norms that scale in fp32 and keep that fp32 output for their weight's gradient (Gemma's (1 + w) x).
    fp32_norm_scale: bool = False
    # Gemma 2 soft-caps its logits (divide, tanh, multiply): tanh's output is kept for backward, one more
    # 16-bit logit-sized tensor at the loss.
    logit_softcapping: bool = False

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def attention_dim(self) -> int:
        return self.num_attention_heads * self.head_size

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_size

    # The figures below depend on the shape alone, so each is computed once per Architecture object (the
    # catalog's are built once at start) and kept in the instance's __dict__ by cached_property, which a
    # frozen dataclass allows: they are not fields, so equality and hashing ignore them.

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear module of one layer (one expert's for the MLP)."""
        return dict(self.shapes)

    @cached_property
    def shapes(self) -> Mapping[str, tuple[int, int]]:
        """`module_shapes()`, computed once and read-only."""
        h, i = self.hidden_size, self.intermediate_size
        shapes = {
            "q_proj": (h, self.attention_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.attention_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }
        if not self.gated_mlp:
            del shapes["gate_proj"]
        return MappingProxyType(shapes)

    def module_copies(self, name: str) -> int:
        return max(self.num_experts, 1) if name in MLP_MODULES else 1

    def layer_linear_parameters(self, *, active_only: bool = False) -> int:
        return self._active_linear_parameters if active_only else self._linear_parameters

    def _count_linear_parameters(self, active_only: bool) -> int:
        total = 0
        for name, (n_in, n_out) in self.shapes.items():
            copies = self.module_copies(name)
            if active_only and name in MLP_MODULES and self.num_experts:
                copies = self.num_experts_per_token
            total += copies * n_in * n_out
        return total

    @cached_property
    def _linear_parameters(self) -> int:
        return self._count_linear_parameters(False)

    @cached_property
    def _active_linear_parameters(self) -> int:
        return self._count_linear_parameters(True)

    @cached_property
    def embedding_parameters(self) -> int:
        return self.vocab_size * self.hidden_size

    @cached_property
    def parameter_count(self) -> int:
        norm = self.hidden_size * (2 if self.norm_bias else 1)
        per_layer = self.layer_linear_parameters() + self.norms_per_layer * norm
        if self.attention_bias:
            per_layer += self.attention_dim + 2 * self.kv_dim
        if self.num_experts:
            per_layer += self.hidden_size * self.num_experts  # router
        lm_head = 0 if self.tied_embeddings else self.embedding_parameters
        return (
            self.num_layers * per_layer + self.embedding_parameters + lm_head + norm + self.vision_parameters
        )

    @cached_property
    def largest_matrix(self) -> int:
        return max(n_in * n_out for n_in, n_out in self.shapes.values())

    @cached_property
    def quantizable_parameters(self) -> int:
        """What bitsandbytes quantises: the layers' linear weights (not embeddings, lm_head or norms)."""
        return self.num_layers * self.layer_linear_parameters()

    @cached_property
    def matmul_parameters(self) -> int:
        """Parameters a token multiplies through (active experts only; the lm_head but not the lookup)."""
        return self.num_layers * self.layer_linear_parameters(active_only=True) + self.embedding_parameters

    @cached_property
    def adapted_by_targets(self) -> dict[tuple[str, ...], tuple[AdaptedMatrix, ...]]:
        """What `_adapted` found for each LoRA target list (filled as target lists are seen)."""
        return {}

    @cached_property
    def mlp_expert_parameters(self) -> int:
        """Weights of one layer's MLP over all its experts (what PEFT's LoRA on fused experts rebuilds)."""
        return self.num_experts * sum(
            n_in * n_out for name, (n_in, n_out) in self.shapes.items() if name in MLP_MODULES
        )


@dataclass(frozen=True)
class Hardware:
    gpu_type: str
    display_name: str
    memory_bytes: int
    peak_tflops: float
    supports_bf16: bool
    hourly_usd: float
    allowed_gpu_counts: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    min_storage_gb: int = 50
    max_storage_gb: int = 1000
    # The network between two nodes of this type, as one node sends and receives at once (Gbit/s), and
    # what it is, for the note that states it (catalog/hardware.json says why each value).
    inter_node_gbps: float = 100.0
    inter_node_network: str = "Ethernet"

    @property
    def is_cpu(self) -> bool:
        return self.gpu_type == "cpu"


@dataclass(frozen=True)
class Setup:
    """A job spec with every default filled in: what the arithmetic needs and nothing else."""

    adapter: Adapter = "lora"
    method: Method = "sft"
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = ("all-linear",)
    lora_dropout: float = 0.05
    use_dora: bool = False
    quantization_bits: int = 4
    double_quantization: bool = True
    num_virtual_tokens: int = 20
    # None: bf16 where the hardware has it, else fp16.
    precision: Precision | None = None
    optimizer: str = "adamw"
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_seq_length: int = 2048
    gradient_checkpointing: bool = False
    packing: bool = False
    epochs: int = 3
    max_steps: int = 0
    strategy: Strategy = "none"
    gpu_count: int = 1
    node_count: int = 1
    num_generations: int = 4
    max_completion_length: int = 256
    kl_beta: float = 0.04
    teacher: Architecture | None = None
    # DPO's own reference model (spec.dpo.reference_model) and GRPO's reward model; None: none is named.
    reference: Architecture | None = None
    reward_model: Architecture | None = None
    # JobSpec.speed as the estimate counts it: options the spec turns ON (AUTO is counted as the worker's
    # plain default, so that an estimate never banks on a package a worker may lack), attention as set
    # ("auto": SDPA or FlashAttention-2, both without seq x seq scores; "eager": materialised scores), and
    # padding-free where the worker always uses it (packing with SFT or distillation, unless OFF).
    liger_kernels: bool = False
    attention: Literal["auto", "eager", "sdpa", "flash_attention_2"] = "auto"
    torch_compile: bool = False
    activation_offloading: bool = False
    padding_free: bool = False

    @property
    def world_size(self) -> int:
        return self.gpu_count * self.node_count

    @property
    def frozen_base(self) -> bool:
        return self.adapter != "full"

    @property
    def needs_reference_model(self) -> bool:
        """DPO and KTO compare against a frozen reference; GRPO too when its KL term is on. With an
        adapter the reference is the base with the adapter switched off, so it costs no memory."""
        return self.method in ("dpo", "kto") or (self.method == "grpo" and self.kl_beta > 0)

    @property
    def sequences_per_example(self) -> int:
        """Preference methods run a chosen and a rejected sequence per example."""
        return 2 if self.method in ("dpo", "orpo", "kto") else 1

    @property
    def sequence_length(self) -> int:
        """Positions the model runs per sequence: the completion too for GRPO, the soft prompt too for
        prompt tuning."""
        extra = self.max_completion_length if self.method == "grpo" else 0
        if self.adapter == "prompt_tuning":
            extra += self.num_virtual_tokens
        return self.max_seq_length + extra


@dataclass(frozen=True)
class Memory:
    """Bytes on ONE GPU. `total` sums every term but the parts-of and the offloaded bytes."""

    weights: int
    trainable_parameters: int
    gradients: int
    optimizer_states: int
    activations: int
    logits: int
    framework_overhead: int
    transient: int = 0
    calibration_adjustment: int = 0
    # Parts of `weights`, shown apart.
    reference_weights: int = 0
    quantization_constants: int = 0
    # Host memory per GPU that ZeRO offload holds instead.
    offloaded_to_cpu: int = 0

    @property
    def total(self) -> int:
        return (
            self.weights
            + self.trainable_parameters
            + self.gradients
            + self.optimizer_states
            + self.activations
            + self.logits
            + self.transient
            + self.framework_overhead
            + self.calibration_adjustment
        )

    @property
    def measured_part(self) -> int:
        """What torch.cuda.max_memory_allocated sees: everything but the CUDA context and allocator slack."""
        return self.total - self.framework_overhead - self.calibration_adjustment

    def largest_terms(self, count: int = 2) -> list[tuple[str, int]]:
        terms = {
            "weights": self.weights,
            "trainable parameters": self.trainable_parameters,
            "gradients": self.gradients,
            "optimizer states": self.optimizer_states,
            "activations": self.activations,
            "logits": self.logits,
            "transient buffers": self.transient,
        }
        return sorted(terms.items(), key=lambda item: -item[1])[:count]


@dataclass(frozen=True)
class Time:
    training_tokens: int
    flops_per_token: float
    utilization: float
    training_seconds: float
    overhead_seconds: float
    tokens_per_second: float = 0.0
    # The part of `training_seconds` spent moving gradients and parameters between nodes (0 on one node).
    communication_seconds: float = 0.0

    @property
    def total_seconds(self) -> float:
        return self.training_seconds + self.overhead_seconds


@dataclass(frozen=True)
class Cost:
    hourly_usd: float
    gpu_count: int
    total_usd: float


@dataclass(frozen=True)
class Calibration:
    """Measured-over-predicted ratios of finished jobs of one model family on one GPU type.

    `throughput` multiplies the utilisation prior (the median ratio: time is a best guess). `memory`
    multiplies the predicted peak (the largest ratio seen: memory must not be under-estimated).
    """

    jobs: int
    throughput: float | None = None
    memory: float | None = None


@dataclass(frozen=True)
class Fit:
    hardware: Hardware
    gpu_count: int
    memory: Memory
    fits: bool
    reason: str
    time: Time | None
    cost: Cost
    strategy: Strategy = "none"
    calibration: Calibration | None = None


# ---- parameters -------------------------------------------------------------------------------------


def lora_targets(arch: Architecture, targets: tuple[str, ...]) -> tuple[set[str], list[str]]:
    """The linear modules a target list names, and the names not recognised."""
    present = set(arch.shapes)
    if not targets or "all-linear" in targets:
        return present, []  # PEFT's all-linear: every linear of the layers, not lm_head
    chosen: set[str] = set()
    unknown: list[str] = []
    for name in targets:
        if name in LINEAR_MODULES:
            chosen.add(name)
        elif name in MODULE_ALIASES:
            chosen.update(MODULE_ALIASES[name])
        else:
            unknown.append(name)
    return chosen & present, unknown


@dataclass(frozen=True)
class AdaptedMatrix:
    """One weight LoRA adapts in each layer, as PEFT sees it: a fused projection is one matrix."""

    copies: int
    n_in: int
    n_out: int
    # Inputs its LoRA dropout keeps per token (0 for a mixture's experts: counted with the active ones).
    mlp: bool
    # Reads a norm's output (q, k, v, gate, up), which the fp32 parameters' autocast already keeps in fp32.
    norm_fed: bool = True


def adapted_matrices(arch: Architecture, modules: set[str], all_linear: bool) -> list[AdaptedMatrix]:
    """The matrices of one layer that LoRA on `modules` adapts.

    Fused projections (Phi-3's qkv_proj and gate_up_proj, Falcon's query_key_value) take one adapter for
    the whole fused output. A mixture's experts are one 3-D tensor per projection in transformers 5; PEFT
    0.21 adapts gate_up with rank x 2E and down with rank x E (as counted on a real model by
    benchmarks/measure_memory.py), and all-linear also adapts the router.
    """
    shapes = arch.shapes
    h, i = arch.hidden_size, arch.intermediate_size
    out: list[AdaptedMatrix] = []
    attention = [m for m in ("q_proj", "k_proj", "v_proj") if m in modules]
    if arch.fused_qkv and attention:
        out.append(AdaptedMatrix(1, h, arch.attention_dim + 2 * arch.kv_dim, False))
    else:
        out += [AdaptedMatrix(1, *shapes[m], False) for m in attention]
    if "o_proj" in modules:
        out.append(AdaptedMatrix(1, *shapes["o_proj"], False, norm_fed=False))
    gate_up = [m for m in ("gate_proj", "up_proj") if m in modules]
    if arch.num_experts:
        if gate_up:
            out.append(AdaptedMatrix(2 * arch.num_experts, h, 2 * i, True))
        if "down_proj" in modules:
            out.append(AdaptedMatrix(arch.num_experts, i, h, True, norm_fed=False))
        if all_linear:
            out.append(AdaptedMatrix(1, h, arch.num_experts, False))
        return out
    if arch.fused_gate_up and gate_up:
        out.append(AdaptedMatrix(1, h, 2 * i, True))
    else:
        out += [AdaptedMatrix(1, *shapes[m], True) for m in gate_up]
    if "down_proj" in modules:
        out.append(AdaptedMatrix(1, *shapes["down_proj"], True, norm_fed=False))
    return out


# Adapted matrices per target list, kept on each Architecture; a target list is the user's to choose, so
# only the first few seen per architecture are kept (the rest are computed on each call).
_ADAPTED_PER_ARCHITECTURE = 64


def _adapted(arch: Architecture, targets: tuple[str, ...]) -> tuple[AdaptedMatrix, ...]:
    known = arch.adapted_by_targets
    found = known.get(targets)
    if found is None:
        modules, _ = lora_targets(arch, targets)
        found = tuple(adapted_matrices(arch, modules, not targets or "all-linear" in targets))
        if len(known) < _ADAPTED_PER_ARCHITECTURE:
            known[targets] = found
    return found


def lora_parameters(arch: Architecture, rank: int, targets: tuple[str, ...], use_dora: bool = False) -> int:
    """rank x (in + out) per adapted matrix (A is in x r, B is r x out); DoRA adds a magnitude per output."""
    per_layer = sum(
        m.copies * (rank * (m.n_in + m.n_out) + (m.n_out if use_dora else 0)) for m in _adapted(arch, targets)
    )
    return arch.num_layers * per_layer


def trainable_parameters(arch: Architecture, setup: Setup) -> int:
    if setup.adapter == "full":
        return arch.parameter_count
    if setup.adapter == "prompt_tuning":
        return setup.num_virtual_tokens * arch.hidden_size
    return lora_parameters(arch, setup.lora_rank, setup.lora_targets, setup.use_dora)


def largest_trainable_tensor(arch: Architecture, setup: Setup) -> int:
    """Elements of the largest tensor that trains."""
    if setup.adapter == "full":
        return max(arch.embedding_parameters, arch.largest_matrix)
    if setup.adapter == "prompt_tuning":
        return setup.num_virtual_tokens * arch.hidden_size
    adapted = _adapted(arch, setup.lora_targets)
    return max((setup.lora_rank * m.copies * max(m.n_in, m.n_out) for m in adapted), default=0)


def quantization_constant_bytes(arch: Architecture, bits: int, double_quantization: bool) -> int:
    """bitsandbytes' constants beside the quantised layer linears.

    4-bit (NF4/FP4) stores one fp32 absmax per 64-weight block (0.5 bit per weight); double quantisation
    stores it as 1 byte plus one fp32 constant per 256 blocks (~0.127 bit). 8-bit (LLM.int8) stores one fp32
    scale per output row.
    """
    if bits == 8:
        rows = sum(arch.module_copies(n) * out for n, (_, out) in arch.shapes.items())
        return 4 * rows * arch.num_layers
    blocks = arch.quantizable_parameters / 64
    return int(blocks * (1 + 4 / 256) if double_quantization else blocks * 4)


def quantized_weight_bytes(arch: Architecture, bits: int, double_quantization: bool) -> int:
    """bitsandbytes storage of the base model: the layers' linears at `bits` plus their constants; the rest
    (embeddings, lm_head, norms, a vision tower) in fp32, because PEFT's prepare_model_for_kbit_training,
    which TRL applies to every k-bit model, upcasts each parameter it did not quantise."""
    quantized = arch.quantizable_parameters
    rest = arch.parameter_count - quantized
    payload = quantized if bits == 8 else quantized // 2
    return payload + quantization_constant_bytes(arch, bits, double_quantization) + 4 * rest


# ---- memory -------------------------------------------------------------------------------------------

# Bytes per logit element at the loss: the 16-bit logits the model returns, the fp32 copy the loss takes and
# the fp32 log-softmax cross-entropy keeps for backward (in fp32 training the copy is the logits themselves).
LOGIT_BYTES = {"bf16": 2 + 4 + 4, "fp16": 2 + 4 + 4, "fp32": 4 + 4}
OFFLOAD_STRATEGIES = ("zero2_offload", "zero3_offload")
SHARDED_OPTIMIZER = ("zero1", "zero2", "zero3", "fsdp")
SHARDED_GRADIENTS = ("zero2", "zero2_offload", "zero3", "zero3_offload", "fsdp")
SHARDED_WEIGHTS = ("zero3", "zero3_offload", "fsdp")


def resolve_precision(setup: Setup, hardware: Hardware) -> Precision:
    """As the worker resolves it: bf16 where the hardware has it, else fp16; fp16 needs a GPU."""
    if hardware.is_cpu and setup.precision == "fp16":
        return "fp32"
    if setup.precision:
        return setup.precision
    return "bf16" if hardware.supports_bf16 else "fp16"


def fp32_parameters(setup: Setup, hardware: Hardware) -> bool:
    """Whether the worker holds the model's parameters in fp32: for full fine-tuning (they are the master
    weights; autocast computes in 16-bit) and on a CPU. Adapters on a GPU sit on a 16-bit base, and DeepSpeed
    keeps 16-bit parameters beside its own fp32 master copy."""
    return not setup.strategy.startswith("zero") and (hardware.is_cpu or setup.adapter == "full")


def activation_bytes_per_token_layer(
    arch: Architecture, setup: Setup, precision: Precision, in_fp32: bool
) -> int:
    """Bytes one decoder layer keeps per token for its backward pass, with fused (flash/SDPA) attention (no
    seq x seq scores unless the model forces them), as counted with saved-tensor hooks on transformers'
    layers (benchmarks/measure_memory.py's figures):

    - attention: q and k after rotary, v, the attention output (GQA's k and v are not repeated), plus
      `attention_score_bytes` per head and key position where the attention runs unfused;
    - every norm keeps its fp32-upcast input (and its fp32 output when the parameters are fp32 under
      autocast);
    - training all weights, each linear keeps its input: the residual and norm outputs, and the MLP's gate,
      up, activation and product (up and activation for a plain MLP), per active expert;
    - with a frozen base, the frozen linears keep no input: the MLP keeps gate, up and activation, and each
      LoRA matrix keeps its input cast to fp32 (already fp32 for a norm's output under autocast) and, with
      dropout, the dropped-out copy, 4 bytes per input feature each, and its rank-r intermediate.
    """
    width = 4 if precision == "fp32" else 2
    autocast = in_fp32 and precision != "fp32"
    h, i = arch.hidden_size, arch.intermediate_size
    experts = arch.num_experts_per_token if arch.num_experts else 1
    attention = 2 * arch.attention_dim + 2 * arch.kv_dim
    score_bytes = arch.attention_score_bytes
    if setup.attention == "eager":
        # The fp32 softmax kept for its backward and, in 16-bit training, its cast that the product with v
        # keeps: per head and key position (the whole seq x seq matrix, not its causal half).
        score_bytes = max(score_bytes, 4 + (0 if precision == "fp32" else PRECISION_BYTES[precision]))
    scores = arch.num_attention_heads * setup.sequence_length * score_bytes
    norm_bytes = arch.norms_per_layer * h * (8 if autocast else 4)
    if setup.adapter == "full":
        mlp = (4 if arch.gated_mlp else 2) * i * experts
        if arch.fp32_norm_scale:
            norm_bytes += arch.norms_per_layer * h * 2  # its scaled output in fp32, not 16-bit
        if arch.num_experts:
            mlp += 2 * h * experts  # each active expert's gathered input and weighted output
        return width * (4 * h + attention + mlp) + norm_bytes + scores
    mlp = (3 if arch.gated_mlp else 2) * i * experts
    total = width * (attention + mlp) + norm_bytes + scores
    if setup.adapter in ("lora", "qlora"):
        dropout = 4 if setup.lora_dropout > 0 else 0
        for matrix in _adapted(arch, setup.lora_targets):
            share = experts if matrix.mlp and arch.num_experts else 1
            cast = 0 if autocast and matrix.norm_fed else 4
            total += share * (matrix.n_in * (cast + dropout) + setup.lora_rank * 4)
    return total


# Layers' activations that stay on the GPU under activation offloading (the one at work, the one prefetched).
OFFLOAD_LAYERS_ON_GPU = 2


def liger_loss_bytes(arch: Architecture, setup: Setup, tokens: int) -> int:
    """Liger's fused linear cross-entropy never holds the logits: it runs the lm_head and the loss over
    chunks of about tokens x hidden / vocab tokens (rounded up to a power of two: up to 2x), each chunk's
    logits in the compute dtype and fp32, and keeps the gradient of the hidden states (fp32) and, training
    the lm_head, of its weight. An unmeasured prior: benchmarks/measure_memory.py --cuda is to check it."""
    chunk_elements = 2 * tokens * arch.hidden_size  # chunk x vocab, at most twice tokens x hidden
    out = chunk_elements * (2 + 4) + tokens * arch.hidden_size * 4
    if setup.adapter == "full":
        out += arch.vocab_size * arch.hidden_size * 4
    return out


def memory_per_gpu(arch: Architecture, setup: Setup, hardware: Hardware, priors: Priors = PRIORS) -> Memory:
    precision = resolve_precision(setup, hardware)
    width = PRECISION_BYTES[precision]
    mixed = precision != "fp32"
    n = arch.parameter_count
    trainable = trainable_parameters(arch, setup)
    full = setup.adapter == "full"
    in_fp32 = fp32_parameters(setup, hardware)
    deepspeed = setup.strategy.startswith("zero")

    constants = 0
    if setup.adapter == "qlora":
        weights = quantized_weight_bytes(arch, setup.quantization_bits, setup.double_quantization)
        constants = quantization_constant_bytes(arch, setup.quantization_bits, setup.double_quantization)
    else:
        weights = n * (4 if in_fp32 else width)
    reference = n * width if full and setup.needs_reference_model else 0  # the frozen starting weights
    if setup.reference is not None:  # a named reference model is loaded frozen, adapter or not
        reference = setup.reference.parameter_count * width
    if setup.reward_model is not None:  # scores the completions, inference only
        reference += setup.reward_model.parameter_count * width
    if setup.method == "distillation":
        reference += (setup.teacher or arch).parameter_count * 2  # teacher in 16-bit, inference only
    weights += reference

    if full:
        trainable_bytes = n * 4 if mixed and not in_fp32 else 0  # DeepSpeed's fp32 master copy
        gradients = n * (4 if in_fp32 else width)
    else:
        trainable_bytes = trainable * 4  # PEFT keeps adapters in fp32
        gradients = trainable * 4
    optimizer = int(trainable * OPTIMIZER_BYTES.get(setup.optimizer, 8.0))
    # torch's AdamW step takes the second moment's square root into a new fp32 buffer: for all trained
    # tensors at once on a GPU (its foreach path), one tensor at a time on a CPU. The 8-bit and SGD steps
    # work in place, and DeepSpeed's fused Adam allocates none.
    step_buffers = 0
    if setup.optimizer in ("adamw", "paged_adamw") and not deepspeed:
        step_buffers = 4 * (largest_trainable_tensor(arch, setup) if hardware.is_cpu else trainable)

    world = setup.world_size
    strategy = setup.strategy
    offloaded = 0
    if strategy in SHARDED_OPTIMIZER:
        optimizer, trainable_bytes, step_buffers = (
            optimizer // world,
            trainable_bytes // world,
            step_buffers // world,
        )
    if strategy in OFFLOAD_STRATEGIES:
        offloaded = (optimizer + trainable_bytes) // world  # the optimizer step runs on the CPU
        optimizer, trainable_bytes, step_buffers = 0, 0, 0
    if strategy in SHARDED_GRADIENTS:
        gradients //= world
    if strategy in SHARDED_WEIGHTS:
        weights, reference, constants = weights // world, reference // world, constants // world

    sequences = setup.batch_size * setup.sequences_per_example
    tokens = sequences * setup.sequence_length
    per_layer = activation_bytes_per_token_layer(arch, setup, precision, in_fp32)
    # PEFT's LoRA on a mixture's fused expert tensors builds each layer's whole delta weight (all experts,
    # in the compute dtype) and keeps it for backward.
    expert_delta = 0
    if setup.adapter in ("lora", "qlora") and arch.num_experts:
        if any(m.mlp and m.copies > 1 for m in _adapted(arch, setup.lora_targets)):
            expert_delta = width * arch.mlp_expert_parameters
    logit_bytes = LOGIT_BYTES[precision] + (width if arch.logit_softcapping else 0)
    logits = tokens * arch.vocab_size * logit_bytes
    if setup.liger_kernels and setup.method == "sft":
        logits = min(logits, liger_loss_bytes(arch, setup, tokens))
    if setup.method == "distillation":
        logits += tokens * (setup.teacher or arch).vocab_size * LOGIT_BYTES[precision]

    # Autocast's 16-bit copies of fp32 weights, which matmuls keep for backward, and bitsandbytes'
    # dequantised matrix of the layer at work.
    autocast = in_fp32 and mixed
    layer_casts = 2 * arch.layer_linear_parameters(active_only=True) if autocast else 0
    casts = 2 * arch.embedding_parameters if autocast else 0  # the lm_head's
    if setup.adapter == "qlora":
        casts += width * arch.largest_matrix
    if setup.gradient_checkpointing:
        # Only each layer's input (the residual stream: fp32 when the parameters are) is kept. One layer is
        # rebuilt at a time in backward, once the loss has freed its fp32 log-softmax (4 bytes a logit):
        # only the rebuilt layer's excess over that adds to the peak (measured on CPU within -10%/+8%).
        residual = 4 if in_fp32 or precision == "fp32" else 2
        rebuilt = tokens * per_layer + layer_casts + expert_delta
        freed = tokens * arch.vocab_size * 4
        activations = tokens * arch.num_layers * arch.hidden_size * residual + max(0, rebuilt - freed)
    else:
        activations = tokens * arch.num_layers * per_layer + arch.num_layers * expert_delta
        casts += arch.num_layers * layer_casts
    if setup.activation_offloading and arch.num_layers > OFFLOAD_LAYERS_ON_GPU:
        # TRL's offloading moves each saved activation to pinned host memory and brings it back in backward
        # one layer ahead: about two layers' worth stay on the GPU, the rest is host memory.
        if setup.gradient_checkpointing:
            residual_bytes = tokens * arch.hidden_size * (4 if in_fp32 or precision == "fp32" else 2)
            kept = OFFLOAD_LAYERS_ON_GPU * residual_bytes + (activations - arch.num_layers * residual_bytes)
        else:
            kept = OFFLOAD_LAYERS_ON_GPU * (tokens * per_layer + expert_delta)
        offloaded += max(0, activations - kept)
        activations = min(activations, kept)
    # The step's buffers come after backward has freed the activations: only their excess adds to the peak.
    transient = casts + max(0, step_buffers - activations - logits - casts)
    allocated = weights + trainable_bytes + gradients + optimizer + activations + logits + transient
    overhead = priors.framework_overhead_bytes + int(priors.allocator_slack * allocated)

    return Memory(
        weights=int(weights),
        trainable_parameters=int(trainable_bytes),
        gradients=int(gradients),
        optimizer_states=optimizer,
        activations=int(activations),
        logits=int(logits),
        framework_overhead=overhead,
        transient=int(transient),
        reference_weights=int(reference),
        quantization_constants=int(constants),
        offloaded_to_cpu=int(offloaded),
    )


def calibrated_memory(memory: Memory, calibration: Calibration | None) -> Memory:
    """The prior scaled by the measured-over-predicted ratio, as a term of its own."""
    if calibration is None or calibration.memory is None:
        return memory
    adjustment = int(memory.measured_part * (calibration.memory - 1.0))
    return replace(memory, calibration_adjustment=adjustment)


# ---- time and cost -----------------------------------------------------------------------------------


def training_tokens(setup: Setup, tokens_per_epoch: int, examples_per_epoch: int | None) -> int:
    """Tokens the trainer processes: epochs x tokens per epoch (each example truncated to max_seq_length),
    or max_steps x global batch x tokens per example. GRPO trains on every generated completion."""
    per_example = float(setup.max_seq_length)
    if examples_per_epoch:
        tokens_per_epoch = min(tokens_per_epoch, examples_per_epoch * setup.max_seq_length)
        per_example = tokens_per_epoch / examples_per_epoch
    if setup.packing:
        per_example = float(setup.max_seq_length)  # packed sequences are full
    if setup.method == "grpo":
        examples = examples_per_epoch or max(1, round(tokens_per_epoch / min(setup.max_seq_length, 512)))
        tokens_per_epoch = setup.num_generations * (tokens_per_epoch + examples * setup.max_completion_length)
        per_example = setup.num_generations * (per_example + setup.max_completion_length)
    if setup.max_steps > 0:
        global_batch = setup.batch_size * setup.gradient_accumulation_steps * setup.world_size
        return int(setup.max_steps * global_batch * per_example)
    return int(setup.epochs * tokens_per_epoch)


def _forward(arch: Architecture, context_tokens: int) -> float:
    return 2.0 * arch.matmul_parameters + 2.0 * arch.num_layers * context_tokens * arch.attention_dim


def flops_per_token(arch: Architecture, setup: Setup, context_tokens: int) -> float:
    """Forward: 2 FLOPs per multiplied parameter plus causal attention (2 x layers x context x attention
    width). Full fine-tuning's backward costs two forwards (6N in all); a frozen base needs gradients
    through the activations only (4N). Checkpointing repeats the forward; a reference, teacher or
    generation pass adds forwards of its own."""
    forward = 2.0 * arch.matmul_parameters + 2.0 * arch.num_layers * context_tokens * arch.attention_dim
    total = forward * (2.0 if setup.frozen_base else 3.0)
    total += 6.0 * trainable_parameters(arch, setup) if setup.frozen_base else 0.0
    if setup.gradient_checkpointing:
        total += forward
    if setup.needs_reference_model:
        total += forward if setup.reference is None else _forward(setup.reference, context_tokens)
    if setup.reward_model is not None:
        total += _forward(setup.reward_model, context_tokens)
    if setup.method == "grpo":
        total += forward  # generating the completions
    if setup.method == "distillation":
        teacher = setup.teacher or arch
        total += (
            2.0 * teacher.matmul_parameters
            + 2.0 * teacher.num_layers * context_tokens * teacher.attention_dim
        )
    return total


def speed_factor(setup: Setup, priors: Priors = PRIORS) -> float:
    """The product of the throughput priors of the speed options the setup uses (1.0 with none)."""
    used = [name for name in ("liger_kernels", "torch_compile", "activation_offloading", "padding_free")
            if getattr(setup, name)]
    if setup.attention in ("eager", "flash_attention_2"):
        used.append(setup.attention)
    value = 1.0
    for name in used:
        value *= priors.speed_throughput.get(name, 1.0)
    return value


def utilization(
    setup: Setup, hardware: Hardware, priors: Priors = PRIORS, calibration: Calibration | None = None
) -> float:
    value = priors.utilization[setup.adapter] * speed_factor(setup, priors)
    if setup.method == "grpo":
        value *= priors.grpo_utilization_factor
    if setup.world_size > 1:
        value *= priors.scaling_efficiency[setup.strategy]
    if calibration is not None and calibration.throughput is not None:
        value *= calibration.throughput
    return min(value, 1.0)


def tokens_per_second(
    arch: Architecture,
    setup: Setup,
    hardware: Hardware,
    context_tokens: int,
    priors: Priors = PRIORS,
    calibration: Calibration | None = None,
) -> float:
    """Training throughput over all GPUs: peak x utilisation / FLOPs per token, slowed on several nodes by
    the time their traffic takes (`inter_node_seconds_per_token`)."""
    util = utilization(setup, hardware, priors, calibration)
    peak = hardware.peak_tflops * 1e12 * setup.world_size
    compute = peak * util / flops_per_token(arch, setup, context_tokens)
    return 1.0 / (1.0 / compute + inter_node_seconds_per_token(arch, setup, hardware, context_tokens))


def inter_node_bytes(arch: Architecture, setup: Setup, hardware: Hardware) -> tuple[float, float]:
    """Bytes each node sends (and receives) over the inter-node network per micro-batch and per optimizer
    step; (0, 0) on one node.

    Collectives are taken as hierarchical rings (NCCL's): the GPUs of a node combine over NVLink first, then
    each reduce-scatter or all-gather moves (nodes - 1) / nodes of the data across the network. By
    strategy:
    - DDP: one all-reduce of the gradients per optimizer step (2 x gradients: a reduce-scatter and an
      all-gather; accumulation steps do not synchronise);
    - ZeRO-1/2: a reduce-scatter of the gradients each micro-batch, an all-gather of the updated 16-bit
      trainable parameters each step;
    - ZeRO-3 / FSDP: the sharded weights gathered for the forward and again for the backward (and a third
      time for the recomputed forward with gradient checkpointing), the gradients reduce-scattered, each
      micro-batch.
    A reference, teacher or reward model's gathers are not counted.
    """
    nodes = setup.node_count
    if nodes <= 1:
        return 0.0, 0.0
    share = (nodes - 1) / nodes
    width = PRECISION_BYTES[resolve_precision(setup, hardware)]
    trainable = trainable_parameters(arch, setup)
    gradients = trainable * (4 if fp32_parameters(setup, hardware) else width)
    if setup.strategy in SHARDED_WEIGHTS:
        gathers = 3 if setup.gradient_checkpointing else 2
        return share * (gathers * arch.parameter_count * width + gradients), 0.0
    if setup.strategy in SHARDED_OPTIMIZER or setup.strategy in SHARDED_GRADIENTS:
        return share * gradients, share * trainable * width
    return 0.0, share * 2 * gradients


def inter_node_seconds_per_token(
    arch: Architecture, setup: Setup, hardware: Hardware, context_tokens: int
) -> float:
    """Seconds of inter-node traffic per training token at `hardware.inter_node_gbps`, taken as NOT
    overlapped with computation: an upper bound (DDP's bucketed all-reduce and FSDP's prefetch hide part
    of it), which keeps a multi-node estimate from promising more than the network gives."""
    per_micro_batch, per_step = inter_node_bytes(arch, setup, hardware)
    if not per_micro_batch and not per_step:
        return 0.0
    sequence = setup.sequence_length if setup.packing else min(context_tokens, setup.sequence_length)
    micro_batch_tokens = setup.world_size * setup.batch_size * setup.sequences_per_example * max(sequence, 1)
    step_tokens = micro_batch_tokens * setup.gradient_accumulation_steps
    bytes_per_second = hardware.inter_node_gbps * 1e9 / 8
    return (per_micro_batch / micro_batch_tokens + per_step / step_tokens) / bytes_per_second


def estimate_time(
    arch: Architecture,
    setup: Setup,
    hardware: Hardware,
    tokens: int,
    context_tokens: int,
    weights_bytes: int,
    priors: Priors = PRIORS,
    calibration: Calibration | None = None,
) -> Time:
    per_token = flops_per_token(arch, setup, context_tokens)
    util = utilization(setup, hardware, priors, calibration)
    throughput = tokens_per_second(arch, setup, hardware, context_tokens, priors, calibration)
    training = tokens / throughput
    communication = tokens * inter_node_seconds_per_token(arch, setup, hardware, context_tokens)
    overhead = (
        priors.overhead_fraction * training
        + priors.setup_seconds
        + weights_bytes / priors.load_bytes_per_second
    )
    return Time(
        training_tokens=tokens,
        flops_per_token=per_token,
        utilization=util,
        training_seconds=training,
        overhead_seconds=overhead,
        tokens_per_second=throughput,
        communication_seconds=communication,
    )


def multi_node_note(setup: Setup, fit: Fit) -> str | None:
    """The assumptions behind a multi-node estimate, in a sentence for the response's notes; None on one
    node. `fit` is the estimate of `setup` (its strategy may be the one the fit search chose)."""
    if setup.node_count <= 1:
        return None
    hardware, world = fit.hardware, fit.gpu_count
    per_node = world // setup.node_count
    sharded = {
        **dict.fromkeys(SHARDED_WEIGHTS, "weights, gradients and optimizer states"),
        **dict.fromkeys(("zero2", "zero2_offload"), "gradients and optimizer states"),
        "zero1": "optimizer states",
    }.get(fit.strategy)
    memory = f"{sharded} sharded over all {world} GPUs" if sharded else "no sharding (each GPU holds a copy)"
    note = (
        f"{setup.node_count} nodes x {per_node} GPUs: {memory}; inter-node bandwidth assumed "
        f"{hardware.inter_node_gbps:g} Gb/s per node ({hardware.inter_node_network}), its traffic not "
        "overlapped with computation"
    )
    if fit.time is not None:
        note += (
            f" ({fit.time.communication_seconds:.0f} s of the {fit.time.training_seconds:.0f} s of training)"
        )
    return note


def estimate_cost(hardware: Hardware, setup: Setup, seconds: float | None) -> Cost:
    hours = (seconds or 0.0) / 3600
    return Cost(
        hourly_usd=hardware.hourly_usd,
        gpu_count=setup.world_size,
        total_usd=hours * hardware.hourly_usd * setup.world_size,
    )


def evaluate(
    arch: Architecture,
    setup: Setup,
    hardware: Hardware,
    tokens: int | None,
    context_tokens: int | None = None,
    priors: Priors = PRIORS,
    calibration: Calibration | None = None,
) -> Fit:
    """Memory, fit, time (when the token count is known) and cost of `setup` on `hardware`."""
    memory = calibrated_memory(memory_per_gpu(arch, setup, hardware, priors), calibration)
    return _fit(arch, setup, hardware, memory, tokens, context_tokens, priors, calibration)


def _fit(
    arch: Architecture,
    setup: Setup,
    hardware: Hardware,
    memory: Memory,
    tokens: int | None,
    context_tokens: int | None,
    priors: Priors,
    calibration: Calibration | None,
) -> Fit:
    """`evaluate` once the (calibrated) memory per GPU is known."""
    fits = memory.total <= hardware.memory_bytes
    reason = ""
    if not fits:
        terms = ", ".join(f"{name} {size / GIB:.1f} GiB" for name, size in memory.largest_terms())
        reason = (
            f"needs {memory.total / GIB:.1f} GiB per GPU but the {hardware.display_name} has "
            f"{hardware.memory_bytes / GIB:.1f} GiB; the largest terms are {terms}"
        )
    time = None
    if tokens is not None:
        load_bytes = arch.parameter_count * 2
        time = estimate_time(
            arch,
            setup,
            hardware,
            tokens,
            context_tokens or setup.sequence_length,
            load_bytes,
            priors,
            calibration,
        )
    return Fit(
        hardware=hardware,
        gpu_count=setup.world_size,
        memory=memory,
        fits=fits,
        reason=reason,
        time=time,
        cost=estimate_cost(hardware, setup, time.total_seconds if time else None),
        strategy=setup.strategy,
        calibration=calibration,
    )


class FitSearch:
    """The fits of one model and setup on several hardware options, doing each piece of arithmetic once.

    Memory per GPU depends on the hardware only through whether it is a CPU and whether it has bf16
    (`resolve_precision`, `fp32_parameters`), so for each GPU count tried it is computed once per such
    kind of hardware, not once per option; only the count that is answered gets a time and cost
    estimate. The answers are those of `evaluate` on each candidate, exactly: the same functions on the
    same inputs, in the same order (tests/estimation/test_cache.py compares them over the catalog).
    """

    def __init__(
        self,
        arch: Architecture,
        setup: Setup,
        tokens: int | None,
        context_tokens: int | None = None,
        priors: Priors = PRIORS,
    ) -> None:
        self.arch = arch
        self.setup = setup
        self.tokens = tokens
        self.context_tokens = context_tokens
        self.priors = priors
        # (gpu count, strategy, is a CPU, has bf16) -> (candidate setup, uncalibrated memory per GPU)
        self._memory: dict[tuple[int, str, bool, bool], tuple[Setup, Memory]] = {}

    def _candidate(self, count: int, hardware: Hardware) -> tuple[Setup, Memory]:
        setup = self.setup
        strategy = setup.strategy
        if count > 1 and strategy not in SHARDED_WEIGHTS:
            strategy = "ddp" if setup.adapter == "qlora" else "zero3"
        key = (count, strategy, hardware.is_cpu, hardware.supports_bf16)
        found = self._memory.get(key)
        if found is None:
            candidate = replace(setup, gpu_count=count, strategy=strategy)
            found = (candidate, memory_per_gpu(self.arch, candidate, hardware, self.priors))
            self._memory[key] = found
        return found

    def smallest_fit(self, hardware: Hardware, calibration: Calibration | None = None) -> Fit:
        """See `smallest_fit`."""
        chosen: tuple[Setup, Memory] | None = None
        for count in sorted(hardware.allowed_gpu_counts):
            candidate, memory = self._candidate(count, hardware)
            chosen = (candidate, calibrated_memory(memory, calibration))
            if chosen[1].total <= hardware.memory_bytes:
                break
        assert chosen is not None, "a hardware option allows at least one GPU count"
        candidate, memory = chosen
        return _fit(
            self.arch, candidate, hardware, memory, self.tokens, self.context_tokens, self.priors, calibration
        )

    def cheapest(
        self, options: Sequence[Hardware], calibrations: Mapping[str, Calibration]
    ) -> Fit | None:
        """The cheapest (`cost_key`) of the smallest fits on `options`; None when none fits. Ties go to
        the option listed first, as `min` gives them."""
        fits = [self.smallest_fit(hw, calibrations.get(hw.gpu_type)) for hw in options]
        fitting = [f for f in fits if f.fits]
        return min(fitting, key=cost_key) if fitting else None


def smallest_fit(
    arch: Architecture,
    setup: Setup,
    hardware: Hardware,
    tokens: int | None,
    context_tokens: int | None = None,
    calibration: Calibration | None = None,
) -> Fit:
    """The fewest GPUs of this type (per node, as allowed) that fit; the largest count when none does.

    More GPUs only help memory when they shard it: a spec without a sharding strategy is tried with ZeRO-3
    on more than one GPU (and the fit says so in its strategy). QLoRA's quantized weights cannot be sharded
    (tuneforge_core.compat.SHARDING_STRATEGIES), so QLoRA is tried with DDP instead."""
    return FitSearch(arch, setup, tokens, context_tokens).smallest_fit(hardware, calibration)


def cost_key(fit: Fit) -> tuple[float, int, int]:
    """Cheapest first: the total cost when known, else the hourly rate of the whole configuration."""
    price = fit.cost.total_usd if fit.time else fit.cost.hourly_usd * fit.gpu_count
    return (price, fit.gpu_count, fit.hardware.memory_bytes)
