"""Other platforms' config files (the seeds' own examples) read into a JobSpec, every key accounted for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tuneforge.v1 import job_pb2

from tuneforge_core.config_files import MODELFORGE, NEMO, SYNTH, load_config, parse_text, read_config
from tuneforge_core.errors import InvalidArgument

SEEDS = Path(__file__).resolve().parent.parent / "fixtures" / "seed_configs"
MODEL = "Qwen/Qwen2.5-0.5B"


def fields(job_or_err: object) -> set[str]:
    return {v.field for v in job_or_err.violations}  # type: ignore[attr-defined]


def why(job_or_err: object, key: str) -> str:
    return next(v.description for v in job_or_err.violations if v.field == key)  # type: ignore[attr-defined]


# -- ModelForge ------------------------------------------------------------------------------------

def test_modelforge_qlora_low_end_maps_every_key() -> None:
    job = read_config(SEEDS / "modelforge_qlora_low_end.json", gpu_type="nvidia-t4")
    s, hp = job.spec, job.spec.hyperparameters
    assert job.format == MODELFORGE
    assert s.base_model == "qwen/Qwen2.5-3B" and s.method == job_pb2.TRAINING_METHOD_SFT
    assert s.adapter == job_pb2.ADAPTER_TYPE_QLORA and s.quantization.bits == 4
    assert (s.lora.rank, s.lora.alpha, s.lora.dropout) == (16, 32, 0.1)
    assert (hp.epochs, hp.batch_size, hp.gradient_accumulation_steps) == (3, 1, 16)
    assert (hp.learning_rate, hp.max_seq_length, hp.eval_steps) == (2e-4, 512, 100)
    assert hp.precision == job_pb2.PRECISION_FP16
    assert s.hardware.gpu_type == "nvidia-t4"
    assert job.dataset == "/path/to/dataset.jsonl" and job.dataset_is_file and job.dataset_key == "dataset"
    assert job.validation_fraction == 0.2
    assert job.violations == []
    assert [n.field for n in job.notes] == ["compute_specs"]


def test_modelforge_half_precision_without_a_gpu_type_is_named_by_its_key() -> None:
    job = read_config(SEEDS / "modelforge_qlora_low_end.json")
    assert fields(job) == {"fp16"}
    assert "needs a GPU" in why(job, "fp16")


@pytest.mark.parametrize("name, rank, adapter, seq", [
    ("modelforge_unsloth_mid_range.json", 64, job_pb2.ADAPTER_TYPE_QLORA, 2048),
    ("modelforge_unsloth_high_end_sft.json", 64, job_pb2.ADAPTER_TYPE_LORA, 4096),
])
def test_modelforge_unsloth_examples(name: str, rank: int, adapter: int, seq: int) -> None:
    job = read_config(SEEDS / name, gpu_type="H100")
    assert job.spec.adapter == adapter and job.spec.lora.rank == rank
    assert job.spec.hyperparameters.max_seq_length == seq
    assert job.spec.hyperparameters.precision == job_pb2.PRECISION_BF16
    assert job.spec.hardware.gpu_type == "nvidia-h100"
    # unsloth is a loading backend TuneForge does not have: named, never dropped
    assert fields(job) == {"provider"}
    assert "unsloth" in why(job, "provider")


def test_modelforge_quantization_keys() -> None:
    doc = {"task": "text-generation", "model_name": MODEL, "strategy": "qlora", "dataset": "chat-0",
           "use_4bit": True, "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_type": "fp4",
           "use_nested_quant": False, "optim": "paged_adamw_32bit", "lr_scheduler_type": "linear",
           "max_steps": -1, "warmup_ratio": 0.1, "packing": True, "group_by_length": False,
           "weight_decay": 0.001, "max_grad_norm": 0.3, "gradient_checkpointing": True}
    job = read_config(json.dumps(doc), gpu_type="nvidia-a10g")
    q, hp = job.spec.quantization, job.spec.hyperparameters
    assert (q.bits, q.type, q.double_quantization) == (4, job_pb2.QUANTIZATION_TYPE_FP4, False)
    assert q.compute_dtype == job_pb2.PRECISION_BF16
    assert hp.optimizer == job_pb2.OPTIMIZER_PAGED_ADAMW and hp.lr_scheduler == job_pb2.LR_SCHEDULER_LINEAR
    assert hp.max_steps == 0 and hp.warmup_ratio == 0.1 and hp.packing and hp.gradient_checkpointing
    assert job.dataset == "chat-0" and not job.dataset_is_file
    assert job.violations == []


def test_modelforge_conflicts_and_ranges_name_the_keys() -> None:
    doc = {"task": "summarization", "model_name": MODEL, "strategy": "rlhf", "dataset": "d",
           "use_4bit": True, "use_8bit": True, "lora_r": 512, "learning_rate": 0.5,
           "per_device_eval_batch_size": 4, "fp16": True, "bf16": True}
    job = read_config(json.dumps(doc), gpu_type="nvidia-h100")
    assert {"task", "strategy", "use_8bit", "lora_r", "learning_rate", "bf16"} <= fields(job)
    assert "no such setting in TuneForge yet" in why(job, "strategy")
    assert job.spec.hyperparameters.eval_batch_size == 4
    assert "[1, 256]" in why(job, "lora_r")


# -- Synth -----------------------------------------------------------------------------------------

def test_synth_lora_toml_with_every_section(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(SEEDS)
    job = read_config(SEEDS / "synth_lora_sft.toml")
    s, hp = job.spec, job.spec.hyperparameters
    assert job.format == SYNTH
    assert s.base_model == "Qwen/Qwen3-4B" and s.adapter == job_pb2.ADAPTER_TYPE_QLORA
    assert (s.hardware.gpu_type, s.hardware.gpu_count, s.hardware.node_count) == ("nvidia-h100", 4, 1)
    assert s.hardware.strategy == job_pb2.DISTRIBUTED_STRATEGY_ZERO2
    assert (hp.epochs, hp.batch_size, hp.gradient_accumulation_steps) == (1, 1, 64)
    assert (hp.max_seq_length, hp.learning_rate, hp.warmup_ratio, hp.eval_steps) == (4096, 5e-6, 0.03, 20)
    assert hp.precision == job_pb2.PRECISION_BF16
    # paths resolve against the working directory, as the Synth CLI resolves them
    assert job.dataset == str(SEEDS / "data" / "train.jsonl") and job.dataset_is_file
    assert job.validation_file == str(SEEDS / "data" / "validation.jsonl")
    assert {n.field for n in job.notes} == {"algorithm", "data.topology", "training.mode"}
    # what the documented file asks for that TuneForge cannot do, by the file's key paths
    assert fields(job) == {"hyperparameters.parallelism.deepspeed_stage"}
    assert hp.keep_best_model and hp.metric_for_best_model == "eval_loss"
    assert "QLoRA" in why(job, "hyperparameters.parallelism.deepspeed_stage")


SYNTH_MIN = """
[job]
model = "Qwen/Qwen2.5-0.5B"
data = "train.jsonl"

[training]
use_qlora = false

[hyperparameters]
n_epochs = 2
per_device_batch = 2
global_batch = 8
"""


def test_synth_without_use_qlora_is_full_fine_tuning_and_global_batch_sets_accumulation() -> None:
    job = read_config(SYNTH_MIN)
    assert job.spec.adapter == job_pb2.ADAPTER_TYPE_FULL
    assert job.spec.hyperparameters.gradient_accumulation_steps == 4
    assert job.violations == []


def test_synth_unknown_and_unsupported_keys_are_named_in_the_error() -> None:
    text = SYNTH_MIN + "learning_rat = 1e-4\n\n[hyperparameters.parallelism]\ntensor_parallel_size = 2\n"
    with pytest.raises(InvalidArgument) as caught:
        load_config(text)
    assert fields(caught.value) == {"hyperparameters.learning_rat",
                                    "hyperparameters.parallelism.tensor_parallel_size"}
    assert "did you mean 'learning_rate'" in why(caught.value, "hyperparameters.learning_rat")
    assert "no such setting in TuneForge yet" in why(caught.value,
                                                     "hyperparameters.parallelism.tensor_parallel_size")
    assert "hyperparameters.learning_rat" in str(caught.value)


def test_synth_unknown_table_is_named() -> None:
    job = read_config(SYNTH_MIN + "\n[extras]\nfoo = 1\n")
    assert fields(job) == {"extras"}


def test_examples_and_dataset_override() -> None:
    job = read_config(SYNTH_MIN, dataset="chat-0", examples=50)
    assert job.dataset == "chat-0" and not job.dataset_is_file and job.dataset_key == "--dataset"
    assert job.max_samples == 50
    assert fields(read_config(SYNTH_MIN, examples=0)) == {"--examples"}


# -- NeMo Customizer -------------------------------------------------------------------------------

def test_nemo_dpo_lora_merged() -> None:
    job = read_config(SEEDS / "nemo_dpo.json", model=MODEL)
    s, hp = job.spec, job.spec.hyperparameters
    assert job.format == NEMO and job.violations == []
    assert s.method == job_pb2.TRAINING_METHOD_DPO
    assert s.adapter == job_pb2.ADAPTER_TYPE_LORA and s.output.merge_adapter
    assert (s.dpo.beta, s.dpo.preference_loss_weight, s.dpo.sft_loss_weight) == (0.05, 1.0, 0.0)
    assert hp.max_grad_norm == 1.0 and hp.batch_size == 16 and hp.seed == 1234 and hp.eval_steps == 20
    assert hp.optimizer == job_pb2.OPTIMIZER_ADAMW
    assert hp.lr_scheduler == job_pb2.LR_SCHEDULER_COSINE_WITH_MIN_LR and hp.min_learning_rate == 9e-7
    assert (s.lora.rank, s.lora.alpha, s.lora.dropout) == (16, 32, 0.05)
    assert list(s.lora.target_modules) == ["q_proj", "k_proj", "v_proj", "o_proj"]  # Megatron names
    # NeMo's built-in early stopping, said out loud
    es = hp.early_stopping
    assert (es.enabled, es.patience, es.min_delta) == (True, 10, 0.001)
    assert [n.field for n in job.notes] == ["val_check_interval"]


def test_nemo_grpo_names_what_has_no_equivalent() -> None:
    job = read_config(SEEDS / "nemo_grpo.json", model=MODEL)
    g, hp = job.spec.grpo, job.spec.hyperparameters
    assert job.spec.method == job_pb2.TRAINING_METHOD_GRPO
    assert (g.num_generations, g.kl_beta, g.clip_epsilon, g.top_p, g.top_k) == (4, 0.01, 0.2, 0.9, 50)
    assert hp.batch_size == 32  # 8 prompts x 4 generations
    assert hp.lr_scheduler == job_pb2.LR_SCHEDULER_CONSTANT_WITH_WARMUP and hp.weight_decay == 0.0
    assert (g.use_rloo, g.normalize_rewards, g.overlong_filtering) == (True, True, False)
    assert g.clip_epsilon_high == 0.2
    assert g.HasField("on_policy_kl_approximation") and not g.on_policy_kl_approximation  # NeMo's false
    # RLOO's loss is per sequence: NeMo's token_level_loss with it is refused by name, as is its Gym env.
    assert {"grpo.environment", "grpo.token_level_loss"} <= fields(job)
    assert {n.field for n in job.notes} == {"grpo.logprob_chunk_size", "grpo.generation_batch_size",
                                            "val_check_interval"}


def test_nemo_distillation_full_weights() -> None:
    job = read_config(SEEDS / "nemo_distillation.json", model="meta-llama/Llama-3.2-1B-Instruct")
    s = job.spec
    assert job.violations == []
    assert s.method == job_pb2.TRAINING_METHOD_DISTILLATION and s.adapter == job_pb2.ADAPTER_TYPE_FULL
    assert s.distillation.teacher_model == "meta-llama/Llama-3.1-8B-Instruct"
    assert s.hyperparameters.packing and s.hyperparameters.eval_steps == 0


def test_nemo_without_a_model_asks_for_one() -> None:
    job = read_config(SEEDS / "nemo_distillation.json")
    assert fields(job) == {"spec.base_model"} and "--model" in why(job, "spec.base_model")


def test_nemo_unsupported_and_conflicting_keys() -> None:
    doc = {"finetuning_type": "lora", "training_type": "dpo", "optimizer": "adam_with_flat_lr",
           "weight_decay": 0.1, "val_check_interval": 0.25,
           "sft": {"hidden_dropout": 0.1}, "lora": {"adapter_dim": 8, "bogus": 1}}
    with pytest.raises(InvalidArgument) as caught:
        load_config(json.dumps(doc), model=MODEL)
    assert fields(caught.value) == {"weight_decay", "sft", "lora.bogus"}


def test_nemo_knobs_map_to_the_spec() -> None:
    doc = {"finetuning_type": "lora", "training_type": "sft", "val_check_interval": 0.25,
           "sft": {"hidden_dropout": 0.1, "attention_dropout": None}}
    job = read_config(json.dumps(doc), model=MODEL)
    hp = job.spec.hyperparameters
    assert hp.eval_epoch_fraction == 0.25 and hp.hidden_dropout == 0.1
    assert not hp.HasField("attention_dropout")


# -- detection -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ('{"foo": 1}', "neither a ModelForge"),
    ("[1, 2]", "not an object"),
    ("title = 'x'\n", "not a Synth SFT config"),
    ("this is: not [ a config", "expected a Synth TOML"),
])
def test_detection_errors_are_clear(text: str, expected: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_text(text)
    assert fields(caught.value) == {"config"} and expected in str(caught.value)


def test_detects_each_format() -> None:
    assert parse_text((SEEDS / "synth_lora_sft.toml").read_text())[0] == SYNTH
    assert parse_text((SEEDS / "nemo_grpo.json").read_text())[0] == NEMO
    assert parse_text((SEEDS / "modelforge_qlora_low_end.json").read_text())[0] == MODELFORGE


def test_a_missing_file_is_an_invalid_argument(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        read_config(tmp_path / "nope.toml")


def test_synth_gpu_names_and_batch_arithmetic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "configs").mkdir()
    text = SYNTH_MIN.replace('model = "Qwen/Qwen2.5-0.5B"', 'model = "./model"') + (
        "gradient_accumulation_steps = 3\n\n[compute]\ngpu_type = \"A100\"\ngpu_count = 2\n")
    config = tmp_path / "configs" / "c.toml"
    config.write_text(text)
    monkeypatch.chdir(tmp_path)
    job = read_config(config)
    # relative to the working directory, not to the file's folder (configs/), as the Synth CLI does
    assert job.spec.base_model == str(tmp_path / "model")
    assert job.dataset == str(tmp_path / "train.jsonl")
    # 8 = 2 per device x 2 GPUs x 2 steps, which the file's 3 contradicts; "A100" has two sizes
    assert fields(job) == {"hyperparameters.global_batch", "compute.gpu_type"}
    assert "needs 2" in why(job, "hyperparameters.global_batch")
    assert "A100-80GB" in why(job, "compute.gpu_type")


def test_wrong_types_are_named() -> None:
    doc = {"task": "text-generation", "model_name": MODEL, "dataset": "d", "lora_r": "16",
           "packing": "yes", "learning_rate": True}
    job = read_config(json.dumps(doc))
    assert fields(job) == {"lora_r", "packing", "learning_rate"}
    assert "must be an integer" in why(job, "lora_r")
