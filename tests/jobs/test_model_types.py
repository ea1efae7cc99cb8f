"""CreateJob fills in JobSpec.model_type from the base model and refuses an image dataset for a text-only
model, and on a vision-language model anything but SFT with LoRA/QLoRA, naming the field and why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tuneforge.v1 import dataset_pb2, job_pb2, job_service_pb2, model_pb2

from services.jobs.component import MIGRATIONS
from services.jobs.manager import JobManager
from services.jobs.models import JobOutbox
from services.kit.db import Database
from services.kit.outbox import OutboxRelay
from tuneforge_core.errors import InvalidArgument
from tuneforge_core.models import ModelPolicy
from tuneforge_core.storage import LocalObjectStore

ORG = "acme"
LLM, VLM = model_pb2.MODEL_TYPE_LLM, model_pb2.MODEL_TYPE_VLM
TEXT_ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
IMAGE_ROW = {
    "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "colour?"}]},
                 {"role": "assistant", "content": "red"}],
    "images": ["file:///x/images/0.png"],
}


class Datasets:
    """GetDataset as the jobs service sees it: READY chat datasets whose train split lies in the store."""

    def __init__(self, store: LocalObjectStore) -> None:
        self.store = store
        self.datasets: dict[str, dataset_pb2.Dataset] = {}

    def add(self, name: str, row: dict) -> None:
        key = f"datasets/{ORG}/ds_{name}/train.jsonl"
        self.store.put_bytes(key, (json.dumps(row) + "\n").encode() * 3)
        split = dataset_pb2.DatasetSplit(kind=dataset_pb2.DATASET_SPLIT_KIND_TRAIN, example_count=3,
                                         uri=self.store.uri(key))
        self.datasets[name] = dataset_pb2.Dataset(
            id=f"ds_{name}", name=name, organization=ORG, state=dataset_pb2.DATASET_STATE_READY,
            format=dataset_pb2.DATASET_FORMAT_OPENAI_CHAT, splits=[split])

    async def get(self, organization: str, ref: str, field: str) -> dataset_pb2.Dataset:
        return self.datasets[ref]


def model_folder(path: Path, *, vision: bool) -> Path:
    path.mkdir(parents=True)
    config = {"model_type": "llava", "vision_config": {"model_type": "clip_vision_model"}} if vision else \
        {"model_type": "llama"}
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").write_bytes(b"\0")
    return path


@pytest.fixture
def roots(tmp_path: Path) -> Path:
    model_folder(tmp_path / "models" / "text", vision=False)
    model_folder(tmp_path / "models" / "vlm", vision=True)
    return tmp_path / "models"


@pytest.fixture
def manager(tmp_path: Path, roots: Path) -> JobManager:
    store = LocalObjectStore(tmp_path / "objects")
    db = Database(f"sqlite:///{tmp_path / 'jobs.db'}", "jobs")
    db.migrate(MIGRATIONS)
    datasets = Datasets(store)
    datasets.add("chats", TEXT_ROW)
    datasets.add("pictures", IMAGE_ROW)
    relay = OutboxRelay(db, js=None, model=JobOutbox)  # type: ignore[arg-type]
    return JobManager(db, relay, datasets, store, nc=None,  # type: ignore[arg-type]
                      models=ModelPolicy(str(roots), store, tmp_path / "data"))


async def create(manager: JobManager, **spec: object) -> job_pb2.JobSpec:
    request = job_service_pb2.CreateJobRequest(organization=ORG, spec=job_pb2.JobSpec(**spec),  # type: ignore[arg-type]
                                               validate_only=True)
    return (await manager.create(request)).spec


async def refused(manager: JobManager, **spec: object) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as info:
        await create(manager, **spec)
    return {v.field: v.description for v in info.value.violations}


async def test_model_type_comes_from_the_catalog_or_the_models_config(
    manager: JobManager, roots: Path
) -> None:
    qwen_vl = "Qwen/Qwen2.5-VL-7B-Instruct"
    assert (await create(manager, base_model=qwen_vl, dataset="pictures")).model_type == VLM
    variant = "meta-llama/Llama-3.2-11B-Vision-Instruct"
    assert (await create(manager, base_model=variant, dataset="chats")).model_type == VLM
    assert (await create(manager, base_model="Qwen/Qwen2.5-3B-Instruct", dataset="chats")).model_type == LLM
    assert (await create(manager, base_model=str(roots / "vlm"), dataset="pictures")).model_type == VLM
    assert (await create(manager, base_model=str(roots / "text"), dataset="chats")).model_type == LLM
    # A hub id the catalog does not list follows the dataset; the worker checks the model it downloads.
    assert (await create(manager, base_model="someone/new-vlm", dataset="pictures")).model_type == VLM
    assert (await create(manager, base_model="someone/new-llm", dataset="chats")).model_type == LLM
    # LLM on a VLM base: the language model alone, on text.
    spec = await create(manager, base_model=str(roots / "vlm"), dataset="chats", model_type=LLM)
    assert spec.model_type == LLM


async def test_an_image_dataset_needs_a_vision_language_model(manager: JobManager, roots: Path) -> None:
    fields = await refused(manager, base_model=str(roots / "text"), dataset="pictures")
    assert list(fields) == ["spec.dataset"]
    assert "holds images" in fields["spec.dataset"]
    assert "text only and cannot read images" in fields["spec.dataset"]
    fields = await refused(manager, base_model="Qwen/Qwen2.5-3B-Instruct", dataset="pictures")
    assert list(fields) == ["spec.dataset"]
    fields = await refused(manager, base_model=str(roots / "vlm"), dataset="pictures", model_type=LLM)
    assert set(fields) == {"spec.dataset", "spec.model_type"}
    assert "MODEL_TYPE_VLM" in fields["spec.model_type"]
    fields = await refused(manager, base_model=str(roots / "text"), dataset="chats", model_type=VLM)
    assert list(fields) == ["spec.model_type"] and "text only" in fields["spec.model_type"]


async def test_a_vision_language_model_trains_with_sft_and_lora_only(
    manager: JobManager, roots: Path
) -> None:
    for model_type in (model_pb2.MODEL_TYPE_UNSPECIFIED, LLM):  # VLM itself: resolve_spec refuses it first
        fields = await refused(manager, base_model=str(roots / "vlm"), dataset="chats", model_type=model_type,
                               method=job_pb2.TRAINING_METHOD_DPO)
        assert "TRAINING_METHOD_SFT only" in fields["spec.method"], fields
    fields = await refused(manager, base_model="Qwen/Qwen2.5-VL-7B-Instruct", dataset="pictures",
                           adapter=job_pb2.ADAPTER_TYPE_FULL)
    assert list(fields) == ["spec.adapter"] and "LORA or ADAPTER_TYPE_QLORA only" in fields["spec.adapter"]
    spec = await create(manager, base_model=str(roots / "vlm"), dataset="pictures",
                        adapter=job_pb2.ADAPTER_TYPE_QLORA)
    assert spec.model_type == VLM and spec.adapter == job_pb2.ADAPTER_TYPE_QLORA
