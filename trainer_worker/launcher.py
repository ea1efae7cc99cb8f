"""Starts and stops the training process of one job attempt.

One process (``python -m trainer_worker.train``), ``torchrun`` with one rank per GPU, or, for a multi-node
job on a worker with a Ray cluster, a Ray driver (``python -m trainer_worker.ray_launch``) whose ranks run
on the cluster's nodes: the command comes from :func:`trainer_worker.distributed.launch_command`, so a
distributed strategy is another command line, not a fork of the recipe. The child gets its own session
(and so its own process group) so that a Ctrl-C meant for the agent does not reach it, and so that a stop
reaches every rank at once. On Linux the child also gets SIGTERM when the agent dies
(``PR_SET_PDEATHSIG``): torchrun would otherwise outlive the agent, and its ranks, whose parent is torchrun,
would never notice. Ranks on Ray are not in that process group: the driver stops them when it gets the
signal, and Ray ends them when the driver dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from tuneforge.v1 import job_pb2

from trainer_worker.distributed import launch_command

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child between fork and exec."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


# The training process runs user-supplied models, data and (where allowed) reward code, so it gets none of
# the platform's credentials: not the TUNEFORGE_* settings (database URL, NATS URL, keys), not the cloud
# identities the agent reads storage with, not anything named like a secret. What it needs (PATH, CUDA,
# torch and Hugging Face settings, torchrun's PET_* variables) passes through; the one worker setting it
# needs, TUNEFORGE_RAY_ADDRESS, travels on its command line (distributed.launch_command).
KEPT_TUNEFORGE = frozenset({"TUNEFORGE_WORKER_ALLOW_USER_REWARD_CODE"})
DROPPED_PREFIXES = ("TUNEFORGE_", "AWS_", "AZURE_", "GOOGLE_", "GCS_", "GCP_", "NATS_", "PG", "DATABASE_")
DROPPED_WORDS = ("PASSWORD", "PASSWD", "SECRET", "CREDENTIAL", "PRIVATE_KEY", "ACCESS_KEY", "API_KEY")


def is_platform_secret(name: str) -> bool:
    """Whether an environment variable is the platform's to keep from the training process."""
    upper = name.upper()
    if upper in KEPT_TUNEFORGE:
        return False
    return upper.startswith(DROPPED_PREFIXES) or any(word in upper for word in DROPPED_WORDS)


def training_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The child's environment: the agent's less the platform's credentials, unbuffered output, and
    whatever the agent adds."""
    kept = {k: v for k, v in os.environ.items() if not is_platform_secret(k)}
    return {**kept, "PYTHONUNBUFFERED": "1", **(extra or {})}


class TrainingProcess:
    """The running recipe (all its ranks); stdout and stderr go to a log file in the attempt's work dir."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process

    @classmethod
    async def start(
        cls,
        config: Path,
        log_path: Path,
        spec: job_pb2.JobSpec,
        env: Mapping[str, str] | None = None,
        keep_fds: Sequence[int] = (),
    ) -> TrainingProcess:
        """`keep_fds`: descriptors the child inherits (the attempt's work folder lock, so that an orphaned
        child still keeps its folder: trainer_worker.work_dirs)."""
        with log_path.open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                *launch_command(spec, config),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
                env=training_env(env),
                pass_fds=tuple(fd for fd in keep_fds if fd >= 0),
            )
        return cls(process)

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    async def wait_exit(self, seconds: float) -> bool:
        """Whether the process has exited, waiting at most ``seconds`` for it."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._process.wait(), seconds)
        return self._process.returncode is not None

    def _signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._process.pid, signum)

    async def stop(self, grace_s: float) -> int:
        """SIGTERM to every rank (the recipe stops between steps), SIGKILL once ``grace_s`` has passed."""
        if self._process.returncode is None:
            self._signal_group(signal.SIGTERM)
            if not await self.wait_exit(grace_s):
                self._signal_group(signal.SIGKILL)
        code = await self._process.wait()
        self._signal_group(signal.SIGKILL)  # no rank outlives its launcher
        return code
