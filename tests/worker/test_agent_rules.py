"""The agent's own line of defence, without NATS: it applies the models rule before it reads anything, copies
only the organization's own stored outputs into a private cache, reads no store but the platform's, and
takes only jobs whose GPU type it has, and as many GPUs of it."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.json_format import ParseDict
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import job_pb2

from trainer_worker.agent import Agent, AgentSettings, JobRun, WorkerHardware
from trainer_worker.errors import TrainingError
from trainer_worker.hardware import HostGpus
from tuneforge_core import subjects
from tuneforge_core.reasons import Reason
from tuneforge_core.spec import resolve_spec
from tuneforge_core.storage import LocalObjectStore

ORG = "acme"


def model_folder(path: Path) -> Path:
    (path / "nested").mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"\0")
    (path / "nested" / "extra.json").write_text("{}")
    return path


@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "objects")


@pytest.fixture
def run(tmp_path: Path, store: LocalObjectStore) -> JobRun:
    model_folder(tmp_path / "models" / "tiny")
    settings = AgentSettings(data_dir=tmp_path / "data", storage_url=store.root.as_uri(),
                             model_roots=str(tmp_path / "models"), worker_id="w1")
    agent = Agent(settings, None, store)  # type: ignore[arg-type]
    assignment = events_pb2.JobAssignment(job_id="job_1", organization=ORG, spec=job_pb2.JobSpec())
    return JobRun(agent, assignment, 1)


async def refused(run: JobRun, ref: str) -> str:
    with pytest.raises(TrainingError) as info:
        await run._model_path(ref, "spec.base_model")
    assert info.value.reason == Reason.MODEL_NOT_FOUND
    return info.value.message


async def test_server_folders_and_other_organizations_outputs_are_never_read(
    run: JobRun, store: LocalObjectStore, tmp_path: Path
) -> None:
    theirs = model_folder(store.root / "jobs" / "other" / "job_9" / "merged")
    for ref in ("/etc", "file:///etc", "../../etc", str(theirs), theirs.as_uri(), "s3://private/models/x",
                f"{tmp_path}/models/../objects/jobs/other/job_9/merged"):
        assert "The worker does not read spec.base_model" in await refused(run, ref), ref
    cache = run.agent.work_root / "models"
    assert not cache.exists() or not any(cache.iterdir()), "nothing was copied"


async def test_a_folder_under_a_root_is_used_in_place(run: JobRun, tmp_path: Path) -> None:
    assert await run._model_path(f"{tmp_path}/models/x/../tiny", "spec.base_model") == str(
        (tmp_path / "models" / "tiny").resolve()
    )
    assert not (run.agent.work_root / "models").exists()


async def test_the_organizations_stored_output_is_cached_privately(
    run: JobRun, store: LocalObjectStore
) -> None:
    ours = model_folder(store.root / "jobs" / ORG / "job_2" / "merged")
    path = Path(await run._model_path(ours.as_uri(), "spec.base_model"))
    assert (path / "model.safetensors").read_bytes() == b"\0"
    assert path.parent == run.agent.work_root / "models"
    assert_private(path.parent, path)
    assert await run._model_path(ours.as_uri(), "spec.base_model") == str(path)  # cached across jobs


def assert_private(*roots: Path) -> None:
    for item in [*roots, *roots[-1].rglob("*")]:
        mode = stat.S_IMODE(item.stat().st_mode)
        assert mode == (0o700 if item.is_dir() else 0o600), (item, oct(mode))


async def test_a_hub_id_naming_a_local_folder_is_refused(
    run: JobRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert await run._model_path("org/model", "spec.base_model") == "org/model"
    (tmp_path / "org" / "model").mkdir(parents=True)
    assert "working directory" in await refused(run, "org/model")


def test_only_the_platforms_object_store_is_located(run: JobRun, store: LocalObjectStore) -> None:
    key = "datasets/acme/ds_1/train.jsonl"
    assert run.agent.locate(store.uri(key)) == (store, key)
    for uri in ("file:///etc/shadow", "s3://someone-elses-bucket/data.jsonl"):
        with pytest.raises(TrainingError) as info:
            run.agent.locate(uri)
        assert "reads only this deployment's object storage" in info.value.message


@pytest.mark.parametrize(
    ("worker", "job", "takes"),
    [
        (("cpu", 0), ("", 1), True),
        (("cpu", 0), ("", 4), True),  # a job naming no GPU type: CPU ranks, any worker runs them
        (("cpu", 0), ("cpu", 1), True),
        (("cpu", 0), ("nvidia-h100", 1), False),
        (("nvidia-h100", 1), ("nvidia-h100", 1), True),
        (("nvidia-h100", 1), ("NVIDIA-H100", 0), True),  # unset counts as one
        (("nvidia-h100", 1), ("nvidia-t4", 1), False),
        (("nvidia-h100", 1), ("cpu", 1), True),
        (("nvidia-h100", 1), ("nvidia-h100", 4), False),  # never trained on fewer GPUs than asked
        (("nvidia-h100", 4), ("nvidia-h100", 4), True),
        (("nvidia-h100", 8), ("nvidia-h100", 4), True),
        (("nvidia-h100", 0), ("nvidia-h100", 1), False),  # a GPU type set, but no GPU counted
        (("", 1), ("nvidia-t4", 1), True),  # a GPU of unknown type takes any GPU job...
        (("", 1), ("nvidia-t4", 2), False),  # ...for as many GPUs as it counts
        (("", 2), ("nvidia-t4", 2), True),
    ],
)
def test_a_worker_takes_only_jobs_for_its_hardware(worker: tuple[str, int], job: tuple[str, int],
                                                    takes: bool) -> None:
    hardware = WorkerHardware(*worker)
    refusal = hardware.refusal(*job)
    assert (refusal is None) == takes, refusal
    if refusal is not None:
        assert f"x{max(1, job[1])}" in refusal, "the refusal names what the job asked for"
    # Routing agrees with the refusal: a worker pulls exactly the routes of the GPU jobs it would take.
    if job[0].strip().lower() not in ("", "cpu"):
        route = subjects.work_route(*job)
        assert hardware.takes_route(route) == takes
        assert (route in hardware.routes()) == (takes and worker[0] != "")


def test_a_worker_pulls_its_gpu_types_routes_for_most_gpus_first_then_any() -> None:
    """In its pool's routes first ("default" for a worker that names none), then in those of no pool."""
    unpooled = ["nvidia-h100.x4", "nvidia-h100.x3", "nvidia-h100.x2", "nvidia-h100", "any"]
    assert WorkerHardware("nvidia-h100", 4).routes() == [*(f"pool-default.{r}" for r in unpooled), *unpooled]
    assert WorkerHardware("nvidia-h100", 1, "h100-a").routes() == [
        "pool-h100-a.nvidia-h100", "pool-h100-a.any", "nvidia-h100", "any"]
    assert WorkerHardware("nvidia-h100", 0).routes() == ["pool-default.any", "any"]
    assert WorkerHardware("cpu", 0, "cpu-b").routes() == ["pool-cpu-b.any", "any"]
    assert WorkerHardware("", 2).routes() == ["pool-default.any", "any"], (
        "a GPU of unknown type finds its routes as jobs wait")
    h100 = WorkerHardware("nvidia-h100", 4)
    assert sorted(reversed(h100.routes()), key=h100.route_order) == h100.routes()
    unknown = WorkerHardware("", 2)
    assert [r for r in ("nvidia-t4", "nvidia-t4.x2", "nvidia-a100.x3", "any") if unknown.takes_route(r)] == [
        "nvidia-t4", "nvidia-t4.x2", "any"]


def test_an_unknown_gpu_type_counts_at_least_the_gpu_it_sees() -> None:
    three = HostGpus("", 3)  # as detected without NVML: three GPUs of unknown type
    assert WorkerHardware.from_settings(AgentSettings(), three) == WorkerHardware("", 3)
    seen = HostGpus("", 0)  # seen, but not counted
    assert WorkerHardware.from_settings(AgentSettings(), seen) == WorkerHardware("", 1)
    h100 = AgentSettings(worker_gpu_type="nvidia-h100")
    assert WorkerHardware.from_settings(h100, three) == WorkerHardware("nvidia-h100", 3)
    assert WorkerHardware.from_settings(AgentSettings(worker_gpu_type="nvidia-h100", worker_gpu_count=2),
                                        three) == WorkerHardware("nvidia-h100", 2)


def test_the_worker_gpu_type_setting_wins_over_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    configured = AgentSettings(worker_gpu_type="NVIDIA-H100")
    assert WorkerHardware.from_settings(configured).gpu_type == "nvidia-h100"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert WorkerHardware.from_settings(AgentSettings()).gpu_type == "cpu"


@pytest.mark.parametrize(
    ("spec", "field", "attribute"),
    [
        ({"method": "TRAINING_METHOD_DPO", "dpo": {"reference_model": "{model}"}},
         "spec.dpo.reference_model", "reference_model_path"),
        ({"method": "TRAINING_METHOD_GRPO", "grpo": {"reward_functions": ["REWARD_FUNCTION_REWARD_MODEL"],
                                                     "reward_model": "{model}"}},
         "spec.grpo.reward_model", "reward_model_path"),
        ({"method": "TRAINING_METHOD_DISTILLATION", "distillation": {"teacher_model": "{model}"}},
         "spec.distillation.teacher_model", "teacher_model_path"),
    ],
    ids=["reference", "reward", "teacher"],
)
async def test_the_other_models_are_fetched_under_the_same_rule(
    run: JobRun, store: LocalObjectStore, tmp_path: Path, spec: dict[str, Any], field: str, attribute: str
) -> None:
    """DPO's reference model and GRPO's reward model reach RUN.json as the teacher does: the organization's
    stored output copied into the private cache; a server folder refused, naming the field."""
    ours = model_folder(store.root / "jobs" / ORG / "job_2" / "merged")
    store.put_file("datasets/acme/ds_1/train.jsonl", _write(tmp_path / "train.jsonl"))

    def assign(model: str) -> None:
        body = json.loads(json.dumps(spec).replace("{model}", model))
        resolved = resolve_spec(ParseDict({**body, "base_model": str(tmp_path / "models" / "tiny")},
                                          job_pb2.JobSpec()), require_dataset=False)
        run.assignment.spec.CopyFrom(resolved)
        run.assignment.train_uri = store.uri("datasets/acme/ds_1/train.jsonl")
        run.assignment.output_prefix = store.uri("jobs/acme/job_1")

    assign(ours.as_uri())
    config = await run._prepare()
    path = Path(getattr(config, attribute))
    assert path.parent == run.agent.work_root / "models" and (path / "model.safetensors").is_file()
    others = {"reference_model_path", "reward_model_path", "teacher_model_path"} - {attribute}
    assert all(getattr(config, name) is None for name in others)

    assign("/etc")
    with pytest.raises(TrainingError) as info:
        await run._prepare()
    assert f"The worker does not read {field}" in info.value.message


def _write(path: Path) -> Path:
    path.write_text('{"prompt": [{"role": "user", "content": "hi"}]}\n')
    return path


def test_only_a_worker_with_a_ray_cluster_takes_a_job_on_several_nodes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = HostGpus("cpu", 0)
    monkeypatch.delenv("PET_RDZV_ENDPOINT", raising=False)
    monkeypatch.delenv("PET_MASTER_ADDR", raising=False)
    plain = WorkerHardware.from_settings(AgentSettings(), cpu)
    driver = WorkerHardware.from_settings(AgentSettings(ray_address="127.0.0.1:6379"), cpu)
    assert (plain.multi_node, driver.multi_node) == (False, True)
    refusal = plain.refusal("", 1, "", 2)
    assert refusal is not None and "2 nodes" in refusal and "TUNEFORGE_RAY_ADDRESS" in refusal
    assert driver.refusal("", 1, "", 2) is None and plain.refusal("", 1, "", 1) is None
    # A torchrun multi-node group counts too (the deployment owns its rendezvous).
    monkeypatch.setenv("PET_RDZV_ENDPOINT", "node-0:29400")
    assert WorkerHardware.from_settings(AgentSettings(), cpu).multi_node
