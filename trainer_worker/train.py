"""Training process entry point: ``python -m trainer_worker.train --config RUN.json``.

Started by the agent, one process per job attempt. It picks the recipe for the spec, runs it, and reports
the outcome through the events file: a ``result`` line and exit 0, an ``error`` line and exit 1, or a
``cancelled`` state and exit 143 after SIGTERM. Unsupported specs are rejected before torch is imported,
so a bad job fails in well under a second.

Under torchrun the same entry point runs once per rank (``distributed.launch_command``): every rank writes
a ``rank`` line (who it is: rank, pid, host), and only the main rank writes metrics, logs and the result.
"""

from __future__ import annotations

import argparse
import logging
import os
import traceback
from collections.abc import Mapping
from pathlib import Path

from trainer_worker import distributed, recipes
from trainer_worker.errors import Cancelled, TrainingError, describe
from trainer_worker.events import EventLogHandler, EventSink
from trainer_worker.run_config import RunConfig
from trainer_worker.stop import EXIT_CANCELLED, StopSignal
from trainer_worker.sysmetrics import SystemSampler, peak_metrics
from tuneforge_core.reasons import Reason

EXIT_FAILED = 1
# Loggers whose WARNING+ records go to the job log: the root, and the libraries that do not propagate to it.
LIBRARY_LOGGERS = ("", "transformers", "DeepSpeed")


def run(cfg: RunConfig, sink: EventSink, stop: StopSignal) -> int:
    """Run one attempt and return the process exit code; every outcome is also written to ``sink``."""
    try:
        spec = cfg.job_spec()
        recipes.check_supported(spec)
        distributed.check_supported(spec)
        distributed.init_process_group(spec)
        for caveat in distributed.caveats(spec):
            sink.log(caveat, "warning")
        recipe = recipes.build(cfg, spec, sink, stop)
        adapter_dir, merged_dir, final_metrics = recipe.run()
    except Cancelled as exc:
        sink.log(f"Training stopped: {exc}.")
        sink.state("cancelled")
        return EXIT_CANCELLED
    except Exception as exc:
        if stop.requested:  # a failure while stopping is still a cancellation
            sink.state("cancelled")
            return EXIT_CANCELLED
        if not isinstance(exc, TrainingError):
            sink.log(traceback.format_exc(), "error")
        reason, message = describe(exc)
        if reason == Reason.OUT_OF_MEMORY:
            message = f"{message} {memory_estimate(cfg)}".strip()
        sink.error(reason, message[:2000])
        return EXIT_FAILED
    finally:
        distributed.leave_process_group()
    sink.result(adapter_dir, merged_dir, with_run_metrics(final_metrics), kept_step=recipe.kept_step,
                early_stop=recipe.early_stop, tokens_trained=recipe.tokens_trained,
                evaluation=recipe.evaluation_report)
    return 0


def memory_estimate(cfg: RunConfig) -> str:
    """The estimate the job was admitted with, for an out-of-memory message: its memory per GPU by term on
    the GPU type the spec names, and what the GPU this process ran on holds.

    It comes with the assignment (EstimationService.ValidateHardware's fit at CreateJob); empty when there
    was none (no GPU type named, or a model the estimator does not know), since the message must not fail
    itself.
    """
    try:
        fit = cfg.admitted_fit()
    except Exception:  # an estimate is a courtesy: the failure itself is already reported
        return ""
    if fit is None or not fit.memory_per_gpu.total:
        return ""
    gib = 2**30
    memory = fit.memory_per_gpu
    sentence = (
        f"Estimated need: {memory.total / gib:.1f} GiB per GPU on {fit.gpu_count} x {fit.gpu_type} (weights "
        f"{memory.weights / gib:.1f}, activations {memory.activations / gib:.1f}, logits "
        f"{memory.logits / gib:.1f}, optimizer states {memory.optimizer_states / gib:.1f})"
    )
    device = _device_memory()
    if device is not None:
        sentence += f" against {device[1] / gib:.1f} GiB on this {device[0]}"
    return f"{sentence}; EstimationService.ValidateHardware names the cheapest configuration that fits."


def _device_memory() -> tuple[str, int] | None:
    """Name and memory of the GPU this process trains on; None on a CPU (or when torch cannot say)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return str(props.name), int(props.total_memory)
    except Exception:
        return None


def with_run_metrics(final_metrics: Mapping[str, float]) -> dict[str, float]:
    """The recipe's final metrics plus the keys every run reports (the estimation service calibrates on
    them): peak host and GPU memory, and tokens per second over the whole run."""
    metrics = dict(final_metrics)
    metrics.update(peak_metrics())
    tokens, runtime = metrics.get("num_input_tokens_seen"), metrics.get("train_runtime")
    if "train_tokens_per_second" not in metrics and tokens and runtime:
        metrics["train_tokens_per_second"] = tokens / runtime
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer_worker.train", description="Run one training job."
    )
    parser.add_argument("--config", type=Path, required=True, help="RUN.json written by the agent")
    args = parser.parse_args(argv)
    return train_rank(args.config)


def train_rank(config: Path, *, handle_signals: bool = True) -> int:
    """One rank (or the only process) of an attempt, from its RUN.json; the process exit code.

    ``handle_signals=False`` is for a rank that Ray Train runs on a thread of its worker process, where no
    signal handler can be installed: Ray stops such ranks by ending their worker processes.
    """
    # Every torch.load in this process (optimizer, scheduler, RNG state, DeepSpeed shards) unpickles only
    # tensors and allow-listed types, whatever its caller asked for: checkpoints come back from storage.
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = RunConfig.load(config)
    me = distributed.world()
    sink = EventSink(cfg.events_file, main=me.is_main, rank=me.rank, sampler=SystemSampler(me.local_rank))
    sink.rank(**me.describe())
    forward = EventLogHandler(sink)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).addHandler(forward)
    try:
        stop = StopSignal()
        return run(cfg, sink, stop.install() if handle_signals else stop)
    except Cancelled:  # a signal that arrived before run() was ready to catch it
        sink.state("cancelled")
        return EXIT_CANCELLED
    finally:
        if me.is_main and cfg.speed is not None:  # the speed options the recipe resolved (RunConfig.speed)
            cfg.dump(config)
        for name in LIBRARY_LOGGERS:
            logging.getLogger(name).removeHandler(forward)
        sink.close()


if __name__ == "__main__":
    raise SystemExit(main())
