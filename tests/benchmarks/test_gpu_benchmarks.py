"""The GPU measurement of issue 17, prepared on a CPU so that it cannot rot before a GPU runs it:
benchmarks/bench_worker.py --cuda (its plan, specs, parsing of the worker's speed log, throughput windows,
FLOPs), benchmarks/measure_memory.py --cuda-only, benchmarks/gpu/run_all.sh and the carried wheels
(`make gpu-wheels`, benchmarks/gpu/slim_wheels.py). The slow test runs the whole driver on the CPU
(--device cpu --tiny): every code path but the CUDA calls."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))

import bench_worker  # noqa: E402
import slim_wheels  # noqa: E402


def test_the_cuda_plan_dry_run_lists_every_run_and_its_specs_parse() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_worker.py"), "--cuda", "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = result.stdout
    assert "plan (12 runs" in out and "dry run: every worker spec parses as a JobSpec" in out, out
    for method in ("lora", "qlora", "full"):
        for mode in ("off", "on"):
            for who in ("worker", "plain TRL"):
                assert re.search(rf"^  {method}\s+{mode}\s+{who}", out, re.M), (
                    f"{method} {mode} {who}:\n{out}"
                )


def test_the_plan_runs_the_goal_pairs_first_and_copies_options_after_the_worker() -> None:
    plan = bench_worker.cuda_plan()
    assert plan[:2] == [("lora", "on", "worker"), ("lora", "off", "plain TRL")]
    for method in bench_worker.METHODS:
        assert plan.index((method, "on", "worker")) < plan.index((method, "on", "plain TRL"))
    assert len(set(plan)) == 12


@pytest.mark.parametrize("method", bench_worker.METHODS)
@pytest.mark.parametrize("mode", ["off", "on"])
def test_every_worker_spec_resolves_as_the_worker_requires(tmp_path: Path, method: str, mode: str) -> None:
    spec = bench_worker.resolved_spec(
        bench_worker.worker_spec(method, mode, bench_worker.GPU_SHAPE), tmp_path
    )
    assert spec["adapter"] == bench_worker.ADAPTERS[method]
    assert spec["hyperparameters"]["packing"] is (mode == "on")
    if mode == "off":
        assert spec["speed"]["liger_kernels"] == "SPEED_MODE_OFF"
        assert spec["speed"]["attention"] == "ATTENTION_IMPLEMENTATION_SDPA"
    else:
        assert not spec.get("speed"), "on: every option left at AUTO (the worker's defaults)"
    if method == "qlora":
        assert spec["quantization"]["double_quantization"] is True


def test_the_speed_log_line_the_worker_writes_is_read_back() -> None:
    from trainer_worker.speed import ResolvedSpeed

    used = ResolvedSpeed(
        liger_kernels=True,
        attention="flash_attention_2",
        padding_free=True,
        reasons={
            "attention": "AUTO: flash-attn is installed",
            "torch_compile": "AUTO: not chosen",
            "activation_offloading": "AUTO: sequences of 1024 tokens",
        },
    )
    assert bench_worker.parse_speed_line(used.log_line()) == {
        "attention": "flash_attention_2",
        "liger_kernels": True,
        "torch_compile": False,
        "activation_offloading": False,
        "padding_free": True,
    }
    none = ResolvedSpeed(reasons={"attention": "asked for", "liger_kernels": "OFF in the spec"})
    assert bench_worker.parse_speed_line(none.log_line()) == {
        "attention": "sdpa",
        "liger_kernels": False,
        "torch_compile": False,
        "activation_offloading": False,
        "padding_free": False,
    }
    assert bench_worker.parse_speed_line("Loaded 12 training rows.") is None


def test_steady_throughput_leaves_out_the_warm_up_windows() -> None:
    windows = [(0, 1, 10.0), (1, 5, 100.0), (5, 10, 1000.0), (10, 15, 1200.0), (15, 20, 1100.0)]
    assert bench_worker.steady_tokens_per_second(windows, logging_steps=5) == 1100.0
    assert bench_worker.steady_tokens_per_second(windows[:2], logging_steps=5) is None
    events = [
        {"type": "metric", "kind": "train", "step": s, "loss": 1.0, "tokens_per_second": t}
        for s, t in ((1, 10.0), (5, 100.0), (10, 1000.0))
    ] + [{"type": "metric", "kind": "system", "step": 10, "loss": None, "tokens_per_second": None}]
    assert bench_worker.worker_windows(events) == [(1, 5, 100.0), (5, 10, 1000.0)]


def test_model_flops_count_the_1b_models_matrix_parameters() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**bench_worker.GPU_MODEL))
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    n = bench_worker.matmul_parameters(bench_worker.GPU_MODEL)
    assert n == linear  # the tied head is an nn.Linear too
    assert 1.2e9 < n < 1.3e9
    attention = 12 * 16 * 2048 * 500
    assert bench_worker.flops_per_token(bench_worker.GPU_MODEL, "full", 500) == 6 * n + attention
    assert bench_worker.flops_per_token(bench_worker.GPU_MODEL, "lora", 500) == 4 * n + attention


def test_the_summary_table_states_ratios_goals_and_what_was_not_measured() -> None:
    def run(method: str, mode: str, who: str, tps: float, peak: float, mfu: float) -> dict[str, Any]:
        return {
            "method": method,
            "mode": mode,
            "runner": who,
            "tokens_per_second": tps,
            "peak_bytes": peak * 2**30,
            "mfu": mfu,
        }

    results = [
        run("full", "on", "worker", 1400.0, 20.0, 0.45),
        run("full", "off", "plain TRL", 1000.0, 21.0, 0.3),
        run("full", "off", "worker", 990.0, 21.0, 0.3),
        {"method": "full", "mode": "on", "runner": "plain TRL", "skipped": "budget: 300 s spent"},
    ]
    table = bench_worker.summarize(results)
    assert "| full | off | 990 | 1000 | 0.99x | 21.00 | 21.00 | 30.0% | 30.0% |" in table
    assert "| full | on | 1400 | - | - | 20.00 | - | 45.0% | - |" in table
    assert "1.40x tokens/s (goal 1.3x: met), peak memory no higher" in table
    assert "MFU 45.0% (goal 40%: met)" in table
    assert "not measured: full on plain TRL: budget: 300 s spent" in table


def test_slim_wheels_keeps_cuda_13_and_rewrites_the_record(tmp_path: Path) -> None:
    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    names = [
        "bitsandbytes/__init__.py",
        "bitsandbytes/libbitsandbytes_cpu.so",
        "bitsandbytes/libbitsandbytes_cuda118.so",
        "bitsandbytes/libbitsandbytes_cuda128.so",
        "bitsandbytes/libbitsandbytes_cuda130.so",
        "bitsandbytes/libbitsandbytes_rocm72.so",
    ]
    with zipfile.ZipFile(wheel, "w") as z:
        for name in names:
            z.writestr(name, b"x" * 100)
        z.writestr(
            "bitsandbytes-0.50.2.dist-info/RECORD", "\n".join(f"{n},sha256=x,100" for n in names) + "\n"
        )
    (tmp_path / "trl-1.16.0-py3-none-any.whl").write_bytes(b"not touched")
    assert slim_wheels.main(tmp_path) == 0
    with zipfile.ZipFile(wheel) as z:
        kept = set(z.namelist())
        record = z.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    assert {"bitsandbytes/libbitsandbytes_cuda130.so", "bitsandbytes/libbitsandbytes_cpu.so"} <= kept
    assert (
        not {
            "bitsandbytes/libbitsandbytes_cuda118.so",
            "bitsandbytes/libbitsandbytes_cuda128.so",
            "bitsandbytes/libbitsandbytes_rocm72.so",
        }
        & kept
    )
    assert "cuda118" not in record and "cuda130" in record
    assert (tmp_path / "trl-1.16.0-py3-none-any.whl").read_bytes() == b"not touched"


def test_every_carried_wheel_is_pinned() -> None:
    constraints = {
        re.split(r"[=<>]", line)[0].lower().replace("_", "-")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line
    }
    for line in (ROOT / "benchmarks" / "gpu" / "wheels.txt").read_text().splitlines():
        name = line.split("#")[0].strip()
        if name:
            assert "==" in name or name.lower().replace("_", "-") in constraints, f"{name}: pin it"
    dry = subprocess.run(["make", "-n", "gpu-wheels"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    for flag in (
        "--python-version 3.12",
        "--only-binary=:all:",
        "--no-deps",
        "-c constraints.txt",
        "manylinux2014_x86_64",
        "manylinux_2_28_x86_64",
        "-r benchmarks/gpu/wheels.txt",
        "slim_wheels.py",
    ):
        assert flag in dry.stdout, f"{flag} not in:\n{dry.stdout}"


def test_run_all_refuses_an_unknown_argument_or_device() -> None:
    script = ROOT / "benchmarks" / "gpu" / "run_all.sh"
    assert subprocess.run(["bash", "-n", str(script)], timeout=30).returncode == 0
    bad = subprocess.run(["bash", str(script), "--fast"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown argument '--fast'" in bad.stderr
    bad = subprocess.run(["bash", str(script), "--device", "tpu"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "--device must be cuda or cpu" in bad.stderr


@pytest.mark.slow
def test_the_whole_gpu_driver_runs_on_the_cpu(tmp_path: Path) -> None:
    """run_all.sh --device cpu --tiny: preflight, the bench plan (QLoRA skipped: no CUDA) and the memory
    grid, results and summary under $OUT. About 3 minutes on a 2-core machine."""
    out = tmp_path / "out"
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu" / "run_all.sh"), "--device", "cpu", "--tiny"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**__import__("os").environ, "OUT": str(out), "PYTHON": sys.executable},
    )
    log = result.stdout[-4000:] + result.stderr[-2000:]
    assert result.returncode == 0, log
    assert {p.name for p in out.iterdir()} == {
        "preflight.log",
        "bench_worker.log",
        "bench_worker.json",
        "measure_memory.log",
        "measure_memory.json",
        "summary.md",
    }
    bench = json.loads((out / "bench_worker.json").read_text())
    measured = [r for r in bench["runs"] if "tokens_per_second" in r]
    assert {(r["method"], r["mode"], r["runner"]) for r in measured} == {
        (m, mode, who) for m in ("lora", "full") for mode in ("off", "on") for who in ("worker", "plain TRL")
    }, [r.get("failed") for r in bench["runs"]]
    for r in measured:
        assert r["tokens_per_second"] > 0 and r["peak_bytes"] > 0 and 0 < r["mfu"] < 1, r
        if r["runner"] == "worker":
            assert r["speed"] is not None and r["speed"]["attention"] == "sdpa", r
        if "differing_settings" in r:
            assert r["differing_settings"] == [], r  # the same settings, or the comparison is unfair
    assert sum("differing_settings" in r for r in measured) == 4
    on = next(r for r in measured if (r["method"], r["mode"], r["runner"]) == ("lora", "on", "worker"))
    assert on["speed"]["padding_free"] is True  # AUTO with packing
    assert all(r["skipped"].startswith("QLoRA needs CUDA") for r in bench["runs"] if r["method"] == "qlora")
    memory = json.loads((out / "measure_memory.json").read_text())
    assert memory["runs"] >= 12 and 0 <= memory["p50"] <= memory["p90"] < 1, memory
    summary = (out / "summary.md").read_text()
    assert (
        "| lora | on |" in summary and "p90 |error|" in summary and "exit status: bench_worker 0" in summary
    )
