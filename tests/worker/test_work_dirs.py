"""The work folders of attempts whose worker was killed outright (kill -9) are deleted, never one that a
running attempt holds, even in another worker process sharing the data dir (trainer_worker.work_dirs):
first the lock protocol against real processes, then real workers training real jobs in one data dir."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import job_pb2

from tests.worker.test_agent import FAST_HYPERPARAMETERS, Heartbeats, Platform, platform  # noqa: F401
from trainer_worker.work_dirs import KEPT_NAME, LOCK_NAME, AttemptLock, sweep

U = events_pb2.WorkerUpdateKind
W = job_pb2.WorkerState


def _attempt(root: Path, job: str, attempt: int, size: int = 10_000) -> Path:
    """An attempt folder as a worker leaves it: a dataset copy and a checkpoint."""
    folder = root / "jobs" / job / f"attempt-{attempt}"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train.jsonl").write_bytes(b"x" * size)
    (folder / "out" / "checkpoint-5").mkdir(parents=True)
    (folder / "out" / "checkpoint-5" / "adapter.bin").write_bytes(b"y" * size)
    return folder


def _hold(folder: Path) -> subprocess.Popen[bytes]:
    """Another worker process on this host running the attempt in `folder` (it holds the lock)."""
    script = ("import sys, time; from pathlib import Path; from trainer_worker.work_dirs import AttemptLock; "
              f"AttemptLock.acquire(Path({str(folder)!r})); print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
    return holder


def test_a_sweep_deletes_only_the_folders_no_running_attempt_holds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trainer_worker.work_dirs")
    root = tmp_path / "worker"
    dead = _attempt(root, "job_dead", 1)  # its worker was killed: no lock file at all (an older worker)
    crashed = _attempt(root, "job_crashed", 2)  # its worker held the lock and was killed
    running = _attempt(root, "job_running", 1)
    kept = _attempt(root, "job_kept", 1)
    (kept / KEPT_NAME).touch()  # a worker with TUNEFORGE_WORKER_KEEP_WORK_DIRS kept it on purpose
    killed = _hold(crashed)
    killed.kill()
    killed.wait()
    holder = _hold(running)
    mine = AttemptLock.acquire(root / "jobs" / "job_mine" / "attempt-1")  # this process's running attempt
    try:
        removed, freed = sweep(root)
        assert not dead.exists() and not crashed.exists() and not (root / "jobs" / "job_dead").exists()
        assert (running / "data" / "train.jsonl").stat().st_size == 10_000, "held by another process"
        assert (running / LOCK_NAME).exists() and kept.exists() and mine.folder.exists()
        assert removed == 2 and freed >= 40_000
        assert "removed the work folder of job job_dead attempt 1, left by a worker that is gone (19.5 KiB)" \
            in caplog.text
        assert "removed 2 work folders of attempts no running worker holds, 39.1 KiB in all" in caplog.text
        assert sweep(root) == (0, 0)
    finally:
        mine.release()
        holder.kill()
        holder.wait()
    # Once its process is gone, nothing holds it: the next sweep takes it (and this process's own).
    assert sweep(root)[0] == 2 and not running.exists() and not mine.folder.exists() and kept.exists()


def test_an_attempt_taking_its_folder_during_a_sweep_gets_a_whole_one(tmp_path: Path) -> None:
    """The sweep holds the lock while it deletes; the attempt waits, then finds its lock file gone and
    creates the folder anew: it never works in a folder being deleted."""
    folder = _attempt(tmp_path, "job_1", 1, size=10)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_EX)  # the sweep's hold

    async def race() -> AttemptLock:
        taking = asyncio.ensure_future(asyncio.to_thread(AttemptLock.acquire, folder))
        await asyncio.sleep(0.3)
        assert not taking.done(), "it waits for the sweep"
        import shutil

        shutil.rmtree(folder)
        os.close(fd)
        return await asyncio.wait_for(taking, 5)

    lock = asyncio.run(race())
    try:
        assert (folder / LOCK_NAME).exists() and not (folder / "data").exists()
        assert sweep(tmp_path) == (0, 0), "held"
    finally:
        lock.release()


async def _running(tf: Platform, job_id: str, worker: str, attempt: int, within_s: float = 120) -> None:
    deadline = time.monotonic() + within_s
    while not any(u.job_id == job_id and u.worker_id == worker and u.attempt == attempt
                  and u.kind == U.WORKER_UPDATE_KIND_RUNNING for u in tf.events.updates):
        assert time.monotonic() < deadline, tf.logs()
        await asyncio.sleep(0.05)


@pytest.mark.slow
async def test_a_killed_workers_folder_is_deleted_and_a_running_siblings_is_kept(
    platform: Platform, tmp_path: Path  # noqa: F811
) -> None:
    """Workers sharing one data dir: w1 is killed (kill -9) mid-training and leaves its attempt folder;
    w2, started next, deletes it and takes the job's next delivery; w3, started while w2 trains, deletes
    a dead folder and leaves w2's, and w2's training goes on. A worker that keeps work dirs deletes none."""
    shared = tmp_path / "shared"
    jobs = shared / "worker" / "jobs"
    heartbeats: Heartbeats = await platform.heartbeats()
    await platform.assign("job_long", {**FAST_HYPERPARAMETERS, "max_steps": 100_000})
    first = platform.start_agent("w1", data_dir=shared)
    await _running(platform, "job_long", "w1", 1)
    crashed = jobs / "job_long" / "attempt-1"
    assert (crashed / "data" / "train.jsonl").is_file() and (crashed / LOCK_NAME).is_file()
    for process in [*psutil.Process(first.pid).children(recursive=True), psutil.Process(first.pid)]:
        process.kill()  # a crash: the agent and the training process, no chance to clean up
    first.wait()
    assert crashed.is_dir(), "left behind"

    # A worker that keeps work dirs (for debugging) deletes nothing, not even a dead one.
    keeper = platform.start_agent("w0", {"TUNEFORGE_WORKER_KEEP_WORK_DIRS": "true",
                                         "TUNEFORGE_WORKER_POOL": "elsewhere"}, data_dir=shared)
    await heartbeats.wait_for("w0", W.WORKER_STATE_IDLE, within_s=60)
    assert crashed.is_dir()
    keeper.terminate()
    assert await asyncio.to_thread(keeper.wait, 30) == 0

    platform.start_agent("w2", data_dir=shared)
    await _running(platform, "job_long", "w2", 2)  # the work queue's next delivery, after the claim lapsed
    assert not crashed.exists(), "w2 deleted the dead attempt's folder when it started"
    running = jobs / "job_long" / "attempt-2"
    assert (running / "data" / "train.jsonl").is_file()

    dead = _attempt(shared / "worker", "job_gone", 3)
    platform.start_agent("w3", data_dir=shared)
    await heartbeats.wait_for("w3", W.WORKER_STATE_IDLE, within_s=60)
    assert not dead.exists() and not dead.parent.exists(), "w3 deleted the dead folder when it started"
    assert (running / "data" / "train.jsonl").is_file(), "w2's running attempt kept its folder"
    log = (tmp_path / "w3.log").read_text()
    assert "removed the work folder of job job_gone attempt 3, left by a worker that is gone (19.5 KiB)" \
        in log
    assert "job_long" not in log
    w2_log = (tmp_path / "w2.log").read_text()
    assert "removed the work folder of job job_long attempt 1, left by a worker that is gone" in w2_log

    # w2 trains on in its folder: its progress keeps coming after w3's sweep.
    seen = len([u for u in platform.events.updates if u.worker_id == "w2"])
    deadline = time.monotonic() + 60
    while len([u for u in platform.events.updates if u.worker_id == "w2"]) <= seen + 2:
        assert time.monotonic() < deadline, platform.logs()
        await asyncio.sleep(0.1)
    assert not {"FAILED", "SUCCEEDED"} & set(platform.events.kinds("job_long")), platform.logs()
