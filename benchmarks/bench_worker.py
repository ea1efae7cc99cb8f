"""Worker vs plain TRL: tokens per second of the same LoRA SFT run, with packing off and on.

    .venv/bin/python benchmarks/bench_worker.py                 # 3 interleaved repeats, 40 steps each
    .venv/bin/python benchmarks/bench_worker.py --steps 8 --repeats 2 --max-length 128   # a busy 2-core box
    .venv/bin/python benchmarks/bench_worker.py --padding-free   # + plain TRL padding_free=True, no packing

Builds a ~11M-parameter Llama-architecture chat model locally (the tiny model's builder, wider and deeper)
and a synthetic chat dataset, then trains it the same way twice per repeat, each in a fresh process:

- **worker**: ``python -m trainer_worker.train --config RUN.json``, exactly what the agent starts (events
  file, metrics and system sampling, the NaN watchdog, checkpoint staging, the worker's hyperparameter
  mapping);
- **plain TRL**: this file's ``plain`` sub-command, a straight ``SFTTrainer`` script with the same model,
  data, LoRA settings and hyperparameters, written out in full: SFTConfig's defaults are not the job spec's
  (TRL turns activation checkpointing on, ~1.5x slower here; transformers picks the fused AdamW), so the
  script sets what the worker sets. Each mode's first repeat diffs the TrainingArguments both runs saved
  with their checkpoint and prints any setting that differs ("none" when the comparison is fair).
  ``--plain-override KEY=JSON`` changes one for the plain script only, e.g. to reproduce an unfair run.

Throughput is training tokens (non-padding) over the Trainer's ``train_runtime``, as both report it, so
process start-up and model loading are left out. Runs alternate worker/plain and the figures are medians:
the machines are shared and noisy, so only the side-by-side ratio means much.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The shared settings; the worker gets them as a job spec, the plain script as SFTConfig/LoraConfig.
LEARNING_RATE = 2e-4
SEED = 42
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}
MODEL = {"hidden_size": 384, "num_layers": 6, "num_heads": 6, "num_kv_heads": 2, "intermediate_size": 1024}


def build_assets(root: Path, rows: int, varied: int = 0) -> tuple[Path, Path]:
    """The model and the chat rows; with ``varied`` > 1 each answer is repeated 1..varied times (seeded),
    so rows differ in length the way real data does and padded batches carry real padding."""
    import random

    from trainer_worker.tiny import build_tiny_chat_model, write_synthetic_chat_dataset

    model = build_tiny_chat_model(root / "model", **MODEL)
    data = write_synthetic_chat_dataset(root / "train.jsonl", rows)
    if varied > 1:
        rng = random.Random(SEED)
        lines = []
        for line in data.read_text().splitlines():
            row = json.loads(line)
            answer = row["messages"][-1]
            answer["content"] = " ".join([answer["content"]] * rng.randint(1, varied))
            lines.append(json.dumps(row))
        data.write_text("\n".join(lines) + "\n")
    return model, data


def bf16_on_this_machine() -> bool:
    """The worker's CPU default (job.proto): bf16 where the CPU has it, else fp32. The plain run matches."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def run_worker(model: Path, data: Path, work: Path, shape: dict[str, Any]) -> dict[str, float]:
    from trainer_worker.run_config import RunConfig

    spec = {
        "method": "TRAINING_METHOD_SFT",
        "lora": {"rank": LORA["r"], "alpha": LORA["lora_alpha"], "dropout": LORA["lora_dropout"]},
        "hyperparameters": {
            "max_steps": shape["steps"],
            "batch_size": shape["batch_size"],
            "learning_rate": LEARNING_RATE,
            "max_seq_length": shape["max_length"],
            "packing": shape["packing"],
            "seed": SEED,
            "logging_steps": 10,
            "save_steps": shape["steps"] * 10,  # one checkpoint, at the end; the plain script does the same
        },
    }
    cfg = RunConfig(
        job_id="bench",
        spec=spec,
        model_path=str(model),
        train_file=data,
        output_dir=work / "out",
        events_file=work / "events.jsonl",
    )
    config = cfg.dump(work / "RUN.json")
    _run([sys.executable, "-m", "trainer_worker.train", "--config", str(config)], work)
    events = [json.loads(line) for line in cfg.events_file.read_text().splitlines()]
    (result,) = [e for e in events if e["type"] == "result"]
    return result["final_metrics"]


def run_plain(model: Path, data: Path, work: Path, shape: dict[str, Any]) -> dict[str, float]:
    args = json.dumps({"model": str(model), "data": str(data), "work": str(work), **shape})
    _run([sys.executable, __file__, "plain", args], work)
    return json.loads((work / "metrics.json").read_text())


def plain_trl(options: dict[str, Any]) -> None:
    """A plain TRL script with the worker's settings (what a user would write by hand)."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(options["model"])
    model = AutoModelForCausalLM.from_pretrained(options["model"], dtype=torch.float32)
    dataset = load_dataset("json", data_files=options["data"], split="train")
    settings: dict[str, Any] = {
        "output_dir": str(Path(options["work"]) / "out"),
        "max_steps": options["steps"],
        "per_device_train_batch_size": options["batch_size"],
        "learning_rate": LEARNING_RATE,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.03,
        "weight_decay": 0.01,
        "bf16": bf16_on_this_machine(),
        "use_cpu": not torch.cuda.is_available(),
        # SFTConfig's own defaults differ from the job spec's: TRL turns activation checkpointing ON and
        # transformers picks the fused AdamW. The worker maps gradient_checkpointing=false and OPTIMIZER_ADAMW
        # to these, and a user writing the same job by hand must too, or the "same settings" are not the same.
        "activation_checkpointing": False,
        "optim": "adamw_torch",
        "packing": options["packing"],
        "padding_free": options.get("padding_free", False),
        "max_length": options["max_length"],
        "assistant_only_loss": True,
        "seed": SEED,
        "logging_steps": 10,
        "logging_first_step": True,
        "logging_nan_inf_filter": False,
        "save_strategy": "steps",  # the worker's cadence: one checkpoint, at the end
        "save_steps": options["steps"] * 10,
        "save_total_limit": 2,
        "report_to": "none",
        "disable_tqdm": True,
        "include_num_input_tokens_seen": "non_padding",
    }
    if settings["padding_free"] and not settings["packing"]:
        settings["max_length"] = None  # TRL: padding-free without packing does not truncate; rows must fit
    config = SFTConfig(**{**settings, **options.get("overrides", {})})
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA),
    )
    metrics = trainer.train().metrics
    metrics["num_input_tokens_seen"] = trainer.state.num_input_tokens_seen
    metrics["threads"] = torch.get_num_threads()
    (Path(options["work"]) / "metrics.json").write_text(json.dumps(metrics))


def _run(command: list[str], work: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    with (work / "run.log").open("wb") as log:
        done = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"{command[:4]} failed; see {work / 'run.log'}")


def tokens_per_second(metrics: dict[str, float]) -> float:
    return float(metrics["num_input_tokens_seen"]) / float(metrics["train_runtime"])


# TrainingArguments fields that name the run rather than set how it trains.
NOT_SETTINGS = {"output_dir", "logging_dir", "run_name", "hub_model_id"}


def used_settings(work: Path) -> dict[str, Any]:
    """The TrainingArguments/SFTConfig a run really trained with, from its checkpoint's training_args.bin."""
    import torch

    saved = next(work.rglob("checkpoint-*/training_args.bin"))
    # Our own file, written a moment ago by a run of this benchmark; it is a pickle of the config object.
    return torch.load(saved, weights_only=False).to_dict()


def differing_settings(worker: Path, plain: Path) -> list[str]:
    """'key: worker value | plain value' for every setting that differs between the two runs."""
    a, b = used_settings(worker), used_settings(plain)
    keys = sorted((set(a) | set(b)) - NOT_SETTINGS)
    return [f"{k}: {a.get(k)!r} | {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512, help="max_seq_length, and the packed length")
    parser.add_argument(
        "--varied-lengths",
        type=int,
        default=0,
        metavar="N",
        help="repeat each answer 1..N times, so rows vary in length (padding to remove)",
    )
    parser.add_argument(
        "--padding-free",
        action="store_true",
        help="also time plain TRL with padding_free=True and no packing (the worker has no such setting)",
    )
    parser.add_argument(
        "--plain-override",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help='an SFTConfig setting for the plain script only, e.g. optim="adamw_torch_fused" (repeatable)',
    )
    args = parser.parse_args()
    overrides = {k: json.loads(v) for k, v in (o.split("=", 1) for o in args.plain_override)}

    with tempfile.TemporaryDirectory(prefix="bench-worker-") as tmp:
        root = Path(tmp)
        model, data = build_assets(root, args.rows, args.varied_lengths)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model)
        print(
            f"model: Llama, hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
            f"{_parameters(model) / 1e6:.1f}M parameters; data: {args.rows} chat rows"
            + (f" (answers repeated 1-{args.varied_lengths}x)" if args.varied_lengths > 1 else "")
            + "; "
            f"{args.steps} steps of batch {args.batch_size}, max length {args.max_length}, "
            f"LoRA r{LORA['r']} all-linear, "
            f"bf16={bf16_on_this_machine()}" + (f"; plain TRL overrides {overrides}" if overrides else "")
        )
        both = [("worker", run_worker), ("plain TRL", run_plain)]
        # (label, packing, padding_free, runners)
        modes: list[tuple[str, bool, bool, list[Any]]] = [
            ("off", False, False, both),
            ("packing", True, False, both),
        ]
        if args.padding_free:
            modes.append(("pad-free", False, True, both[1:]))
        results: dict[tuple[str, str], list[float]] = {}
        for label, packing, padding_free, runners in modes:
            for repeat in range(args.repeats):
                works: dict[str, Path] = {}
                for name, runner in runners if repeat % 2 == 0 else runners[::-1]:
                    work = works[name] = root / f"{name.replace(' ', '_')}-{label}-{repeat}"
                    work.mkdir()
                    started = time.monotonic()
                    shape = {
                        "steps": args.steps,
                        "batch_size": args.batch_size,
                        "max_length": args.max_length,
                        "packing": packing,
                    }
                    if name == "plain TRL":
                        shape.update(padding_free=padding_free, overrides=overrides)
                    tps = tokens_per_second(runner(model, data, work, shape))
                    results.setdefault((label, name), []).append(tps)
                    print(
                        f"  {label:8} {name:9} repeat {repeat}: {tps:8.0f} tokens/s "
                        f"({time.monotonic() - started:.0f} s with start-up)",
                        flush=True,
                    )
                if repeat == 0 and len(works) == 2:
                    differ = differing_settings(works["worker"], works["plain TRL"])
                    differ_text = "; ".join(differ) or "none"
                    print(f"  {label:8} settings that differ (worker | plain TRL): {differ_text}")
        print("\nmedian training tokens/s (non-padding tokens / train_runtime)")
        print(f"{'batching':8} {'worker':>10} {'plain TRL':>10} {'worker/TRL':>11}")
        median = {key: statistics.median(values) for key, values in results.items()}
        for label, _, _, runners in modes:
            plain = median[(label, "plain TRL")]
            if len(runners) == 2:
                worker = median[(label, "worker")]
                print(f"{label:8} {worker:10.0f} {plain:10.0f} {worker / plain:11.3f}")
            else:
                print(f"{label:8} {'-':>10} {plain:10.0f} {'-':>11}")
        off = median[("off", "plain TRL")]
        gain = median[("packing", "worker")] / off
        print(f"worker with packing vs plain TRL without: {gain:.2f}x")
        if args.padding_free:
            free = median[("pad-free", "plain TRL")] / off
            print(f"plain TRL padding-free vs plain TRL without: {free:.2f}x")


def _parameters(model: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(model / "model.safetensors"), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "plain":
        plain_trl(json.loads(sys.argv[2]))
    else:
        main()
