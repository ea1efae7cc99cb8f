"""Starts and stops the training process of one job attempt.

One process today (``python -m trainer_worker.train``); several ranks under torchrun later, as another
command here rather than a fork of the recipe. The child gets its own session so that a Ctrl-C meant for
the agent does not reach it: the agent decides how the child stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path


def training_command(config: Path) -> list[str]:
    return [sys.executable, "-m", "trainer_worker.train", "--config", str(config)]


class TrainingProcess:
    """The running recipe; its stdout and stderr go to a log file in the attempt's work dir."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process

    @classmethod
    async def start(cls, config: Path, log_path: Path) -> TrainingProcess:
        with log_path.open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                *training_command(config),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
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

    async def stop(self, grace_s: float) -> int:
        """SIGTERM (the recipe stops between steps), then SIGKILL once ``grace_s`` has passed."""
        if self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(signal.SIGTERM)
            if not await self.wait_exit(grace_s):
                with contextlib.suppress(ProcessLookupError):
                    self._process.kill()
        return await self._process.wait()
