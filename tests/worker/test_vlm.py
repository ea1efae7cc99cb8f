"""Vision-language jobs on the worker: the tiny LLaVA-style model (trainer_worker.tiny_vlm) trains with LoRA
on an image dataset through TRL's vision path, and "LLM on a VLM base" trains the language model alone.
Both run the recipe as the agent does (a subprocess from RUN.json) and load the adapter back onto the base
model through from_pretrained, as a user would."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.worker.helpers import make_run_config, read_events, start_recipe
from trainer_worker import vision
from trainer_worker.errors import TrainingError
from trainer_worker.tiny import write_synthetic_chat_dataset
from trainer_worker.tiny_vlm import build_tiny_vlm, image_rows, write_image_split
from tuneforge_core.storage import LocalObjectStore

HYPERPARAMETERS = {
    "epochs": 3,
    "batch_size": 4,
    "learning_rate": 3e-3,
    "logging_steps": 1,
    "warmup_steps": 0,
    "save_steps": 1000,
}


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm") / "model")


def _adapter_keys(adapter: Path) -> list[str]:
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        return list(f.keys())


def _train(tmp_path: Path, model: Path, train_file: Path, spec: dict, test_file: Path | None = None) -> dict:
    cfg = make_run_config(tmp_path, model, train_file, spec)
    cfg.test_file = test_file
    assert start_recipe(cfg, tmp_path).wait(timeout=120) == 0, (tmp_path / "train.log").read_text()
    events = read_events(cfg.events_file)
    assert events[-1]["type"] == "result", events[-3:]
    return {"events": events, "result": events[-1]}


@pytest.mark.slow
def test_vlm_lora_trains_on_images_and_the_adapter_loads(tmp_path: Path, tiny_vlm: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    train_file = write_image_split(tmp_path / "data", 16)
    test_file = write_image_split(tmp_path / "test", 6, seed=1)
    spec = {
        "method": "TRAINING_METHOD_SFT",
        "model_type": "MODEL_TYPE_VLM",
        "lora": {"rank": 8},
        "hyperparameters": HYPERPARAMETERS,
        "output": {"merge_adapter": True},
    }
    run = _train(tmp_path, tiny_vlm, train_file, spec, test_file=test_file)
    train = [e for e in run["events"] if e["type"] == "metric" and e["kind"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"], [p["loss"] for p in train]
    result = run["result"]
    # Evaluated on the image test split, through the same collator as training.
    report = result["evaluation"]
    assert report["status"] == "EVALUATION_STATUS_SUCCEEDED", report
    assert int(report["exampleCount"]) == 6 and report["primaryMetric"] == "loss"
    assert report["tunedMetrics"]["loss"] < report["baseMetrics"]["loss"] and report["improved"]
    samples = report["samples"]
    assert len(samples) == 3 and all(s["prompt"] == "What colour is the square?" for s in samples), samples
    assert all(s["reference"].startswith("The square is") and "tunedAnswer" in s for s in samples), samples
    adapter = Path(result["adapter_dir"])
    keys = _adapter_keys(adapter)
    assert any("vision_tower" in k for k in keys) and any("language_model" in k for k in keys)
    assert (adapter / "processor_config.json").is_file()  # the processor travels with the adapter

    processor = AutoProcessor.from_pretrained(adapter)
    row = json.loads(train_file.read_text().splitlines()[0])
    messages = row["messages"]
    messages[0]["content"][0]["image"] = row["images"][0]
    inputs = processor.apply_chat_template([messages], tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        base = AutoModelForImageTextToText.from_pretrained(tiny_vlm)
        base_logits = base(**inputs).logits
        tuned = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_vlm), adapter)
        tuned_logits = tuned(**inputs).logits
        merged_logits = AutoModelForImageTextToText.from_pretrained(result["merged_dir"])(**inputs).logits
    assert not torch.allclose(base_logits, tuned_logits, atol=1e-4)
    torch.testing.assert_close(merged_logits, tuned_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_llm_on_a_vlm_base_trains_the_language_model_only(tmp_path: Path, tiny_vlm: Path) -> None:
    train_file = write_synthetic_chat_dataset(tmp_path / "train.jsonl", 32)
    spec = {
        "method": "TRAINING_METHOD_SFT",
        "model_type": "MODEL_TYPE_LLM",
        "lora": {"rank": 4},
        "hyperparameters": {**HYPERPARAMETERS, "epochs": 1, "batch_size": 8},
        "evaluation": {"enabled": False},
    }
    result = _train(tmp_path, tiny_vlm, train_file, spec)["result"]
    keys = _adapter_keys(Path(result["adapter_dir"]))
    assert keys and all("language_model" in k for k in keys), keys
    assert not any("vision_tower" in k or "multi_modal_projector" in k for k in keys)


def test_the_language_model_targets_exclude_the_vision_tower() -> None:
    import re

    from trainer_worker.recipes.vlm import language_model_targets

    names = [
        "model.language_model.layers.0.self_attn.q_proj",
        "model.language_model.layers.0.mlp.down_proj",
        "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj",
        "model.multi_modal_projector.linear_1",
        "lm_head",
    ]
    everything = language_model_targets(["all-linear"], ["down_proj", "q_proj"])
    assert [n for n in names if re.fullmatch(everything, n)] == names[:2]
    only_q = language_model_targets(["q_proj"], ["down_proj", "q_proj"])
    assert [n for n in names if re.fullmatch(only_q, n)] == names[:1]
    wildcard = language_model_targets(["*.self_attn.*"], ["down_proj", "q_proj"])
    assert [n for n in names if re.fullmatch(wildcard, n)] == names[:1]


def test_the_agent_fetches_the_images_a_split_names(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    rows = []
    for path, data, row in image_rows(3):
        key = f"datasets/acme/ds_1/images/{path}"
        (store.root / key).parent.mkdir(parents=True, exist_ok=True)
        (store.root / key).write_bytes(data)
        rows.append({**row, "images": [store.uri(key)]})
    split = tmp_path / "data" / "train.jsonl"
    split.parent.mkdir()
    split.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = tmp_path / "data" / "validation.jsonl"
    text.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    before = text.read_text()

    def locate(uri: str) -> tuple[LocalObjectStore, str]:
        return store, store.key_of(uri)

    assert vision.localize_images([split, text], locate, tmp_path / "data" / "images") == 3
    local = [json.loads(line)["images"][0] for line in split.read_text().splitlines()]
    assert all(Path(p).is_file() and Path(p).parent == tmp_path / "data" / "images" for p in local)
    assert text.read_text() == before  # a text split is left as it was

    rows[0]["images"] = [store.uri("datasets/acme/ds_1/images/missing.png")]
    split.write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(TrainingError, match="does not exist"):
        vision.localize_images([split], locate, tmp_path / "other")


def test_a_vision_language_base_picks_the_vlm_recipe(tmp_path: Path) -> None:
    from tuneforge.v1 import job_pb2, model_pb2

    vlm, text = tmp_path / "vlm", tmp_path / "text"
    for folder, config in ((vlm, {"vision_config": {}}), (text, {"model_type": "llama"})):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
    sft = job_pb2.JobSpec(method=job_pb2.TRAINING_METHOD_SFT, adapter=job_pb2.ADAPTER_TYPE_LORA)
    assert vision.recipe_override(sft, str(text)) is None
    assert vision.recipe_override(sft, str(vlm)) == vision.VLM_RECIPE  # LLM on a VLM base: language only
    sft.model_type = model_pb2.MODEL_TYPE_VLM
    assert vision.recipe_override(sft, "Qwen/Qwen2.5-VL-7B-Instruct") == vision.VLM_RECIPE
    dpo = job_pb2.JobSpec(method=job_pb2.TRAINING_METHOD_DPO, adapter=job_pb2.ADAPTER_TYPE_LORA)
    with pytest.raises(TrainingError, match="SFT and LoRA or QLoRA only"):
        vision.recipe_override(dpo, str(vlm))
    with pytest.raises(TrainingError):
        vision.recipe_override(dpo, "meta-llama/Llama-3.2-11B-Vision-Instruct")  # the catalog says VLM
