"""Distributed training: which processes a job runs as, and what the HF Trainer needs to know about them.

Seam between the recipes and the launcher. Recipes call :func:`trainer_kwargs` when they build their
TrainingArguments/TRL config and :func:`world` to decide who writes events and artifacts; the launcher
decides from the spec whether to start one process or ``torchrun``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from tuneforge.v1 import job_pb2

from trainer_worker.errors import TrainingError

SINGLE_PROCESS = (job_pb2.DISTRIBUTED_STRATEGY_UNSPECIFIED, job_pb2.DISTRIBUTED_STRATEGY_NONE)


@dataclass(frozen=True)
class World:
    """This process's place among the job's processes (torchrun's environment, or a single process)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> World:
        return cls(
            rank=int(os.environ.get("RANK", "0")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
        )


def world() -> World:
    return World.from_env()


def check_supported(spec: job_pb2.JobSpec) -> None:
    """Reject distributed settings this worker cannot run, before torch is imported."""
    hardware = spec.hardware
    if hardware.strategy not in SINGLE_PROCESS or hardware.gpu_count > 1 or hardware.node_count > 1:
        raise TrainingError(
            "TRAINING_FAILED",
            "Distributed training (several GPUs, nodes, DDP, ZeRO, FSDP) is not supported yet.",
        )


def trainer_kwargs(spec: job_pb2.JobSpec) -> dict[str, Any]:
    """Extra TrainingArguments for the job's strategy (deepspeed config, fsdp, ddp backend...)."""
    return {}
