"""Distributed training: the command line per strategy, the Trainer settings, and real 2-rank gloo runs.

The integration tests start the training exactly as the agent does (``distributed.launch_command``, so
torchrun) and prove that two processes trained: each rank writes its own ``rank`` line with its pid, and
only rank 0 writes metrics and the result.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from google.protobuf.json_format import ParseDict
from tuneforge.v1 import job_pb2

from tests.worker.helpers import make_run_config, read_events
from trainer_worker import distributed
from trainer_worker.errors import TrainingError
from trainer_worker.launcher import TrainingProcess
from tuneforge_core.spec import resolve_spec

REPO = Path(__file__).resolve().parents[2]
# DeepSpeed JIT-compiles a communication op on first use (about half a minute); keep it across runs.
TORCH_EXTENSIONS_DIR = REPO / ".cache" / "torch_extensions"


def _spec(**hardware: Any) -> job_pb2.JobSpec:
    """A spec as the jobs service queues it: resolved (UNSPECIFIED strategy is NONE or DDP by then)."""
    spec = ParseDict({"base_model": "org/model", "hardware": hardware}, job_pb2.JobSpec())
    return resolve_spec(spec, require_dataset=False)


def test_one_process_without_a_strategy_needs_no_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in distributed.MULTINODE_ENV:
        monkeypatch.delenv(var, raising=False)
    command = distributed.launch_command(_spec(), Path("RUN.json"))
    assert command[1:] == ["-m", "trainer_worker.train", "--config", "RUN.json"]
    # Several GPUs without a strategy mean DDP (job.proto); one GPU with a strategy still gets a group.
    assert distributed.strategy(_spec(gpu_count=4)) == job_pb2.DISTRIBUTED_STRATEGY_DDP
    zero = distributed.launch_command(_spec(strategy="DISTRIBUTED_STRATEGY_ZERO3"), Path("RUN.json"))
    assert zero[1:5] == ["-m", "torch.distributed.run", "--nproc-per-node=1", "--standalone"]


def test_multi_node_takes_the_rendezvous_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _spec(gpu_count=8, node_count=4, strategy="DISTRIBUTED_STRATEGY_ZERO2")
    monkeypatch.delenv("PET_RDZV_ENDPOINT", raising=False)
    monkeypatch.delenv("PET_MASTER_ADDR", raising=False)
    with pytest.raises(TrainingError, match=r"4 nodes.*multi-node group"):
        distributed.check_supported(spec)

    monkeypatch.setenv("PET_RDZV_ENDPOINT", "job-x-0.trainers:29400")
    monkeypatch.setenv("PET_NNODES", "4")
    distributed.check_supported(spec)
    command = distributed.launch_command(spec, Path("RUN.json"))
    args = command[command.index("torch.distributed.run") + 1 : command.index("trainer_worker.train") - 1]
    # The node count and endpoint come from the deployment; the worker adds what it left open.
    assert args == ["--nproc-per-node=8", "--rdzv-backend=c10d"]


def test_any_rank_is_the_flag_itself_without_a_process_group() -> None:
    assert distributed.any_rank(True) and not distributed.any_rank(False)


def test_quantized_models_are_not_sharded() -> None:
    for strategy in ("DISTRIBUTED_STRATEGY_ZERO3", "DISTRIBUTED_STRATEGY_FSDP"):
        spec = _spec(gpu_count=2, strategy=strategy)
        spec.adapter = job_pb2.ADAPTER_TYPE_QLORA
        with pytest.raises(TrainingError, match="QLoRA cannot train under"):
            distributed.check_supported(spec)
    spec = _spec(gpu_count=2, strategy="DISTRIBUTED_STRATEGY_DDP")
    spec.adapter = job_pb2.ADAPTER_TYPE_QLORA
    distributed.check_supported(spec)


def test_trainer_settings_per_strategy() -> None:
    assert distributed.trainer_kwargs(_spec()) == {}
    ddp = distributed.trainer_kwargs(_spec(gpu_count=2))
    assert ddp["ddp_backend"] == "gloo" and "deepspeed" not in ddp  # this machine has no GPU

    offload = distributed.trainer_kwargs(_spec(gpu_count=2, strategy="DISTRIBUTED_STRATEGY_ZERO3_OFFLOAD"))
    zero = offload["deepspeed"]["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"]
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
    assert offload["deepspeed"]["train_micro_batch_size_per_gpu"] == "auto"  # the TrainingArguments decide

    zero2 = distributed.trainer_kwargs(_spec(gpu_count=2, strategy="DISTRIBUTED_STRATEGY_ZERO2_OFFLOAD"))
    assert zero2["deepspeed"]["zero_optimization"]["stage"] == 2
    assert "offload_param" not in zero2["deepspeed"]["zero_optimization"]

    fsdp = distributed.trainer_kwargs(_spec(gpu_count=2, strategy="DISTRIBUTED_STRATEGY_FSDP"))
    assert fsdp["fsdp"] is True and fsdp["fsdp_config"]["version"] == 2
    # Accelerate runs FSDP as plain DDP on CPUs; the job log says so rather than pretend.
    assert "as DDP" in distributed.caveats(_spec(gpu_count=2, strategy="DISTRIBUTED_STRATEGY_FSDP"))[0]
    assert distributed.caveats(_spec(gpu_count=2)) == []


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy",
    ["DISTRIBUTED_STRATEGY_DDP", "DISTRIBUTED_STRATEGY_ZERO2", "DISTRIBUTED_STRATEGY_ZERO3"],
)
def test_two_gloo_ranks_train_a_loadable_adapter(
    tmp_path: Path, tiny_model: Path, chat_data: Path, strategy: str
) -> None:
    spec = {
        "method": "TRAINING_METHOD_SFT",
        "hardware": {"gpu_count": 2, "strategy": strategy},
        "hyperparameters": {
            "max_steps": 6,
            "batch_size": 4,
            "learning_rate": 2e-3,
            "logging_steps": 2,
            "warmup_steps": 0,
            "save_steps": 3,
            "max_seq_length": 256,
        },
    }
    cfg = make_run_config(tmp_path, tiny_model, chat_data, spec)
    config = cfg.dump(tmp_path / "RUN.json")
    command = distributed.launch_command(cfg.job_spec(), config)
    assert "torch.distributed.run" in command
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(TORCH_EXTENSIONS_DIR), "PYTHONPATH": str(REPO)}
    with (tmp_path / "train.log").open("wb") as log:
        done = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=300)
    assert done.returncode == 0, (tmp_path / "train.log").read_text()[-4000:]

    events = read_events(cfg.events_file)
    ranks = [e for e in events if e["type"] == "rank"]
    assert sorted(e["rank"] for e in ranks) == [0, 1] and {e["world_size"] for e in ranks} == {2}
    assert len({e["pid"] for e in ranks}) == 2 and os.getpid() not in {e["pid"] for e in ranks}
    # Only rank 0 reports: one point per step, one result, no errors.
    train = [e["step"] for e in events if e["type"] == "metric" and e["kind"] == "train"]
    assert train == [1, 2, 4, 6]
    (result,) = [e for e in events if e["type"] == "result"]
    assert not [e for e in events if e["type"] == "error"]
    assert [e["step"] for e in events if e["type"] == "checkpoint"] == [3, 6]

    assert (
        result["final_metrics"]["train_tokens_per_second"] > 0 and result["final_metrics"]["peak_rss_bytes"]
    )

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), result["adapter_dir"])
    lora = {n: p for n, p in tuned.named_parameters() if "lora_B" in n}
    assert lora and all(p.isfinite().all() for p in lora.values())
    assert any(p.abs().sum() > 0 for p in lora.values()), "lora_B starts at zero: training must move it"
    if strategy == "DISTRIBUTED_STRATEGY_DDP":
        return  # DDP checkpoints are the single-process kind, resumed in test_agent

    # Resume from the staged step-3 checkpoint, as the agent would lay it out: the DeepSpeed shards load
    # under the forced weights_only unpickler.
    resume = tmp_path / "out" / "resume" / "checkpoint-3"
    shutil.copytree(tmp_path / "out" / "checkpoint-uploads" / "checkpoint-3", resume)
    (resume / "COMPLETE").write_text("3")
    cfg.events_file.unlink()
    with (tmp_path / "train.log").open("wb") as log:
        done = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=300)
    assert done.returncode == 0, (tmp_path / "train.log").read_text()[-4000:]
    events = read_events(cfg.events_file)
    assert [e["step"] for e in events if e["type"] == "metric" and e["kind"] == "train"] == [4, 6]


@pytest.mark.slow
async def test_a_stop_reaches_every_rank_and_leaves_no_orphans(
    tmp_path: Path, tiny_model: Path, chat_data: Path
) -> None:
    spec = {
        "hardware": {"gpu_count": 2},
        "hyperparameters": {"max_steps": 100_000, "batch_size": 4, "logging_steps": 1, "save_steps": 100_000},
    }
    cfg = make_run_config(tmp_path, tiny_model, chat_data, spec)
    process = await TrainingProcess.start(
        cfg.dump(tmp_path / "RUN.json"), tmp_path / "train.log", cfg.job_spec(), {"PYTHONPATH": str(REPO)}
    )
    deadline = time.monotonic() + 120
    while not any(e["type"] == "metric" for e in read_events(cfg.events_file)):
        assert time.monotonic() < deadline and process.returncode is None, (
            tmp_path / "train.log"
        ).read_text()
        await asyncio.sleep(0.2)
    ranks = [e["pid"] for e in read_events(cfg.events_file) if e["type"] == "rank"]
    assert len(ranks) == 2

    started = time.monotonic()
    await process.stop(grace_s=20)
    assert time.monotonic() - started < 20, "both ranks stopped between steps, without SIGKILL"
    assert not [pid for pid in ranks if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    events = read_events(cfg.events_file)
    assert {"type": "state", "state": "cancelled"} in [
        {k: e.get(k) for k in ("type", "state")} for e in events
    ]


@pytest.mark.slow
def test_ranks_do_not_outlive_a_killed_agent(tmp_path: Path, tiny_model: Path, chat_data: Path) -> None:
    """torchrun sits between the agent and the ranks; without PR_SET_PDEATHSIG it would train on."""
    spec = {"hardware": {"gpu_count": 2}, "hyperparameters": {"max_steps": 100_000, "logging_steps": 1}}
    cfg = make_run_config(tmp_path, tiny_model, chat_data, spec)
    config = cfg.dump(tmp_path / "RUN.json")
    agent = (  # stands in for the agent: starts the training as the agent does, then waits forever
        "import asyncio, sys\n"
        "from trainer_worker.launcher import TrainingProcess\n"
        "from trainer_worker.run_config import RunConfig\n"
        "async def main():\n"
        f"    cfg = RunConfig.load(__import__('pathlib').Path({str(config)!r}))\n"
        f"    await TrainingProcess.start(cfg.events_file.parent / 'RUN.json', "
        f"cfg.events_file.parent / 'train.log', cfg.job_spec())\n"
        "    await asyncio.sleep(3600)\n"
        "asyncio.run(main())\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", agent], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    try:
        deadline = time.monotonic() + 120
        while not any(e["type"] == "metric" for e in read_events(cfg.events_file)):
            assert time.monotonic() < deadline and parent.poll() is None, (tmp_path / "train.log").read_text()
            time.sleep(0.2)
        launcher = psutil.Process(parent.pid).children()
        ranks = [e["pid"] for e in read_events(cfg.events_file) if e["type"] == "rank"]
    finally:
        parent.kill()
        parent.wait()
    survivors = [psutil.Process(p.pid) for p in launcher] + [psutil.Process(pid) for pid in ranks]
    _, alive = psutil.wait_procs(survivors, timeout=60)
    for process in alive:
        process.kill()
    assert not alive, f"outlived the agent: {alive}"
