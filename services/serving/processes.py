"""Model processes (services.serving.runner), one per deployment, started and stopped by the serving service.

A process is started from the event loop's thread (the main thread of the services process) and sets
PR_SET_PDEATHSIG first thing (services.serving.runner.die_with_parent): when the services process dies,
however it dies, its model processes get SIGTERM, so none outlives the platform. Its stdout carries the
runner's events; its stderr goes to `runner.log` in the
deployment's folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

# The runner asks for PR_SET_PDEATHSIG itself and checks that its parent is still this process: no
# preexec_fn here, since running Python between fork and exec in a process serving gRPC can abort in
# grpcio's fork handlers ("epoll_wait error: Bad file descriptor").
PARENT_PID_ENV = "TUNEFORGE_SERVING_PARENT_PID"


class RunnerFailed(Exception):
    """The model did not load, or failed its self-check; `reason` is a tuneforge Reason name."""

    def __init__(self, reason: str, message: str, check: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.check = check


@dataclass
class ModelProcess:
    deployment_id: str
    process: asyncio.subprocess.Process
    log_path: Path
    port: int = 0
    check: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    async def start(cls, deployment_id: str, config: dict[str, Any], folder: Path) -> ModelProcess:
        config_path, log_path = folder / "runner.json", folder / "runner.log"
        stderr = await asyncio.to_thread(_prepare, folder, config_path, config, log_path)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "services.serving.runner", str(config_path),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=stderr,
                env={**os.environ, "PYTHONUNBUFFERED": "1", PARENT_PID_ENV: str(os.getpid())})
        finally:
            stderr.close()
        log.info("deployment %s: model process %d started", deployment_id, process.pid)
        return cls(deployment_id, process, log_path)

    async def _event(self) -> dict[str, Any] | None:
        """The runner's next event, or None when it ended; other lines (libraries printing) are skipped."""
        assert self.process.stdout is not None
        while True:
            line = await self.process.stdout.readline()
            if not line:
                return None
            if line.startswith(b'{"event"'):
                with contextlib.suppress(ValueError):
                    event: dict[str, Any] = json.loads(line)
                    return event

    async def wait_ready(self, timeout_s: float, *, serve: bool = True) -> dict[str, Any]:
        """The passed self-check once the process serves (or, with `serve` False, once it checked);
        RunnerFailed otherwise. A process that takes longer than `timeout_s` is stopped."""
        try:
            async with asyncio.timeout(timeout_s):
                return await self._wait_ready(serve)
        except TimeoutError:
            await self.stop(1.0)
            raise RunnerFailed("INTERNAL", f"the model did not load and pass its self-check within "
                                           f"{timeout_s:g} s (TUNEFORGE_SERVING_LOAD_TIMEOUT_S)") from None

    async def _wait_ready(self, serve: bool) -> dict[str, Any]:
        while True:
            event = await self._event()
            if event is None:
                code = await self.process.wait()
                raise RunnerFailed("INTERNAL", f"the model process exited with status {code} before it "
                                               f"was ready (its log: {self.log_path})", self.check or None)
            kind = event.get("event")
            if kind == "failed":
                raise RunnerFailed(str(event.get("reason") or "INTERNAL"), str(event.get("error")))
            if kind == "checked":
                self.check = dict(event.get("check") or {})
                if event.get("error"):
                    raise RunnerFailed("INTERNAL", str(event["error"]), self.check)
                if not serve:
                    return self.check
            if kind == "listening":
                self.port = int(event["port"])
                # Keep reading stdout, so a library printing there can never block the process.
                asyncio.get_running_loop().create_task(self._drain())
                return self.check

    async def _drain(self) -> None:
        with contextlib.suppress(Exception):
            while await self._event() is not None:
                pass

    async def stop(self, grace_s: float) -> None:
        if self.process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.terminate()
        try:
            await asyncio.wait_for(self.process.wait(), timeout=grace_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()
        log.info("deployment %s: model process %d stopped", self.deployment_id, self.process.pid)


def _prepare(folder: Path, config_path: Path, config: dict[str, Any], log_path: Path) -> BinaryIO:
    folder.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(config))
    return open(log_path, "ab")  # the caller closes it once the child holds it
