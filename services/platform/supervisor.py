"""Starts and stops the whole platform on embedded defaults: what `tuneforge up`, `make demo` and the
end-to-end tests run.

Processes: a nats-server (unless a NATS URL is given), one services process hosting the four services,
and N trainer workers. Each default (NATS, database, storage) can point at real infrastructure through the
same TUNEFORGE_* variables the services read.

Supervision: `Platform.supervise()`, called every half second by `tuneforge up`, restarts a worker that
died (same worker id setting, same log file) and the embedded nats-server if it died (same port and
JetStream folder, so every client reconnects by itself and nothing queued is lost), and returns one line
per restart for the caller to print; the lines also go to logs/platform.log. A child that keeps dying
soon after it started is restarted less and less often (doubling from `restart_delay_s` up to a minute),
so a broken setup does not spin. The services process is not restarted: `check_alive` reports it.

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
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlparse

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
    # Seconds before the first restart of a child that died; doubles while it keeps dying soon after
    # each start, up to MAX_RESTART_DELAY_S.
    restart_delay_s: float = 1.0


# A child that ran this long before it died is restarted after restart_delay_s again, not after longer.
STABLE_AFTER_S = 60.0
MAX_RESTART_DELAY_S = 60.0


class _Nats(EmbeddedNats):
    """The embedded nats-server, plus whether it still runs (EmbeddedNats does not say)."""

    def exit_code(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None


@dataclass
class _Restarts:
    """When a supervised child last started, and when it may start again after dying."""

    delay_s: float
    started_at: float = field(default_factory=time.monotonic)
    due_at: float | None = None  # set while it is dead and waiting to be restarted
    count: int = 0

    def schedule(self, now: float, base_s: float) -> float:
        """The delay before the next start: the base again after a long run, else twice the last one."""
        self.delay_s = base_s if now - self.started_at >= STABLE_AFTER_S else min(
            MAX_RESTART_DELAY_S, self.delay_s * 2 if self.count else base_s)
        self.due_at = now + self.delay_s
        return self.delay_s

    def started(self, now: float) -> None:
        self.started_at, self.due_at, self.count = now, None, self.count + 1


@dataclass
class _WorkerSlot:
    index: int
    worker_id: str
    restarts: _Restarts


class Platform:
    def __init__(self, config: PlatformConfig) -> None:
        self.config = config
        self.data_dir = config.data_dir.resolve()
        self.nats: _Nats | None = None
        self.nats_url = config.nats_url
        self.address = ""
        self.services: subprocess.Popen[bytes] | None = None
        # One entry per worker slot; a restarted worker replaces its slot's process.
        self.workers: list[subprocess.Popen[bytes]] = []
        self._slots: list[_WorkerSlot] = []
        self._nats_restarts = _Restarts(config.restart_delay_s)
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
                self.nats = _Nats(self.data_dir / "nats")
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
            self._write_state()
        except BaseException:
            self.stop()
            raise

    def _write_state(self) -> None:
        assert self.services is not None
        (self.data_dir / "platform.json").write_text(json.dumps({
            "address": self.address, "nats_url": self.nats_url,
            "nats_pid": self.nats.pid if self.nats else None,
            "services_pid": self.services.pid, "worker_pids": [w.pid for w in self.workers]}))

    def _spawn_worker(self, index: int, worker_id: str) -> subprocess.Popen[bytes]:
        env = {"TUNEFORGE_WORKER_ID": worker_id} if worker_id else {}
        return self._spawn(["-m", "trainer_worker"], f"worker-{index}.log", env)

    def start_worker(self, worker_id: str = "") -> subprocess.Popen[bytes]:
        index = len(self.workers)
        worker = self._spawn_worker(index, worker_id)
        self.workers.append(worker)
        self._slots.append(_WorkerSlot(index, worker_id, _Restarts(self.config.restart_delay_s)))
        if self.services is not None and self.address:
            self._write_state()
        return worker

    def supervise(self) -> list[str]:
        """Restarts what died among the workers and the embedded nats-server (each when its delay is up);
        returns a line for each death and restart, also written to logs/platform.log."""
        lines: list[str] = []
        now = time.monotonic()
        if self.nats is not None:
            lines += self._supervise_nats(now)
        for slot in self._slots:
            worker = self.workers[slot.index]
            code = worker.poll()
            if code is None:
                continue
            name = f"worker {slot.index}" + (f" ({slot.worker_id})" if slot.worker_id else "")
            if slot.restarts.due_at is None:
                delay = slot.restarts.schedule(now, self.config.restart_delay_s)
                lines.append(f"{name} (pid {worker.pid}) exited with {_exit(code)}; restarting it in "
                             f"{delay:g} s")
            elif now >= slot.restarts.due_at:
                self.workers[slot.index] = self._spawn_worker(slot.index, slot.worker_id)
                slot.restarts.started(now)
                lines.append(f"{name} restarted (pid {self.workers[slot.index].pid}, restart "
                             f"{slot.restarts.count})")
                self._write_state()
        self._log(lines)
        return lines

    def _supervise_nats(self, now: float) -> list[str]:
        assert self.nats is not None
        code = self.nats.exit_code()
        if code is None:
            return []
        restarts = self._nats_restarts
        if restarts.due_at is None:
            delay = restarts.schedule(now, self.config.restart_delay_s)
            return [f"nats-server (pid {self.nats.pid}) exited with {_exit(code)}; restarting it in "
                    f"{delay:g} s on the same port"]
        if now < restarts.due_at:
            return []
        # The same port and JetStream folder: clients reconnect to it, and the streams are as they were.
        self.nats.port = urlparse(self.nats_url).port or self.nats.port
        try:
            self.nats.start()
        except RuntimeError as exc:
            restarts.started(now)  # counts as a start that died at once: the next wait is longer
            delay = restarts.schedule(now, self.config.restart_delay_s)
            return [f"nats-server did not restart ({exc}); trying again in {delay:g} s"]
        restarts.started(now)
        if self.services is not None:
            self._write_state()
        return [f"nats-server restarted (pid {self.nats.pid}, {self.nats.url}, restart {restarts.count})"]

    def _log(self, lines: list[str]) -> None:
        if not lines:
            return
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        with open(self.logs_dir / "platform.log", "a") as log:
            log.writelines(f"{stamp} {line}\n" for line in lines)

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


def _exit(code: int) -> str:
    """An exit status in words: "code 1", "signal SIGKILL"."""
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"code {code}"
