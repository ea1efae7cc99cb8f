"""What to change in a spec so it fits the hardware it asked for: each candidate is a real re-estimate,
and only the ones that fit are offered, least invasive first."""

from __future__ import annotations

from dataclasses import replace

from services.estimation.estimator import GIB, Architecture, Hardware, Setup, memory_per_gpu

MAX_SUGGESTIONS = 4


def _candidates(setup: Setup, hardware: Hardware) -> list[list[tuple[str, Setup]]]:
    """Groups of alternatives; within a group the first that fits is the one offered (the largest batch,
    the longest sequence, the fewest GPUs)."""
    out: list[list[tuple[str, Setup]]] = []
    ckpt = not setup.gradient_checkpointing
    if ckpt:
        out.append(
            [
                (
                    "Enable gradient checkpointing (spec.hyperparameters.gradient_checkpointing = true)",
                    replace(setup, gradient_checkpointing=True),
                )
            ]
        )
    batches: list[tuple[str, Setup]] = []
    batch = setup.batch_size
    while batch > 1:
        batch //= 2
        steps = setup.gradient_accumulation_steps * (setup.batch_size // batch)
        batches.append(
            (
                f"Lower spec.hyperparameters.batch_size to {batch} and raise "
                f"gradient_accumulation_steps to {steps} (the same effective batch)",
                replace(setup, batch_size=batch, gradient_accumulation_steps=steps),
            )
        )
    out.append(batches)
    if ckpt:
        out.append(
            [
                (
                    f"Enable gradient checkpointing and {text[0].lower()}{text[1:]}",
                    replace(candidate, gradient_checkpointing=True),
                )
                for text, candidate in batches
            ]
        )
    if setup.adapter == "full" and setup.optimizer in ("adamw", "paged_adamw"):
        out.append(
            [
                (
                    "Use an 8-bit optimizer (spec.hyperparameters.optimizer = OPTIMIZER_ADAMW_8BIT)",
                    replace(setup, optimizer="adamw_8bit"),
                )
            ]
        )
    if setup.adapter == "full":
        out.append(
            [
                (
                    "Train a LoRA adapter instead of all weights (spec.adapter = ADAPTER_TYPE_LORA)",
                    replace(setup, adapter="lora"),
                )
            ]
        )
    if setup.adapter in ("lora", "full"):
        qlora = replace(setup, adapter="qlora", quantization_bits=4)
        out.append([("Train with QLoRA: a 4-bit base model (spec.adapter = ADAPTER_TYPE_QLORA)", qlora)])
        if ckpt:
            out.append(
                [
                    (
                        "Train with QLoRA and enable gradient checkpointing",
                        replace(qlora, gradient_checkpointing=True),
                    )
                ]
            )
        out.append(
            [
                (
                    f"Train with QLoRA, gradient checkpointing and {text[0].lower()}{text[1:]}",
                    replace(candidate, adapter="qlora", quantization_bits=4, gradient_checkpointing=True),
                )
                for text, candidate in batches
            ]
        )
    lengths: list[tuple[str, Setup]] = []
    length = setup.max_seq_length
    while length > 256:
        length //= 2
        lengths.append(
            (
                f"Lower spec.hyperparameters.max_seq_length to {length} (longer examples are truncated)",
                replace(setup, max_seq_length=length),
            )
        )
    out.append(lengths)
    if setup.strategy not in ("zero3", "zero3_offload", "fsdp") and setup.adapter != "qlora":
        out.append(
            [
                (
                    f"Shard the model with ZeRO-3 across {count} GPUs (spec.hardware.strategy = "
                    f"DISTRIBUTED_STRATEGY_ZERO3, gpu_count = {count})",
                    replace(setup, strategy="zero3", gpu_count=count),
                )
                for count in sorted(c for c in hardware.allowed_gpu_counts if c > 1)
            ]
        )
    return out


def suggestions(arch: Architecture, setup: Setup, hardware: Hardware) -> list[str]:
    """Up to four one-change (or one well-known pair) fixes, each with the memory it would need."""
    found: list[str] = []
    for group in _candidates(setup, hardware):
        for text, candidate in group:
            total = memory_per_gpu(arch, candidate, hardware).total
            if total <= hardware.memory_bytes:
                found.append(f"{text}: needs ~{total / GIB:.1f} GiB per GPU.")
                break
        if len(found) == MAX_SUGGESTIONS:
            break
    return found
