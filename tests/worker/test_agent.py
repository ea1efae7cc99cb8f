"""The worker agent against a real nats-server: a job runs to SUCCEEDED with metrics, logs and a stored
adapter; a cancelled job stops and the agent takes the next one; a stopping agent hands its job back."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from google.protobuf.json_format import ParseDict
from google.rpc import error_details_pb2
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import job_pb2, metrics_pb2

from tests.worker.helpers import FAST_HYPERPARAMETERS, make_run_config, start_recipe
from trainer_worker.agent import Agent, AgentSettings, WorkerHardware
from trainer_worker.checkpointing import CheckpointStore
from tuneforge_core import nats as kit_nats
from tuneforge_core import subjects
from tuneforge_core.ids import new_id
from tuneforge_core.spec import resolve_spec
from tuneforge_core.storage import LocalObjectStore

LEGACY_SPECS = Path(__file__).parents[1] / "fixtures" / "legacy_specs"

U = events_pb2.WorkerUpdateKind
ACK_WAIT_S = 3.0  # shorter than a job, so only in-progress acks keep the claim


class WorkerEvents:
    """Everything the agents publish on TF_WORKER, decoded, in arrival order."""

    def __init__(self) -> None:
        self.updates: list[events_pb2.WorkerJobUpdate] = []
        self.points: list[metrics_pb2.MetricPoint] = []
        self.entries: list[metrics_pb2.LogEntry] = []

    async def on_message(self, msg: Msg) -> None:
        if msg.subject.endswith(".status"):
            self.updates.append(events_pb2.WorkerJobUpdate.FromString(msg.data))
        elif msg.subject.endswith(".metrics"):
            self.points.extend(events_pb2.MetricsReported.FromString(msg.data).points)
        else:
            self.entries.extend(events_pb2.LogsReported.FromString(msg.data).entries)

    def kinds(self, job_id: str) -> list[str]:
        return [
            U.Name(u.kind).removeprefix("WORKER_UPDATE_KIND_") for u in self.updates if u.job_id == job_id
        ]

    def update(self, job_id: str, kind: int) -> events_pb2.WorkerJobUpdate:
        return next(u for u in self.updates if u.job_id == job_id and u.kind == kind)

    async def wait_for(self, job_id: str, kind: str, within_s: float = 60.0) -> None:
        deadline = time.monotonic() + within_s
        while kind not in self.kinds(job_id):
            assert time.monotonic() < deadline, f"no {kind} for {job_id}; saw {self.kinds(job_id)}"
            await asyncio.sleep(0.1)


class Heartbeats:
    """The WorkerHeartbeats the agents send (core NATS), in arrival order."""

    def __init__(self) -> None:
        self.received: list[events_pb2.WorkerHeartbeat] = []

    async def on_message(self, msg: Msg) -> None:
        self.received.append(events_pb2.WorkerHeartbeat.FromString(msg.data))

    async def wait_for(self, worker_id: str, state: int, *, count: int = 1,
                       within_s: float = 30.0) -> events_pb2.WorkerHeartbeat:
        """The `count`-th heartbeat of `worker_id` in `state`."""
        deadline = time.monotonic() + within_s
        while True:
            seen = [h for h in self.received if h.worker_id == worker_id and h.state == state]
            if len(seen) >= count:
                return seen[count - 1]
            assert time.monotonic() < deadline, f"{worker_id}: {self.received}"
            await asyncio.sleep(0.05)


class Platform:
    """The parts of TuneForge the agent talks to: NATS streams and a local object store."""

    def __init__(self, tmp_path: Path, nats_url: str, nc: NATS, js: JetStreamContext) -> None:
        self.tmp_path, self.nats_url, self.nc, self.js = tmp_path, nats_url, nc, js
        self.store = LocalObjectStore(tmp_path / "objects")
        self.events = WorkerEvents()
        self._agents: list[subprocess.Popen[bytes]] = []

    async def assign(
        self,
        job_id: str,
        hyperparameters: dict[str, Any],
        *,
        merge: bool = False,
        method: str = "TRAINING_METHOD_SFT",
        dataset: str = "datasets/acme/ds_1/train.jsonl",
        hardware: dict[str, Any] | None = None,
        subject: str | None = None,
        resolved: job_pb2.JobSpec | None = None,
    ) -> None:
        spec = {
            # The organization's own output: the one kind of stored model a worker reads.
            "base_model": self.store.uri("jobs/acme/job_base/merged"),
            "method": method,
            "hyperparameters": hyperparameters,
            "output": {"merge_adapter": merge},
            "hardware": hardware or {},
        }
        assignment = events_pb2.JobAssignment(
            event_id=new_id("evt"),
            job_id=job_id,
            organization="acme",
            # As the jobs service queues it: resolved (the worker fills in no default itself).
            spec=resolved or resolve_spec(ParseDict(spec, job_pb2.JobSpec()), require_dataset=False),
            train_uri=self.store.uri(dataset),
            output_prefix=self.store.uri(f"jobs/acme/{job_id}"),
        )
        # Queued as the jobs service queues it: on the subject of the GPU type and count it asks for.
        hw = assignment.spec.hardware
        subject = subject or subjects.work_jobs(hw.gpu_type, hw.gpu_count)
        await kit_nats.publish(self.js, subject, assignment, assignment.event_id)

    async def change_state(self, job_id: str, state: int) -> None:
        changed = events_pb2.JobChanged(event_id=new_id("evt"), job=job_pb2.Job(id=job_id, state=state))
        await kit_nats.publish(self.js, subjects.job_events(job_id), changed, changed.event_id)

    def start_agent(self, name: str, extra_env: dict[str, str] | None = None,
                    data_dir: Path | None = None) -> subprocess.Popen[bytes]:
        """A worker process `name`; its data dir is its own unless `data_dir` names one (workers on one
        host may share it)."""
        env = {
            **os.environ,
            **(extra_env or {}),
            "TUNEFORGE_NATS_URL": self.nats_url,
            "TUNEFORGE_STORAGE_URL": self.store.root.as_uri(),
            "TUNEFORGE_DATA_DIR": str(data_dir or self.tmp_path / name),
            "TUNEFORGE_WORKER_ID": name,
            "TUNEFORGE_WORK_ACK_WAIT_S": str(ACK_WAIT_S),
            "TUNEFORGE_WORKER_PROGRESS_INTERVAL_S": "0.3",
            "TUNEFORGE_WORKER_RETRY_DELAY_S": "0.5",
            "TUNEFORGE_WORKER_HEARTBEAT_INTERVAL_S": "0.5",
        }
        with (self.tmp_path / f"{name}.log").open("wb") as log:
            agent = subprocess.Popen(
                [sys.executable, "-m", "trainer_worker"], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        self._agents.append(agent)
        return agent

    def stop_agents(self) -> None:
        for agent in self._agents:
            if agent.poll() is None:
                agent.send_signal(signal.SIGTERM)
        for agent in self._agents:
            try:
                agent.wait(timeout=20)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()

    async def heartbeats(self) -> Heartbeats:
        heartbeats = Heartbeats()
        await self.nc.subscribe(subjects.WORKER_HEARTBEATS, cb=heartbeats.on_message)
        return heartbeats

    def logs(self) -> str:
        return "\n".join(p.read_text() for p in sorted(self.tmp_path.glob("*.log")))

    async def pending_work(self, within_s: float = 10.0) -> int:
        """Messages left in the work queue, once the acks that follow a final update have landed."""
        deadline = time.monotonic() + within_s
        while True:
            left = (await self.js.stream_info(subjects.STREAM_WORK)).state.messages
            if not left or time.monotonic() > deadline:
                return left
            await asyncio.sleep(0.1)


@pytest.fixture
async def platform(
    tmp_path: Path, nats_url: str, tiny_model: Path, chat_data: Path
) -> AsyncIterator[Platform]:
    nc = await kit_nats.connect(nats_url, name="test")
    js = nc.jetstream()
    await kit_nats.ensure_streams(js)
    platform = Platform(tmp_path, nats_url, nc, js)
    platform.store.put_dir("jobs/acme/job_base/merged", tiny_model)
    platform.store.put_file("datasets/acme/ds_1/train.jsonl", chat_data)
    watch = await js.subscribe(
        "tuneforge.worker.jobs.>",
        stream=subjects.STREAM_WORKER,
        cb=platform.events.on_message,
        ordered_consumer=True,
    )
    try:
        yield platform
    finally:
        platform.stop_agents()
        await watch.unsubscribe()
        await nc.drain()


def test_agent_module_never_imports_torch() -> None:
    script = (
        "import sys, trainer_worker.agent; sys.exit('torch' in sys.modules or 'transformers' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", script], check=False).returncode == 0


async def test_a_job_for_a_gpu_this_worker_lacks_is_never_delivered_to_it(platform: Platform) -> None:
    """Jobs are queued by GPU type: a CPU worker pulls only the jobs any worker may take, so a job for an
    H100 waits in its own queue, undelivered (no NAK, no delivery spent), while the worker keeps pulling."""
    heartbeats = await platform.heartbeats()
    await platform.assign("job_h100", FAST_HYPERPARAMETERS, hardware={"gpu_type": "nvidia-h100"})
    platform.start_agent("w1", {"TUNEFORGE_WORKER_GPU_TYPE": "cpu"})
    await heartbeats.wait_for("w1", job_pb2.WORKER_STATE_IDLE)
    await asyncio.sleep(2 * ACK_WAIT_S)  # long enough for a refusal and a redelivery, were it delivered
    assert "job_h100" not in platform.logs() and platform.events.kinds("job_h100") == []
    info = await platform.js.stream_info(subjects.STREAM_WORK, subjects_filter=subjects.ALL_WORK_JOBS)
    assert info.state.subjects == {"tuneforge.work.jobs.nvidia-h100": 1}
    with pytest.raises(NotFoundError):  # nobody pulls that queue, so nothing was ever delivered from it
        await platform.js.consumer_info(subjects.STREAM_WORK, subjects.trainers_consumer("nvidia-h100"))
    consumer = await platform.js.consumer_info(subjects.STREAM_WORK, subjects.trainers_consumer(""))
    assert consumer.delivered.stream_seq == 0 and consumer.num_pending == 0
    assert platform.logs().count("queues: pool-default.any, any") == 1, platform.logs()


async def test_a_gpu_of_unknown_type_also_pulls_each_gpu_type_with_jobs_waiting(platform: Platform) -> None:
    await platform.assign("job_t4", FAST_HYPERPARAMETERS, hardware={"gpu_type": "nvidia-t4"})
    settings = AgentSettings(nats_url=platform.nats_url, data_dir=platform.tmp_path / "unknown",
                             storage_url=platform.store.root.as_uri(), worker_id="w-gpu")
    agent = Agent(settings, platform.js, platform.store)
    agent.hardware = WorkerHardware("", 1)  # as on a GPU host without TUNEFORGE_WORKER_GPU_TYPE
    try:
        await agent._subscribe(agent.hardware.routes())
        assert list(agent._subs) == ["pool-default.any", "any"]
        await agent._find_routes()
        assert list(agent._subs) == ["pool-default.any", "nvidia-t4", "any"], "its pool first, then GPU jobs"
        msg = await agent._next()
        assert msg is not None and events_pb2.JobAssignment.FromString(msg.data).job_id == "job_t4"
        await msg.nak()
    finally:
        for sub in agent._subs.values():
            await sub.unsubscribe()


async def test_a_job_for_more_gpus_than_a_worker_has_is_never_delivered_to_it(platform: Platform) -> None:
    """Jobs are queued by GPU count too: a worker with one H100 never sees a job for four (no delivery, no
    NAK, no delivery spent) while it pulls the one-GPU queue of its type."""
    heartbeats = await platform.heartbeats()
    x4 = {"gpu_type": "nvidia-h100", "gpu_count": 4}
    await platform.assign("job_x4", FAST_HYPERPARAMETERS, hardware=x4)
    platform.start_agent("w1", {"TUNEFORGE_WORKER_GPU_TYPE": "nvidia-h100",
                                "TUNEFORGE_WORKER_GPU_COUNT": "1"})
    first = await heartbeats.wait_for("w1", job_pb2.WORKER_STATE_IDLE)
    assert (first.gpu_type, first.gpu_count) == ("nvidia-h100", 1)
    await asyncio.sleep(2 * ACK_WAIT_S)  # long enough for a refusal and a redelivery, were it delivered
    assert "job_x4" not in platform.logs() and platform.events.kinds("job_x4") == []
    info = await platform.js.stream_info(subjects.STREAM_WORK, subjects_filter=subjects.EVERY_WORK_ROUTE)
    assert info.state.subjects == {"tuneforge.work.jobs.nvidia-h100.x4": 1}
    with pytest.raises(NotFoundError):  # nobody pulls that queue, so nothing was ever delivered from it
        await platform.js.consumer_info(subjects.STREAM_WORK, subjects.trainers_consumer("nvidia-h100", 4))
    assert subjects.trainers_consumer("nvidia-h100", 4) == "trainers-nvidia-h100-x4"
    queues = "queues: pool-default.nvidia-h100, pool-default.any, nvidia-h100, any"
    assert platform.logs().count(queues) == 1, platform.logs()
    one = subjects.trainers_consumer("nvidia-h100")
    consumer = await platform.js.consumer_info(subjects.STREAM_WORK, one)
    assert consumer.delivered.stream_seq == 0


def gpu_agent(platform: Platform, name: str, hardware: WorkerHardware) -> Agent:
    settings = AgentSettings(nats_url=platform.nats_url, data_dir=platform.tmp_path / name,
                             storage_url=platform.store.root.as_uri(), worker_id=name,
                             worker_retry_delay_s=0.2, work_ack_wait_s=ACK_WAIT_S)
    agent = Agent(settings, platform.js, platform.store)
    agent.hardware = hardware  # as TUNEFORGE_WORKER_GPU_TYPE / _COUNT would set it
    return agent


async def test_a_worker_with_several_gpus_takes_the_largest_job_it_can_first(platform: Platform) -> None:
    for job_id, hardware in [("job_1", {"gpu_type": "nvidia-h100"}), ("job_any", {}),
                             ("job_8", {"gpu_type": "nvidia-h100", "gpu_count": 8}),
                             ("job_2", {"gpu_type": "nvidia-h100", "gpu_count": 2})]:
        await platform.assign(job_id, FAST_HYPERPARAMETERS, hardware=hardware)
    agent = gpu_agent(platform, "w4", WorkerHardware("nvidia-h100", 4))
    try:
        await agent._subscribe(agent.hardware.routes())
        unpooled = ["nvidia-h100.x4", "nvidia-h100.x3", "nvidia-h100.x2", "nvidia-h100", "any"]
        assert list(agent._subs) == [*(f"pool-default.{r}" for r in unpooled), *unpooled]
        taken = []
        for _ in range(3):
            msg = await agent._next()
            assert msg is not None
            taken.append(events_pb2.JobAssignment.FromString(msg.data).job_id)
            await msg.ack_sync()
        assert taken == ["job_2", "job_1", "job_any"], "never job_8: four GPUs are fewer than eight"
        assert await agent._next() is None
    finally:
        for sub in agent._subs.values():
            await sub.unsubscribe()


async def test_a_job_for_more_gpus_that_reaches_a_smaller_worker_is_refused_not_trained(
    platform: Platform,
) -> None:
    """Published on the wrong subject (by hand here; an older version's queue in real life): the worker
    hands it back without a word to the jobs service (no update, so no attempt) and never starts it."""
    hardware = {"gpu_type": "nvidia-h100", "gpu_count": 4}
    await platform.assign("job_x4", FAST_HYPERPARAMETERS, hardware=hardware,
                          subject=subjects.work_jobs("nvidia-h100"))
    agent = gpu_agent(platform, "w1", WorkerHardware("nvidia-h100", 1))
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
        assert platform.events.kinds("job_x4") == []
    finally:
        for sub in agent._subs.values():
            await sub.unsubscribe()


async def test_heartbeats_say_what_a_worker_has_and_a_last_one_says_it_stopped(platform: Platform) -> None:
    heartbeats = await platform.heartbeats()
    agent = platform.start_agent("w1", {"TUNEFORGE_WORKER_GPU_TYPE": "nvidia-h100",
                                        "TUNEFORGE_WORKER_GPU_COUNT": "2"})
    first = await heartbeats.wait_for("w1", job_pb2.WORKER_STATE_IDLE)
    assert (first.gpu_type, first.gpu_count, first.interval_seconds) == ("nvidia-h100", 2, 0.5)
    assert first.hostname and first.started_at.seconds > 0 and not first.job_id
    await heartbeats.wait_for("w1", job_pb2.WORKER_STATE_IDLE, count=3)  # every interval
    # A GPU worker pulls its own GPU type's queues first, most GPUs first, then the one any worker may take.
    assert "queues: pool-default.nvidia-h100.x2, pool-default.nvidia-h100, pool-default.any, " \
           "nvidia-h100.x2, nvidia-h100, any" in platform.logs()
    agent.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(agent.wait, 20) == 0
    last = await heartbeats.wait_for("w1", job_pb2.WORKER_STATE_STOPPED)
    assert last.started_at == first.started_at


@pytest.mark.slow
async def test_job_runs_to_succeeded_with_metrics_logs_and_stored_adapter(platform: Platform) -> None:
    platform.start_agent("w1")
    platform.start_agent("w2")  # idle, ready to take the job should the claim lapse
    await platform.assign("job_ok", FAST_HYPERPARAMETERS, merge=True)

    await platform.events.wait_for("job_ok", "SUCCEEDED", within_s=90)
    kinds = platform.events.kinds("job_ok")
    assert kinds[:2] == ["PREPARING", "RUNNING"] and kinds[-1] == "SUCCEEDED", kinds
    assert set(kinds[2:-1]) == {"PROGRESS"}, "one attempt, kept alive by in-progress acks"
    assert {(u.attempt, u.worker_id) for u in platform.events.updates} in ({(1, "w1")}, {(1, "w2")})
    info = await platform.js.consumer_info(subjects.STREAM_WORK, subjects.trainers_consumer(""))
    assert info.num_redelivered == 0 and info.config.ack_wait == ACK_WAIT_S

    done = platform.events.update("job_ok", U.WORKER_UPDATE_KIND_SUCCEEDED)
    adapter = platform.store.key_of(done.output.adapter_uri)
    merged = platform.store.key_of(done.output.merged_model_uri)
    assert (adapter, merged) == ("jobs/acme/job_ok/adapter", "jobs/acme/job_ok/merged")
    assert platform.store.exists(f"{adapter}/adapter_model.safetensors")
    assert platform.store.exists(f"{merged}/model.safetensors")
    assert done.output.final_metrics["train_loss"] > 0 and done.progress.step == 40

    train = [p for p in platform.events.points if p.kind == metrics_pb2.METRIC_KIND_TRAIN]
    assert [p.step for p in train] == [1, 5, 10, 15, 20, 25, 30, 35, 40]
    assert train[-1].loss < train[0].loss and all(p.tokens_per_second > 0 for p in train)
    assert all(p.job_id == "job_ok" and p.attempt == 1 and p.total_steps == 40 for p in train)
    progress = platform.events.update("job_ok", U.WORKER_UPDATE_KIND_PROGRESS).progress
    assert progress.total_steps == 40 and progress.HasField("loss")

    entries = platform.events.entries
    assert [e.sequence for e in entries] == [(1 << 32) + n for n in range(1, len(entries) + 1)]
    assert {e.source for e in entries} == {metrics_pb2.LOG_SOURCE_WORKER, metrics_pb2.LOG_SOURCE_TRAINING}
    assert await platform.pending_work() == 0


async def test_a_job_queued_by_the_first_release_trains_after_an_upgrade(platform: Platform) -> None:
    """Its spec was resolved before the newer JobSpec fields existed: the worker fills their defaults
    (tuneforge_core.spec.upgrade_resolved) instead of refusing it as unresolved."""
    legacy = job_pb2.JobSpec.FromString((LEGACY_SPECS / "sft_lora.binpb").read_bytes())
    legacy.base_model = platform.store.uri("jobs/acme/job_base/merged")  # first-release fields only
    legacy.hyperparameters.epochs = 1
    legacy.hyperparameters.batch_size = 8
    legacy.hyperparameters.save_steps = 1000
    platform.start_agent("w1")
    await platform.assign("job_legacy", {}, resolved=legacy)
    await platform.events.wait_for("job_legacy", "SUCCEEDED", within_s=90)
    assert "resolved by an earlier version" in platform.logs()


@pytest.mark.slow
async def test_failures_and_cancellations_end_jobs_and_the_agent_goes_on(platform: Platform) -> None:
    await platform.change_state("job_gone", job_pb2.JOB_STATE_CANCELLED)
    await platform.assign("job_gone", FAST_HYPERPARAMETERS)
    await platform.assign("job_nodes", FAST_HYPERPARAMETERS, hardware={"node_count": 2})
    await platform.assign("job_nodata", FAST_HYPERPARAMETERS, dataset="datasets/acme/missing/train.jsonl")
    await platform.assign("job_long", {**FAST_HYPERPARAMETERS, "max_steps": 100_000})
    await platform.assign("job_next", {**FAST_HYPERPARAMETERS, "max_steps": 5})
    platform.start_agent("w1")

    await platform.events.wait_for("job_long", "RUNNING")
    assert platform.events.kinds("job_gone") == ["CANCELLED"], "cancelled before it started: never prepared"
    # A job on two nodes is not this worker's (no Ray cluster): handed back untouched, for one that has it.
    assert platform.events.kinds("job_nodes") == []
    assert "asks for 2 nodes and this worker runs no multi-node jobs" in platform.logs()
    assert _failure(platform.events.update("job_nodata", U.WORKER_UPDATE_KIND_FAILED))[:2] == (
        3,
        "BAD_TRAINING_DATA",
    )
    await platform.change_state("job_long", job_pb2.JOB_STATE_CANCELLING)
    started = time.monotonic()
    await platform.events.wait_for("job_long", "CANCELLED", within_s=30)
    assert time.monotonic() - started < 15
    cancelled = platform.events.update("job_long", U.WORKER_UPDATE_KIND_CANCELLED)
    assert cancelled.error.code == 1 and cancelled.attempt == 1

    await platform.events.wait_for("job_next", "SUCCEEDED", within_s=90)
    assert platform.events.kinds("job_next")[:2] == ["PREPARING", "RUNNING"]
    # Nothing but the training log (stored whatever the outcome) for the cancelled job.
    assert platform.store.list_keys("jobs/acme/job_long/") == ["jobs/acme/job_long/logs/training.log"]
    assert await platform.pending_work() == 1  # job_nodes, still waiting for a worker with a Ray cluster
    assert platform.events.kinds("job_nodes") == []


# Loaded into the training process through PYTHONPATH: after "running" it writes a line that is no event,
# as a bug in our own recipe code would.
BROKEN_SINK = """
from trainer_worker import events

_state = events.EventSink.state

def state(self, value):
    _state(self, value)
    self._file.write(b'{"type": "metric", "kind": "train", "step": "seven"}\\n')
    self._file.flush()

events.EventSink.state = state
"""


@pytest.mark.slow
async def test_a_malformed_event_fails_the_job_on_its_first_delivery(platform: Platform) -> None:
    """Our own bug is not a lost worker: the job fails at once with a reason, it is not retried."""
    hooks = platform.tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(BROKEN_SINK)
    path = os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")])
    platform.start_agent("w1", {"PYTHONPATH": path})
    await platform.assign("job_garbled", {**FAST_HYPERPARAMETERS, "max_steps": 100_000})

    await platform.events.wait_for("job_garbled", "FAILED", within_s=60)
    code, reason, message = _failure(platform.events.update("job_garbled", U.WORKER_UPDATE_KIND_FAILED))
    assert (code, reason) == (13, "TRAINING_FAILED")
    assert "could not read what the training process reported" in message and "step" in message
    assert {u.attempt for u in platform.events.updates if u.job_id == "job_garbled"} == {1}
    assert await platform.pending_work() == 0, "acked: no other delivery"
    info = await platform.js.consumer_info(subjects.STREAM_WORK, subjects.trainers_consumer(""))
    assert info.num_redelivered == 0


@pytest.mark.slow
async def test_stopping_agent_hands_its_job_to_another(platform: Platform) -> None:
    await platform.assign("job_moved", {**FAST_HYPERPARAMETERS, "max_steps": 100_000})
    first = platform.start_agent("w1")
    await platform.events.wait_for("job_moved", "RUNNING")

    first.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(first.wait, 20) == 0, platform.logs()
    assert "FAILED" not in platform.events.kinds("job_moved")
    platform.start_agent("w2")
    deadline = time.monotonic() + 30
    while not any(u.worker_id == "w2" for u in platform.events.updates):
        assert time.monotonic() < deadline, platform.logs()
        await asyncio.sleep(0.1)
    second = next(u for u in platform.events.updates if u.worker_id == "w2")
    assert (second.kind, second.attempt) == (U.WORKER_UPDATE_KIND_PREPARING, 2)


def _failure(update: events_pb2.WorkerJobUpdate) -> tuple[int, str, str]:
    """(code, ErrorInfo reason, message) of a FAILED update; the ErrorInfo must be TuneForge's."""
    (detail,) = update.error.details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info) and info.domain == "tuneforge.dev"
    return update.error.code, info.reason, update.error.message


@pytest.mark.slow
async def test_killed_worker_resumes_from_its_last_checkpoint(
    platform: Platform, tmp_path: Path, tiny_model: Path, chat_data: Path
) -> None:
    """A crash mid-run costs only the steps since the last stored checkpoint, and the result is the same
    as a run that was never interrupted."""
    hp = {**FAST_HYPERPARAMETERS, "max_steps": 60, "save_steps": 10, "logging_steps": 1}
    hp["save_total_limit"] = 2
    (tmp_path / "ref").mkdir()
    reference = make_run_config(tmp_path / "ref", tiny_model, chat_data, {"hyperparameters": hp})
    uninterrupted = start_recipe(reference, tmp_path / "ref")  # trains beside the agents

    await platform.assign("job_resumed", hp)
    first = platform.start_agent("w1")
    checkpoints = CheckpointStore(platform.store, "jobs/acme/job_resumed")
    deadline = time.monotonic() + 90
    while not (await asyncio.to_thread(checkpoints.steps))[0]:
        assert time.monotonic() < deadline, platform.logs()
        await asyncio.sleep(0.05)
    for process in [*psutil.Process(first.pid).children(recursive=True), psutil.Process(first.pid)]:
        process.kill()  # a crash: the agent and the training process, no chance to clean up
    first.wait()
    platform.start_agent("w2")

    await platform.events.wait_for("job_resumed", "SUCCEEDED", within_s=240)
    done = platform.events.update("job_resumed", U.WORKER_UPDATE_KIND_SUCCEEDED)
    assert (done.worker_id, done.attempt) == ("w2", 2)
    resumed = [e.message for e in platform.events.entries if e.message.startswith("Resuming from")]
    (message,) = resumed
    step = int(message.removeprefix("Resuming from the checkpoint of step ").rstrip("."))
    assert step > 0 and step % 10 == 0
    restarted = [e for u in platform.events.updates if u.attempt == 2 for e in u.events
                 if e.type == job_pb2.JOB_EVENT_TYPE_RESTARTED]
    assert [(e.step, e.worker_id, e.attempt) for e in restarted] == [(step, "w2", 2)]
    train = [p for p in platform.events.points if p.kind == metrics_pb2.METRIC_KIND_TRAIN]
    second = [p.step for p in train if p.attempt == 2]
    assert second[0] == step + 1 and second[-1] == 60, "attempt 2 starts where the checkpoint left off"
    assert {p.kind for p in platform.events.points} >= {metrics_pb2.METRIC_KIND_SYSTEM}
    assert (done.progress.step, done.progress.total_steps) == (60, 60)
    by_attempt = {a: [e.sequence for e in platform.events.entries if e.attempt == a] for a in (1, 2)}
    assert by_attempt[1] and by_attempt[2] and max(by_attempt[1]) < min(by_attempt[2]), "one log sequence"

    complete, _ = checkpoints.steps()
    assert len(complete) == 2 and complete[-1] == 60, complete  # save_total_limit, newest kept

    assert uninterrupted.wait(timeout=240) == 0
    from safetensors.torch import load_file

    expected = load_file(tmp_path / "ref" / "out" / "adapter" / "adapter_model.safetensors")
    adapter = platform.store.key_of(done.output.adapter_uri)
    got = load_file(platform.store.root / adapter / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    worst = max(float((expected[k].float() - got[k].float()).abs().max()) for k in expected)
    assert worst < 1e-4, f"resumed weights differ from an uninterrupted run by {worst}"
