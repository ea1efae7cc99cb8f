"""Multi-node jobs on Ray: ``python -m trainer_worker.ray_launch --config RUN.json --address ADDRESS``.

The agent starts this instead of torchrun when a job asks for several nodes and the worker has a Ray cluster
(``TUNEFORGE_RAY_ADDRESS``; see :func:`trainer_worker.distributed.launch_command`). It is a Ray *driver*:
``ray.init(address=...)`` attaches it to the Ray node on its own host (the GCS address of a cluster the
worker's host has joined, e.g. as a node with no CPUs or GPUs; a ``ray://`` address would go through Ray
Client, which these tests do not cover). It never starts a node, a dashboard or a job server itself. It
runs Ray Train's ``TorchTrainer`` with one Ray Train worker per rank. Each worker runs the same recipe
entry as a torchrun rank (:func:`trainer_worker.train.train_rank` over the same RUN.json) with
torchrun's variables (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``) and
the process group Ray Train made (gloo on CPUs, nccl on GPUs), which
:func:`trainer_worker.distributed.init_process_group` joins, DeepSpeed included.

Placement: ``node_count x ranks per node`` workers, gang-scheduled in one placement group, on nodes with the
job's GPU type (:data:`GPU_TYPE_LABEL`). One rank per node (CPU jobs, one-GPU nodes) is ``STRICT_SPREAD``:
every rank on its own Ray node. Several GPUs per node is ``PACK`` with one GPU per rank: Ray fills a node's
GPUs before the next node's, so on nodes of ``gpu_count`` GPUs (a KubeRay worker group sized like the job)
the ranks land ``gpu_count`` to a node on ``node_count`` nodes; the rank lines say where each one ran (the
Ray node id). A cluster that lacks the nodes as it stands is said in the job's log at once; ranks not
placed within ``--placement-timeout`` seconds (TUNEFORGE_RAY_PLACEMENT_TIMEOUT_S, 30 minutes: time for an
autoscaler to add nodes) fail the attempt with INSUFFICIENT_HARDWARE, naming what the cluster lacks.

Storage: the worker's work dir (RUN.json, data, model, the events file, checkpoints, outputs) must be on a
filesystem every Ray node mounts at the same path (a ReadWriteMany volume on Kubernetes). The agent then
tails the events file and uploads checkpoints exactly as for a single-node job.

Failures: Ray Train restarts all ranks when one is lost (a node, a killed process), up to
``--max-failures`` times. A restarted rank resumes from the newest checkpoint this attempt completed (one
the recipe announced with a ``checkpoint`` event, so every rank had written its part), or else from the
checkpoint the agent fetched before the attempt. A failure the recipe reports itself (bad data, out of
memory) is not retried: it would fail the same way again.

Cancellation: the agent SIGTERMs this process's group; the driver (waiting for Ray Train in short steps, so
the signal is handled at once) writes ``cancelled`` and leaves the cluster, and Ray ends every actor the
driver owned, the ranks included (as it does when the driver is killed outright).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from tuneforge.v1 import job_pb2

from trainer_worker import checkpointing, distributed
from trainer_worker.errors import Cancelled
from trainer_worker.events import CheckpointEvent, EventSink, EventTail, MalformedEvent, RankEvent
from trainer_worker.launcher import KEPT_TUNEFORGE
from trainer_worker.run_config import RunConfig
from trainer_worker.stop import EXIT_CANCELLED
from tuneforge_core.reasons import Reason

T = TypeVar("T")
log = logging.getLogger(__name__)

EXIT_FAILED = 1
# The Trainer's own checkpoint folders (recipes.base: TrainingArguments.output_dir).
TRAINER_CHECKPOINTS = "checkpoints"
# What the ranks need from the driver's environment (which is already the agent's, less the platform's
# secrets): Ray starts rank processes with the environment of each node's raylet, not the driver's.
RANK_ENV_PREFIXES = ("HF_", "TRANSFORMERS_", "TOKENIZERS_", "TORCH_", "NCCL_", "GLOO_", "PYTORCH_")
RANK_ENV_NAMES = frozenset({"PYTHONUNBUFFERED", *KEPT_TUNEFORGE})
# Ray Train replaces print() in its workers with one that ignores ``file=``: libraries that print into a
# buffer (datasets' fingerprinting disassembles functions that way) would flood the job's output.
RANK_ENV_FIXED = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


# The Ray node label naming a node's GPU type, as the catalog's hardware option (nvidia-h100,
# nvidia-a100-80gb, ...): each GPU group of deploy/k8s/components/ray/raycluster.yaml sets it, and a node
# started by hand takes it with `ray start --labels=tuneforge.dev/gpu-type=<option>`. A GPU job's ranks ask
# for it (Ray Train's label_selector), so a job for H100s runs on H100 nodes only, never on whatever GPU a
# mixed cluster has free; a cluster with no node of the job's type leaves it waiting (the job's log says
# so at once), until nodes join or the placement timeout ends the attempt (INSUFFICIENT_HARDWARE).
GPU_TYPE_LABEL = "tuneforge.dev/gpu-type"


def scaling(spec: job_pb2.JobSpec) -> dict[str, Any]:
    """ScalingConfig's arguments for the job: one Ray Train worker per rank, placed node by node, on
    nodes labelled with the job's GPU type (`GPU_TYPE_LABEL`)."""
    per_node = distributed.process_count(spec)
    gpus = distributed.uses_gpus(spec)
    config: dict[str, Any] = {
        "num_workers": distributed.node_count(spec) * per_node,
        "use_gpu": gpus,
        "resources_per_worker": {"GPU": 1} if gpus else {"CPU": 1},
        "placement_strategy": "STRICT_SPREAD" if per_node == 1 else "PACK",
    }
    if gpus:
        config["label_selector"] = {GPU_TYPE_LABEL: spec.hardware.gpu_type}
    return config


def placement_shortfall(spec: job_pb2.JobSpec, nodes: Sequence[Mapping[str, Any]]) -> str | None:
    """Why a cluster of these nodes (``ray.nodes()``) could never place the job's ranks as it stands, even
    idle: too few live nodes of the job's GPU type, or too few GPUs (CPUs) on them. None when it could
    (the ranks may still wait for nodes busy with other work)."""
    placement = scaling(spec)
    wanted: int = placement["num_workers"]
    resource, per_rank = next(iter(placement["resources_per_worker"].items()))
    selector: dict[str, str] = placement.get("label_selector", {})
    eligible = [n for n in nodes if n.get("Alive")
                and all((n.get("Labels") or {}).get(k) == v for k, v in selector.items())]
    capacity = [int(float((n.get("Resources") or {}).get(resource, 0)) // per_rank) for n in eligible]
    spread = placement["placement_strategy"] == "STRICT_SPREAD"
    if (sum(1 for c in capacity if c) if spread else sum(capacity)) >= wanted:
        return None
    kind = "".join(f" labelled {k}={v}" for k, v in selector.items())
    need = f"{wanted} nodes with a {resource} each" if spread else f"{wanted} {resource}s"
    holding = sum(1 for c in capacity if c)
    return (f"the cluster has {holding} live node(s){kind} with {resource}s, {sum(capacity)} {resource}(s) "
            f"in all; the job's {wanted} ranks need {need}")


class PlacementTimeout(Exception):
    """No rank of the run was placed within the placement timeout."""


def placement_watch(placed: Callable[[], bool], timeout_s: float,
                    clock: Callable[[], float] = time.monotonic) -> Callable[[], None]:
    """A check for `fit_interruptibly`: raises PlacementTimeout once `timeout_s` passed (from now) and
    `placed()` never said yes; 0: never. Once placed it costs nothing."""
    since = clock()
    done = timeout_s <= 0

    def check() -> None:
        nonlocal done
        if done:
            return
        if placed():
            done = True
        elif clock() - since >= timeout_s:
            raise PlacementTimeout(f"no rank was placed within {timeout_s:g} s")

    return check


def ranks_placed(events_file: Path) -> bool:
    """Whether this driver's ranks have a place on the cluster: Ray made a placement group of this driver's
    Ray job (a placement group id ends with its job's id), or a rank already started."""
    import ray
    from ray.util import placement_group_table

    try:
        job = ray.get_runtime_context().get_job_id()
        if any(pg_id.endswith(job) and pg.get("state") == "CREATED"
               for pg_id, pg in placement_group_table().items()):
            return True
    except Exception:  # the GCS out of reach for a moment: asked again in half a second
        log.debug("could not read the cluster's placement groups", exc_info=True)
    return starts(events_file) > 0


def cluster_shortfall(spec: job_pb2.JobSpec) -> str | None:
    """`placement_shortfall` of the cluster this driver is attached to; None where its nodes cannot be
    read (that says nothing about placement)."""
    import ray

    try:
        nodes = ray.nodes()
    except Exception:
        log.debug("could not list the cluster's nodes", exc_info=True)
        return None
    return placement_shortfall(spec, nodes)


def rank_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables of the driver's environment that the ranks get (Hugging Face, torch, NCCL settings)."""
    source = os.environ if environ is None else environ
    kept = {k: v for k, v in source.items() if k.startswith(RANK_ENV_PREFIXES) or k in RANK_ENV_NAMES}
    return {**kept, **RANK_ENV_FIXED}


# -- a rank -------------------------------------------------------------------------------------------


def train_loop(config: dict[str, str]) -> int:
    """One Ray Train worker: torchrun's node-rank variable, the newest checkpoint, then the recipe."""
    import ray.train

    from trainer_worker import train

    context = ray.train.get_context()
    # Ray Train sets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE and NODE_RANK; torchrun calls the node
    # rank GROUP_RANK, which World.from_env reads.
    os.environ["GROUP_RANK"] = str(context.get_node_rank())
    path = Path(config["run_config"])
    cfg = RunConfig.load(path)
    started = starts(cfg.events_file)  # before this start's own rank lines
    step = restore_checkpoint(cfg, rank=context.get_world_rank())
    if started and context.get_world_rank() == 0:
        resume = f"resuming from the checkpoint of step {step}" if step else "no checkpoint was complete yet"
        sink = EventSink(cfg.events_file)
        sink.log(f"Ray restarted the ranks (start {started + 1}); {resume}.", "warning")
        sink.close()
    return train.train_rank(path, handle_signals=False)


def completed_steps(events_file: Path) -> list[int]:
    """The steps whose checkpoints the recipe announced in this attempt (after every rank wrote its part)."""
    try:
        events = EventTail(events_file).read()
    except MalformedEvent:  # the agent fails the job for it; a restart only falls back to older checkpoints
        return []
    return [e.step for e in events if isinstance(e, CheckpointEvent)]


def restore_checkpoint(cfg: RunConfig, *, rank: int) -> int | None:
    """Put this attempt's newest complete checkpoint where the recipe resumes from it; its step, or None.

    After a Ray restart the Trainer's own checkpoint folder still holds what the lost run saved; the ones
    the events file announced are complete. The newest one is hard-linked into the resume folder with the
    ``COMPLETE`` marker (:func:`trainer_worker.checkpointing.resume_checkpoint` takes the newest marked
    one there, so it wins over an older checkpoint the agent fetched). Every rank calls this at once and
    reaches the same answer; each builds a private copy and the first rename wins.
    """
    trainer_dir = cfg.output_dir / TRAINER_CHECKPOINTS
    steps = [s for s in completed_steps(cfg.events_file) if (trainer_dir / f"checkpoint-{s}").is_dir()]
    if not steps:
        return None
    step = max(steps)
    target = checkpointing.resume_dir(cfg.output_dir) / f"checkpoint-{step}"
    if (target / checkpointing.COMPLETE).is_file():
        return step
    partial = target.with_name(f".partial-{target.name}-rank{rank}")
    shutil.rmtree(partial, ignore_errors=True)
    # Hard links, as when the recipe staged it: no copy of the weights, and safe from the Trainer's rotation.
    shutil.copytree(trainer_dir / target.name, partial, copy_function=checkpointing._link_or_copy)
    (partial / checkpointing.COMPLETE).write_text(str(step))
    try:
        partial.rename(target)
    except OSError:  # another rank's copy is already in place
        shutil.rmtree(partial, ignore_errors=True)
    return step


def starts(events_file: Path) -> int:
    """How many times rank 0 has started in this attempt (1 for a run Ray never restarted)."""
    try:
        events = EventTail(events_file).read()
    except MalformedEvent:
        return 0
    return sum(1 for e in events if isinstance(e, RankEvent) and e.rank == 0)


# -- the driver -----------------------------------------------------------------------------------------


def _stop_on_signal(signum: int, _frame: FrameType | None) -> None:
    raise Cancelled(f"received {signal.Signals(signum).name}")


def handle_stop_signals() -> None:
    """SIGTERM/SIGINT raise Cancelled in the driver's main thread (ray.init installs its own handlers, so
    this runs again once connected)."""
    signal.signal(signal.SIGTERM, _stop_on_signal)
    signal.signal(signal.SIGINT, _stop_on_signal)


def fit_interruptibly(fit: Callable[[], T], check: Callable[[], None] = lambda: None) -> T:
    """``fit()`` on a thread of its own while the main thread waits in short steps, calling ``check``
    after each (an exception it raises ends the wait; the driver then leaves the cluster).

    A driver blocked in Ray's ``fit`` (a wait inside Ray's C++ core) would run no signal handler until
    training ended; waiting here keeps SIGTERM prompt, so a cancellation stops the ranks at once.
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = fit()
        except BaseException as exc:  # handed to the main thread as it is
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
        check()
    if "error" in outcome:
        raise outcome["error"]
    result: T = outcome["result"]
    return result


def drive(cfg: RunConfig, config: Path, address: str, max_failures: int, sink: EventSink,
          placement_timeout_s: float = distributed.DEFAULT_RAY_PLACEMENT_TIMEOUT_S) -> int:
    """Run the ranks on the cluster at ``address`` and wait for them; the exit code of rank 0."""
    import ray
    from ray.train.torch import TorchConfig, TorchTrainer

    # What ray.train exports under Train v2 (Ray's default), imported where it is defined: Ray 2.60's type
    # hints on TorchTrainer still name Train v1's classes, hence the ignores below.
    from ray.train.v2.api.config import FailureConfig, ScalingConfig
    from ray.train.v2.api.config import RunConfig as RayRunConfig
    from ray.train.v2.api.exceptions import TrainingFailedError

    spec = cfg.job_spec()
    placement = scaling(spec)
    # Attaches to the cluster; never starts a node of its own, nor a dashboard.
    ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)
    handle_stop_signals()
    sink.log(
        f"Running {placement['num_workers']} ranks with Ray Train on the cluster at {address} "
        f"({distributed.process_count(spec)} per node on {distributed.node_count(spec)} nodes, "
        f"{placement['placement_strategy']}, up to {max_failures} restarts)."
    )
    wait = (f"up to {placement_timeout_s:g} s ({distributed.RAY_PLACEMENT_TIMEOUT_ENV}), then fails"
            if placement_timeout_s > 0 else f"without limit ({distributed.RAY_PLACEMENT_TIMEOUT_ENV}=0)")
    shortfall = cluster_shortfall(spec)
    if shortfall:
        sink.log(f"The Ray cluster cannot place this job now: {shortfall}. It waits for nodes to join (an "
                 f"autoscaler may add them) {wait}.", "warning")
    trainer = TorchTrainer(
        train_loop,  # type: ignore[arg-type]  # returns rank 0's exit code: Result.return_value
        train_loop_config={"run_config": str(config)},
        torch_config=TorchConfig(backend="nccl" if distributed.uses_gpus(spec) else "gloo"),
        scaling_config=ScalingConfig(**placement),
        run_config=RayRunConfig(  # type: ignore[arg-type]
            name=f"{cfg.job_id}-attempt-{cfg.attempt}",
            # Ray Train's own run state; beside the work dir, on the storage every node shares.
            storage_path=str(config.parent / "ray"),
            failure_config=FailureConfig(max_failures=max_failures),
            worker_runtime_env={"env_vars": rank_env()},
        ),
    )
    try:
        watch = placement_watch(lambda: ranks_placed(cfg.events_file), placement_timeout_s)
        result = fit_interruptibly(trainer.fit, watch)
    except PlacementTimeout:
        now = cluster_shortfall(spec)
        why = f": {now}" if now else " (its nodes of this kind stayed busy with other work)"
        sink.error(Reason.INSUFFICIENT_HARDWARE,
                   f"Ray could not place this job's {placement['num_workers']} ranks on the cluster at "
                   f"{address} within {placement_timeout_s:g} s "
                   f"({distributed.RAY_PLACEMENT_TIMEOUT_ENV}){why}.")
        return EXIT_FAILED
    except TrainingFailedError as exc:
        message = f"Ray Train stopped the run after {starts(cfg.events_file)} start(s) of its ranks: {exc}"
        sink.error(Reason.TRAINING_FAILED, message[:2000])
        return EXIT_FAILED
    code = result.return_value  # type: ignore[attr-defined]
    return int(code) if code is not None else EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer_worker.ray_launch",
                                     description="Run one multi-node training job on a Ray cluster.")
    parser.add_argument("--config", type=Path, required=True, help="RUN.json written by the agent")
    parser.add_argument("--address", required=True, help="the Ray cluster (TUNEFORGE_RAY_ADDRESS)")
    parser.add_argument("--max-failures", type=int, default=distributed.DEFAULT_RAY_MAX_FAILURES,
                        help="restarts of the ranks after a lost node before the attempt fails")
    parser.add_argument("--placement-timeout", type=float,
                        default=distributed.DEFAULT_RAY_PLACEMENT_TIMEOUT_S,
                        help="seconds the ranks may wait to be placed before the attempt fails (0: no limit)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = args.config.resolve()
    cfg = RunConfig.load(config)
    sink = EventSink(cfg.events_file)  # the driver speaks for the attempt as a whole, like rank 0
    handle_stop_signals()
    try:
        return drive(cfg, config, args.address, args.max_failures, sink, args.placement_timeout)
    except Cancelled as exc:
        sink.log(f"Stopping every rank: {exc}.")
        sink.state("cancelled")
        return EXIT_CANCELLED
    except ConnectionError as exc:
        sink.error(Reason.TRAINING_FAILED, f"Could not reach the Ray cluster at {args.address}: {exc}")
        return EXIT_FAILED
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM while leaving ends the driver
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            with contextlib.suppress(Exception):
                ray.shutdown()  # Ray ends the actors this driver owned: the controller and every rank
        sink.close()


if __name__ == "__main__":
    raise SystemExit(main())
