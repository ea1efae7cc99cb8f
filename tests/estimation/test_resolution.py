"""Catalog loading, model resolution (catalog, config.json, name), a spec's `Setup` (its defaults are
tuneforge_core.spec.resolve_spec's, the same CreateJob stores) and catalog checks, suggestions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tuneforge.v1 import job_pb2

from services.estimation.advice import suggestions
from services.estimation.catalog import CATALOG_DIR, Catalog, CatalogError
from services.estimation.estimator import Setup, memory_per_gpu
from services.estimation.resolver import resolve_model
from services.estimation.spec import resolve_setup, to_setup
from tuneforge_core.errors import InvalidArgument
from tuneforge_core.models import S3_OUTSIDE, ModelPolicy
from tuneforge_core.spec import resolve_spec
from tuneforge_core.storage import LocalObjectStore

CATALOG = Catalog.load()

LLAMA_1B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_attention_heads": 32,
    "num_hidden_layers": 16,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": True,
    "max_position_embeddings": 131072,
    "head_dim": 64,
}


def fields(exc: InvalidArgument) -> list[str]:
    return [v.field for v in exc.violations]


def test_catalog_has_the_hardware_table_and_price_overrides(tmp_path: Path) -> None:
    gpus = {h.gpu_type: h for h in CATALOG.hardware_options()}
    assert set(gpus) == {
        "nvidia-t4",
        "nvidia-l4",
        "nvidia-a10g",
        "nvidia-l40s",
        "nvidia-a100-40gb",
        "nvidia-a100-80gb",
        "nvidia-h100",
        "nvidia-h200",
        "cpu",
    }
    assert not gpus["nvidia-t4"].supports_bf16 and gpus["nvidia-h100"].peak_tflops == 989.0
    assert gpus["nvidia-a100-80gb"].allowed_gpu_counts == (1, 2, 3, 4, 5, 6, 7, 8)
    assert (gpus["nvidia-l4"].min_storage_gb, gpus["nvidia-l4"].max_storage_gb) == (50, 1000)
    assert gpus["cpu"].allowed_gpu_counts == (1,)
    assert CATALOG.model("META-LLAMA/llama-3.1-8b-instruct") is not None  # ids are case-insensitive

    cheaper = Catalog.load(hourly_usd={"nvidia-h100": 2.5})
    assert cheaper.hardware("nvidia-h100").hourly_usd == 2.5  # type: ignore[union-attr]
    with pytest.raises(CatalogError, match="unknown GPU types"):
        Catalog.load(hourly_usd={"nvidia-b200": 5.0})
    broken = tmp_path / "catalog"
    shutil.copytree(CATALOG_DIR, broken)
    (broken / "models.json").write_text('{"models": [{"id": "x"}]}')
    with pytest.raises(CatalogError):
        Catalog.load(broken)


def test_a_local_folder_is_read_from_its_config_json(tmp_path: Path) -> None:
    models = ModelPolicy(str(tmp_path))
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_1B_CONFIG))
    resolved = resolve_model(CATALOG, str(folder), models=models)
    assert resolved.architecture.parameter_count == 1_235_814_400  # the same figures as Llama-3.2-1B
    assert resolved.family == "llama" and resolved.max_context_length == 131072
    assert "config.json" in resolved.note

    vlm = tmp_path / "vlm"
    vlm.mkdir()
    (vlm / "config.json").write_text(json.dumps({"model_type": "mllama", "text_config": LLAMA_1B_CONFIG}))
    assert resolve_model(CATALOG, vlm.as_uri(), models=models).model_type == "vlm"

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(InvalidArgument) as caught:
        resolve_model(CATALOG, str(bad), models=models)
    assert fields(caught.value) == ["spec.base_model"]


def test_config_json_is_read_only_under_the_model_roots_and_never_echoed(tmp_path: Path) -> None:
    """EstimateJob used to read a config.json anywhere and quote its values in the error."""
    root, outside = tmp_path / "models", tmp_path / "outside"
    outside.mkdir()
    secret = "root:$6$hash-that-must-not-leak"
    (outside / "config.json").write_text(json.dumps({**LLAMA_1B_CONFIG, "hidden_size": secret}))
    root.mkdir()
    models = ModelPolicy(str(root))
    for ref in ("/etc", str(outside), outside.as_uri(), f"{root}/../outside"):
        with pytest.raises(InvalidArgument) as caught:
            resolve_model(CATALOG, ref, models=models)
        assert fields(caught.value) == ["spec.base_model"] and "model roots" in str(caught.value)
    with pytest.raises(InvalidArgument) as caught:  # no policy: no local paths at all
        resolve_model(CATALOG, str(outside))
    assert "allows none" in str(caught.value)

    linked = root / "linked"
    linked.mkdir()
    (linked / "config.json").symlink_to(outside / "config.json")  # a link out of the root
    with pytest.raises(InvalidArgument) as caught:
        resolve_model(CATALOG, str(linked), models=models)
    assert secret not in str(caught.value)

    inside = root / "inside"
    inside.mkdir()
    (inside / "config.json").write_text(json.dumps({**LLAMA_1B_CONFIG, "hidden_size": secret}))
    with pytest.raises(InvalidArgument) as caught:
        resolve_model(CATALOG, str(inside), models=models)
    assert secret not in str(caught.value) and "hash" not in str(caught.value)
    assert "not a usable number" in caught.value.violations[0].description
    (inside / "config.json").write_text(secret)
    with pytest.raises(InvalidArgument) as caught:
        resolve_model(CATALOG, str(inside), models=models)
    assert secret not in str(caught.value) and "not valid JSON" in str(caught.value)

    teacher = job_pb2.JobSpec(
        base_model="meta-llama/Llama-3.2-1B", method=job_pb2.TRAINING_METHOD_DISTILLATION
    )
    teacher.distillation.teacher_model = str(outside)
    with pytest.raises(InvalidArgument) as caught:  # a refused teacher is an error, not "assumed the size"
        resolve_setup(teacher, CATALOG, models=models)
    assert fields(caught.value) == ["spec.distillation.teacher_model"]


def test_an_organizations_stored_output_is_read_from_the_object_store(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    store.put_bytes("jobs/acme/job_1/merged/config.json", json.dumps(LLAMA_1B_CONFIG).encode())
    models = ModelPolicy((), store)
    ref = store.uri("jobs/acme/job_1/merged")
    resolved = resolve_model(CATALOG, ref, models=models, organization="acme")
    assert resolved.architecture.parameter_count == 1_235_814_400
    with pytest.raises(InvalidArgument) as caught:
        resolve_model(CATALOG, ref, models=models, organization="other")
    assert "another organization" in caught.value.violations[0].description


def test_an_unknown_name_with_a_size_is_guessed_and_noted() -> None:
    resolved = resolve_model(CATALOG, "acme/support-bot-13B-v2")
    assert resolved.architecture.parameter_count == pytest.approx(13e9, rel=0.05)
    assert "unknown" in resolved.note and "13" in resolved.note
    with pytest.raises(InvalidArgument) as caught:  # never read with the platform's identity, nor guessed
        resolve_model(CATALOG, "s3://models/tiny-135M")
    assert caught.value.violations[0].description == S3_OUTSIDE
    with pytest.raises(InvalidArgument) as caught:
        resolve_model(CATALOG, "gpt2")
    assert fields(caught.value) == ["spec.base_model"]
    assert "ListBaseModels" in caught.value.violations[0].description


def test_spec_defaults_follow_job_proto() -> None:
    resolved = resolve_setup(job_pb2.JobSpec(base_model="meta-llama/Llama-3.1-8B-Instruct"), CATALOG)
    assert resolved.setup == Setup()
    setup = resolved.setup
    assert (
        setup.batch_size,
        setup.max_seq_length,
        setup.lora_rank,
        setup.epochs,
        setup.adapter,
        setup.method,
    ) == (4, 2048, 16, 3, "lora", "sft")
    assert resolved.hardware is None and resolved.notes == ()

    quantization = job_pb2.QuantizationConfig(bits=8, compute_dtype=job_pb2.PRECISION_FP16)
    spec = job_pb2.JobSpec(
        base_model="Qwen/Qwen2.5-7B",
        adapter=job_pb2.ADAPTER_TYPE_QLORA,
        quantization=quantization,
        hardware=job_pb2.HardwareConfig(
            gpu_type="nvidia-l4", gpu_count=2, strategy=job_pb2.DISTRIBUTED_STRATEGY_DDP
        ),
    )
    spec.hyperparameters.batch_size = 8
    spec.hyperparameters.gradient_checkpointing = True
    spec.lora.target_modules.extend(["q_proj", "lm_head_x"])
    setup = resolve_setup(spec, CATALOG).setup
    assert (
        setup.adapter,
        setup.quantization_bits,
        setup.precision,
        setup.gpu_count,
        setup.strategy,
        setup.batch_size,
        setup.gradient_checkpointing,
    ) == ("qlora", 8, "fp16", 2, "ddp", 8, True)
    assert any("lm_head_x" in note for note in resolve_setup(spec, CATALOG).notes)


def test_an_int8_qlora_spec_is_8_bits_as_create_job_resolves_it() -> None:
    """The regression that made one resolver: QLoRA with quantization.type INT8 and bits unset was 8-bit at
    CreateJob and 4-bit in the estimator."""
    spec = job_pb2.JobSpec(
        base_model="Qwen/Qwen2.5-7B",
        adapter=job_pb2.ADAPTER_TYPE_QLORA,
        quantization=job_pb2.QuantizationConfig(type=job_pb2.QUANTIZATION_TYPE_INT8),
    )
    assert not spec.quantization.HasField("bits")
    resolved = resolve_spec(spec, require_dataset=False)
    assert resolved.quantization.bits == 8
    assert resolve_setup(spec, CATALOG).setup.quantization_bits == 8
    # 4-bit when the type says so or is left to the resolver.
    spec.quantization.type = job_pb2.QUANTIZATION_TYPE_NF4
    assert resolve_setup(spec, CATALOG).setup.quantization_bits == 4


@pytest.mark.parametrize(
    "spec",
    [
        job_pb2.JobSpec(base_model="meta-llama/Llama-3.1-8B-Instruct"),
        job_pb2.JobSpec(
            base_model="Qwen/Qwen2.5-7B",
            adapter=job_pb2.ADAPTER_TYPE_QLORA,
            quantization=job_pb2.QuantizationConfig(type=job_pb2.QUANTIZATION_TYPE_INT8),
            hardware=job_pb2.HardwareConfig(gpu_type="nvidia-l4", gpu_count=2),
        ),
        job_pb2.JobSpec(base_model="Qwen/Qwen2.5-0.5B", adapter=job_pb2.ADAPTER_TYPE_FULL),
        job_pb2.JobSpec(base_model="Qwen/Qwen2.5-0.5B", adapter=job_pb2.ADAPTER_TYPE_PROMPT_TUNING),
        job_pb2.JobSpec(
            base_model="Qwen/Qwen2.5-0.5B",
            method=job_pb2.TRAINING_METHOD_GRPO,
            grpo=job_pb2.GrpoConfig(reward_functions=[job_pb2.REWARD_FUNCTION_LENGTH], target_length=100),
        ),
    ],
)
def test_a_draft_and_the_spec_create_job_stores_estimate_the_same(spec: job_pb2.JobSpec) -> None:
    """The estimator reads the resolved spec only: estimating a draft, or the resolved copy CreateJob stored
    and the worker trains, is the same `Setup`, field for field."""
    stored = resolve_spec(spec, require_dataset=False)
    setup = resolve_setup(spec, CATALOG).setup
    assert setup == resolve_setup(stored, CATALOG).setup == to_setup(stored)
    hp = stored.hyperparameters
    assert (setup.batch_size, setup.epochs, setup.max_seq_length, setup.gpu_count) == (
        hp.batch_size,
        hp.epochs,
        hp.max_seq_length,
        stored.hardware.gpu_count,
    )
    if stored.method == job_pb2.TRAINING_METHOD_GRPO:
        assert (setup.num_generations, setup.kl_beta) == (stored.grpo.num_generations, stored.grpo.kl_beta)


def test_spec_checks_name_every_bad_field() -> None:
    """The resolver's violations and the catalog's come together, all at once."""
    spec = job_pb2.JobSpec(
        hardware=job_pb2.HardwareConfig(gpu_type="nvidia-b200", gpu_count=9),
        method=job_pb2.TRAINING_METHOD_DISTILLATION,
        adapter=job_pb2.ADAPTER_TYPE_QLORA,
    )
    spec.hyperparameters.batch_size = 0
    spec.hyperparameters.max_seq_length = 8
    spec.lora.rank = 0
    spec.quantization.bits = 3
    with pytest.raises(InvalidArgument) as caught:
        resolve_setup(spec, CATALOG)
    assert set(fields(caught.value)) == {
        "spec.base_model",
        "spec.hyperparameters.batch_size",
        "spec.hyperparameters.max_seq_length",
        "spec.lora.rank",
        "spec.lora.alpha",  # 2 x rank unless set: the resolver checks the value it derived too
        "spec.quantization.bits",
        "spec.distillation.teacher_model",
        "spec.hardware.gpu_type",
        "spec.hardware.gpu_count",
    }

    cpu = job_pb2.JobSpec(
        base_model="Qwen/Qwen2.5-0.5B", hardware=job_pb2.HardwareConfig(gpu_type="cpu", gpu_count=2)
    )
    with pytest.raises(InvalidArgument) as caught:
        resolve_setup(cpu, CATALOG)
    assert fields(caught.value) == ["spec.hardware.gpu_count"]
    assert "allows 1 GPUs" in caught.value.violations[0].description


def test_suggestions_only_offer_changes_that_fit() -> None:
    llama_8b = CATALOG.model("meta-llama/Llama-3.1-8B").architecture  # type: ignore[union-attr]
    t4 = CATALOG.hardware("nvidia-t4")
    assert t4 is not None
    setup = Setup()
    assert memory_per_gpu(llama_8b, setup, t4).total > t4.memory_bytes
    offered = suggestions(llama_8b, setup, t4)
    assert offered and any("QLoRA" in s for s in offered)
    assert all("GiB per GPU" in s for s in offered)
    # Gradient checkpointing alone is not enough for 16 GB of bf16 weights: it is not offered.
    assert not any(s.startswith("Enable gradient checkpointing") for s in offered)
