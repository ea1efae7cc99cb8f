"""Multi-node jobs on a real Ray cluster of several nodes on this machine (``ray.cluster_utils.Cluster``).

The fast tests check what the worker decides without a cluster: the command, the placement, what the ranks
inherit, and which checkpoint a restarted rank resumes from. In the slow ones the real agent pulls each job
from a real nats-server and runs it with ``TUNEFORGE_RAY_ADDRESS`` set, so its
training process is the Ray driver (``trainer_worker.ray_launch``) and the ranks are Ray Train workers on
distinct Ray nodes. All nodes share this machine's filesystem, as the nodes of a real cluster share the
worker's work volume. The rank lines of the events file carry the Ray node id and the pid of every rank.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from pydantic import ValidationError
from ray.cluster_utils import Cluster
from ray.train.v2.api.config import ScalingConfig
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import job_pb2, metrics_pb2

from tests.worker.helpers import FAST_HYPERPARAMETERS, make_run_config, read_events, resolved
from tests.worker.test_agent import Platform, _failure, platform  # noqa: F401  (the fixture, reused)
from trainer_worker import checkpointing, distributed, ray_launch
from trainer_worker.agent import AgentSettings
from trainer_worker.errors import TrainingError
from trainer_worker.events import EventSink
from trainer_worker.launcher import training_env
from trainer_worker.run_config import RunConfig

U = events_pb2.WorkerUpdateKind
REPO = Path(__file__).resolve().parents[2]
# DeepSpeed JIT-compiles a communication op on first use; shared with tests/worker/test_distributed.py.
TORCH_EXTENSIONS_DIR = REPO / ".cache" / "torch_extensions"
WORKER_NODES = 3  # two for a job's ranks, one to replace a node that is lost


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Cluster]:
    """A head that runs nothing (num_cpus=0: only the driver attaches to it) and one-CPU worker nodes, so
    each node holds one rank; shut down whatever a test did to it."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(WORKER_NODES):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


def start_ray_agent(platform: Platform, cluster: Cluster, name: str = "w1",  # noqa: F811
                    env: dict[str, str] | None = None) -> Path:
    """An agent with the cluster's address; its work dirs are kept so the test can read the events file."""
    platform.start_agent(name, {
        "TUNEFORGE_RAY_ADDRESS": cluster.address,
        "TUNEFORGE_RAY_MAX_FAILURES": "2",
        "TUNEFORGE_WORKER_KEEP_WORK_DIRS": "true",
        "TORCH_EXTENSIONS_DIR": str(TORCH_EXTENSIONS_DIR),
        **(env or {}),
    })
    return platform.tmp_path / name / "worker" / "jobs"


def events_of(jobs: Path, job_id: str) -> list[dict[str, Any]]:
    return read_events(jobs / job_id / "attempt-1" / "events.jsonl")


def ranks(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == "rank"]


def worker_node_ids(cluster: Cluster) -> set[str]:
    return {node.node_id for node in cluster.worker_nodes}


async def wait_until(what: str, check: Any, platform: Platform, within_s: float) -> None:  # noqa: F811
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, f"{what}; log:\n{platform.logs()[-4000:]}"
        await asyncio.sleep(0.2)


def assert_two_ranks_on_two_nodes(cluster: Cluster, events: list[dict[str, Any]]) -> None:
    seen = ranks(events)
    assert sorted(r["rank"] for r in seen) == [0, 1] and {r["world_size"] for r in seen} == {2}, seen
    # Ray Train numbers nodes (NODE_RANK, LOCAL_RANK) by IP address, and every node here has this machine's:
    # the Ray node ids are what tell the nodes apart.
    nodes = {r["ray_node_id"] for r in seen}
    assert len(nodes) == 2 and nodes <= worker_node_ids(cluster), (nodes, worker_node_ids(cluster))


@pytest.mark.slow
async def test_a_two_node_job_trains_on_two_ray_nodes(
    platform: Platform, ray_cluster: Cluster  # noqa: F811
) -> None:
    """DDP over gloo, one rank on each of two Ray nodes; only rank 0 reports, the agent relays it all."""
    jobs = start_ray_agent(platform, ray_cluster)
    await platform.assign("job_ray", {**FAST_HYPERPARAMETERS, "max_steps": 10}, hardware={"node_count": 2})

    await platform.events.wait_for("job_ray", "SUCCEEDED", within_s=300)
    kinds = platform.events.kinds("job_ray")
    assert kinds[:2] == ["PREPARING", "RUNNING"] and kinds[-1] == "SUCCEEDED", kinds
    events = events_of(jobs, "job_ray")
    assert_two_ranks_on_two_nodes(ray_cluster, events)
    assert any("ranks with Ray Train" in e.get("message", "") for e in events), "the driver said how it ran"

    done = platform.events.update("job_ray", U.WORKER_UPDATE_KIND_SUCCEEDED)
    adapter = platform.store.key_of(done.output.adapter_uri)
    assert platform.store.exists(f"{adapter}/adapter_model.safetensors")
    train = [p for p in platform.events.points if p.kind == metrics_pb2.METRIC_KIND_TRAIN]
    # 2 ranks x 8 rows a step: the global batch of two nodes.
    assert [p.step for p in train] == [1, 5, 10] and train[-1].loss < train[0].loss
    assert done.progress.step == 10


@pytest.mark.slow
async def test_zero2_shards_across_two_ray_nodes(platform: Platform, ray_cluster: Cluster) -> None:  # noqa: F811
    """DeepSpeed ZeRO-2 joins the process group Ray Train made, across the two nodes."""
    jobs = start_ray_agent(platform, ray_cluster)
    await platform.assign("job_zero2", {**FAST_HYPERPARAMETERS, "max_steps": 6},
                          hardware={"node_count": 2, "strategy": "DISTRIBUTED_STRATEGY_ZERO2"})

    await platform.events.wait_for("job_zero2", "SUCCEEDED", within_s=420)
    events = events_of(jobs, "job_zero2")
    assert_two_ranks_on_two_nodes(ray_cluster, events)
    done = platform.events.update("job_zero2", U.WORKER_UPDATE_KIND_SUCCEEDED)
    assert done.progress.step == 6 and done.output.final_metrics["train_loss"] > 0
    saved = jobs / "job_zero2" / "attempt-1" / "out" / "checkpoints" / "checkpoint-6"
    assert (saved / "global_step6").is_dir(), "a DeepSpeed checkpoint: ZeRO trained it"
    adapter = platform.store.key_of(done.output.adapter_uri)
    assert platform.store.exists(f"{adapter}/adapter_model.safetensors")


@pytest.mark.slow
async def test_a_failure_the_recipe_reports_is_not_retried(
    platform: Platform, ray_cluster: Cluster  # noqa: F811
) -> None:
    """Bad data fails the same way on every start: Ray Train restarts lost ranks, never a reported failure,
    and the job fails with the recipe's own reason."""
    platform.store.put_bytes("datasets/acme/bad/train.jsonl", b'{"messages": []}\nnot json\n')
    jobs = start_ray_agent(platform, ray_cluster)
    await platform.assign("job_bad", FAST_HYPERPARAMETERS, hardware={"node_count": 2},
                          dataset="datasets/acme/bad/train.jsonl")

    await platform.events.wait_for("job_bad", "FAILED", within_s=300)
    code, reason, message = _failure(platform.events.update("job_bad", U.WORKER_UPDATE_KIND_FAILED))
    assert (code, reason) == (3, "BAD_TRAINING_DATA") and "line 2 is not JSON" in message, message
    events = events_of(jobs, "job_bad")
    assert sorted(r["rank"] for r in ranks(events)) == [0, 1], "one start: no restart"


@pytest.mark.slow
async def test_cancelling_stops_every_rank(platform: Platform, ray_cluster: Cluster) -> None:  # noqa: F811
    """The agent SIGTERMs the driver; the driver leaves the cluster and Ray ends both ranks: no orphans."""
    jobs = start_ray_agent(platform, ray_cluster)
    await platform.assign("job_long", {**FAST_HYPERPARAMETERS, "max_steps": 100_000},
                          hardware={"node_count": 2})
    await platform.events.wait_for("job_long", "RUNNING", within_s=300)
    await wait_until("two rank lines", lambda: len(ranks(events_of(jobs, "job_long"))) == 2, platform, 60)
    pids = [r["pid"] for r in ranks(events_of(jobs, "job_long"))]
    assert all(psutil.pid_exists(pid) for pid in pids)

    await platform.change_state("job_long", job_pb2.JOB_STATE_CANCELLING)
    await platform.events.wait_for("job_long", "CANCELLED", within_s=60)
    await wait_until(f"rank processes {pids} gone", lambda: not any(map(_alive, pids)), platform, 30)
    events = events_of(jobs, "job_long")
    assert any(e.get("state") == "cancelled" for e in events), "the driver handled SIGTERM, not a SIGKILL"
    assert any(e.get("message", "").startswith("Stopping every rank") for e in events)


@pytest.mark.slow
async def test_a_job_the_cluster_cannot_place_says_so_and_fails_after_the_placement_timeout(
    platform: Platform, ray_cluster: Cluster  # noqa: F811
) -> None:
    """Four ranks one to a node on a cluster of three one-CPU nodes: the job's log says at once what the
    cluster lacks, and when the placement timeout ends the job fails with INSUFFICIENT_HARDWARE, naming it;
    it never waits without end, and the cluster is left free."""
    # Long enough for a job the cluster can place to be placed on this machine, however loaded.
    jobs = start_ray_agent(platform, ray_cluster, env={"TUNEFORGE_RAY_PLACEMENT_TIMEOUT_S": "30"})
    await platform.assign("job_wide", FAST_HYPERPARAMETERS, hardware={"node_count": 4})

    await platform.events.wait_for("job_wide", "FAILED", within_s=180)
    code, reason, message = _failure(platform.events.update("job_wide", U.WORKER_UPDATE_KIND_FAILED))
    lacks = f"the cluster has {WORKER_NODES} live node(s) with CPUs, {WORKER_NODES} CPU(s) in all; " \
            "the job's 4 ranks need 4 nodes with a CPU each"
    assert (code, reason) == (9, "INSUFFICIENT_HARDWARE"), (code, reason, message)
    assert "within 30 s (TUNEFORGE_RAY_PLACEMENT_TIMEOUT_S)" in message and lacks in message, message
    events = events_of(jobs, "job_wide")
    warned = [e["message"] for e in events if e["type"] == "log" and e.get("level") == "warning"]
    assert any(m.startswith("The Ray cluster cannot place this job now: " + lacks) for m in warned), warned
    assert not ranks(events), "no rank ever started"
    # The driver left: its placement request is gone and a two-node job runs at once.
    await platform.assign("job_after", {**FAST_HYPERPARAMETERS, "max_steps": 2}, hardware={"node_count": 2})
    await platform.events.wait_for("job_after", "SUCCEEDED", within_s=300)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


MAX_STEPS = 200


@pytest.mark.slow
async def test_a_lost_node_restarts_the_ranks_from_the_last_checkpoint(
    platform: Platform, ray_cluster: Cluster  # noqa: F811
) -> None:
    """Killing the node of rank 1 after the first checkpoint: Ray Train restarts both ranks on the nodes
    left, they resume from that checkpoint (not step 0), and the job still ends SUCCEEDED."""
    jobs = start_ray_agent(platform, ray_cluster)
    # Steps enough that the node is gone long before the last one, however loaded the machine: with 30, a
    # fresh-clone CI once saw the run reach its end before the kill landed (nothing left to resume).
    hp = {**FAST_HYPERPARAMETERS, "max_steps": MAX_STEPS, "save_steps": 5, "logging_steps": 1}
    await platform.assign("job_lost", hp, hardware={"node_count": 2})
    try:
        await wait_until(
            "a first checkpoint",
            lambda: any(e["type"] == "checkpoint" for e in events_of(jobs, "job_lost")), platform, 300,
        )
        first = ranks(events_of(jobs, "job_lost"))
        lost = next(r["ray_node_id"] for r in first if r["rank"] == 1)
        node = next(n for n in ray_cluster.worker_nodes if n.node_id == lost)
        ray_cluster.remove_node(node, allow_graceful=False)  # its raylet and every process on it, killed

        await platform.events.wait_for("job_lost", "SUCCEEDED", within_s=420)
    finally:
        while len(ray_cluster.worker_nodes) < WORKER_NODES:  # the next test gets a whole cluster
            ray_cluster.add_node(num_cpus=1)

    events = events_of(jobs, "job_lost")
    resumed = [e["message"] for e in events if e["type"] == "log" and "Ray restarted" in e["message"]]
    assert resumed and "(start 2)" in resumed[0], "the ranks were restarted by Ray Train, once"
    step = int(resumed[0].rsplit(" ", 1)[1].rstrip("."))
    assert step > 0 and step % 5 == 0
    after = [r for r in ranks(events)][2:]
    assert sorted(r["rank"] for r in after) == [0, 1] and lost not in {r["ray_node_id"] for r in after}
    assert len({r["ray_node_id"] for r in after}) == 2
    restart_at = next(i for i, e in enumerate(events) if "Ray restarted" in e.get("message", ""))
    steps_after = [e["step"] for e in events[restart_at:] if e["type"] == "metric" and e["kind"] == "train"]
    assert step < MAX_STEPS, f"the run had reached step {step} of {MAX_STEPS} when the node was lost"
    assert steps_after and steps_after[0] == step + 1 and steps_after[-1] == MAX_STEPS, (
        f"resumed where the checkpoint of step {step} left off: {steps_after}")
    done = platform.events.update("job_lost", U.WORKER_UPDATE_KIND_SUCCEEDED)
    assert done.progress.step == MAX_STEPS


# -- without a cluster ----------------------------------------------------------------------------------


def _spec(**hardware: Any) -> job_pb2.JobSpec:
    return RunConfig(job_id="j", spec=resolved({"hardware": hardware}, "org/model"), model_path="m",
                     train_file=Path("t"), output_dir=Path("o"), events_file=Path("e")).job_spec()


def test_a_multi_node_job_runs_on_ray_only_where_the_worker_has_a_cluster(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for var in (*distributed.MULTINODE_ENV, "WORLD_SIZE", distributed.RAY_MAX_FAILURES_ENV,
                distributed.RAY_PLACEMENT_TIMEOUT_ENV):
        monkeypatch.delenv(var, raising=False)
    spec = _spec(node_count=2)
    monkeypatch.delenv(distributed.RAY_ADDRESS_ENV, raising=False)
    with pytest.raises(TrainingError, match=r"2 nodes .* set TUNEFORGE_RAY_ADDRESS"):
        distributed.check_supported(spec)
    assert "torch.distributed.run" in distributed.launch_command(spec, Path("RUN.json"))

    monkeypatch.setenv(distributed.RAY_ADDRESS_ENV, "10.0.0.5:6379")
    command = distributed.launch_command(spec, Path("RUN.json"))
    assert command[1:] == ["-m", "trainer_worker.ray_launch", "--config", "RUN.json", "--address",
                           "10.0.0.5:6379", "--max-failures", "3", "--placement-timeout", "1800"]
    # The address reaches the driver on its command line; the training env keeps no TUNEFORGE_* setting.
    assert distributed.RAY_ADDRESS_ENV not in training_env()
    one_node = distributed.launch_command(_spec(), Path("RUN.json"))
    assert one_node[1:3] == ["-m", "trainer_worker.train"], "one node never goes through Ray"

    monkeypatch.setenv(distributed.RAY_PLACEMENT_TIMEOUT_ENV, "90.5")
    assert distributed.launch_command(spec, Path("RUN.json"))[-2:] == ["--placement-timeout", "90.5"]
    for bad in ("-1", "nan", "soon"):
        monkeypatch.setenv(distributed.RAY_PLACEMENT_TIMEOUT_ENV, bad)
        with pytest.raises(TrainingError, match=f"TUNEFORGE_RAY_PLACEMENT_TIMEOUT_S='{bad}'"):
            distributed.launch_command(spec, Path("RUN.json"))
    monkeypatch.delenv(distributed.RAY_PLACEMENT_TIMEOUT_ENV)
    # The worker's own settings take the same default and refuse the same values when it starts.
    assert AgentSettings().ray_placement_timeout_s == distributed.DEFAULT_RAY_PLACEMENT_TIMEOUT_S
    for refused in (-1.0, float("nan")):
        with pytest.raises(ValidationError, match="ray_placement_timeout_s"):
            AgentSettings(ray_placement_timeout_s=refused)
    monkeypatch.setenv(distributed.RAY_MAX_FAILURES_ENV, "-1")
    with pytest.raises(TrainingError, match="TUNEFORGE_RAY_MAX_FAILURES"):
        distributed.launch_command(spec, Path("RUN.json"))
    monkeypatch.setenv("WORLD_SIZE", "2")  # a rank of a group that spans both nodes (Ray Train's)
    distributed.check_supported(spec)


def test_ranks_are_placed_one_per_node_or_packed_by_gpu() -> None:
    assert ray_launch.scaling(_spec(node_count=2)) == {
        "num_workers": 2, "use_gpu": False, "resources_per_worker": {"CPU": 1},
        "placement_strategy": "STRICT_SPREAD",
    }
    gpus = ray_launch.scaling(_spec(node_count=4, gpu_count=8, gpu_type="nvidia-a100-80gb"))
    assert gpus == {"num_workers": 32, "use_gpu": True, "resources_per_worker": {"GPU": 1},
                    "placement_strategy": "PACK",
                    "label_selector": {"tuneforge.dev/gpu-type": "nvidia-a100-80gb"}}
    # Every rank asks for a node of the job's GPU type, as Ray Train's own config hands it to placement.
    selectors = ScalingConfig(**gpus)._label_selector_per_worker(32)
    assert selectors == [{"tuneforge.dev/gpu-type": "nvidia-a100-80gb"}] * 32
    env = ray_launch.rank_env({"HF_HUB_OFFLINE": "1", "TORCH_EXTENSIONS_DIR": "/x",
                               "NCCL_SOCKET_IFNAME": "eth0", "PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0",
                               "HOSTNAME": "worker-0"})
    assert env == {"HF_HUB_OFFLINE": "1", "TORCH_EXTENSIONS_DIR": "/x", "NCCL_SOCKET_IFNAME": "eth0",
                   "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}, "nothing that belongs to the driver's own node"


def _node(alive: bool = True, labels: dict[str, str] | None = None, **resources: float) -> dict[str, Any]:
    """A node as ray.nodes() lists it (the keys read here)."""
    return {"Alive": alive, "Labels": {"ray.io/node-id": "x", **(labels or {})},
            "Resources": {"memory": 1e9, **resources}}


def test_what_a_cluster_lacks_to_place_a_job_is_named() -> None:
    two = _spec(node_count=2)
    assert ray_launch.placement_shortfall(two, [_node(CPU=0), _node(CPU=1), _node(CPU=1)]) is None
    # A dead node, and the head with no CPU, hold no rank; one rank a node, so 2 CPUs on one node are not 2.
    assert ray_launch.placement_shortfall(two, [_node(CPU=0), _node(CPU=1), _node(False, CPU=1)]) == (
        "the cluster has 1 live node(s) with CPUs, 1 CPU(s) in all; "
        "the job's 2 ranks need 2 nodes with a CPU each")
    assert "need 2 nodes" in (ray_launch.placement_shortfall(two, [_node(CPU=2)]) or "")

    h100 = {"tuneforge.dev/gpu-type": "nvidia-h100"}
    gpus = _spec(node_count=2, gpu_count=4, gpu_type="nvidia-h100")  # PACK: 8 GPUs, on H100 nodes only
    whole = [_node(labels=h100, GPU=4), _node(labels=h100, GPU=4)]
    assert ray_launch.placement_shortfall(gpus, whole) is None
    lacking = [_node(labels=h100, GPU=4), _node(labels={"tuneforge.dev/gpu-type": "nvidia-a100-80gb"}, GPU=8),
               _node(GPU=8)]
    assert ray_launch.placement_shortfall(gpus, lacking) == (
        "the cluster has 1 live node(s) labelled tuneforge.dev/gpu-type=nvidia-h100 with GPUs, "
        "4 GPU(s) in all; "
        "the job's 8 ranks need 8 GPUs")
    assert "0 live node(s)" in (ray_launch.placement_shortfall(gpus, []) or "")


def test_the_placement_watch_ends_a_wait_with_no_placement_and_nothing_else() -> None:
    now = [100.0]
    placed = [False]
    watch = ray_launch.placement_watch(lambda: placed[0], 30, clock=lambda: now[0])
    now[0] = 129.9
    watch()
    now[0] = 130.0
    with pytest.raises(ray_launch.PlacementTimeout, match="within 30 s"):
        watch()

    watch = ray_launch.placement_watch(lambda: placed[0], 30, clock=lambda: now[0])
    placed[0] = True
    watch()
    placed[0], now[0] = False, 1e9
    watch()  # placed once: no limit on how long the run then takes, nor is it asked again
    never = ray_launch.placement_watch(lambda: False, 0, clock=lambda: now[0])
    now[0] = 1e12
    never()


def test_a_restarted_rank_resumes_from_the_newest_announced_checkpoint(
    tmp_path: Path, chat_data: Path
) -> None:
    cfg = make_run_config(tmp_path, "org/model", chat_data)
    assert ray_launch.restore_checkpoint(cfg, rank=0) is None, "a first start resumes from nothing new"
    trainer_dir = cfg.output_dir / ray_launch.TRAINER_CHECKPOINTS
    for step in (5, 10, 15):
        (trainer_dir / f"checkpoint-{step}").mkdir(parents=True)
        (trainer_dir / f"checkpoint-{step}" / "model.safetensors").write_text(str(step))
    sink = EventSink(cfg.events_file)
    for step in (5, 10):  # 15 was being written when the node was lost: never announced
        sink.checkpoint(step, checkpointing.staging_dir(cfg.output_dir) / f"checkpoint-{step}")
    sink.close()

    assert [ray_launch.restore_checkpoint(cfg, rank=r) for r in (0, 1)] == [10, 10]
    restored = checkpointing.resume_dir(cfg.output_dir) / "checkpoint-10"
    assert checkpointing.resume_checkpoint(cfg) == str(restored)
    assert (restored / "model.safetensors").read_text() == "10"
    assert [p.name for p in checkpointing.resume_dir(cfg.output_dir).iterdir()] == ["checkpoint-10"]
