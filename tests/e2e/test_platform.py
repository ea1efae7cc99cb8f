"""The spine, end to end through the gRPC stubs against the running platform."""

from __future__ import annotations

import json
import os
import signal
import uuid
from pathlib import Path

import pytest
from tuneforge.v1 import dataset_pb2, job_pb2, metrics_pb2

from services.client import FailedPrecondition, InvalidArgument, NotFound, TuneForgeClient
from services.platform.supervisor import Platform
from tests.auth import make_key, org_client
from tests.e2e.conftest import FAST_WORKER_CHECKS, lora_spec, start_platform, wait_final, wait_for

pytestmark = pytest.mark.slow


def upload(client: TuneForgeClient, path: Path, name: str) -> dataset_pb2.Dataset:
    return client.upload_dataset(path, name, request_id=str(uuid.uuid4())).dataset


def test_upload_train_stream_and_load_adapter(
    client: TuneForgeClient, tiny_assets: tuple[Path, Path], platform: Platform, tmp_path: Path
) -> None:
    model, data = tiny_assets
    ds = upload(client, data, "chat")
    assert ds.state == dataset_pb2.DATASET_STATE_READY
    counts = {s.kind: s.example_count for s in ds.splits}
    assert sum(counts.values()) == 240 and counts[dataset_pb2.DATASET_SPLIT_KIND_TRAIN] > 150

    spec = lora_spec(model, ds.id, epochs=3)
    spec.output.merge_adapter = True
    job = client.create_job(spec, name="slice")
    assert job.state == job_pb2.JOB_STATE_QUEUED
    final = wait_final(client, job.id)
    assert final.state == job_pb2.JOB_STATE_SUCCEEDED, final.error
    assert final.attempt == 1 and final.progress.total_steps > 0

    points = [
        p for p in client.stream_metrics(job.id, follow=False) if p.kind == metrics_pb2.METRIC_KIND_TRAIN
    ]
    steps = [p.step for p in points]
    assert steps == sorted(set(steps)) and len(points) >= 5
    losses = [p.loss for p in points]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, f"loss did not fall: {losses}"
    assert all(p.HasField("learning_rate") and p.HasField("tokens_per_second") for p in points)

    adapter_dir = Path(final.output.adapter_uri.removeprefix("file://"))
    assert (adapter_dir / "adapter_config.json").exists()
    assert (adapter_dir / "adapter_model.safetensors").exists()
    # Results out: the adapter through the CLI (checksums verified); the model loads from the download.
    from typer.testing import CliRunner

    from services.cli.main import app

    downloaded = tmp_path / "downloaded-adapter"
    result = CliRunner(env={"TUNEFORGE_API_KEY": client.api_key}).invoke(
        app, ["jobs", "download", job.id, str(downloaded), "--address", platform.address])
    assert result.exit_code == 0 and "sha256 verified" in result.output, result.output
    assert (downloaded / "adapter_model.safetensors").read_bytes() == \
        (adapter_dir / "adapter_model.safetensors").read_bytes()
    adapter_dir = downloaded
    # The job's story as the CLI prints it: the worker's and the training process's lines, filterable.
    logs = CliRunner(env={"TUNEFORGE_API_KEY": client.api_key}).invoke(
        app, ["jobs", "logs", job.id, "--address", platform.address])
    assert logs.exit_code == 0 and " worker " in logs.output and " training " in logs.output, logs.output
    warnings = CliRunner(env={"TUNEFORGE_API_KEY": client.api_key}).invoke(
        app, ["jobs", "logs", job.name or job.id, "--source", "worker", "--level", "warning", "--json",
              "--address", platform.address])
    assert warnings.exit_code == 0, warnings.output
    assert all(json.loads(line)["source"] == "LOG_SOURCE_WORKER" for line in warnings.output.splitlines()
               if line.strip()), warnings.output
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model)
    tuned = PeftModel.from_pretrained(base, adapter_dir)
    assert any("lora_A" in name for name, _ in tuned.named_parameters())
    merged = Path(final.output.merged_model_uri.removeprefix("file://"))
    assert (merged / "config.json").exists()


def test_preference_data_trains_dpo_end_to_end(
    client: TuneForgeClient, tmp_path: Path, tiny_assets: tuple[Path, Path]
) -> None:
    """OpenAI-shaped preference pairs go through upload, detection and normalization, and the worker's DPO
    recipe trains on the split files the datasets service wrote."""
    model, _ = tiny_assets
    rows = []
    for i in range(120):
        a, b = i % 10, (i * 3) % 10
        rows.append(json.dumps({
            "input": {"messages": [{"role": "user", "content": f"What is {a} plus {b}?"}]},
            "preferred_output": [{"role": "assistant", "content": f"{a + b}"}],
            "non_preferred_output": [{"role": "assistant", "content": f"{a + b + 1}"}],
        }))
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(rows) + "\n")
    ds = upload(client, data, "pairs")
    assert ds.format == dataset_pb2.DATASET_FORMAT_OPENAI_PREFERENCE
    spec = lora_spec(model, ds.id)
    spec.method = job_pb2.TRAINING_METHOD_DPO
    spec.hyperparameters.max_steps = 4
    spec.output.merge_adapter = True
    final = wait_final(client, client.create_job(spec).id)
    assert final.state == job_pb2.JOB_STATE_SUCCEEDED, final.error
    assert final.output.final_metrics["global_step"] == 4
    adapter = Path(final.output.adapter_uri.removeprefix("file://"))
    assert (adapter / "adapter_model.safetensors").is_file()
    assert (Path(final.output.merged_model_uri.removeprefix("file://")) / "model.safetensors").is_file()


def test_prompt_only_data_trains_grpo_end_to_end(
    client: TuneForgeClient, tmp_path: Path, tiny_assets: tuple[Path, Path]
) -> None:
    """Prompt-only rows keep their extra `answer` column through normalization; GRPO's exact-match grader
    reads it on the worker."""
    model, _ = tiny_assets
    rows = [json.dumps({"prompt": [{"role": "user", "content": f"Say {i % 7}."}], "answer": str(i % 7)})
            for i in range(120)]
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(rows) + "\n")
    ds = upload(client, data, "prompts")
    assert ds.format == dataset_pb2.DATASET_FORMAT_PROMPT_ONLY
    spec = lora_spec(model, ds.id)
    spec.method = job_pb2.TRAINING_METHOD_GRPO
    spec.hyperparameters.max_steps = 2
    spec.grpo.reward_functions.append(job_pb2.REWARD_FUNCTION_EXACT_MATCH)
    spec.grpo.max_completion_length = 8
    final = wait_final(client, client.create_job(spec).id)
    assert final.state == job_pb2.JOB_STATE_SUCCEEDED, final.error
    assert final.output.final_metrics["global_step"] == 2
    keys = {key for point in client.stream_metrics(final.id, follow=False) for key in point.values}
    assert "reward" in keys and any(key.startswith("rewards/exact_match") for key in keys), keys


def test_bad_input_gets_clear_errors_and_leaves_nothing(
    client: TuneForgeClient, tmp_path: Path, tiny_assets: tuple[Path, Path]
) -> None:
    model, data = tiny_assets
    lines = data.read_text().splitlines()
    lines[6] = '{"messages": [{"role": "user", "content": "hi"}'  # line 7 is cut short
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    before = len(client.list_datasets().datasets)
    with pytest.raises(InvalidArgument) as info:
        client.upload_dataset(bad, "bad-data")
    assert any("line 7" in v.field for v in info.value.violations), info.value
    assert len(client.list_datasets().datasets) == before
    with pytest.raises(NotFound):
        client.get_dataset("bad-data")

    with pytest.raises(NotFound):
        client.get_job("job_does_not_exist")

    ds = upload(client, data, "chat-for-bad-spec")
    jobs_before = len(client.list_jobs().jobs)
    spec = lora_spec(model, ds.id)
    spec.lora.rank = 0
    with pytest.raises(InvalidArgument) as info:
        client.create_job(spec)
    assert "spec.lora.rank" in {v.field for v in info.value.violations}
    assert len(client.list_jobs().jobs) == jobs_before

    dpo = lora_spec(model, ds.id)
    dpo.method = job_pb2.TRAINING_METHOD_DPO  # chat data cannot train DPO: refused before queueing
    with pytest.raises(InvalidArgument) as info:
        client.create_job(dpo)
    assert [v.field for v in info.value.violations] == ["spec.dataset"]
    assert len(client.list_jobs().jobs) == jobs_before

    with pytest.raises(NotFound):
        client.create_job(lora_spec(model, "no-such-dataset"))
    assert len(client.list_jobs().jobs) == jobs_before

    # Server paths are not models: neither the server's own folders nor anything outside the model roots.
    for path in ("/etc", "../../", "file:///etc", str(tmp_path)):
        outside = lora_spec(model, ds.id)
        outside.base_model = path
        with pytest.raises(InvalidArgument) as info:
            client.create_job(outside)
        assert [v.field for v in info.value.violations] == ["spec.base_model"], (path, info.value)
    fp16_on_any_worker = lora_spec(model, ds.id)
    fp16_on_any_worker.hyperparameters.precision = job_pb2.PRECISION_FP16
    with pytest.raises(InvalidArgument) as info:
        client.create_job(fp16_on_any_worker)
    assert [v.field for v in info.value.violations] == ["spec.hyperparameters.precision"]
    assert len(client.list_jobs().jobs) == jobs_before


def test_cancel_running_job_then_worker_takes_the_next(
    client: TuneForgeClient, tiny_assets: tuple[Path, Path]
) -> None:
    model, data = tiny_assets
    ds = upload(client, data, "chat-cancel")
    long_job = client.create_job(lora_spec(model, ds.id, epochs=40))
    wait_for(client, long_job.id, lambda j: j.state == job_pb2.JOB_STATE_RUNNING and j.progress.step > 0)
    with pytest.raises(FailedPrecondition) as info:  # a running job still needs its data
        client.delete_dataset(ds.id)
    assert info.value.reason == "DATASET_IN_USE" and long_job.id in str(info.value)
    assert client.cancel_job(long_job.id).state == job_pb2.JOB_STATE_CANCELLING
    final = wait_final(client, long_job.id, timeout_s=120)
    assert final.state == job_pb2.JOB_STATE_CANCELLED
    assert final.progress.step < final.progress.total_steps

    next_job = client.create_job(lora_spec(model, ds.id, epochs=1))
    assert wait_final(client, next_job.id).state == job_pb2.JOB_STATE_SUCCEEDED
    client.delete_dataset(ds.id)  # every job using it has ended
    with pytest.raises(NotFound):
        client.get_dataset(ds.id)


def test_worker_killed_mid_job_resumes_from_its_checkpoint(
    tmp_path: Path, tiny_assets: tuple[Path, Path]
) -> None:
    """SIGKILL a worker mid-job: the job shows QUEUED again with the attempt it lost and why, and finishes
    on another worker from its last checkpoint."""
    model, data = tiny_assets
    platform: Platform = start_platform(tmp_path / "p", workers=0, model=model, TUNEFORGE_WORK_ACK_WAIT_S="4",
                                        **FAST_WORKER_CHECKS)
    try:
        first = platform.start_worker("worker-a")
        with org_client(platform.address, platform.data_dir, "e2e") as client:
            ds = upload(client, data, "chat-kill")
            spec = lora_spec(model, ds.id, epochs=12)
            spec.hyperparameters.save_steps = 5
            job = client.create_job(spec)
            wait_for(client, job.id, lambda j: j.state == job_pb2.JOB_STATE_RUNNING and j.progress.step >= 12)
            os.killpg(first.pid, signal.SIGKILL)  # the agent, as a crash would; its child notices and stops
            first.wait()
            requeued = wait_for(client, job.id, lambda j: j.state == job_pb2.JOB_STATE_QUEUED, timeout_s=30)
            assert requeued.attempt == 1 and requeued.worker_id == "worker-a"
            assert requeued.status_message.startswith("worker worker-a stopped responding at "), requeued
            assert "waiting for another delivery (attempt 2 of 5)" in requeued.status_message
            platform.start_worker("worker-b")
            final = wait_final(client, job.id, timeout_s=300)
            assert final.state == job_pb2.JOB_STATE_SUCCEEDED, final.error
            assert final.attempt >= 2 and final.worker_id == "worker-b" and final.status_message == ""
            points = list(client.stream_metrics(job.id, follow=False, kinds=[metrics_pb2.METRIC_KIND_TRAIN]))
    finally:
        platform.stop()
    steps = [p.step for p in points]
    assert steps == sorted(set(steps)) and steps[-1] == final.progress.total_steps, "no step twice, none lost"
    resumed = [p.step for p in points if p.attempt == final.attempt]
    # The last delivery started right after a stored checkpoint (every 5 steps), not at step 1.
    assert resumed[0] > 5 and (resumed[0] - 1) % 5 == 0, resumed[:3]
    assert json.loads((tmp_path / "p" / "platform.json").read_text())["address"] == platform.address


def test_a_job_that_does_not_fit_the_gpu_it_names_is_not_admitted(
    client: TuneForgeClient, tiny_assets: tuple[Path, Path]
) -> None:
    """CreateJob asks the estimation service; a job its own estimate says would run out of memory on the
    requested GPU never reaches the queue, and the error says what would fit."""
    model, data = tiny_assets
    ds = upload(client, data, "chat-for-hardware")
    jobs_before = len(client.list_jobs().jobs)
    too_big = lora_spec(model, ds.id)
    too_big.base_model = "meta-llama/Llama-3.1-70B"  # a catalog architecture: 140 GB of bf16 weights
    too_big.hardware.gpu_type = "nvidia-t4"
    with pytest.raises(InvalidArgument) as info:
        client.create_job(too_big)
    assert info.value.reason == "INSUFFICIENT_HARDWARE"
    (violation,) = info.value.violations
    assert violation.field == "spec.hardware.gpu_type"
    assert "GiB per GPU" in violation.description and "nvidia-t4" in violation.description
    assert len(client.list_jobs().jobs) == jobs_before

    fits = lora_spec(model, ds.id)  # the tiny model fits anywhere
    fits.hardware.gpu_type = "nvidia-t4"
    assert client.create_job(fits, validate_only=True).state == job_pb2.JOB_STATE_QUEUED


def test_cli_talks_to_the_platform(platform: Platform, tiny_assets: tuple[Path, Path]) -> None:
    from typer.testing import CliRunner

    from services.cli.main import app

    model, data = tiny_assets
    # A member key of organization cli, as a user would export it.
    member = make_key(platform.address, platform.data_dir, "cli", "member")
    runner = CliRunner(env={"TUNEFORGE_API_KEY": member, "COLUMNS": "200"})
    common = ["--address", platform.address, "--org", "cli"]
    result = runner.invoke(app, ["datasets", "upload", str(data), "--name", "cli-chat", *common])
    assert result.exit_code == 0, result.output
    assert "cli-chat" in result.output and "READY" in result.output
    result = runner.invoke(
        app, ["jobs", "create", "--model", str(model), "--dataset", "cli-chat", "--lora-rank", "0", *common]
    )
    assert result.exit_code == 2 and "spec.lora.rank" in result.output
    result = runner.invoke(app, ["jobs", "get", "job_missing", *common])
    assert result.exit_code == 2 and "NOT_FOUND" in result.output
    result = runner.invoke(app, ["jobs", "list", *common])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["plan", "--model", str(model), "--dataset", "cli-chat", "--json", *common])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert int(plan["training_tokens"]) > 0 and plan["fits"], plan
    result = runner.invoke(app, ["plan", "--model", str(model), "--dataset", "cli-chat", *common])
    assert result.exit_code == 0 and "cheapest fit" in result.output, result.output


def test_job_fails_as_worker_lost_when_deliveries_run_out(
    tmp_path: Path, tiny_assets: tuple[Path, Path]
) -> None:
    from google.rpc import error_details_pb2

    model, data = tiny_assets
    platform = start_platform(
        tmp_path / "p", workers=0, model=model, TUNEFORGE_WORK_ACK_WAIT_S="3", TUNEFORGE_WORK_MAX_DELIVER="1"
    )
    try:
        worker = platform.start_worker("doomed")
        with org_client(platform.address, platform.data_dir, "e2e") as client:
            ds = upload(client, data, "chat-lost")
            job = client.create_job(lora_spec(model, ds.id, epochs=12))
            wait_for(client, job.id, lambda j: j.state == job_pb2.JOB_STATE_RUNNING)
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
            final = wait_final(client, job.id, timeout_s=120)
        assert final.state == job_pb2.JOB_STATE_FAILED
        info = error_details_pb2.ErrorInfo()
        assert final.error.details[0].Unpack(info) and info.reason == "WORKER_LOST"
    finally:
        platform.stop()
