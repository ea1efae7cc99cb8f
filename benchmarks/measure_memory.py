"""How right the estimator's memory figures are, against what PyTorch really allocates.

    .venv/bin/python benchmarks/measure_memory.py            # CPU: states per term, and peaks
    .venv/bin/python benchmarks/measure_memory.py --cuda     # + peak GPU memory over a grid (needs a GPU)
    python benchmarks/measure_memory.py --cuda-only --json OUT.json   # the GPU grid alone (~2 min, H200)
    .venv/bin/python benchmarks/measure_memory.py --cuda-only --device cpu --tiny   # its CPU dry run

Real architectures from the catalog are built with random weights from configs made of the catalog's
figures (no download), scaled down on CPU (2 layers, narrower, a smaller vocabulary) so they run in seconds.

1. States (CPU): after one optimizer step, the storage bytes of parameters (and bitsandbytes' quantisation
   constants), gradients and optimizer states, against `memory_per_gpu`'s weights + trainable copies,
   gradients and optimizer states, per configuration.
2. Activations (CPU): the bytes a layer keeps per token for backward (saved-tensor hooks, bf16) against
   `activation_bytes_per_token_layer`, per architecture, full and LoRA.
3. Peak (CPU): the parameters and optimizer states plus the peak of every tensor storage allocated during
   a training step (tracked by a TorchDispatchMode until Python frees it), against the predicted peak less
   the framework overhead.
4. Peak (CUDA, --cuda): torch.cuda.max_memory_allocated over method x sequence length x batch on a
   0.5B-1.5B architecture at full size, against the same prediction; the p90 of the error, and whether any
   run needed more than the prediction (a job the estimator would have admitted and that then failed).
   The peak of the second training step (optimizer states exist), less what was allocated before the
   model was built (the cuBLAS workspaces a warm-up step left), with the catalog entry of the device
   (H200: "NVIDIA H200 141GB"). ``--device cpu --tiny`` runs the same grid code on a scaled-down model
   on the CPU, tracked as in 3., predicted for the GPU: a check that the code runs, not a measurement.

The training step is the one the worker's Trainer takes: autocast to the compute dtype when the parameters
are fp32, loss on shifted labels, backward, gradient clipping, optimizer step, gradients set to None.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.estimation.catalog import Catalog
from services.estimation.estimator import (
    PRIORS,
    Architecture,
    Hardware,
    Setup,
    activation_bytes_per_token_layer,
    memory_per_gpu,
)

warnings.filterwarnings("ignore")
CATALOG = Catalog.load()
CPU = CATALOG.hardware("cpu")
A100 = CATALOG.hardware("nvidia-a100-80gb")
assert CPU is not None and A100 is not None


# ---- architectures ---------------------------------------------------------------------------------------


def catalog_arch(model_id: str) -> Architecture:
    model = CATALOG.model(model_id)
    assert model is not None, model_id
    return model.architecture


def scaled(arch: Architecture, layers: int = 2, width: int = 4, vocab: int = 16) -> Architecture:
    """The same shape of model, smaller: `layers` layers, 1/width of the heads, half the head width
    (hidden follows heads x head width unless the model sets head_dim apart), 1/vocab of the vocabulary."""
    heads = max(2, arch.num_attention_heads // width)
    group = max(1, arch.num_attention_heads // arch.num_key_value_heads)
    kv_heads = max(1, heads // group)
    heads = kv_heads * max(1, heads // kv_heads)
    head_dim = max(16, arch.head_size // 2)
    hidden = heads * head_dim if not arch.head_dim else max(64, arch.hidden_size // (2 * width))
    intermediate = max(64, arch.intermediate_size * hidden // arch.hidden_size // 64 * 64)
    return replace(
        arch,
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim if arch.head_dim else 0,
        intermediate_size=intermediate,
        vocab_size=max(512, arch.vocab_size // vocab),
        vision_parameters=0,
    )


def hf_config(arch: Architecture, family: str) -> Any:
    """A transformers config with the architecture's figures, in the model class the family uses."""
    import transformers

    common: dict[str, Any] = dict(
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_attention_heads,
        tie_word_embeddings=arch.tied_embeddings,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family == "falcon":
        return transformers.FalconConfig(
            vocab_size=arch.vocab_size,
            hidden_size=arch.hidden_size,
            num_hidden_layers=arch.num_layers,
            num_attention_heads=arch.num_attention_heads,
            multi_query=arch.num_key_value_heads == 1,
            parallel_attn=True,
            bias=False,
            new_decoder_architecture=False,
            ffn_hidden_size=arch.intermediate_size,
            tie_word_embeddings=arch.tied_embeddings,
        )
    common |= dict(
        num_key_value_heads=arch.num_key_value_heads,
        intermediate_size=arch.intermediate_size,
        head_dim=arch.head_size,
    )
    if arch.num_experts:
        return transformers.MixtralConfig(
            **common, num_local_experts=arch.num_experts, num_experts_per_tok=arch.num_experts_per_token
        )
    if family == "gemma":
        if arch.norms_per_layer == 4:
            return transformers.Gemma2Config(**common)
        return transformers.GemmaConfig(**common)
    if family == "phi":
        return transformers.Phi3Config(**common)
    if arch.attention_bias:
        return transformers.Qwen2Config(**common)
    return transformers.LlamaConfig(**common)


def build(
    arch: Architecture, family: str, dtype: torch.dtype, device: str, quantize: bool = False
) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = hf_config(arch, family)
    if not quantize:
        with torch.device(device):  # random init where the model trains: seconds, not a minute, at 1B
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    # bitsandbytes quantises at load time, so the random model goes through a folder, like a hub model;
    # one folder per architecture and dtype, kept for the run.
    from transformers import BitsAndBytesConfig

    key = (repr(arch), family, str(dtype))
    if key not in SAVED:
        SAVED[key] = tempfile.mkdtemp(prefix="measure-memory-")
        with torch.device(device):
            AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(SAVED[key])
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    return AutoModelForCausalLM.from_pretrained(
        SAVED[key], quantization_config=quant, dtype=dtype, device_map={"": device}
    )


# Saved random models for quantised loading, by (architecture, family, dtype); removed at exit.
SAVED: dict[tuple[str, str, str], str] = {}


# ---- one configuration --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    model_id: str
    setup: Setup
    hardware: Hardware
    # What the parameters are stored in (fp32 on a CPU worker and for full fine-tuning; 16-bit adapters'
    # base on a GPU).
    dtype: torch.dtype
    scale: bool = True

    @property
    def label(self) -> str:
        s = self.setup
        extras = [
            s.adapter,
            s.optimizer,
            f"seq {s.max_seq_length}",
            f"batch {s.batch_size}",
            "ckpt" if s.gradient_checkpointing else "",
            str(self.dtype).removeprefix("torch."),
        ]
        return f"{self.model_id.split('/')[-1]:<24} " + " ".join(e for e in extras if e)


def architecture_of(case: Case) -> Architecture:
    arch = catalog_arch(case.model_id)
    return scaled(arch) if case.scale else arch


def prepare(case: Case, device: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from peft import LoraConfig, PromptTuningConfig, get_peft_model, prepare_model_for_kbit_training

    arch = architecture_of(case)
    family = CATALOG.model(case.model_id).family  # type: ignore[union-attr]
    setup = case.setup
    compute = torch.float32 if setup.precision == "fp32" else torch.bfloat16
    model = build(
        arch,
        family,
        compute if setup.adapter == "qlora" else case.dtype,
        device,
        quantize=setup.adapter == "qlora",
    )
    if setup.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if setup.adapter == "qlora":
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=setup.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    if setup.adapter in ("lora", "qlora"):
        # PEFT adapts a mixture's fused expert tensors only without dropout.
        dropout = 0.0 if arch.num_experts else setup.lora_dropout
        model = get_peft_model(
            model,
            LoraConfig(
                r=setup.lora_rank,
                lora_alpha=2 * setup.lora_rank,
                lora_dropout=dropout,
                target_modules="all-linear",
                task_type="CAUSAL_LM",
            ),
        )
    elif setup.adapter == "prompt_tuning":
        model = get_peft_model(
            model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=setup.num_virtual_tokens)
        )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if setup.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(params, lr=1e-4)
    elif setup.optimizer in ("adamw_8bit", "paged_adamw_8bit", "paged_adamw"):
        import bitsandbytes as bnb

        kinds = {
            "adamw_8bit": bnb.optim.AdamW8bit,
            "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
            "paged_adamw": bnb.optim.PagedAdamW,
        }
        optimizer = kinds[setup.optimizer](params, lr=1e-4)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-4)  # what the Trainer builds for "adamw_torch"
    return model, optimizer


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, case: Case, device: str) -> None:
    setup = case.setup
    arch = architecture_of(case)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, arch.vocab_size, (setup.batch_size, setup.max_seq_length), generator=generator)
    ids = ids.to(device)
    autocast: AbstractContextManager[Any] = nullcontext()
    mixed = setup.precision != "fp32"
    if mixed and case.dtype == torch.float32:
        autocast = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    with autocast:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()


def storage_bytes(tensors: Iterator[torch.Tensor]) -> int:
    seen: set[int] = set()
    total = 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def quant_state_tensors(model: torch.nn.Module) -> Iterator[torch.Tensor]:
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        while state is not None:
            for name in ("absmax", "code", "offset"):
                value = getattr(state, name, None)
                if isinstance(value, torch.Tensor):
                    yield value
            state = getattr(state, "state2", None)


def measure_states(case: Case) -> dict[str, tuple[int, int]]:
    """(predicted, measured) bytes of weights, gradients and optimizer states after one step."""
    model, optimizer = prepare(case, "cpu")
    train_step(model, optimizer, case, "cpu")
    params = storage_bytes(p for p in model.parameters()) + storage_bytes(quant_state_tensors(model))
    grads = storage_bytes(p.grad for p in model.parameters() if p.grad is not None)
    states = storage_bytes(
        v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0
    )
    memory = memory_per_gpu(architecture_of(case), case.setup, case.hardware)
    return {
        "weights": (memory.weights + memory.trainable_parameters, params),
        "gradients": (memory.gradients, grads),
        "optimizer": (memory.optimizer_states, states),
    }


def measure_peak(case: Case, device: str) -> tuple[int, int, int]:
    """(predicted allocations, predicted allocations with the allocator slack, measured) peak bytes of one
    training step after a first one (optimizer states exist)."""
    cuda = device.startswith("cuda")
    before = 0
    if cuda:  # whatever an earlier configuration left (and the cuBLAS workspaces) is not this one's
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
    model, optimizer = prepare(case, device)
    train_step(model, optimizer, case, device)
    optimizer.zero_grad(set_to_none=True)
    memory = memory_per_gpu(architecture_of(case), case.setup, case.hardware)
    # The admission bound without the fixed CUDA-context part (which a scaled-down model would dwarf):
    # what the allocations may reach before the estimate is exceeded.
    predicted, total = memory.measured_part, memory.total - PRIORS.framework_overhead_bytes
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        train_step(model, optimizer, case, device)
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated() - before
        del model, optimizer
        gc.collect()
        torch.cuda.empty_cache()
        return predicted, total, measured
    existing = [
        *model.parameters(),
        *model.buffers(),
        *quant_state_tensors(model),
        *(v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)),
    ]
    baseline = storage_bytes(iter(existing))
    with PeakTracker({t.untyped_storage().data_ptr() for t in existing}) as tracker:
        train_step(model, optimizer, case, device)
    return predicted, total, baseline + tracker.peak


class PeakTracker(TorchDispatchMode):
    """Bytes of the tensor storages created while it is active, and their peak: torch.cuda's allocator
    statistics for a CPU. Every op's output storage is counted once, until Python frees it."""

    def __init__(self, existing: set[int]) -> None:
        super().__init__()
        # Storages allocated before (parameters, optimizer states): in-place updates of them are no
        # allocation.
        self.existing = existing
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _freed(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key in self.live or key in self.existing or storage.nbytes() == 0:
                continue
            self.live[key] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._freed, key)
        return out


def measure_activations(model_id: str, adapter: str, sequence: int = 128) -> tuple[int, float]:
    """(predicted, measured) bytes one layer keeps per token for backward: what a 2-layer model saves
    (saved-tensor hooks, parameters excluded) less a 1-layer one, per token."""
    from peft import LoraConfig, get_peft_model

    arch = scaled(catalog_arch(model_id))
    family = CATALOG.model(model_id).family  # type: ignore[union-attr]
    setup = Setup(adapter=adapter, max_seq_length=sequence, lora_dropout=0.0 if arch.num_experts else 0.05)

    def saved(layers: int) -> int:
        model = build(replace(arch, num_layers=layers), family, torch.bfloat16, "cpu")
        if adapter == "lora":
            config = LoraConfig(r=16, target_modules="all-linear", lora_dropout=setup.lora_dropout)
            model = get_peft_model(model, config)
        model.train()
        ids = torch.randint(0, arch.vocab_size, (2, sequence), generator=torch.Generator().manual_seed(1))
        storages: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(input_ids=ids, labels=ids)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        return sum(size for key, size in storages.items() if key not in params)

    measured = (saved(2) - saved(1)) / (2 * sequence)
    predicted = activation_bytes_per_token_layer(arch, setup, "bf16", False)
    if adapter == "lora" and arch.num_experts:  # each layer's materialised expert delta, per token here
        predicted += 2 * arch.num_experts * 3 * arch.hidden_size * arch.intermediate_size // (2 * sequence)
    return predicted, measured


# ---- grids --------------------------------------------------------------------------------------------

STATE_MODELS = (
    "meta-llama/Llama-3.1-8B",
    "Qwen/Qwen2.5-7B",
    "mistralai/Mixtral-8x7B-v0.1",
    "google/gemma-2-9b",
    "microsoft/Phi-3.5-mini-instruct",
    "tiiuae/falcon-7b",
)


def state_cases() -> list[Case]:
    cases: list[Case] = []
    for model_id in STATE_MODELS:
        cases += [
            Case(model_id, Setup(adapter="full", optimizer="adamw", precision="bf16"), CPU, torch.float32),
            Case(model_id, Setup(adapter="lora", optimizer="adamw", precision="bf16"), CPU, torch.float32),
            Case(model_id, Setup(adapter="lora", optimizer="adamw", precision="bf16"), A100, torch.bfloat16),
        ]
    llama = STATE_MODELS[0]
    cases += [
        Case(llama, Setup(adapter="full", optimizer="sgd", precision="bf16"), CPU, torch.float32),
        Case(llama, Setup(adapter="full", optimizer="adamw_8bit", precision="bf16"), CPU, torch.float32),
        Case(llama, Setup(adapter="prompt_tuning", optimizer="adamw", precision="bf16"), CPU, torch.float32),
        Case(llama, Setup(adapter="qlora", optimizer="adamw", precision="bf16"), A100, torch.bfloat16),
    ]
    return [replace(c, setup=replace(c.setup, max_seq_length=32, batch_size=1)) for c in cases]


def peak_cases(
    model_id: str, hardware: Hardware, lengths: tuple[int, ...], batches: tuple[int, ...], scale: bool
) -> list[Case]:
    cases: list[Case] = []
    gpu = not hardware.is_cpu
    for adapter in ("lora", "full", "qlora", "prompt_tuning"):  # the slow QLoRA loads after the others
        if adapter == "qlora" and not gpu:
            continue  # bitsandbytes' CPU kernels are for correctness, not representative allocations
        for length in lengths:
            for batch in batches:
                for ckpt in (False, True):
                    dtype = torch.bfloat16 if gpu and adapter != "full" else torch.float32
                    setup = Setup(
                        adapter=adapter,
                        precision="bf16",
                        max_seq_length=length,
                        batch_size=batch,
                        gradient_checkpointing=ckpt,
                    )
                    cases.append(Case(model_id, setup, hardware, dtype, scale=scale))
    return cases


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def report_peaks(
    title: str,
    cases: list[Case],
    run: Callable[[Case], tuple[int, int, int]],
    deadline: float | None = None,
) -> dict[str, Any]:
    """Runs and prints each case (none after ``deadline``, a time.monotonic()); returns the rows and the
    summary (for --json)."""
    print(f"\n{title}", flush=True)
    rows: list[dict[str, Any]] = []
    print(f"{'configuration':<70} {'predicted':>10} {'measured':>10} {'error':>8}")
    errors: list[float] = []
    under: list[str] = []
    overflow: list[str] = []  # the estimate with its allocator slack below the measured peak
    for case in cases:
        if deadline is not None and time.monotonic() > deadline:
            print(f"{case.label:<70} skipped: past the time budget (--budget-s)", flush=True)
            rows.append({"configuration": case.label, "skipped": "past the time budget (--budget-s)"})
            continue
        try:
            predicted, total, measured = run(case)
        except Exception as exc:  # one configuration that cannot run here must not hide the others
            print(f"{case.label:<70} skipped: {type(exc).__name__}: {str(exc)[:60]}", flush=True)
            rows.append({"configuration": case.label, "skipped": f"{type(exc).__name__}: {exc}"[:300]})
            if torch.cuda.is_available():
                gc.collect()
                torch.cuda.empty_cache()
            continue
        error = (predicted - measured) / measured
        errors.append(error)
        if predicted < measured:
            under.append(case.label)
        if total < measured:
            overflow.append(case.label)
        print(
            f"{case.label:<70} {predicted / 2**20:>8.1f}Mi {measured / 2**20:>8.1f}Mi {error:>+8.1%}",
            flush=True,
        )
        rows.append(
            {
                "configuration": case.label,
                "predicted": predicted,
                "with_slack": total,
                "measured": measured,
                "error": error,
            }
        )
    summary: dict[str, Any] = {"title": title, "rows": rows}
    if errors:
        absolute = [abs(e) for e in errors]
        summary.update(
            runs=len(errors),
            p50=statistics.median(absolute),
            p90=percentile(absolute, 0.9),
            under=len(under),
            beyond_slack=len(overflow),
        )
        print(
            f"runs {len(errors)}: p50 |error| {statistics.median(absolute):.1%}, "
            f"p90 |error| {percentile(absolute, 0.9):.1%}, max over-estimate {max(errors):+.1%}, "
            f"under-estimated {len(under)} (largest {min(errors):+.1%}); beyond the estimate with its "
            f"allocator slack (admitted, then out of memory, CUDA context not even counted): {len(overflow)}"
        )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--cuda", action="store_true", help="also measure peak GPU memory over a grid")
    parser.add_argument("--cuda-model", default="Qwen/Qwen2.5-0.5B", help="architecture for the GPU grid")
    parser.add_argument("--cuda-only", action="store_true", help="the GPU grid (4.) alone, not 1.-3.")
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda", help="4. on the CPU: a dry run (with --tiny)"
    )
    parser.add_argument("--tiny", action="store_true", help="4. on a scaled-down model, short sequences")
    parser.add_argument("--lengths", default="512,2048", help="4.: sequence lengths (comma-separated)")
    parser.add_argument("--batches", default="1,4", help="4.: batch sizes (comma-separated)")
    parser.add_argument("--json", default="", help="write 4.'s rows and p50/p90 here")
    parser.add_argument("--budget-s", type=float, default=0.0, help="4.: start no configuration after this")
    args = parser.parse_args()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.monotonic()
    try:
        if not args.cuda_only:
            cpu_sections()
        if args.cuda or args.cuda_only:
            summary = cuda_section(args)
            if args.json:
                Path(args.json).write_text(json.dumps(summary, indent=1, default=str))
                print(f"results: {args.json}")
    finally:
        for folder in SAVED.values():
            shutil.rmtree(folder, ignore_errors=True)
    print(f"\n{time.monotonic() - started:.0f} s")


def cuda_section(args: argparse.Namespace) -> dict[str, Any]:
    """4.: the estimator's predicted peak against torch.cuda.max_memory_allocated over the grid."""
    deadline = time.monotonic() + args.budget_s if args.budget_s else None
    lengths = tuple(int(n) for n in args.lengths.split(",") if n)
    batches = tuple(int(n) for n in args.batches.split(",") if n)
    if args.device == "cpu":
        # The code of 4. on a CPU: the GPU's catalog entry for the prediction, a scaled-down model, the
        # tracked peak of 3. for the measurement. Checks that it runs; the figures mean nothing.
        gpu = CATALOG.hardware("nvidia-h200") or A100
        if args.tiny:
            lengths, batches = (32,), (1, 2)
        summary = report_peaks(
            f"4. (CPU dry run: tracked tensor storages, not GPU memory) {args.cuda_model} scaled down, "
            f"predicted for {gpu.display_name}",
            peak_cases(args.cuda_model, gpu, lengths, batches, scale=True),
            lambda case: measure_peak(case, "cpu"),
            deadline,
        )
        return {"device": "cpu (dry run)", "hardware": gpu.display_name, **summary}
    if not torch.cuda.is_available():
        sys.exit("--cuda: no CUDA device (--device cpu --tiny runs the same code on the CPU)")
    # The catalog's entry for this card: its name, then the memory size closest to the device's.
    name, size = torch.cuda.get_device_name().lower(), torch.cuda.mem_get_info()[1]
    named = [h for h in CATALOG.gpus() if h.display_name.split()[1].lower() in name] or [A100]
    gpu = min(named, key=lambda h: abs(h.memory_bytes - size))
    # A warm-up forward and backward, so the cuBLAS workspaces exist before the first measurement.
    warm = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    (warm @ warm).float().sum().backward()
    del warm
    summary = report_peaks(
        f"4. peak GPU memory (torch.cuda.max_memory_allocated), {args.cuda_model} at full size, "
        f"{torch.cuda.get_device_name()} as {gpu.display_name}",
        peak_cases(args.cuda_model, gpu, lengths, batches, scale=args.tiny),
        lambda case: measure_peak(case, "cuda"),
        deadline,
    )
    return {"device": torch.cuda.get_device_name(), "hardware": gpu.display_name, **summary}


def cpu_sections() -> None:
    """1.-3.: states, activations and peaks on the CPU."""
    print("1. states after one optimizer step, CPU, scaled-down architectures (bytes predicted vs allocated)")
    print(f"{'configuration':<70} {'weights':>9} {'grads':>9} {'optim':>9}")
    for case in state_cases():
        try:
            result = measure_states(case)
        except Exception as exc:
            print(f"{case.label:<70} skipped: {type(exc).__name__}: {str(exc)[:60]}")
            continue
        cells = []
        for predicted, measured in result.values():
            cells.append(
                f"{(predicted - measured) / measured:>+9.1%}"
                if measured
                else f"{'0 = 0' if predicted == 0 else f'{predicted}/0':>9}"
            )
        print(f"{case.label:<70} {' '.join(cells)}")

    print(
        "\n2. activations kept for backward, bytes per token and layer (saved-tensor hooks, bf16, 2 x 128 "
        "tokens)"
    )
    for model_id in STATE_MODELS:
        for adapter in ("full", "lora"):
            try:
                predicted, measured = measure_activations(model_id, adapter)
            except Exception as exc:
                print(f"{model_id:<40} {adapter:<5} skipped: {type(exc).__name__}: {str(exc)[:60]}")
                continue
            error = (predicted - measured) / measured
            row = f"{model_id:<40} {adapter:<5} predicted {predicted:>7} measured {measured:>9.0f}"
            print(f"{row} {error:>+7.1%}")

    report_peaks(
        "3. peak of a training step, CPU (tensor storages tracked), scaled-down Llama-3.1-8B",
        peak_cases("meta-llama/Llama-3.1-8B", CPU, (64, 256), (1, 4), scale=True),
        lambda case: measure_peak(case, "cpu"),
    )

    others = [
        Case(
            model_id,
            Setup(
                adapter=adapter,
                precision="bf16",
                max_seq_length=256,
                batch_size=4,
                gradient_checkpointing=ckpt,
            ),
            CPU,
            torch.float32,
        )
        for model_id in ("google/gemma-2-9b", "Qwen/Qwen2.5-7B", "tiiuae/falcon-7b")
        for adapter in ("lora", "full")
        for ckpt in (False, True)
    ]
    report_peaks(
        "3b. the same for other families, 256 tokens x 4", others, lambda case: measure_peak(case, "cpu")
    )


if __name__ == "__main__":
    main()
