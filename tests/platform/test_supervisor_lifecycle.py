"""The supervisor's lifecycle: one platform per data dir, children that die with the supervisor however it
dies, and a services process that is restarted on the same address."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.platform import supervisor
from services.platform.supervisor import Platform, PlatformConfig, PlatformStartError

T = TypeVar("T")

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")


def eventually(check: Callable[[], T], timeout_s: float = 30.0, what: str = "it") -> T:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def gone(pid: int) -> bool:
    """Whether `pid` has exited (a zombie nobody reaped yet counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def alive(pids: list[int]) -> list[str]:
    """What each pid still running is: its command line and state (a failure says which child lingered)."""
    out = []
    for pid in pids:
        if not gone(pid):
            with contextlib.suppress(psutil.Error):
                process = psutil.Process(pid)
                out.append(f"{pid} {process.status()} {' '.join(process.cmdline())[:200]}")
    return out


def serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def test_a_second_platform_on_the_same_data_dir_is_refused_at_once(tmp_path: Path) -> None:
    first = Platform(PlatformConfig(data_dir=tmp_path / "data", grpc_port=0, workers=0))
    first.start()
    try:
        second = Platform(PlatformConfig(data_dir=tmp_path / "data", grpc_port=0, workers=0))
        started = time.monotonic()
        with pytest.raises(PlatformStartError, match=rf"another TuneForge \(pid {os.getpid()}\) holds "):
            second.start()
        assert time.monotonic() - started < 2
        assert second.services is None and second.nats is None, "nothing of the second one started"
        assert serving(first.address), "the first one is untouched"
    finally:
        first.stop()
    third = Platform(PlatformConfig(data_dir=tmp_path / "data", grpc_port=0, workers=0))
    third.start()  # the lock went with the first one
    third.stop()


def test_a_dead_supervisors_processes_still_holding_the_lock_are_named(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lock names a supervisor that has exited, but a process it started still holds the lock (a worker
    slow to stop): after ORPHAN_LOCK_WAIT_S the refusal names that process and how to stop it."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    lock = data_dir / supervisor.LOCK_FILE
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    lock.write_text(f"{dead.stdout.strip()}\n")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; "
                               f"fd = os.open({str(lock)!r}, os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX); "
                               "print('held', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(supervisor, "ORPHAN_LOCK_WAIT_S", 0.5)
        platform = Platform(PlatformConfig(data_dir=data_dir, grpc_port=0, workers=0))
        assert platform.lock_path == lock
        with pytest.raises(PlatformStartError) as refused:
            platform.start()
        message = str(refused.value)
        assert f"which has exited while its processes still run: pid {holder.pid} (" in message, message
        assert f"kill {holder.pid}" in message and platform.services is None
    finally:
        holder.kill()
        holder.wait()


def test_every_child_dies_with_a_killed_supervisor_and_the_data_dir_is_free_again(tmp_path: Path) -> None:
    data_dir = tmp_path / "up"
    output = tmp_path / "up.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    command = [sys.executable, "-m", "services.cli.main", "up", "--data-dir", str(data_dir), "--port", "0",
               "--http-port", "0", "--workers", "1"]
    with output.open("wb") as log:
        up = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        state_file = data_dir / "platform.json"
        eventually(lambda: state_file.exists() and "TuneForge is up" in output.read_text(), 120, "up")
        state = json.loads(state_file.read_text())
        children = [state["nats_pid"], state["services_pid"], *state["worker_pids"]]
        assert len(children) == 3 and not any(gone(pid) for pid in children)

        again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 1
        assert f"another TuneForge (pid {up.pid}) holds" in " ".join(again.stderr.split()), again.stderr

        up.send_signal(signal.SIGKILL)
        up.wait(10)
        try:
            eventually(lambda: all(gone(pid) for pid in children), 30,
                       "every child to die with the supervisor")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; still alive: {alive(children)}; the log's end: "
                                 f"{output.read_text()[-2000:]}") from None
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    # No process holds the data dir any more: a new platform starts on it at once.
    platform = Platform(PlatformConfig(data_dir=data_dir, grpc_port=0, workers=0))
    platform.start()
    platform.stop()


def test_a_dead_services_process_is_restarted_on_the_same_address(tmp_path: Path) -> None:
    platform = Platform(PlatformConfig(data_dir=tmp_path / "data", grpc_port=0, workers=0,
                                       restart_delay_s=0.2))
    platform.start()
    try:
        assert platform.services is not None
        address, first_pid = platform.address, platform.services.pid
        assert serving(address)
        os.killpg(first_pid, signal.SIGKILL)
        platform.services.wait(10)

        assert platform.supervise() == [
            f"services (pid {first_pid}) exited with signal SIGKILL; restarting it in 0.2 s on {address}"]
        assert platform.check_alive() is None, "a dead services process is no reason to stop"
        lines = eventually(platform.supervise, 60, "the services' restart")
        assert platform.services.pid != first_pid
        assert lines == [f"services restarted (pid {platform.services.pid}, {address}, restart 1)"]
        assert platform.address == address
        assert eventually(lambda: serving(address), 30, "the restarted services to answer")
        state = json.loads((platform.data_dir / "platform.json").read_text())
        assert (state["address"], state["services_pid"]) == (address, platform.services.pid)
        assert "services restarted" in (platform.logs_dir / "platform.log").read_text()
        assert platform.check_alive() is None
    finally:
        platform.stop()


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def test_each_child_gets_only_the_secrets_it_needs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """nats-server gets no setting or credential at all; a worker gets no database, service token or key
    of the services (the training process it starts gets even less: tests/worker/test_launcher_env.py)."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "canary-aws-secret")
    secrets = {"TUNEFORGE_SERVICE_TOKEN": "tfs_canary_service_token",
               "TUNEFORGE_PAGE_TOKEN_KEY": "canary-page-token-key-0123456789"}
    platform = Platform(PlatformConfig(data_dir=tmp_path / "data", grpc_port=0, workers=1, env=secrets))
    platform.start()
    try:
        assert platform.nats is not None and platform.services is not None
        nats_env = _environ(platform.nats.pid)
        assert not [k for k in nats_env if k.startswith(("TUNEFORGE_", "AWS_"))], nats_env.keys()
        worker_env = _environ(platform.workers[0].pid)
        assert not set(secrets) & set(worker_env)
        assert worker_env["TUNEFORGE_NATS_USER"] == "worker"
        services_env = _environ(platform.services.pid)
        assert services_env["TUNEFORGE_SERVICE_TOKEN"] == secrets["TUNEFORGE_SERVICE_TOKEN"]
    finally:
        platform.stop()
