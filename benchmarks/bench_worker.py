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

On a GPU (``--cuda``; the plan in ``cuda_plan``, run by benchmarks/gpu/run_all.sh):

    python benchmarks/bench_worker.py --cuda --json OUT.json          # ~5 minutes on one H200
    .venv/bin/python benchmarks/bench_worker.py --cuda --device cpu --tiny   # the same plan on CPU, tiny
    .venv/bin/python benchmarks/bench_worker.py --cuda --dry-run      # prints the plan, runs nothing

builds a Llama-3.2-1B-shaped model (16 layers, hidden 2048, 32 heads, 8 KV heads, vocabulary 128256, tied
embeddings: 1.24B parameters, random weights, no download; the tiny tokenizer uses the first 1024 ids) and
chat rows of uneven length, then trains LoRA, QLoRA and full fine-tuning with the speed options off and on,
worker and plain TRL each in a fresh process, same data, same seed:

- **off**: no packing, and every JobSpec.speed option OFF with SDPA attention (the worker); plain TRL's
  SFTConfig defaults (the same SDPA attention). Same settings; the ratio is the worker's overhead.
- **on**: packing, and JobSpec.speed left at AUTO (the worker's defaults: which options it resolved is
  read back from its log, "Speed options used: ..."); plain TRL with packing and those same options set by
  hand (use_liger_kernel, padding_free, torch_compile, activation_offloading, attn_implementation).

The headline ratio is the worker with its defaults ("on") over plain TRL as a user writes it ("off").
Throughput on a GPU is the median of the logging windows' tokens/s after the first window (warm-up and
compilation) and before the final save, from the worker's metric events and the plain script's callback;
peak memory is torch.cuda.max_memory_allocated over the whole process (the worker's
``peak_gpu_memory_bytes``); MFU is model FLOPs per token x tokens/s over the GPU's dense bf16 peak (the
estimator's catalog: 989 TFLOP/s for an H200), with model FLOPs per token = 6N for full fine-tuning and
4N for adapters (the frozen weights get no weight gradients; N = the matrix-multiply parameters, LM head
included), plus 12 x layers x attention width x context (PaLM's count; context = the token-weighted mean
example length). Runs the plan in priority order and skips what would overrun ``--budget-s``.
"""

from __future__ import annotations

import argparse
import itertools
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
    from trainer_worker.tiny import build_tiny_chat_model

    model = build_tiny_chat_model(root / "model", **MODEL)
    return model, write_varied_data(root / "train.jsonl", rows, varied)


def write_varied_data(path: Path, rows: int, varied: int) -> Path:
    """The synthetic chat rows; with ``varied`` > 1 each answer repeated 1..varied times (seeded)."""
    import random

    from trainer_worker.tiny import write_synthetic_chat_dataset

    data = write_synthetic_chat_dataset(path, rows)
    if varied > 1:
        rng = random.Random(SEED)
        lines = []
        for line in data.read_text().splitlines():
            row = json.loads(line)
            answer = row["messages"][-1]
            answer["content"] = " ".join([answer["content"]] * rng.randint(1, varied))
            lines.append(json.dumps(row))
        data.write_text("\n".join(lines) + "\n")
    return data


def bf16_on_this_machine() -> bool:
    """The worker's CPU default (job.proto): bf16 where the CPU has it, else fp32. The plain run matches."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolved_spec(spec: dict[str, Any], model: Path) -> dict[str, Any]:
    """The spec as the jobs service queues it (every default filled in: the worker refuses anything else),
    with the model as its base model."""
    from google.protobuf import json_format
    from tuneforge.v1 import job_pb2

    from trainer_worker.run_config import RunConfig
    from tuneforge_core.spec import resolve_spec

    proto = json_format.ParseDict(spec, job_pb2.JobSpec())
    proto.base_model = str(model.absolute())
    return RunConfig.spec_to_dict(resolve_spec(proto, allow_user_reward_code=True, require_dataset=False))


def run_worker(model: Path, data: Path, work: Path, shape: dict[str, Any]) -> dict[str, float]:
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
    events, _ = train_with_worker("bench", resolved_spec(spec, model), model, data, work)
    (result,) = [e for e in events if e["type"] == "result"]
    return result["final_metrics"]


def train_with_worker(job_id: str, spec: dict[str, Any], model: Path, data: Path,
                      work: Path) -> tuple[list[dict[str, Any]], Path]:
    """Runs the worker's training process (as the agent starts it) on a resolved spec; returns its events
    and the RunConfig file (where the worker writes back what it used)."""
    from trainer_worker.run_config import RunConfig

    cfg = RunConfig(
        job_id=job_id,
        spec=spec,
        model_path=str(model),
        train_file=data,
        output_dir=work / "out",
        events_file=work / "events.jsonl",
    )
    config = cfg.dump(work / "RUN.json")
    _run([sys.executable, "-m", "trainer_worker.train", "--config", str(config)], work)
    return [json.loads(line) for line in cfg.events_file.read_text().splitlines()], config


def run_plain(model: Path, data: Path, work: Path, shape: dict[str, Any]) -> dict[str, float]:
    args = json.dumps({"model": str(model), "data": str(data), "work": str(work), **shape})
    _run([sys.executable, __file__, "plain", args], work)
    return json.loads((work / "metrics.json").read_text())


def plain_trl(options: dict[str, Any]) -> None:
    """A plain TRL script with the worker's settings (what a user would write by hand)."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from trainer_worker.sysmetrics import peak_metrics

    # The CUDA plan (cuda_plan) adds: "adapter" (lora, qlora, full), "speed" (the options the worker
    # resolved: use them by hand), "logging_steps". Without them this is the CPU comparison's script.
    adapter = options.get("adapter", "lora")
    speed: dict[str, Any] = options.get("speed") or {}
    cuda = torch.cuda.is_available()
    # The worker's dtypes (recipes.base.model_dtype): adapters on a GPU train in the compute dtype, full
    # fine-tuning keeps fp32 master weights; QLoRA's base is 4-bit NF4, double-quantized, bf16 compute.
    dtype = torch.bfloat16 if cuda and adapter != "full" and bf16_on_this_machine() else torch.float32
    load: dict[str, Any] = {"dtype": dtype}
    if adapter == "qlora":
        from transformers import BitsAndBytesConfig

        load["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    if "attention" in speed:
        load["attn_implementation"] = speed["attention"]
    tokenizer = AutoTokenizer.from_pretrained(options["model"])
    model = AutoModelForCausalLM.from_pretrained(options["model"], **load)
    dataset = load_dataset("json", data_files=options["data"], split="train")
    marks: list[tuple[float, int, int]] = []

    class StepClock(TrainerCallback):
        """(time, step, tokens) at each training log: the windows the worker's metric events time."""

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:
                marks.append((time.monotonic(), state.global_step, int(state.num_input_tokens_seen)))

    settings: dict[str, Any] = {
        "output_dir": str(Path(options["work"]) / "out"),
        "max_steps": options["steps"],
        "per_device_train_batch_size": options["batch_size"],
        "per_device_eval_batch_size": options["batch_size"],  # the resolved spec's default (no evaluation)
        "learning_rate": options.get("learning_rate", LEARNING_RATE),
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
        # TRL makes best-fit packing padding-free whatever this says (SFTTrainer: bfd implies it); the worker
        # says so explicitly (JobSpec.speed.padding_free AUTO), so say the same here and the diff stays clean.
        "padding_free": options.get("padding_free", options["packing"]),
        "max_length": options["max_length"],
        "assistant_only_loss": True,
        "seed": SEED,
        "logging_steps": options.get("logging_steps", 10),
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
    if speed:  # what the worker maps JobSpec.speed to (recipes.base.training_args, recipes.sft)
        settings.update(
            use_liger_kernel=bool(speed.get("liger_kernels")),
            torch_compile=bool(speed.get("torch_compile")),
            activation_offloading=bool(speed.get("activation_offloading")),
            padding_free=bool(speed.get("padding_free")),
            packing_strategy="bfd" if speed.get("padding_free") or not options["packing"] else "wrapped",
        )
    config = SFTConfig(**{**settings, **options.get("overrides", {})})
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=None if adapter == "full" else LoraConfig(task_type="CAUSAL_LM", **LORA),
        callbacks=[StepClock()],
    )
    metrics: dict[str, Any] = dict(trainer.train().metrics)
    metrics["num_input_tokens_seen"] = trainer.state.num_input_tokens_seen
    metrics["threads"] = torch.get_num_threads()
    metrics.update(peak_metrics())
    # [first step, last step, tokens/s] of each window between two training logs
    metrics["windows"] = [
        [a[1], b[1], (b[2] - a[2]) / (b[0] - a[0])] for a, b in itertools.pairwise(marks) if b[0] > a[0]
    ]
    (Path(options["work"]) / "metrics.json").write_text(json.dumps(metrics))


def _run(command: list[str], work: Path) -> None:
    path = os.pathsep.join([str(REPO), str(REPO / "gen" / "python"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": path}
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

    kept = work / "training_args.bin"  # the CUDA plan keeps only this of a run's output (cuda_plan)
    saved = kept if kept.exists() else next(work.rglob("checkpoint-*/training_args.bin"))
    # Our own file, written a moment ago by a run of this benchmark; it is a pickle of the config object.
    return torch.load(saved, weights_only=False).to_dict()


def differing_settings(worker: Path, plain: Path) -> list[str]:
    """'key: worker value | plain value' for every setting that differs between the two runs."""
    a, b = used_settings(worker), used_settings(plain)
    keys = sorted((set(a) | set(b)) - NOT_SETTINGS)
    return [f"{k}: {a.get(k)!r} | {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="default 40 (--cuda: 30, --tiny: 6)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=None, help="default 1200 (--cuda: 512, --tiny: 48)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 8 (--tiny: 4)")
    parser.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="max_seq_length, and the packed length; default 512 (--cuda: 1024, --tiny: 256)",
    )
    parser.add_argument(
        "--varied-lengths",
        type=int,
        default=None,
        metavar="N",
        help="repeat each answer 1..N times, so rows vary in length (padding to remove); default 0 "
        "(--cuda: 120, --tiny: 8)",
    )
    parser.add_argument("--cuda", action="store_true", help="the GPU plan: LoRA/QLoRA/full, options off/on")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="--cuda: where to run it")
    parser.add_argument("--tiny", action="store_true", help="--cuda: a tiny model and shape (a CPU check)")
    parser.add_argument("--dry-run", action="store_true", help="--cuda: print the plan, run nothing")
    parser.add_argument("--methods", default=",".join(METHODS), help="--cuda: which of lora,qlora,full")
    parser.add_argument("--budget-s", type=float, default=330.0, help="--cuda: start no run past this")
    parser.add_argument("--json", default="", help="--cuda: write the results here")
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
    if args.cuda:
        main_cuda(args)
        return
    for name, default in (
        ("steps", 40),
        ("rows", 1200),
        ("batch_size", 8),
        ("max_length", 512),
        ("varied_lengths", 0),
    ):
        if getattr(args, name) is None:
            setattr(args, name, default)
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


# ---- the CUDA plan (--cuda) ------------------------------------------------------------------------------

# Llama-3.2-1B's shape (1.24B parameters with tied embeddings); --tiny: a few-MB stand-in for CPU checks.
GPU_MODEL = {
    "hidden_size": 2048,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 8192,
    "vocab_size": 128256,
    "tie_word_embeddings": True,
}
TINY_MODEL = {
    **GPU_MODEL,
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 256,
    "vocab_size": 4096,
}
# Shapes: the GPU's, and --tiny's (seconds per run on a CPU).
GPU_SHAPE = {"steps": 30, "batch_size": 8, "max_length": 1024, "rows": 512, "varied": 120, "logging_steps": 5}
TINY_SHAPE = {"steps": 6, "batch_size": 4, "max_length": 256, "rows": 48, "varied": 8, "logging_steps": 2}
METHODS = ("lora", "full", "qlora")
ADAPTERS = {"lora": "ADAPTER_TYPE_LORA", "qlora": "ADAPTER_TYPE_QLORA", "full": "ADAPTER_TYPE_FULL"}
FULL_LEARNING_RATE = 2e-5  # the spec's default for full fine-tuning
# "off": every speed option OFF and the attention plain TRL gets by default (SDPA); "on": AUTO, the default.
SPEED_OFF = {
    "liger_kernels": "SPEED_MODE_OFF",
    "attention": "ATTENTION_IMPLEMENTATION_SDPA",
    "torch_compile": "SPEED_MODE_OFF",
    "activation_offloading": "SPEED_MODE_OFF",
    "padding_free": "SPEED_MODE_OFF",
}
SPEED_LINE = "Speed options used: "
# A run's expected seconds with start-up, for the budget before one has run (then the last one's).
EXPECTED_S = {"lora": 45.0, "qlora": 50.0, "full": 75.0}


def cuda_plan(methods: tuple[str, ...] = METHODS) -> list[tuple[str, str, str]]:
    """(method, mode, runner) in the order they run: first what the goals need (the worker with its
    defaults, plain TRL as a user writes it), then the other pair; plain TRL "on" after the worker's "on"
    (it copies the options the worker resolved)."""
    first = [(m, mode, who) for m in methods for mode, who in (("on", "worker"), ("off", "plain TRL"))]
    second = [(m, mode, who) for m in methods for mode, who in (("off", "worker"), ("on", "plain TRL"))]
    return first + second


def worker_spec(method: str, mode: str, shape: dict[str, Any]) -> dict[str, Any]:
    """The JobSpec (JSON) of one worker run of the CUDA plan."""
    hyper = {
        "max_steps": shape["steps"],
        "batch_size": shape["batch_size"],
        "learning_rate": FULL_LEARNING_RATE if method == "full" else LEARNING_RATE,
        "max_seq_length": shape["max_length"],
        "packing": mode == "on",
        "seed": SEED,
        "logging_steps": shape["logging_steps"],
        "save_steps": shape["steps"] * 10,
    }
    spec: dict[str, Any] = {
        "method": "TRAINING_METHOD_SFT",
        "adapter": ADAPTERS[method],
        "hyperparameters": hyper,
    }
    if method != "full":
        spec["lora"] = {"rank": LORA["r"], "alpha": LORA["lora_alpha"], "dropout": LORA["lora_dropout"]}
    if method == "qlora":
        spec["quantization"] = {"bits": 4, "type": "QUANTIZATION_TYPE_NF4", "double_quantization": True}
    if mode == "off":
        spec["speed"] = dict(SPEED_OFF)
    return spec


def parse_speed_line(message: str) -> dict[str, Any] | None:
    """The options of the worker's "Speed options used: attention=sdpa, liger_kernels (...)." log line."""
    if not message.startswith(SPEED_LINE):
        return None
    used = message[len(SPEED_LINE) :].split(" (", 1)[0].rstrip(".")
    speed: dict[str, Any] = {
        "liger_kernels": False,
        "torch_compile": False,
        "activation_offloading": False,
        "padding_free": False,
    }
    for item in (i.strip() for i in used.split(",")):
        if item.startswith("attention="):
            speed["attention"] = item.split("=", 1)[1]
        elif item in speed:
            speed[item] = True
    return speed


def steady_tokens_per_second(windows: list[tuple[int, int, float]], logging_steps: int) -> float | None:
    """The median tokens/s of the logging windows that start at or after the first full window's end
    (the first step and the first window hold warm-up, allocation and compilation)."""
    kept = [tps for start, _, tps in windows if start >= logging_steps and tps > 0]
    return statistics.median(kept) if kept else None


def worker_windows(events: list[dict[str, Any]]) -> list[tuple[int, int, float]]:
    """[first step, last step, tokens/s] of each training log window, from the worker's metric events."""
    train = [
        e
        for e in events
        if e.get("type") == "metric"
        and e.get("kind") == "train"
        and e.get("loss") is not None
        and e.get("tokens_per_second") is not None
    ]
    return [(a["step"], b["step"], float(b["tokens_per_second"])) for a, b in itertools.pairwise(train)]


def run_worker_cuda(
    model: Path, data: Path, work: Path, method: str, mode: str, shape: dict[str, Any]
) -> dict[str, Any]:
    spec = resolved_spec(worker_spec(method, mode, shape), model)
    events, config = train_with_worker(f"bench-{method}-{mode}", spec, model, data, work)
    (result,) = [e for e in events if e["type"] == "result"]
    metrics = dict(result["final_metrics"])
    speed = next(
        (
            parse_speed_line(e["message"])
            for e in events
            if e.get("type") == "log" and str(e.get("message", "")).startswith(SPEED_LINE)
        ),
        None,
    )
    written = json.loads(config.read_text()).get("speed")  # RunConfig.speed, where the worker writes it back
    if speed is None and written:
        speed = {k: v for k, v in written.items() if k != "reasons"}
    metrics["windows"] = worker_windows(events)
    metrics["speed"] = speed
    metrics["speed_log"] = next(
        (
            e["message"]
            for e in events
            if e.get("type") == "log" and str(e.get("message", "")).startswith(SPEED_LINE)
        ),
        None,
    )
    return metrics


def run_plain_cuda(
    model: Path,
    data: Path,
    work: Path,
    method: str,
    mode: str,
    shape: dict[str, Any],
    speed: dict[str, Any] | None,
) -> dict[str, Any]:
    options = {
        "steps": shape["steps"],
        "batch_size": shape["batch_size"],
        "max_length": shape["max_length"],
        "packing": mode == "on",
        "adapter": method,
        "learning_rate": FULL_LEARNING_RATE if method == "full" else LEARNING_RATE,
        "logging_steps": shape["logging_steps"],
        "speed": speed if mode == "on" else None,
    }
    metrics: dict[str, Any] = dict(run_plain(model, data, work, options))
    metrics["speed"] = speed if mode == "on" else None
    return metrics


def keep_settings_only(work: Path) -> None:
    """Drop a run's model, adapter and checkpoints (a full run writes ~20 GB); keep its TrainingArguments
    (for the settings diff), its log and events."""
    import shutil

    saved = next(iter(work.rglob("checkpoint-*/training_args.bin")), None)
    if saved is not None:
        shutil.copy(saved, work / "training_args.bin")
    for name in ("out",):
        shutil.rmtree(work / name, ignore_errors=True)


def build_gpu_assets(
    root: Path, model_shape: dict[str, Any], shape: dict[str, Any], device: str
) -> tuple[Path, Path]:
    """A random-weight model of ``model_shape`` with the tiny BPE tokenizer (its ids are the model's first
    ones), saved in bf16, and the uneven-length chat rows."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    from trainer_worker.tiny import build_tiny_chat_model

    tokenizer_dir = build_tiny_chat_model(root / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        **model_shape,
        max_position_embeddings=max(2048, shape["max_length"]),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(SEED)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    out = root / "model"
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    del model
    return out, write_varied_data(root / "train.jsonl", shape["rows"], shape["varied"])


def token_lengths(model: Path, data: Path, max_length: int) -> list[int]:
    """Each row's tokens under the chat template, cut at max_length: what training sees."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    lengths = []
    for line in data.read_text().splitlines():
        ids = tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        lengths.append(min(len(ids), max_length))
    return lengths


def matmul_parameters(c: dict[str, Any]) -> int:
    """Parameters that take part in matrix multiplies per token: every layer's projections and the LM
    head (the embedding lookup is no multiply; tied or not, the head is)."""
    d, heads, kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    head_dim = c.get("head_dim") or d // heads
    attention = d * heads * head_dim * 2 + d * kv * head_dim * 2  # q, o; k, v
    mlp = 3 * d * c["intermediate_size"]
    return c["num_hidden_layers"] * (attention + mlp) + c["vocab_size"] * d


def flops_per_token(c: dict[str, Any], method: str, context: float) -> float:
    """Model FLOPs per trained token: 6N (full) or 4N (adapters: no weight gradients of the frozen
    weights; the adapters' own are negligible), plus PaLM's 12 x layers x attention width x context."""
    n = matmul_parameters(c)
    width = c["num_attention_heads"] * (c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])
    return (6 if method == "full" else 4) * n + 12 * c["num_hidden_layers"] * width * context


def peak_tflops(cuda: bool) -> tuple[str, float]:
    """The device's dense bf16 peak from the estimator's catalog (the CPU entry's for a CPU dry run)."""
    from services.estimation.catalog import Catalog

    catalog = Catalog.load()
    if not cuda:
        cpu = catalog.hardware("cpu")
        return "cpu (catalog)", cpu.peak_tflops if cpu else 1.0
    import torch

    name, size = torch.cuda.get_device_name(), torch.cuda.mem_get_info()[1]
    named = [h for h in catalog.gpus() if h.display_name.split()[1].lower() in name.lower()]
    if not named:
        return name + " (not in the catalog: H200's peak used)", 989.0
    gpu = min(named, key=lambda h: abs(h.memory_bytes - size))
    return f"{name} = {gpu.display_name}", gpu.peak_tflops


def main_cuda(args: argparse.Namespace) -> None:
    """The CUDA plan: worker vs plain TRL, LoRA/QLoRA/full, speed options off and on (module docstring)."""
    import shutil

    cuda = args.device != "cpu"
    shape = dict(TINY_SHAPE if args.tiny else GPU_SHAPE)
    for key, value in (
        ("steps", args.steps),
        ("batch_size", args.batch_size),
        ("max_length", args.max_length),
        ("rows", args.rows),
        ("varied", args.varied_lengths),
    ):
        if value is not None:
            shape[key] = value
    model_shape = TINY_MODEL if args.tiny else GPU_MODEL
    methods = tuple(m for m in args.methods.split(",") if m)
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; choose from {','.join(METHODS)}")
    plan = cuda_plan(methods)
    print(f"plan ({len(plan)} runs, budget {args.budget_s:.0f} s): shape {shape}; model {model_shape}")
    for method, mode, who in plan:
        spec = worker_spec(method, mode, shape) if who == "worker" else None
        print(f"  {method:5} {mode:3} {who:9}" + (f" spec {json.dumps(spec)}" if spec else ""))
    if args.dry_run:
        from google.protobuf import json_format
        from tuneforge.v1 import job_pb2

        for method, mode, who in plan:
            if who == "worker":
                json_format.ParseDict(worker_spec(method, mode, shape), job_pb2.JobSpec())
        print("dry run: every worker spec parses as a JobSpec; nothing was run")
        return
    if not cuda:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the runs' processes too
    import torch

    if cuda and not torch.cuda.is_available():
        raise SystemExit("--cuda: no CUDA device here (use --device cpu for the CPU dry run)")
    started = time.monotonic()
    device_name, peak = peak_tflops(cuda)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-worker-cuda-") as tmp:
        root = Path(tmp)
        model, data = build_gpu_assets(root, model_shape, shape, "cuda" if cuda else "cpu")
        config = json.loads((model / "config.json").read_text())
        lengths = token_lengths(model, data, shape["max_length"])
        context = sum(n * n for n in lengths) / sum(lengths)
        print(
            f"device {device_name}, dense bf16 peak {peak:.0f} TFLOP/s; model "
            f"{matmul_parameters(config) / 1e9:.3f}B matmul parameters; {len(lengths)} rows of "
            f"{min(lengths)}-{max(lengths)} tokens (mean "
            f"{statistics.mean(lengths):.0f}, token-weighted context {context:.0f}); assets in "
            f"{time.monotonic() - started:.0f} s",
            flush=True,
        )
        resolved: dict[str, dict[str, Any] | None] = {}
        last: dict[str, float] = {}

        def save() -> str:
            """The table of the runs so far, also written to --json."""
            table = summarize(results)
            if args.json:
                document = {
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "device": device_name,
                    "peak_tflops": peak,
                    "shape": shape,
                    "model": model_shape,
                    "context": context,
                    "runs": results,
                    "table": table,
                }
                Path(args.json).write_text(json.dumps(document, indent=1, default=str))
            return table

        for method, mode, who in plan:
            record: dict[str, Any] = {"method": method, "mode": mode, "runner": who}
            results.append(record)
            elapsed = time.monotonic() - started
            expected = last.get(method, 0.0 if args.tiny else EXPECTED_S[method])
            if method == "qlora" and not cuda:
                record["skipped"] = "QLoRA needs CUDA (bitsandbytes' 4-bit kernels)"
            elif elapsed + expected > args.budget_s:
                record["skipped"] = (
                    f"budget: {elapsed:.0f} s spent, ~{expected:.0f} s more would pass {args.budget_s:.0f}"
                )
            elif who == "plain TRL" and mode == "on" and resolved.get(method) is None:
                record["skipped"] = "the worker's 'on' run resolved no options to copy"
            if "skipped" in record:
                print(f"  {method:5} {mode:3} {who:9} skipped: {record['skipped']}", flush=True)
                continue
            work = root / f"{method}-{mode}-{who.replace(' ', '_')}"
            work.mkdir()
            record["work"] = str(work)
            run_started = time.monotonic()
            try:
                if who == "worker":
                    metrics = run_worker_cuda(model, data, work, method, mode, shape)
                    if mode == "on":
                        resolved[method] = metrics["speed"]
                else:
                    metrics = run_plain_cuda(model, data, work, method, mode, shape, resolved.get(method))
            except (SystemExit, Exception) as exc:  # one failed run must not hide the others
                record["failed"] = str(exc)
                log, events = work / "run.log", work / "events.jsonl"
                tail = log.read_text(errors="replace").splitlines()[-25:] if log.exists() else []
                if events.exists():
                    tail += [line for line in events.read_text().splitlines() if '"type":"error"' in line]
                print(f"  {method:5} {mode:3} {who:9} FAILED: {exc}\n    " + "\n    ".join(tail), flush=True)
                keep_settings_only(work)
                continue
            seconds = last[method] = time.monotonic() - run_started
            keep_settings_only(work)
            windows = [(int(a), int(b), float(t)) for a, b, t in metrics.get("windows", [])]
            steady = steady_tokens_per_second(windows, shape["logging_steps"])
            overall = tokens_per_second(metrics)
            tps = steady or overall
            peak_bytes = metrics.get("peak_gpu_memory_bytes") if cuda else metrics.get("peak_rss_bytes")
            record.update(
                tokens_per_second=tps,
                tokens_per_second_overall=overall,
                steady=steady is not None,
                peak_bytes=peak_bytes,
                mfu=tps * flops_per_token(config, method, context) / (peak * 1e12),
                speed=metrics.get("speed"),
                speed_log=metrics.get("speed_log"),
                seconds=seconds,
            )
            print(
                f"  {method:5} {mode:3} {who:9} {tps:9.0f} tokens/s ({'steady' if steady else 'whole run'}; "
                f"whole run {overall:.0f}), peak {(peak_bytes or 0) / 2**30:6.2f} GiB, "
                f"MFU {record['mfu']:6.1%}, "
                f"{seconds:.0f} s with start-up"
                + (f"; options {metrics['speed']}" if metrics.get("speed") else ""),
                flush=True,
            )
            if metrics.get("speed_log"):
                print(f"      worker log: {metrics['speed_log']}")
            # Once both runs of a pair are done: the settings they really trained with, side by side.
            pair = [root / f"{method}-{mode}-{name}" for name in ("worker", "plain_TRL")]
            if all((w / "training_args.bin").exists() for w in pair):
                differ = differing_settings(*pair)
                record["differing_settings"] = differ
                print(f"      settings that differ (worker | plain TRL): {'; '.join(differ) or 'none'}")
            shutil.rmtree(work / "out", ignore_errors=True)
            save()  # after every run: a run stopped at the time limit keeps what was measured
        print(save())
        print(f"\n{time.monotonic() - started:.0f} s in all")
    if args.json:
        print(f"results: {args.json}")


def summarize(results: list[dict[str, Any]]) -> str:
    """The bench table (markdown): per method and mode, worker and plain TRL side by side, and the goals."""
    by = {(r["method"], r["mode"], r["runner"]): r for r in results if "tokens_per_second" in r}

    def cell(key: tuple[str, str, str], field: str, fmt: str) -> str:
        r = by.get(key)
        return format(r[field], fmt) if r and r.get(field) is not None else "-"

    lines = [
        "",
        "| method | options | worker tokens/s | TRL tokens/s | worker/TRL | worker peak GiB | TRL peak GiB "
        "| worker MFU | TRL MFU |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    methods = list(dict.fromkeys(r["method"] for r in results))
    for method in methods:
        for mode in ("off", "on"):
            w, t = by.get((method, mode, "worker")), by.get((method, mode, "plain TRL"))
            ratio = f"{w['tokens_per_second'] / t['tokens_per_second']:.2f}x" if w and t else "-"
            gib = {
                k: f"{r['peak_bytes'] / 2**30:.2f}" if r and r.get("peak_bytes") else "-"
                for k, r in (("w", w), ("t", t))
            }
            lines.append(
                f"| {method} | {mode} | {cell((method, mode, 'worker'), 'tokens_per_second', '.0f')} "
                f"| {cell((method, mode, 'plain TRL'), 'tokens_per_second', '.0f')} | {ratio} | {gib['w']} "
                f"| {gib['t']} | {cell((method, mode, 'worker'), 'mfu', '.1%')} "
                f"| {cell((method, mode, 'plain TRL'), 'mfu', '.1%')} |"
            )
    lines.append("")
    for method in methods:
        w, t = by.get((method, "on", "worker")), by.get((method, "off", "plain TRL"))
        if w and t:
            ratio = w["tokens_per_second"] / t["tokens_per_second"]
            memory = (w.get("peak_bytes") or 0) <= (t.get("peak_bytes") or 0)
            lines.append(
                f"{method}: worker with its defaults vs plain TRL as written: {ratio:.2f}x tokens/s "
                f"(goal 1.3x: {'met' if ratio >= 1.3 else 'NOT met'}), peak memory "
                f"{'no higher' if memory else 'HIGHER'}"
                + (
                    f"; full fine-tuning MFU {w['mfu']:.1%} (goal 40%: "
                    f"{'met' if w['mfu'] >= 0.4 else 'NOT met'})"
                    if method == "full"
                    else ""
                )
            )
    skipped = [
        f"{r['method']} {r['mode']} {r['runner']}: {r.get('skipped') or r.get('failed')}"
        for r in results
        if "skipped" in r or "failed" in r
    ]
    if skipped:
        lines.append("not measured: " + "; ".join(skipped))
    return "\n".join(lines)


def _parameters(model: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(model / "model.safetensors"), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "plain":
        plain_trl(json.loads(sys.argv[2]))
    else:
        main()
