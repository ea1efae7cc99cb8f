#!/usr/bin/env bash
# The GPU measurement of issue 17 in one command, for the device tool's `run` (benchmarks/README.md, "On a
# GPU"): installs the carried wheels offline, checks the imports, then runs
#   1. benchmarks/bench_worker.py --cuda       worker vs plain TRL, LoRA/QLoRA/full, speed options off/on
#   2. benchmarks/measure_memory.py --cuda-only the estimator's peak vs torch.cuda.max_memory_allocated
# and writes under $OUT: preflight.log, bench_worker.{log,json}, measure_memory.{log,json}, summary.md.
# About 8 minutes on one H200 (each step has a hard time limit; bench_worker starts no run past its budget).
#
#   bash benchmarks/gpu/run_all.sh                      # on the GPU machine ($OUT set by the device tool)
#   OUT=/tmp/gpu-out bash benchmarks/gpu/run_all.sh --device cpu --tiny   # the same steps on a CPU, tiny
#
# Wheels: `make gpu-wheels` fills .cache/gpu-wheels (name it in the run's carry); GPU_WHEELS overrides.
set -uo pipefail
cd "$(dirname "$0")/../.."

DEVICE=cuda
TINY=()
while (($#)); do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --tiny) TINY=(--tiny); shift ;;
    *) echo "run_all.sh: unknown argument '$1' (use --device cuda|cpu, --tiny)" >&2; exit 2 ;;
  esac
done
if [[ "$DEVICE" != cuda && "$DEVICE" != cpu ]]; then
  echo "run_all.sh: --device must be cuda or cpu, not '$DEVICE'" >&2; exit 2
fi
OUT="${OUT:-.cache/gpu-out}"
mkdir -p "$OUT"
WHEELS="${GPU_WHEELS:-.cache/gpu-wheels}"
# Seconds: each script starts no run past its budget and is stopped at its limit.
BENCH_BUDGET_S="${BENCH_BUDGET_S:-300}"
BENCH_LIMIT_S="${BENCH_LIMIT_S:-360}"
MEMORY_BUDGET_S="${MEMORY_BUDGET_S:-95}"
MEMORY_LIMIT_S="${MEMORY_LIMIT_S:-120}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ "$DEVICE" == cpu && -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=warning
started=$(date +%s)
say() { echo "[run_all $(( $(date +%s) - started )) s] $*"; }

# 1. The carried wheels, offline, into a folder ahead of the machine's own packages.
if [[ "$DEVICE" == cuda ]]; then
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    say "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS"
    SITE="${GPU_SITE:-/tmp/tuneforge-site}"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$WHEELS"/*.whl || { echo "run_all.sh: installing the wheels failed" >&2; exit 1; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  else
    say "no wheels in $WHEELS (make gpu-wheels, and carry it): using what is installed"
  fi
fi
export PYTHONPATH="$PWD:$PWD/gen/python${PYTHONPATH:+:$PYTHONPATH}"

# 2. Preflight: the versions, the GPU, and every import the runs need (fails in seconds, not minutes).
say "preflight"
"$PYTHON" - <<'EOF' 2>&1 | tee "$OUT/preflight.log"
import importlib, importlib.metadata as md, platform, sys
print("python", platform.python_version(), sys.executable)
names = ["torch", "triton", "transformers", "trl", "peft", "accelerate", "datasets", "huggingface_hub",
         "bitsandbytes", "liger_kernel", "flash_attn", "tokenizers", "safetensors", "pyarrow", "numpy",
         "protobuf", "grpcio", "pydantic", "msgspec"]
for name in names:
    try:
        print(f"  {name} {md.version(name.replace('_', '-'))}")
    except md.PackageNotFoundError:
        print(f"  {name} -")
import torch
print("cuda", torch.cuda.is_available(), torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
failed = []
for module in ("trl", "datasets", "peft", "transformers", "liger_kernel", "bitsandbytes",
               "trainer_worker.train", "trainer_worker.speed", "services.estimation.estimator"):
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - every failure is reported
        failed.append(f"{module}: {type(exc).__name__}: {exc}")
for line in failed:
    print("IMPORT FAILED", line)
sys.exit(1 if any(not f.startswith(("liger_kernel", "bitsandbytes")) for f in failed) else 0)
EOF
[[ ${PIPESTATUS[0]} -eq 0 ]] || { echo "run_all.sh: preflight failed (see $OUT/preflight.log)" >&2; exit 1; }
if [[ "$DEVICE" == cuda ]]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
  >>"$OUT/preflight.log" 2>&1 || true; fi

# 3. Worker vs plain TRL.
say "bench_worker --cuda (budget ${BENCH_BUDGET_S} s, limit ${BENCH_LIMIT_S} s)"
timeout -k 10 "$BENCH_LIMIT_S" "$PYTHON" benchmarks/bench_worker.py --cuda --device "$DEVICE" "${TINY[@]}" \
  --budget-s "$BENCH_BUDGET_S" --json "$OUT/bench_worker.json" 2>&1 | tee "$OUT/bench_worker.log"
bench=${PIPESTATUS[0]}

# 4. The estimator's peak memory against the measured one.
say "measure_memory --cuda-only (budget ${MEMORY_BUDGET_S} s, limit ${MEMORY_LIMIT_S} s)"
timeout -k 10 "$MEMORY_LIMIT_S" "$PYTHON" benchmarks/measure_memory.py --cuda-only --device "$DEVICE" \
  "${TINY[@]}" --budget-s "$MEMORY_BUDGET_S" --json "$OUT/measure_memory.json" 2>&1 \
  | tee "$OUT/measure_memory.log"
memory=${PIPESTATUS[0]}

# 5. The two tables in one file for benchmarks/README.md.
"$PYTHON" - "$OUT" "$bench" "$memory" <<'EOF' | tee "$OUT/summary.md"
import json, sys, time
from pathlib import Path
out, bench, memory = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
print(f"# GPU run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
b = out / "bench_worker.json"
if b.exists():
    data = json.loads(b.read_text())
    print(f"bench_worker --cuda on {data['device']} (dense bf16 peak {data['peak_tflops']:.0f} TFLOP/s), "
          f"shape {data['shape']}, token-weighted context {data['context']:.0f} tokens")
    print(data["table"])
else:
    print(f"bench_worker: no results (exit status {bench}; see bench_worker.log)")
m = out / "measure_memory.json"
if m.exists():
    data = json.loads(m.read_text())
    print(f"\nmeasure_memory: {data['title']}")
    if "p90" in data:
        print(f"runs {data['runs']}: p50 |error| {data['p50']:.1%}, p90 |error| {data['p90']:.1%}, "
              f"under-estimated {data['under']}, beyond the estimate with its slack {data['beyond_slack']}")
    skipped = [r for r in data["rows"] if "skipped" in r]
    if skipped:
        print(f"skipped {len(skipped)}: "
              + "; ".join(f"{r['configuration']}: {r['skipped'][:80]}" for r in skipped))
else:
    print(f"\nmeasure_memory: no results (exit status {memory}; see measure_memory.log)")
print(f"\nexit status: bench_worker {bench}, measure_memory {memory}")
EOF
say "done"
[[ "$bench" -eq 0 && "$memory" -eq 0 ]]
