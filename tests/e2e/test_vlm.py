"""A vision-language job end to end: a ZIP of images and train.jsonl uploaded through the datasets service,
CreateJob telling the model type from the base model's config, a worker fetching the images and training
the tiny LLaVA-style model with LoRA, and the adapter loading onto the base model. An image dataset for a
text-only model is refused at CreateJob."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from tuneforge.v1 import dataset_pb2, job_pb2, model_pb2

from services.client import InvalidArgument, TuneForgeClient
from services.platform.supervisor import Platform
from tests.auth import org_client
from tests.e2e.conftest import start_platform, wait_final

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer_worker.tiny import build_tiny_chat_model
    from trainer_worker.tiny_vlm import build_tiny_vlm

    root = tmp_path_factory.mktemp("vlm-models")
    build_tiny_vlm(root / "tiny-vlm")
    build_tiny_chat_model(root / "tiny-chat")
    return root


@pytest.fixture(scope="module")
def vlm_client(tmp_path_factory: pytest.TempPathFactory, models: Path) -> Iterator[TuneForgeClient]:
    platform: Platform = start_platform(tmp_path_factory.mktemp("vlm-platform"), workers=1,
                                        model=models / "tiny-vlm")
    try:
        with org_client(platform.address, platform.data_dir, "e2e-vlm") as client:
            yield client
    finally:
        platform.stop()


def test_image_zip_trains_a_vlm_adapter_end_to_end(
    vlm_client: TuneForgeClient, models: Path, tmp_path: Path
) -> None:
    from trainer_worker.tiny_vlm import write_image_dataset_zip

    archive = write_image_dataset_zip(tmp_path / "pictures.zip", n=100)
    ds = vlm_client.upload_dataset(archive, "pictures", request_id=str(uuid.uuid4())).dataset
    assert ds.state == dataset_pb2.DATASET_STATE_READY, ds.failure_message

    # A text-only model cannot read the images: refused at CreateJob, naming the dataset.
    with pytest.raises(InvalidArgument) as info:
        vlm_client.create_job(job_pb2.JobSpec(base_model=str(models / "tiny-chat"), dataset=ds.id))
    assert "spec.dataset" in {v.field for v in info.value.violations}, info.value

    spec = job_pb2.JobSpec(base_model=str(models / "tiny-vlm"), dataset=ds.id)  # model_type from the model
    spec.lora.rank = 8
    hp = spec.hyperparameters
    hp.max_steps, hp.batch_size, hp.learning_rate, hp.logging_steps, hp.warmup_steps = 8, 4, 3e-3, 1, 0
    job = vlm_client.create_job(spec, name="pictures-lora")
    assert job.spec.model_type == model_pb2.MODEL_TYPE_VLM
    final = wait_final(vlm_client, job.id)
    assert final.state == job_pb2.JOB_STATE_SUCCEEDED, final.error

    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    adapter = Path(final.output.adapter_uri.removeprefix("file://"))
    base = AutoModelForImageTextToText.from_pretrained(models / "tiny-vlm")
    tuned = PeftModel.from_pretrained(base, adapter)
    trained = {name for name, p in tuned.named_parameters() if "lora_B" in name and torch.any(p != 0)}
    assert any("vision_tower" in n for n in trained) and any("language_model" in n for n in trained)
