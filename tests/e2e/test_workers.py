"""No stranded job, end to end: a job waits visibly for a worker that can take it, a worker that dies is
noticed and restarted, and `tuneforge up` says so."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from tuneforge.v1 import job_pb2

from services.platform.supervisor import Platform
from tests.auth import org_client
from tests.e2e.conftest import FAST_WORKER_CHECKS, lora_spec, start_platform, wait_final

T = TypeVar("T")
FAST = {"TUNEFORGE_WORK_ACK_WAIT_S": "3", **FAST_WORKER_CHECKS}


def eventually(probe: Callable[[], T | None], timeout_s: float = 30, what: str = "") -> T:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what or probe}")


@pytest.fixture(scope="module")
def fast_platform(tmp_path_factory: pytest.TempPathFactory,
                  tiny_assets: tuple[Path, Path]) -> Iterator[Platform]:
    platform = start_platform(tmp_path_factory.mktemp("workers"), workers=1, model=tiny_assets[0], **FAST)
    try:
        yield platform
    finally:
        platform.stop()


def test_a_gpu_job_with_only_a_cpu_worker_waits_queued_with_a_reason(
    fast_platform: Platform, tiny_assets: tuple[Path, Path]
) -> None:
    """Nothing but a CPU worker: a job for a T4 is never delivered to it (no attempt, no worker, no
    WORKER_LOST later), and says what it waits for; `tuneforge workers` shows the worker it is not for."""
    model, data = tiny_assets
    with org_client(fast_platform.address, fast_platform.data_dir, "e2e") as client:
        workers = eventually(lambda: [w for w in client.list_workers().workers if w.alive], what="a worker")
        (cpu,) = workers
        assert (cpu.gpu_type, cpu.gpu_count, cpu.state) == ("cpu", 0, job_pb2.WORKER_STATE_IDLE)
        ds = client.upload_dataset(data, "chat-gpu", request_id=str(uuid.uuid4())).dataset
        spec = lora_spec(model, ds.id)
        spec.hardware.gpu_type = "nvidia-t4"  # the tiny model fits it (the estimate admits it)
        job = client.create_job(spec)
        assert job.state == job_pb2.JOB_STATE_QUEUED
        waiting = "waiting for a worker with nvidia-t4; none seen "
        assert job.status_message.startswith(waiting), job
        time.sleep(3 * 3.0)  # three claims' worth: a delivery, refusal or WORKER_LOST would show by now
        job = client.get_job(job.id)
        assert (job.state, job.attempt, job.worker_id) == (job_pb2.JOB_STATE_QUEUED, 0, "")
        assert job.status_message.startswith(waiting), job

        from typer.testing import CliRunner

        from services.cli.main import app

        common = ["--address", fast_platform.address, "--org", "e2e"]
        env = {"TUNEFORGE_API_KEY": client.api_key}
        result = CliRunner().invoke(app, ["workers", *common], env=env)
        assert result.exit_code == 0 and cpu.id in result.output and "IDLE" in result.output, result.output
        result = CliRunner().invoke(app, ["jobs", "get", job.id, *common], env=env)
        assert "status: waiting for a worker with nvidia-t4" in result.output, result.output
        assert client.cancel_job(job.id).state == job_pb2.JOB_STATE_CANCELLED
        assert client.get_job(job.id).status_message == ""


@pytest.mark.slow
def test_with_no_worker_left_a_job_waits_until_the_supervisor_restarts_one(
    tmp_path: Path, tiny_assets: tuple[Path, Path]
) -> None:
    model, data = tiny_assets
    platform = start_platform(tmp_path / "p", workers=1, model=model, **FAST)
    try:
        with org_client(platform.address, platform.data_dir, "e2e") as client:
            (first,) = eventually(lambda: [w for w in client.list_workers().workers if w.alive])
            ds = client.upload_dataset(data, "chat-restart", request_id=str(uuid.uuid4())).dataset
            pid = platform.workers[0].pid
            assert first.id.endswith(f"-{pid}"), "an embedded worker is <hostname>-<pid>"
            os.killpg(pid, signal.SIGKILL)
            platform.workers[0].wait()
            eventually(lambda: not client.list_workers().workers[0].alive, what="the worker to be gone")

            job = client.create_job(lora_spec(model, ds.id, epochs=1))
            assert job.state == job_pb2.JOB_STATE_QUEUED
            assert job.status_message.startswith(
                f"waiting for a worker; none is alive (the last one, {first.id}, stopped responding at "), job
            time.sleep(2)
            assert client.get_job(job.id).state == job_pb2.JOB_STATE_QUEUED

            lines = platform.supervise()
            assert lines == [f"worker 0 (pid {pid}) exited with signal SIGKILL; restarting it in 1 s"], lines
            restarted = eventually(lambda: platform.supervise(), timeout_s=10, what="the restart")
            assert restarted[0].startswith("worker 0 restarted (pid "), restarted
            final = wait_final(client, job.id)
            assert final.state == job_pb2.JOB_STATE_SUCCEEDED, final.error
            assert final.attempt == 1 and final.worker_id.endswith(f"-{platform.workers[0].pid}")
            alive = {w.id: w.alive for w in client.list_workers().workers}
            assert alive == {first.id: False, final.worker_id: True}
        assert "worker 0 restarted" in (platform.logs_dir / "platform.log").read_text()
        state = json.loads((platform.data_dir / "platform.json").read_text())
        assert state["worker_pids"] == [platform.workers[0].pid]
    finally:
        platform.stop()


def test_tuneforge_up_restarts_a_dead_worker_and_nats_server(
    tmp_path: Path, tiny_assets: tuple[Path, Path]
) -> None:
    """`tuneforge up` supervises its children: each restart is a line on its output, and afterwards the
    worker sends heartbeats again through the restarted nats-server."""
    data_dir = tmp_path / "up"
    output = tmp_path / "up.log"
    env = {**os.environ, **FAST, "PYTHONUNBUFFERED": "1", "COLUMNS": "200",
           "TUNEFORGE_MODEL_ROOTS": str(tiny_assets[0].parent.resolve())}
    with output.open("wb") as log:
        command = [sys.executable, "-m", "services.cli.main", "up", "--data-dir", str(data_dir),
                   "--port", "0", "--http-port", "0", "--workers", "1"]
        up = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        state_file = data_dir / "platform.json"
        eventually(lambda: state_file.exists() and "TuneForge is up" in output.read_text(), 120, "up")
        state = json.loads(state_file.read_text())
        with org_client(state["address"], data_dir, "e2e") as client:
            eventually(lambda: any(w.alive for w in client.list_workers().workers), what="a worker")
            os.killpg(state["worker_pids"][0], signal.SIGKILL)
            eventually(lambda: "worker 0 restarted" in output.read_text(), 30, "the worker's restart")
            assert "exited with signal SIGKILL; restarting it in 1 s" in output.read_text()
            new_pid = eventually(lambda: json.loads(state_file.read_text())["worker_pids"][0] != state[
                "worker_pids"][0] and json.loads(state_file.read_text())["worker_pids"][0])

            os.kill(state["nats_pid"], signal.SIGKILL)
            eventually(lambda: "nats-server restarted" in output.read_text(), 30, "the nats-server's restart")
            assert state["nats_url"] in output.read_text(), "the same port"
            restarted_at = time.time()

            def heard_again() -> bool:
                workers = client.list_workers().workers
                return any(w.alive and w.id.endswith(f"-{new_pid}") and w.last_heartbeat_time.seconds
                           > restarted_at for w in workers)

            eventually(heard_again, 30, "a heartbeat through the new nats-server")
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
    assert up.returncode == 0, output.read_text()
