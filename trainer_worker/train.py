"""Training process entry point: ``python -m trainer_worker.train --config RUN.json``.

Started by the agent, one process per job attempt. It picks the recipe for the spec, runs it, and reports
the outcome through the events file: a ``result`` line and exit 0, an ``error`` line and exit 1, or a
``cancelled`` state and exit 143 after SIGTERM. Unsupported specs are rejected before torch is imported,
so a bad job fails in well under a second.
"""

from __future__ import annotations

import argparse
import logging
import traceback
from pathlib import Path

from trainer_worker import distributed, recipes
from trainer_worker.errors import Cancelled, TrainingError, classify
from trainer_worker.events import EventSink
from trainer_worker.run_config import RunConfig
from trainer_worker.stop import EXIT_CANCELLED, StopSignal

EXIT_FAILED = 1


def run(cfg: RunConfig, sink: EventSink, stop: StopSignal) -> int:
    """Run one attempt and return the process exit code; every outcome is also written to ``sink``."""
    try:
        spec = cfg.job_spec()
        recipes.check_supported(spec)
        distributed.check_supported(spec)
        adapter_dir, merged_dir, final_metrics = recipes.build(cfg, spec, sink, stop).run()
    except Cancelled as exc:
        sink.log(f"Training stopped: {exc}.")
        sink.state("cancelled")
        return EXIT_CANCELLED
    except Exception as exc:
        if stop.requested:  # a failure while stopping is still a cancellation
            sink.state("cancelled")
            return EXIT_CANCELLED
        if isinstance(exc, TrainingError):
            message = exc.message
        else:
            message = f"Training failed: {type(exc).__name__}: {exc}"
            sink.log(traceback.format_exc(), "error")
        sink.error(classify(exc), message[:2000])
        return EXIT_FAILED
    sink.result(adapter_dir, merged_dir, final_metrics)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer_worker.train", description="Run one training job."
    )
    parser.add_argument("--config", type=Path, required=True, help="RUN.json written by the agent")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = RunConfig.load(args.config)
    sink = EventSink(cfg.events_file)
    try:
        return run(cfg, sink, StopSignal().install())
    except Cancelled:  # a signal that arrived before run() was ready to catch it
        sink.state("cancelled")
        return EXIT_CANCELLED
    finally:
        sink.close()


if __name__ == "__main__":
    raise SystemExit(main())
