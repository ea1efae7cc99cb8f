"""The arithmetic of an estimate: parameters, memory per GPU, FLOPs, time and cost. Pure functions, no I/O.

Every figure is a PRIOR: architecture arithmetic plus the published rules of thumb below, so the numbers can
be checked by hand. Calibration against finished jobs (a later issue) adjusts `Priors`, not the formulas.

Memory follows the usual accounting (ZeRO paper, Korthikanti et al. 2022) for one optimizer step:
  weights + trainable copies + gradients + optimizer states + activations + logits + framework overhead,
with ZeRO/FSDP dividing the sharded parts by the number of GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

GIB = 1024**3
MIB = 1024**2

Adapter = Literal["lora", "qlora", "full", "prompt_tuning"]
Method = Literal["sft", "dpo", "grpo", "distillation", "orpo", "kto"]
Precision = Literal["bf16", "fp16", "fp32"]
Strategy = Literal["none", "ddp", "zero1", "zero2", "zero2_offload", "zero3", "zero3_offload", "fsdp"]

PRECISION_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp32": 4}
# Optimizer state bytes per trainable parameter. AdamW keeps two fp32 moments (8); bitsandbytes' 8-bit
# variants two 1-byte moments (2); HF's "sgd" has no momentum buffer (0); Adafactor keeps factored second
# moments, a few bytes per row and column of each matrix (well under 1 byte per parameter; 0.5 is a bound).
OPTIMIZER_BYTES: dict[str, float] = {
    "adamw": 8.0, "paged_adamw": 8.0, "adamw_8bit": 2.0, "paged_adamw_8bit": 2.0, "sgd": 0.0,
    "adafactor": 0.5,
}
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MLP_MODULES = frozenset({"gate_proj", "up_proj", "down_proj"})
# Other names users give LoRA targets for the same matrices (fused Phi-3 projections, Mixtral experts).
MODULE_ALIASES: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj"),
    "w1": ("gate_proj",), "w3": ("up_proj",), "w2": ("down_proj",),
}


@dataclass(frozen=True)
class Priors:
    """The rules of thumb, in one place so calibration can replace them."""

    # CUDA context, allocator fragmentation and library workspaces, per GPU.
    framework_overhead_bytes: int = GIB
    # Model FLOPs utilisation per method on one GPU (HF Trainer-class stacks). QLoRA pays for dequantising.
    utilization: dict[str, float] = field(default_factory=lambda: {
        "full": 0.40, "lora": 0.35, "qlora": 0.25, "prompt_tuning": 0.35})
    # GRPO spends most of its time generating, far below peak.
    grpo_utilization_factor: float = 0.4
    # Throughput kept per GPU when training on several (communication), by strategy family.
    scaling_efficiency: dict[str, float] = field(default_factory=lambda: {
        "none": 0.90, "ddp": 0.90, "zero1": 0.90, "zero2": 0.88, "zero3": 0.80, "fsdp": 0.80,
        "zero2_offload": 0.50, "zero3_offload": 0.45})
    multi_node_efficiency: float = 0.90
    # Setup, evaluation and export on top of the training time (the 20-30% competitors quote) ...
    overhead_fraction: float = 0.20
    # ... plus a fixed start: worker claim, dataset fetch, process start ...
    setup_seconds: float = 60.0
    # ... and loading the base weights at this rate.
    load_bytes_per_second: float = 250 * 1024**2


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

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def attention_dim(self) -> int:
        return self.num_attention_heads * self.head_size

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_size

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear module of one layer (one expert's for the MLP)."""
        h, i = self.hidden_size, self.intermediate_size
        return {"q_proj": (h, self.attention_dim), "k_proj": (h, self.kv_dim),
                "v_proj": (h, self.kv_dim), "o_proj": (self.attention_dim, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def module_copies(self, name: str) -> int:
        return max(self.num_experts, 1) if name in MLP_MODULES else 1

    def layer_linear_parameters(self, *, active_only: bool = False) -> int:
        total = 0
        for name, (n_in, n_out) in self.module_shapes().items():
            copies = self.module_copies(name)
            if active_only and name in MLP_MODULES and self.num_experts:
                copies = self.num_experts_per_token
            total += copies * n_in * n_out
        return total

    @property
    def embedding_parameters(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def parameter_count(self) -> int:
        per_layer = self.layer_linear_parameters() + self.norms_per_layer * self.hidden_size
        if self.attention_bias:
            per_layer += self.attention_dim + 2 * self.kv_dim
        if self.num_experts:
            per_layer += self.hidden_size * self.num_experts  # router
        lm_head = 0 if self.tied_embeddings else self.embedding_parameters
        return self.num_layers * per_layer + self.embedding_parameters + lm_head + self.hidden_size

    @property
    def quantizable_parameters(self) -> int:
        """What bitsandbytes quantises: the layers' linear weights (not embeddings, lm_head or norms)."""
        return self.num_layers * self.layer_linear_parameters()

    @property
    def matmul_parameters(self) -> int:
        """Parameters a token multiplies through (active experts only; the lm_head but not the lookup)."""
        return self.num_layers * self.layer_linear_parameters(active_only=True) + self.embedding_parameters


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
        return self.max_seq_length + (self.max_completion_length if self.method == "grpo" else 0)


@dataclass(frozen=True)
class Memory:
    """Bytes on ONE GPU."""

    weights: int
    trainable_parameters: int
    gradients: int
    optimizer_states: int
    activations: int
    logits: int
    framework_overhead: int

    @property
    def total(self) -> int:
        return (self.weights + self.trainable_parameters + self.gradients + self.optimizer_states
                + self.activations + self.logits + self.framework_overhead)


@dataclass(frozen=True)
class Time:
    training_tokens: int
    flops_per_token: float
    utilization: float
    training_seconds: float
    overhead_seconds: float

    @property
    def total_seconds(self) -> float:
        return self.training_seconds + self.overhead_seconds


@dataclass(frozen=True)
class Cost:
    hourly_usd: float
    gpu_count: int
    total_usd: float


@dataclass(frozen=True)
class Fit:
    hardware: Hardware
    gpu_count: int
    memory: Memory
    fits: bool
    reason: str
    time: Time | None
    cost: Cost


# ---- parameters -------------------------------------------------------------------------------------

def lora_targets(arch: Architecture, targets: tuple[str, ...]) -> tuple[set[str], list[str]]:
    """The linear modules a target list names, and the names not recognised."""
    if not targets or "all-linear" in targets:
        return set(LINEAR_MODULES), []  # PEFT's all-linear: every linear of the layers, not lm_head
    chosen: set[str] = set()
    unknown: list[str] = []
    for name in targets:
        if name in LINEAR_MODULES:
            chosen.add(name)
        elif name in MODULE_ALIASES:
            chosen.update(MODULE_ALIASES[name])
        else:
            unknown.append(name)
    return chosen, unknown


def lora_parameters(arch: Architecture, rank: int, targets: tuple[str, ...], use_dora: bool = False) -> int:
    """rank x (in + out) per adapted matrix (A is in x r, B is r x out); DoRA adds a magnitude per output."""
    modules, _ = lora_targets(arch, targets)
    shapes = arch.module_shapes()
    per_layer = 0
    for name in modules:
        n_in, n_out = shapes[name]
        per_layer += arch.module_copies(name) * (rank * (n_in + n_out) + (n_out if use_dora else 0))
    return arch.num_layers * per_layer


def trainable_parameters(arch: Architecture, setup: Setup) -> int:
    if setup.adapter == "full":
        return arch.parameter_count
    if setup.adapter == "prompt_tuning":
        return setup.num_virtual_tokens * arch.hidden_size
    return lora_parameters(arch, setup.lora_rank, setup.lora_targets, setup.use_dora)


def quantized_weight_bytes(arch: Architecture, bits: int, double_quantization: bool) -> int:
    """bitsandbytes storage of the base model: quantised layer linears plus their constants; embeddings,
    lm_head and norms stay in 16-bit.

    4-bit (NF4/FP4) stores one fp32 absmax per 64-weight block (0.5 bit per weight); double quantisation
    stores it as 1 byte plus one fp32 constant per 256 blocks (~0.127 bit). 8-bit (LLM.int8) stores one fp32
    scale per output row.
    """
    quantized = arch.quantizable_parameters
    rest = arch.parameter_count - quantized
    if bits == 8:
        rows = sum(arch.module_copies(n) * out for n, (_, out) in arch.module_shapes().items())
        return quantized + 4 * rows * arch.num_layers + 2 * rest
    blocks = quantized / 64
    constants = blocks * (1 + 4 / 256) if double_quantization else blocks * 4
    return int(quantized / 2 + constants) + 2 * rest


# ---- memory -------------------------------------------------------------------------------------------

def resolve_precision(setup: Setup, hardware: Hardware) -> Precision:
    """As the worker resolves it: bf16 where the hardware has it, else fp16; fp16 needs a GPU."""
    if hardware.is_cpu and setup.precision == "fp16":
        return "fp32"
    if setup.precision:
        return setup.precision
    return "bf16" if hardware.supports_bf16 else "fp16"


def activation_elements_per_token_layer(arch: Architecture, setup: Setup) -> int:
    """Tensors one decoder layer keeps per token for its backward pass, with fused (flash/SDPA) attention,
    so no seq x seq scores: the residual input and norm output of both blocks, q, k, v and the attention
    output, and the gated MLP's gate, up, activation and product (per active expert). LoRA with dropout
    also keeps each adapted module's dropped-out input."""
    h, i = arch.hidden_size, arch.intermediate_size
    experts = arch.num_experts_per_token if arch.num_experts else 1
    elements = 4 * h + 2 * arch.attention_dim + 2 * arch.kv_dim + 4 * i * experts
    if setup.adapter in ("lora", "qlora") and setup.lora_dropout > 0:
        modules, _ = lora_targets(arch, setup.lora_targets)
        shapes = arch.module_shapes()
        elements += sum(shapes[m][0] * (experts if m in MLP_MODULES else 1) for m in modules)
    return elements


def memory_per_gpu(arch: Architecture, setup: Setup, hardware: Hardware,
                   priors: Priors = PRIORS) -> Memory:
    precision = resolve_precision(setup, hardware)
    width = PRECISION_BYTES[precision]
    n = arch.parameter_count
    trainable = trainable_parameters(arch, setup)
    full = setup.adapter == "full"
    mixed = precision != "fp32"

    if setup.adapter == "qlora":
        weights = quantized_weight_bytes(arch, setup.quantization_bits, setup.double_quantization)
    else:
        weights = n * width
    if full and setup.needs_reference_model:
        weights += n * width  # a frozen copy of the starting weights
    if setup.method == "distillation":
        weights += (setup.teacher or arch).parameter_count * 2  # teacher in 16-bit, inference only

    if full:
        # Mixed precision keeps an fp32 master copy next to the 16-bit working weights (DeepSpeed's
        # layout; the worker's fp32-weights + autocast layout costs the same 16 bytes per parameter).
        trainable_bytes = n * 4 if mixed else 0
        gradients = n * width
    else:
        trainable_bytes = trainable * 4  # PEFT keeps adapters in fp32
        gradients = trainable * 4
    optimizer = int(trainable * OPTIMIZER_BYTES.get(setup.optimizer, 8.0))

    world = setup.world_size
    strategy = setup.strategy
    if strategy in ("zero1", "zero2", "zero3", "fsdp"):
        optimizer, trainable_bytes = optimizer // world, trainable_bytes // world
    if strategy in ("zero2_offload", "zero3_offload"):
        optimizer, trainable_bytes = 0, 0  # optimizer step on the CPU
    if strategy in ("zero2", "zero2_offload", "zero3", "zero3_offload", "fsdp"):
        gradients //= world
    if strategy in ("zero3", "zero3_offload", "fsdp"):
        weights //= world

    act_width = 4 if precision == "fp32" else 2
    sequences = setup.batch_size * setup.sequences_per_example
    tokens = sequences * setup.sequence_length
    per_layer = activation_elements_per_token_layer(arch, setup) * act_width
    if setup.gradient_checkpointing:
        # Only each layer's input is kept; one layer's activations are rebuilt at a time in backward.
        activations = tokens * (arch.num_layers * arch.hidden_size * act_width + per_layer)
    else:
        activations = tokens * arch.num_layers * per_layer
    logits = tokens * arch.vocab_size * 4  # fp32 logits for the loss
    if setup.method == "distillation":
        logits += tokens * (setup.teacher or arch).vocab_size * 4

    return Memory(weights=int(weights), trainable_parameters=int(trainable_bytes), gradients=int(gradients),
                  optimizer_states=optimizer, activations=int(activations), logits=int(logits),
                  framework_overhead=priors.framework_overhead_bytes)


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
        total += forward
    if setup.method == "grpo":
        total += forward  # generating the completions
    if setup.method == "distillation":
        teacher = setup.teacher or arch
        total += (2.0 * teacher.matmul_parameters
                  + 2.0 * teacher.num_layers * context_tokens * teacher.attention_dim)
    return total


def utilization(setup: Setup, hardware: Hardware, priors: Priors = PRIORS) -> float:
    value = priors.utilization[setup.adapter]
    if setup.method == "grpo":
        value *= priors.grpo_utilization_factor
    if setup.world_size > 1:
        value *= priors.scaling_efficiency[setup.strategy]
    if setup.node_count > 1:
        value *= priors.multi_node_efficiency
    return value


def estimate_time(arch: Architecture, setup: Setup, hardware: Hardware, tokens: int, context_tokens: int,
                  weights_bytes: int, priors: Priors = PRIORS) -> Time:
    per_token = flops_per_token(arch, setup, context_tokens)
    util = utilization(setup, hardware, priors)
    throughput = hardware.peak_tflops * 1e12 * setup.world_size * util
    training = tokens * per_token / throughput
    overhead = (priors.overhead_fraction * training + priors.setup_seconds
                + weights_bytes / priors.load_bytes_per_second)
    return Time(training_tokens=tokens, flops_per_token=per_token, utilization=util,
                training_seconds=training, overhead_seconds=overhead)


def estimate_cost(hardware: Hardware, setup: Setup, seconds: float | None) -> Cost:
    hours = (seconds or 0.0) / 3600
    return Cost(hourly_usd=hardware.hourly_usd, gpu_count=setup.world_size,
                total_usd=hours * hardware.hourly_usd * setup.world_size)


def evaluate(arch: Architecture, setup: Setup, hardware: Hardware, tokens: int | None,
             context_tokens: int | None = None, priors: Priors = PRIORS) -> Fit:
    """Memory, fit, time (when the token count is known) and cost of `setup` on `hardware`."""
    memory = memory_per_gpu(arch, setup, hardware, priors)
    fits = memory.total <= hardware.memory_bytes
    reason = "" if fits else (
        f"needs {memory.total / GIB:.1f} GiB per GPU but the {hardware.display_name} has "
        f"{hardware.memory_bytes / GIB:.1f} GiB")
    time = None
    if tokens is not None:
        load_bytes = arch.parameter_count * 2
        time = estimate_time(arch, setup, hardware, tokens, context_tokens or setup.sequence_length,
                             load_bytes, priors)
    return Fit(hardware=hardware, gpu_count=setup.world_size, memory=memory, fits=fits, reason=reason,
               time=time, cost=estimate_cost(hardware, setup, time.total_seconds if time else None))


def smallest_fit(arch: Architecture, setup: Setup, hardware: Hardware, tokens: int | None,
                 context_tokens: int | None = None) -> Fit:
    """The fewest GPUs of this type (per node, as allowed) that fit; the largest count when none does."""
    fit: Fit | None = None
    for count in sorted(hardware.allowed_gpu_counts):
        fit = evaluate(arch, replace(setup, gpu_count=count), hardware, tokens, context_tokens)
        if fit.fits:
            return fit
    assert fit is not None, "a hardware option allows at least one GPU count"
    return fit


def cost_key(fit: Fit) -> tuple[float, int, int]:
    """Cheapest first: the total cost when known, else the hourly rate of the whole configuration."""
    price = fit.cost.total_usd if fit.time else fit.cost.hourly_usd * fit.gpu_count
    return (price, fit.gpu_count, fit.hardware.memory_bytes)
