"""Worker pools, the worker's side, against a real nats-server: a worker pulls its pool's routes before the
routes of no pool, takes a job queued for its pool and never one queued for another (it is not even
delivered), refuses one that names another pool but reached it on a shared route, announces its pool in
its heartbeats, and refuses to start with a pool name that is none."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import job_pb2

from tests.worker.test_agent import ACK_WAIT_S, Platform, gpu_agent, platform  # noqa: F401 (the fixture)
from trainer_worker.agent import Agent, AgentSettings, WorkerHardware
from tuneforge_core import subjects

QUICK = {"epochs": 1, "batch_size": 8, "learning_rate": 2e-3, "max_steps": 3, "logging_steps": 1,
         "warmup_steps": 0, "save_steps": 1000}


async def _take(agent: Agent) -> str:
    """The job id of the next assignment the agent pulls, acked so it leaves the queue."""
    for _ in range(10):
        msg = await agent._next()
        if msg is not None:
            await msg.ack_sync()
            return events_pb2.JobAssignment.FromString(msg.data).job_id
    raise AssertionError("nothing to pull")


async def _unsubscribe(agent: Agent) -> None:
    for sub in agent._subs.values():
        await sub.unsubscribe()


@pytest.mark.slow
async def test_a_worker_takes_its_pools_job_and_never_another_pools(platform: Platform) -> None:  # noqa: F811
    heartbeats = await platform.heartbeats()
    await platform.assign("job_a", QUICK, hardware={"pool": "cpu-a"},
                          subject=subjects.work_jobs("", pool="cpu-a"))
    await platform.assign("job_b", QUICK, hardware={"pool": "cpu-b"},
                          subject=subjects.work_jobs("", pool="cpu-b"))
    platform.start_agent("w-b", {"TUNEFORGE_WORKER_POOL": "cpu-b", "TUNEFORGE_WORKER_GPU_TYPE": "cpu"})

    first = await heartbeats.wait_for("w-b", job_pb2.WORKER_STATE_IDLE)
    assert (first.pool, first.gpu_type, first.gpu_count) == ("cpu-b", "cpu", 0)
    assert (first.gpu_memory_bytes, first.gpu_name) == (0, ""), "a CPU worker has no GPU facts"
    await platform.events.wait_for("job_b", "SUCCEEDED", within_s=120)
    busy = await heartbeats.wait_for("w-b", job_pb2.WORKER_STATE_BUSY)
    assert (busy.job_id, busy.pool) == ("job_b", "cpu-b")
    assert "queues: pool-cpu-b.any, any" in platform.logs()

    await asyncio.sleep(2 * ACK_WAIT_S)  # long enough for a refusal and a redelivery, were it delivered
    assert platform.events.kinds("job_a") == [] and "job_a" not in platform.logs()
    info = await platform.js.stream_info(subjects.STREAM_WORK, subjects_filter=subjects.EVERY_WORK_ROUTE)
    assert info.state.subjects == {"tuneforge.work.jobs.pool-cpu-a.any": 1}, "job_a waits for its pool"
    consumers = [c.name for c in await platform.js.consumers_info(subjects.STREAM_WORK)]
    assert sorted(consumers) == ["trainers-any", "trainers-pool-cpu-b--any"], "nobody pulls cpu-a's queue"


async def test_a_worker_pulls_its_pools_routes_first_then_those_of_no_pool(platform: Platform) -> None:  # noqa: F811
    await platform.assign("job_shared", QUICK)
    await platform.assign("job_other_pool", QUICK, hardware={"pool": "h100-b"},
                          subject=subjects.work_jobs("nvidia-h100", pool="h100-b"))
    await platform.assign("job_pool_any", QUICK, hardware={"pool": "h100-a"},
                          subject=subjects.work_jobs("", pool="h100-a"))
    await platform.assign("job_h100", QUICK, hardware={"gpu_type": "nvidia-h100"})
    await platform.assign("job_pool_h100", QUICK, hardware={"gpu_type": "nvidia-h100", "pool": "h100-a"},
                          subject=subjects.work_jobs("nvidia-h100", pool="h100-a"))
    agent = gpu_agent(platform, "w-a", WorkerHardware("nvidia-h100", 1, "h100-a"))
    try:
        await agent._subscribe(agent.hardware.routes())
        assert list(agent._subs) == ["pool-h100-a.nvidia-h100", "pool-h100-a.any", "nvidia-h100", "any"]
        taken = [await _take(agent) for _ in range(4)]
        assert taken == ["job_pool_h100", "job_pool_any", "job_h100", "job_shared"]
        assert await agent._next() is None, "never job_other_pool"
    finally:
        await _unsubscribe(agent)


async def test_a_worker_in_the_default_pool_takes_the_default_pools_jobs(platform: Platform) -> None:  # noqa: F811
    await platform.assign("job_default", QUICK, hardware={"pool": "default"},
                          subject=subjects.work_jobs("", pool="default"))
    settings = AgentSettings(nats_url=platform.nats_url, data_dir=platform.tmp_path / "w",
                             storage_url=platform.store.root.as_uri(), worker_id="w")
    agent = Agent(settings, platform.js, platform.store)  # names no pool: "default"
    try:
        await agent._subscribe(agent.hardware.routes())
        assert list(agent._subs) == ["pool-default.any", "any"]
        assert await _take(agent) == "job_default"
    finally:
        await _unsubscribe(agent)


async def test_a_gpu_of_unknown_type_finds_only_its_own_pools_routes(platform: Platform) -> None:  # noqa: F811
    for pool in ("t4-a", "t4-b"):
        await platform.assign(f"job_{pool}", QUICK, hardware={"gpu_type": "nvidia-t4", "pool": pool},
                              subject=subjects.work_jobs("nvidia-t4", pool=pool))
    agent = gpu_agent(platform, "w-unknown", WorkerHardware("", 1, "t4-b"))
    try:
        await agent._subscribe(agent.hardware.routes())
        await agent._find_routes()
        assert list(agent._subs) == ["pool-t4-b.nvidia-t4", "pool-t4-b.any", "any"]
        assert await _take(agent) == "job_t4-b"
    finally:
        await _unsubscribe(agent)


async def test_a_job_for_another_pool_that_reaches_a_worker_is_refused_not_trained(
    platform: Platform,  # noqa: F811
) -> None:
    """Published on a route every pool pulls (by hand here): handed back without a word to the jobs
    service (no update, so no attempt), and never started."""
    await platform.assign("job_a", QUICK, hardware={"pool": "cpu-a"}, subject=subjects.work_jobs(""))
    agent = gpu_agent(platform, "w-b", WorkerHardware("cpu", 0, "cpu-b"))
    try:
        await agent._subscribe(agent.hardware.routes())
        msg = await agent._next()
        assert msg is not None and msg.metadata.num_delivered == 1
        await agent.handle(msg)
        assert agent.current is None and not (agent.work_root / "jobs").exists()
        again = None
        for _ in range(20):  # handed back at once (after the short retry delay), not held
            again = await agent._next()
            if again is not None:
                break
        assert again is not None and again.metadata.num_delivered == 2
        await again.term()
        assert platform.events.kinds("job_a") == []
    finally:
        await _unsubscribe(agent)
    assert WorkerHardware("cpu", 0, "cpu-b").refusal("", 0, "cpu-a") == (
        "the job asks for pool cpu-a and this worker serves pool cpu-b")
    assert WorkerHardware("cpu", 0, "cpu-b").refusal("", 0, "cpu-b") is None


def test_a_worker_with_a_pool_name_that_is_none_does_not_start() -> None:
    env = {**os.environ, "TUNEFORGE_WORKER_POOL": "GPU_A", "TUNEFORGE_NATS_URL": "nats://127.0.0.1:1"}
    done = subprocess.run([sys.executable, "-m", "trainer_worker"], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode != 0
    assert "TUNEFORGE_WORKER_POOL 'GPU_A' is not a pool name" in done.stderr, done.stderr
