"""Distributed training: which processes a job runs as, and what the HF Trainer needs to know about them.

One accelerator (or, on a CPU worker, one CPU rank) is one training process. A job with one process and no
strategy runs as ``python -m trainer_worker.train``; anything else runs under ``torchrun``, one rank per
GPU (``hardware.gpu_count``), as DDP, DeepSpeed ZeRO 1/2/3 (optionally offloading to CPU) or FSDP. The
strategy is a launcher setting, never a fork of the recipe: recipes call :func:`trainer_kwargs` when they
build their TrainingArguments and :func:`world` to decide who writes artifacts.

Multi-node jobs run on a Ray cluster when the worker has ``TUNEFORGE_RAY_ADDRESS``: the training process is
then a Ray driver (:mod:`trainer_worker.ray_launch`) whose Ray Train workers run the same recipe entry as
torchrun's ranks. Without it, a deployment can still start a torchrun group itself through torchrun's own
environment (``PET_NNODES``, ``PET_NODE_RANK``, ``PET_RDZV_ENDPOINT``, ...): the launcher passes only what
the environment leaves open (see docs/multinode.md). This module imports neither torch, deepspeed nor ray
at import time: the agent uses it to build the command line.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tuneforge.v1 import job_pb2

from trainer_worker.errors import TrainingError
from tuneforge_core.reasons import Reason

N = TypeVar("N", int, float)

D = job_pb2.DistributedStrategy
SINGLE_PROCESS = (D.DISTRIBUTED_STRATEGY_UNSPECIFIED, D.DISTRIBUTED_STRATEGY_NONE)
# ZeRO stage and what it offloads to CPU memory: (stage, optimizer state, parameters).
ZERO: dict[int, tuple[int, bool, bool]] = {
    D.DISTRIBUTED_STRATEGY_ZERO1: (1, False, False),
    D.DISTRIBUTED_STRATEGY_ZERO2: (2, False, False),
    D.DISTRIBUTED_STRATEGY_ZERO2_OFFLOAD: (2, True, False),
    D.DISTRIBUTED_STRATEGY_ZERO3: (3, False, False),
    D.DISTRIBUTED_STRATEGY_ZERO3_OFFLOAD: (3, True, True),
}
# torchrun reads its arguments from PET_<NAME> when they are not on the command line; any of these means the
# deployment runs a multi-node rendezvous.
MULTINODE_ENV = ("PET_RDZV_ENDPOINT", "PET_MASTER_ADDR")
# The worker's setting (read from the agent's environment; the training process gets the address on its
# command line, since TUNEFORGE_* variables never reach it): a Ray cluster that runs multi-node jobs.
RAY_ADDRESS_ENV = "TUNEFORGE_RAY_ADDRESS"
# How often Ray Train restarts the ranks of a run after losing one (a node or a rank process) before the
# attempt fails: TUNEFORGE_RAY_MAX_FAILURES.
RAY_MAX_FAILURES_ENV = "TUNEFORGE_RAY_MAX_FAILURES"
DEFAULT_RAY_MAX_FAILURES = 3
# How long a run's ranks may wait to be placed on the Ray cluster (nodes of the job's GPU type with the GPUs
# free) before the attempt fails with INSUFFICIENT_HARDWARE: TUNEFORGE_RAY_PLACEMENT_TIMEOUT_S; 0 waits
# without limit. Long enough by default for an autoscaler to add nodes.
RAY_PLACEMENT_TIMEOUT_ENV = "TUNEFORGE_RAY_PLACEMENT_TIMEOUT_S"
DEFAULT_RAY_PLACEMENT_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class World:
    """This process's place among the job's processes (torchrun's environment, or a single process)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    node_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> World:
        return cls(
            rank=int(os.environ.get("RANK", "0")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            node_rank=int(os.environ.get("GROUP_RANK", "0")),
        )

    def describe(self) -> dict[str, Any]:
        """Who this rank is, for the events file: proof of how many processes trained, and where (with the
        Ray node id when Ray Train started the rank)."""
        return {
            "rank": self.rank,
            "local_rank": self.local_rank,
            "world_size": self.world_size,
            "node_rank": self.node_rank,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "ray_node_id": ray_node_id(),
        }


def ray_node_id() -> str:
    """The id of the Ray node this process runs on; empty outside a Ray worker (never imports ray)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return ""
    return str(ray.get_runtime_context().get_node_id())


def world() -> World:
    return World.from_env()


def process_count(spec: job_pb2.JobSpec) -> int:
    """Training processes per node: one per GPU asked for (CPU workers run as many gloo ranks)."""
    return max(1, spec.hardware.gpu_count)


def node_count(spec: job_pb2.JobSpec) -> int:
    return max(1, spec.hardware.node_count)


def strategy(spec: job_pb2.JobSpec) -> job_pb2.DistributedStrategy.ValueType:
    """The spec's strategy, as the jobs service resolved it (never UNSPECIFIED; NONE means one process)."""
    return spec.hardware.strategy


def needs_launcher(spec: job_pb2.JobSpec) -> bool:
    """Whether the job runs under torchrun (several ranks, or a strategy that wants a process group)."""
    return strategy(spec) not in SINGLE_PROCESS


def uses_gpus(spec: job_pb2.JobSpec) -> bool:
    """Whether the job's ranks train on GPUs: it names a GPU type (a CPU job's gpu_count is its ranks)."""
    return spec.hardware.gpu_type not in ("", "cpu")


def ray_address() -> str:
    """The Ray cluster this worker runs multi-node jobs on (TUNEFORGE_RAY_ADDRESS); empty: none."""
    return os.environ.get(RAY_ADDRESS_ENV, "").strip()


def _ray_setting(name: str, default: N, parse: Callable[[str], N]) -> N:
    """A worker's Ray setting from the environment: a number >= 0, `default` when unset."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = parse(raw)
    except ValueError:
        value = parse("-1")
    if not value >= 0:  # NaN too
        raise TrainingError(Reason.TRAINING_FAILED, f"{name}={raw!r} on the worker is not a number >= 0.")
    return value


def ray_max_failures() -> int:
    """TUNEFORGE_RAY_MAX_FAILURES: restarts of a multi-node run after a lost node (default 3)."""
    return _ray_setting(RAY_MAX_FAILURES_ENV, DEFAULT_RAY_MAX_FAILURES, int)


def ray_placement_timeout_s() -> float:
    """TUNEFORGE_RAY_PLACEMENT_TIMEOUT_S: how long the ranks may wait to be placed (default 1800; 0: no
    limit)."""
    return _ray_setting(RAY_PLACEMENT_TIMEOUT_ENV, DEFAULT_RAY_PLACEMENT_TIMEOUT_S, float)


def runs_on_ray(spec: job_pb2.JobSpec) -> bool:
    """Whether this worker runs the job on its Ray cluster: several nodes, and TUNEFORGE_RAY_ADDRESS set."""
    return node_count(spec) > 1 and bool(ray_address())


def check_supported(spec: job_pb2.JobSpec) -> None:
    """Reject distributed settings this worker cannot run, before torch is imported."""
    chosen = strategy(spec)
    name = D.Name(chosen).removeprefix("DISTRIBUTED_STRATEGY_")
    quantized = spec.adapter == job_pb2.ADAPTER_TYPE_QLORA
    if quantized and (chosen in ZERO or chosen == D.DISTRIBUTED_STRATEGY_FSDP):
        raise TrainingError(
            Reason.TRAINING_FAILED,
            f"QLoRA cannot train under {name}: a bitsandbytes-quantized base model cannot be sharded. "
            "Use DDP (or one GPU), or LoRA without quantization.",
        )
    if chosen in ZERO and importlib.util.find_spec("deepspeed") is None:
        raise TrainingError(Reason.DEPENDENCY_ERROR, f"The {name} strategy needs DeepSpeed on the worker.")
    # A torchrun rendezvous the deployment runs (PET_*), or a group that already spans the nodes (Ray Train
    # started node_count x process_count ranks); anything else would train on one node while the job says
    # it used several.
    in_group = any(os.environ.get(v) for v in MULTINODE_ENV) or world().world_size > process_count(spec)
    if node_count(spec) > 1 and not in_group:
        raise TrainingError(
            Reason.TRAINING_FAILED,
            f"The job asks for {node_count(spec)} nodes but this worker runs jobs on one: set "
            f"{RAY_ADDRESS_ENV} on the worker to run them on a Ray cluster, or start the worker in a "
            "torchrun multi-node group (PET_RDZV_ENDPOINT or PET_MASTER_ADDR); see docs/multinode.md.",
        )


def launch_command(spec: job_pb2.JobSpec, config: Path) -> list[str]:
    """The command line of the training process(es) for one attempt.

    A multi-node job on a worker with a Ray cluster gets a Ray driver (:mod:`trainer_worker.ray_launch`);
    the cluster's address, the restart budget and the placement timeout travel as arguments, since the
    training process's environment keeps no TUNEFORGE_* variable.
    """
    train = ["-m", "trainer_worker.train", "--config", str(config)]
    if runs_on_ray(spec):
        return [sys.executable, "-m", "trainer_worker.ray_launch", "--config", str(config),
                "--address", ray_address(), "--max-failures", str(ray_max_failures()),
                "--placement-timeout", f"{ray_placement_timeout_s():g}"]
    if not needs_launcher(spec):
        return [sys.executable, *train]
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={process_count(spec)}"]
    if any(os.environ.get(v) for v in MULTINODE_ENV):
        # The deployment owns the rendezvous (endpoint, node rank); fill in only what it left open.
        defaults = {"PET_NNODES": f"--nnodes={node_count(spec)}", "PET_RDZV_BACKEND": "--rdzv-backend=c10d"}
        command += [arg for var, arg in defaults.items() if not os.environ.get(var)]
    else:
        # One node: a private rendezvous on a free port, so several workers can share a host.
        command += ["--standalone", "--nnodes=1"]
    return [*command, *train]


def init_process_group(spec: job_pb2.JobSpec) -> None:
    """Join the job's process group before the recipe loads anything (imports torch).

    DeepSpeed ZeRO-3 needs its process group before a model is built (``zero.Init``), and on CPU it must be
    gloo, which DeepSpeed would not pick by itself when asked through the Trainer. Accelerate and DeepSpeed
    reuse a group that already exists: under Ray Train the group is Ray's (made before the recipe starts),
    and DeepSpeed is still initialized here, on top of it, so ZeRO runs the same way under both launchers.
    """
    if not needs_launcher(spec) or "RANK" not in os.environ:
        return
    import torch
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(world().local_rank)
    if strategy(spec) in ZERO:
        import deepspeed

        torch.serialization.add_safe_globals(deepspeed_checkpoint_types())
        deepspeed.init_distributed(dist_backend=backend)  # joins the existing group when there is one
    elif not dist.is_initialized():
        dist.init_process_group(backend=backend)


def deepspeed_checkpoint_types() -> list[Any]:
    """The few DeepSpeed classes its checkpoints pickle besides tensors and containers.

    The training process forces ``weights_only`` on every ``torch.load`` (``train.main``); DeepSpeed asks for
    full unpickling when it resumes, so its own plain-data classes are allowed by name instead.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def deepspeed_config(spec: job_pb2.JobSpec, *, cuda: bool) -> dict[str, Any]:
    """A DeepSpeed config whose batch, precision and clipping follow the TrainingArguments ("auto")."""
    stage, offload_optimizer, offload_params = ZERO[strategy(spec)]
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": cuda, "contiguous_gradients": True}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    if stage == 3:
        # Without it, the saved model of a ZeRO-3 run holds empty shards instead of weights.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "steps_per_print": 1_000_000_000,  # the recipe reports progress; keep DeepSpeed's own log quiet
        "wall_clock_breakdown": False,
    }


def trainer_kwargs(spec: job_pb2.JobSpec) -> dict[str, Any]:
    """Extra TrainingArguments for the job's strategy (deepspeed config, fsdp, ddp backend...)."""
    chosen = strategy(spec)
    if chosen in SINGLE_PROCESS:
        return {}
    import torch

    cuda = torch.cuda.is_available()
    kwargs: dict[str, Any] = {
        "ddp_backend": "nccl" if cuda else "gloo",
        # Adapters leave most of the model frozen; searching for unused parameters every step is waste.
        "ddp_find_unused_parameters": False,
    }
    if chosen in ZERO:
        kwargs["deepspeed"] = deepspeed_config(spec, cuda=cuda)
    elif chosen == D.DISTRIBUTED_STRATEGY_FSDP:
        kwargs["fsdp"] = True
        kwargs["fsdp_config"] = {
            # FSDP2 (per-parameter sharding) takes PEFT's frozen and trainable weights in one module as is.
            "version": 2,
            "reshard_after_forward": True,  # full shard
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "state_dict_type": "FULL_STATE_DICT",  # one loadable model file on save
            "cpu_ram_efficient_loading": False,
        }
    return kwargs


def caveats(spec: job_pb2.JobSpec) -> list[str]:
    """What the job asked for that this machine runs differently, for the job log (imports torch)."""
    import torch

    if strategy(spec) == D.DISTRIBUTED_STRATEGY_FSDP and not torch.cuda.is_available():
        return ["FSDP needs GPUs: on this CPU worker Accelerate runs the ranks as DDP (unsharded)."]
    return []


def leave_process_group() -> None:
    """Tear the process group down so a rank exits without hanging on, or warning about, a live group."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is set on any rank (a collective: every rank must call it at the same point).

    Stops between steps must be agreed: a rank that leaves the loop alone leaves the others waiting in
    their next all-reduce. One tiny all-reduce per step costs nothing next to the step.
    """
    torch = sys.modules.get("torch")
    if torch is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return flag
    device = f"cuda:{torch.cuda.current_device()}" if torch.distributed.get_backend() == "nccl" else "cpu"
    value = torch.tensor([1 if flag else 0], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())
