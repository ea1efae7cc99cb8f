"""Checkpoints as resources: ListCheckpoints, the CLI listing, and retention of optimizer state.

Checkpoints are placed in storage as the worker uploads them (trainer_worker/checkpointing.py), each with a
trainer_state.json as the HF Trainer writes it, and the job row put in the jobs table directly (as
tests/jobs/test_artifacts.py does), against the real jobs component on port 0 (real nats-server, SQLite).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import pytest
from tuneforge.v1 import job_pb2
from typer.testing import CliRunner

from services.cli.main import app
from services.client import NotFound
from services.jobs.checkpoints import CheckpointRetention, describe, is_resume_only, prune_resume_state
from services.jobs.models import JobRow
from services.jobs.settings import JobSettings
from tests.jobs.test_artifacts import ORG, Served, served_jobs
from tuneforge_core.ids import new_id
from tuneforge_core.settings import KitSettings

# Training loss every 5 steps, an evaluation every 10, a checkpoint every 10 (save_total_limit 3).
HISTORY = [
    {"loss": 2.5, "grad_norm": 1.2, "learning_rate": 2e-4, "epoch": 0.25, "step": 5},
    {"loss": 2.0, "grad_norm": 1.1, "learning_rate": 1.9e-4, "epoch": 0.5, "step": 10},
    {"eval_loss": 1.9, "eval_runtime": 1.5, "eval_samples_per_second": 40.0, "epoch": 0.5, "step": 10},
    {"loss": 1.6, "grad_norm": 0.9, "learning_rate": 1.5e-4, "epoch": 0.75, "step": 15},
    {"loss": 1.4, "grad_norm": 0.8, "learning_rate": 1.2e-4, "epoch": 1.0, "step": 20},
    {"eval_loss": 1.3, "eval_runtime": 1.4, "eval_samples_per_second": 41.0, "epoch": 1.0, "step": 20},
    {"loss": 1.2, "grad_norm": 0.7, "learning_rate": 0.8e-4, "epoch": 1.25, "step": 25},
    {"loss": 1.1, "grad_norm": 0.7, "learning_rate": 0.5e-4, "epoch": 1.5, "step": 30},
    {"eval_loss": 1.45, "eval_runtime": 1.6, "eval_samples_per_second": 39.0, "epoch": 1.5, "step": 30},
]
RESUME_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "rng_state_1.pth")


def trainer_state(step: int, best: int | None = None) -> bytes:
    """trainer_state.json as the HF Trainer writes it into checkpoint-<step>."""
    state: dict[str, object] = {
        "best_global_step": best, "best_metric": None, "best_model_checkpoint": None,
        "epoch": step / 20, "eval_steps": 10, "global_step": step, "is_hyper_param_search": False,
        "is_local_process_zero": True, "is_world_process_zero": True,
        "log_history": [e for e in HISTORY if int(e["step"]) <= step], "logging_steps": 5, "max_steps": 40,
        "num_train_epochs": 2, "save_steps": 10, "total_flos": 1.0e12, "train_batch_size": 4,
    }
    if best is not None:
        state["best_metric"] = next(e["eval_loss"] for e in HISTORY if e["step"] == best and "eval_loss" in e)
        state["best_model_checkpoint"] = f"/tmp/tuneforge-attempt/output/checkpoint-{best}"
    return json.dumps(state, indent=2).encode()


def checkpoint_files(step: int, best: int | None = None) -> dict[str, bytes]:
    return {
        "adapter_config.json": b'{"r": 8}',
        "adapter_model.safetensors": b"w" * (1000 + step),
        "optimizer.pt": b"o" * 2000,
        "scheduler.pt": b"s" * 100,
        "rng_state.pth": b"r" * 50,
        "rng_state_1.pth": b"r" * 50,
        "trainer_state.json": trainer_state(step, best),
        "training_args.bin": b"a" * 10,
    }


def store_checkpoints(served: Served, *, state: int = job_pb2.JOB_STATE_RUNNING,
                      steps: tuple[int, ...] = (10, 20, 30), best: int | None = None,
                      keep_optimizer_state: bool = False) -> str:
    """A job of ORG with complete checkpoints at `steps` and one still uploading (step 40, no marker)."""
    job_id = new_id("job")
    prefix = f"jobs/{ORG}/{job_id}/checkpoints"
    for step in steps:
        for name, data in checkpoint_files(step, best).items():
            served.store.put_bytes(f"{prefix}/checkpoint-{step}/{name}", data)
        served.store.put_bytes(f"{prefix}/checkpoint-{step}/COMPLETE", str(step).encode())
    served.store.put_bytes(f"{prefix}/checkpoint-40/optimizer.pt", b"half")
    spec = job_pb2.JobSpec(base_model="org/m", dataset="ds_1",
                           output=job_pb2.OutputConfig(keep_optimizer_state=keep_optimizer_state))
    with served.component.manager.db.session() as s:
        s.add(JobRow(id=job_id, organization=ORG, name=job_id, spec=spec.SerializeToString(), state=state,
                     revision=3, request_hash="", attempt=1, worker_id="w1"))
    return job_id


def files_of(served: Served, job_id: str, step: int) -> set[str]:
    folder = f"jobs/{ORG}/{job_id}/checkpoints/checkpoint-{step}/"
    return {k[len(folder):] for k in served.store.list_keys(folder)}


@pytest.fixture
def local(kit_settings: KitSettings) -> Iterator[Served]:
    with served_jobs(JobSettings(**kit_settings.model_dump())) as served:
        yield served


# -- unit --------------------------------------------------------------------------------------------------

def test_a_checkpoint_is_described_by_its_trainer_state() -> None:
    c = describe("checkpoint-20", 20, json.loads(trainer_state(20)))
    assert (c.step, c.epoch, c.train_loss, c.eval_loss) == (20, 1.0, 1.4, 1.3)
    assert dict(c.eval_metrics) == {"eval_loss": 1.3, "eval_runtime": 1.4, "eval_samples_per_second": 41.0}
    # Train loss logged before the step counts; an evaluation at another step does not.
    c = describe("checkpoint-25", 25, json.loads(trainer_state(25)))
    assert c.train_loss == 1.2 and not c.HasField("eval_loss") and not c.eval_metrics
    c = describe("checkpoint-3", 3, {"log_history": [], "epoch": 0.1})
    assert not c.HasField("train_loss") and c.epoch == 0.1
    assert describe("checkpoint-5", 5, {}).epoch == 0.0


def test_only_resume_state_is_pruned() -> None:
    for path in ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth", "rng_state_3.pth",
                 "global_step10/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "optimizer_0/__0_0.distcp"):
        assert is_resume_only(path), path
    for path in ("adapter_model.safetensors", "model.safetensors", "trainer_state.json",
                 "adapter_config.json",
                 "tokenizer.json", "training_args.bin", "pytorch_model_fsdp_0/__0_0.distcp"):
        assert not is_resume_only(path), path


# -- ListCheckpoints ---------------------------------------------------------------------------------------

def test_checkpoints_are_listed_with_their_metrics(local: Served) -> None:
    job_id = store_checkpoints(local)
    with local.client() as acme:
        response = acme.list_checkpoints(job_id)
    checkpoints = list(response.checkpoints)
    assert [c.step for c in checkpoints] == [10, 20, 30]
    assert [c.name for c in checkpoints] == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]
    assert [c.epoch for c in checkpoints] == [0.5, 1.0, 1.5]
    assert [c.train_loss for c in checkpoints] == [2.0, 1.4, 1.1]
    assert [c.eval_loss for c in checkpoints] == [1.9, 1.3, 1.45]
    assert checkpoints[1].eval_metrics["eval_samples_per_second"] == 41.0
    for c in checkpoints:
        assert c.size_bytes == sum(len(v) for v in checkpoint_files(c.step).values())
        assert c.optimizer_state_kept
    # Without a tracked best model: the lowest eval_loss.
    assert [c.best for c in checkpoints] == [False, True, False] and response.best_metric == "eval_loss"


def test_a_checkpoint_pruned_while_it_is_listed_is_left_out(local: Served,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer prunes its oldest checkpoint as it saves the next: one gone between the listing and the
    read of its trainer_state.json is not listed (as a listing a moment later would say), where a complete
    checkpoint without that file is, with what is known of it."""
    job_id = store_checkpoints(local)
    prefix = f"jobs/{ORG}/{job_id}/checkpoints"
    local.store.delete_prefix(f"{prefix}/checkpoint-30/trainer_state.json")
    read = local.store.get_bytes

    def pruning(key: str) -> bytes:
        if key == f"{prefix}/checkpoint-10/trainer_state.json":
            local.store.delete_prefix(f"{prefix}/checkpoint-10/")  # the prune, just then
        return read(key)

    monkeypatch.setattr(local.store, "get_bytes", pruning)
    with local.client() as acme:
        listed = [(c.step, c.epoch) for c in acme.list_checkpoints(job_id).checkpoints]
    assert listed == [(20, 1.0), (30, 0.0)]


def test_the_trainers_best_model_checkpoint_wins(local: Served) -> None:
    # With early stopping the Trainer tracks the best checkpoint itself (here, as it saw it: step 10).
    job_id = store_checkpoints(local, best=10)
    with local.client() as acme:
        assert [c.best for c in acme.list_checkpoints(job_id).checkpoints] == [True, False, False]


def test_none_is_best_without_evaluations_and_a_job_without_checkpoints_lists_none(local: Served) -> None:
    job_id = store_checkpoints(local, steps=(25,))
    bare = store_checkpoints(local, steps=())
    with local.client() as acme:
        response = acme.list_checkpoints(job_id)
        listed = [(c.step, c.best, c.HasField("eval_loss")) for c in response.checkpoints]
        assert listed == [(25, False, False)]
        assert response.best_metric == ""
        assert list(acme.list_checkpoints(bare).checkpoints) == []


def test_another_organizations_job_is_not_found(local: Served) -> None:
    job_id = store_checkpoints(local)
    with local.client(local.bravo_key) as bravo:
        for ref in (job_id, "no-such-job"):
            with pytest.raises(NotFound):
                bravo.list_checkpoints(ref)


def test_the_cli_lists_checkpoints(local: Served) -> None:
    job_id = store_checkpoints(local)
    runner = CliRunner()
    env = {"TUNEFORGE_API_KEY": local.acme_key, "TUNEFORGE_ADDRESS": local.address, "COLUMNS": "60"}
    result = runner.invoke(app, ["jobs", "checkpoints", job_id], env=env)
    assert result.exit_code == 0, result.output
    for name in ("checkpoint-10", "checkpoint-20", "checkpoint-30"):  # whole even on a narrow terminal
        assert name in result.output
    result = runner.invoke(app, ["jobs", "checkpoints", job_id], env={**env, "COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "checkpoint-20" in line)
    assert [cell.strip() for cell in row.split("│")[1:-1]] == [
        "checkpoint-20", "20", "1.00", "1.4000", "1.3000", "4.3 KiB", "*", "kept"], row
    assert "best (*) by eval_loss" in result.output
    result = runner.invoke(app, ["jobs", "checkpoints", job_id, "--json"], env=env)
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)["checkpoints"]
    assert [int(c["step"]) for c in listed] == [10, 20, 30] and listed[1]["best"] is True
    assert listed[0]["optimizer_state_kept"] is True and listed[1]["eval_metrics"]["eval_loss"] == 1.3
    result = runner.invoke(app, ["jobs", "checkpoints", "no-such-job"], env=env)
    assert result.exit_code == 2


# -- retention ---------------------------------------------------------------------------------------------

def test_an_ended_job_keeps_optimizer_state_only_in_its_last_checkpoint(local: Served) -> None:
    job_id = store_checkpoints(local, state=job_pb2.JOB_STATE_SUCCEEDED)
    whole = set(checkpoint_files(10))
    with local.client() as acme:
        acme.get_job_artifacts(job_id)  # caches the checksum manifests
    # This sweep, or the service's own (at its start, which may come after the job was stored), prunes it:
    # what is asserted is the outcome, not which sweep got there first.
    asyncio.run(CheckpointRetention(local.component.db, local.store).sweep())
    for step in (10, 20):
        assert files_of(local, job_id, step) == (whole - set(RESUME_FILES)) | {"COMPLETE"}
        manifest = json.loads(local.store.get_bytes(f"jobs/{ORG}/{job_id}/manifests/checkpoint-{step}.json"))
        assert set(manifest["files"]) == whole - set(RESUME_FILES)
    assert files_of(local, job_id, 30) == whole | {"COMPLETE"}  # the last one resumes exactly
    assert files_of(local, job_id, 40) == {"optimizer.pt"}  # not complete: not the service's to touch
    with local.client() as acme:
        listed = acme.list_checkpoints(job_id).checkpoints
        assert [c.optimizer_state_kept for c in listed] == [False, False, True]
        assert [c.eval_loss for c in listed] == [1.9, 1.3, 1.45]
        artifacts = acme.get_job_artifacts(job_id)
        assert sorted(f.path for f in artifacts[0].files) == sorted(whole - set(RESUME_FILES))
    # Done, and idempotent: a second sweep skips it, pruning again changes nothing.
    with local.component.manager.db.session() as s:
        row = s.get(JobRow, job_id)
        assert row is not None and row.retention_time is not None
    assert prune_resume_state(local.store, f"jobs/{ORG}/{job_id}/") == 0
    assert files_of(local, job_id, 30) == whole | {"COMPLETE"}


def test_keep_optimizer_state_keeps_it_and_running_jobs_are_untouched(local: Served) -> None:
    kept = store_checkpoints(local, state=job_pb2.JOB_STATE_FAILED, keep_optimizer_state=True)
    running = store_checkpoints(local, state=job_pb2.JOB_STATE_RUNNING)
    asyncio.run(CheckpointRetention(local.component.db, local.store).sweep())
    for job_id in (kept, running):
        for step in (10, 20, 30):
            assert set(RESUME_FILES) <= files_of(local, job_id, step)
    with local.component.manager.db.session() as s:
        assert s.get(JobRow, kept).retention_time is not None  # type: ignore[union-attr]
        assert s.get(JobRow, running).retention_time is None  # type: ignore[union-attr]


def test_a_job_that_ends_is_pruned_in_the_background(local: Served) -> None:
    job_id = store_checkpoints(local, state=job_pb2.JOB_STATE_QUEUED)
    with local.client() as acme:
        assert acme.cancel_job(job_id).state == job_pb2.JOB_STATE_CANCELLED
    # Woken by the commit that ended it, not by the minute's sweep.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with local.component.manager.db.session() as s:
            if s.get(JobRow, job_id).retention_time is not None:  # type: ignore[union-attr]
                break
        time.sleep(0.1)
    assert "optimizer.pt" not in files_of(local, job_id, 10)
    assert "optimizer.pt" not in files_of(local, job_id, 20)
    assert "optimizer.pt" in files_of(local, job_id, 30)
