"""End-to-end fixtures: the whole platform as users run it (real nats-server, SQLite, local storage,
real workers training a tiny model built locally)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tuneforge.v1 import job_pb2

from services.client import TuneForgeClient
from services.platform.supervisor import Platform, PlatformConfig
from tests.auth import org_client

FINAL = {job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED}
# Heartbeats and the jobs service's pass over them every half second, so a lost worker shows in seconds.
FAST_WORKER_CHECKS = {
    "TUNEFORGE_WORKER_HEARTBEAT_INTERVAL_S": "0.5",
    "TUNEFORGE_WORKER_CHECK_INTERVAL_S": "0.5",
}


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from trainer_worker.tiny import build_tiny_chat_model, write_synthetic_chat_dataset

    root = tmp_path_factory.mktemp("assets")
    model = build_tiny_chat_model(root / "tiny-chat")
    data = write_synthetic_chat_dataset(root / "chat.jsonl", 240)
    return model, data


def start_platform(root: Path, workers: int, model: Path, **env: str) -> Platform:
    """The platform, allowed to read local models from the tiny model's folder and nowhere else."""
    env = {"TUNEFORGE_MODEL_ROOTS": str(model.parent.resolve()), **env}
    platform = Platform(PlatformConfig(data_dir=root, grpc_port=0, workers=workers, env=env))
    platform.start()
    return platform


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory, tiny_assets: tuple[Path, Path]) -> Iterator[Platform]:
    p = start_platform(tmp_path_factory.mktemp("platform"), workers=1, model=tiny_assets[0])
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def client(platform: Platform) -> Iterator[TuneForgeClient]:
    with org_client(platform.address, platform.data_dir, "e2e") as c:
        yield c


def lora_spec(model: Path, dataset_id: str, *, epochs: int = 2, lr: float = 3e-3) -> job_pb2.JobSpec:
    spec = job_pb2.JobSpec(base_model=str(model), dataset=dataset_id)
    hp = spec.hyperparameters
    hp.epochs, hp.batch_size, hp.learning_rate, hp.logging_steps, hp.max_seq_length = epochs, 8, lr, 1, 256
    return spec


def wait_for(
    client: TuneForgeClient, job_id: str, predicate: Callable[[job_pb2.Job], bool], timeout_s: float = 240
) -> job_pb2.Job:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get_job(job_id)
        if predicate(job):
            return job
        if job.state in FINAL:
            raise AssertionError(f"job ended {job_pb2.JobState.Name(job.state)} while waiting: {job.error}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting on job {job_id}")


def wait_final(client: TuneForgeClient, job_id: str, timeout_s: float = 300) -> job_pb2.Job:
    final = None
    deadline = time.monotonic() + timeout_s
    for job in client.watch_job(job_id):  # WatchJob ends by itself at a final state
        final = job
        assert time.monotonic() < deadline, "watch did not end in time"
    assert final is not None and final.state in FINAL
    return final
