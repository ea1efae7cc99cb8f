"""Starts and stops the whole platform on embedded defaults: what `tuneforge up`, `make demo` and the
end-to-end tests run.

Processes: a nats-server (unless a NATS URL is given), one services process hosting the four services,
and N trainer workers. Each default (NATS, database, storage) can point at real infrastructure through the
same TUNEFORGE_* variables the services read.

Local base models: unless TUNEFORGE_MODEL_ROOTS is set (in the environment or `PlatformConfig.env`), the
embedded platform allows the folders under `<data_dir>/models` and nothing else on its disk
(tuneforge_core.models has the rule).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.kit.embedded import EmbeddedNats
from services.kit.runtime import EXIT_ADDRESS_IN_USE, AddressInUse, check_address


class PlatformStartError(RuntimeError):
    """The platform did not come up; the message says why in a sentence fit for a user."""


_HINT = " (another TuneForge may be running there; choose another with --port or TUNEFORGE_GRPC_PORT)"


@dataclass
class PlatformConfig:
    data_dir: Path
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 50051
    nats_url: str = ""
    workers: int = 1
    # Extra TUNEFORGE_* (or other) variables for every child, e.g. DATABASE_URL, STORAGE_URL.
    env: dict[str, str] = field(default_factory=dict)


class Platform:
    def __init__(self, config: PlatformConfig) -> None:
        self.config = config
        self.data_dir = config.data_dir.resolve()
        self.nats: EmbeddedNats | None = None
        self.nats_url = config.nats_url
        self.address = ""
        self.services: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self.logs_dir = self.data_dir / "logs"

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "TUNEFORGE_DATA_DIR": str(self.data_dir),
            "TUNEFORGE_NATS_URL": self.nats_url,
            "TUNEFORGE_GRPC_HOST": self.config.grpc_host,
            "TUNEFORGE_GRPC_PORT": str(self.config.grpc_port),
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": env.get("HF_HUB_OFFLINE", "1"),
        })
        env.setdefault("TUNEFORGE_MODEL_ROOTS", str(self.data_dir / "models"))
        env.update(self.config.env)
        return env

    def _spawn(self, args: list[str], log_name: str, extra_env: dict[str, str] | None = None
               ) -> subprocess.Popen[bytes]:
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        with open(self.logs_dir / log_name, "ab") as log:
            return subprocess.Popen([sys.executable, *args], env={**self.child_env(), **(extra_env or {})},
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def start(self, timeout_s: float = 120.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.config.grpc_port:  # fail before starting anything; the child's exit status covers a race
            try:
                check_address(self.config.grpc_host, self.config.grpc_port)
            except AddressInUse as exc:
                raise PlatformStartError(f"{exc}{_HINT}") from None
        try:
            if not self.nats_url:
                self.nats = EmbeddedNats(self.data_dir / "nats")
                try:
                    self.nats_url = self.nats.start()
                except RuntimeError as exc:
                    raise PlatformStartError(str(exc)) from exc
            ready = self.data_dir / "services.address"
            ready.unlink(missing_ok=True)
            self.services = self._spawn(["-m", "services.platform"], "services.log",
                                        {"TUNEFORGE_READY_FILE": str(ready)})
            deadline = time.monotonic() + timeout_s
            while not ready.exists():
                code = self.services.poll()
                if code == EXIT_ADDRESS_IN_USE:
                    raise PlatformStartError(f"address {self.config.grpc_host}:{self.config.grpc_port} is "
                                             f"already in use{_HINT}")
                if code is not None:
                    raise PlatformStartError(f"the services process exited with {code}; "
                                             f"see {self.logs_dir / 'services.log'}")
                if time.monotonic() > deadline:
                    raise PlatformStartError("the services did not start in time; "
                                             f"see {self.logs_dir / 'services.log'}")
                time.sleep(0.05)
            self.address = ready.read_text().strip()
            for _ in range(self.config.workers):
                self.start_worker()
            (self.data_dir / "platform.json").write_text(json.dumps({
                "address": self.address, "nats_url": self.nats_url,
                "services_pid": self.services.pid, "worker_pids": [w.pid for w in self.workers]}))
        except BaseException:
            self.stop()
            raise

    def start_worker(self, worker_id: str = "") -> subprocess.Popen[bytes]:
        index = len(self.workers)
        env = {"TUNEFORGE_WORKER_ID": worker_id} if worker_id else {}
        worker = self._spawn(["-m", "trainer_worker"], f"worker-{index}.log", env)
        self.workers.append(worker)
        return worker

    def check_alive(self) -> str | None:
        """A sentence naming the first child that died, or None."""
        if self.services and self.services.poll() is not None:
            return f"the services process exited with {self.services.returncode}"
        return None

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM everything (workers first, so they hand their jobs back), wait, then SIGKILL."""
        children = [w for w in self.workers if w.poll() is None]
        if self.services and self.services.poll() is None:
            children.append(self.services)
        for child in children:
            child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for child in children:
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        if self.nats:
            self.nats.stop()
            self.nats = None

    def __enter__(self) -> Platform:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
