"""Experiment trackers (JobSpec.integrations) on a real tiny job: the recipe runs as the agent starts it
(the same environment filter, the tracker variables of `trackers.child_env`), and each tracker's logged
loss is read back the way its users read it: W&B's offline run files, MLflow's client on a SQLite store,
TensorBoard's EventAccumulator on the event files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tuneforge.v1 import job_pb2

from tests.worker.helpers import FAST_HYPERPARAMETERS, make_run_config, read_events
from trainer_worker import trackers
from trainer_worker.errors import TrainingError
from trainer_worker.launcher import training_env
from trainer_worker.run_config import RunConfig

SECRET = "wandb-secret-0123456789abcdef0123456789abcdef"

INTEGRATIONS = [
    {"wandb": {"project": "tf-test", "name": "tiny-run", "tags": ["ci", "tiny"]}},
    {"mlflow": {"experiment_name": "tf-tiny", "run_name": "tiny-mlflow"}},
    {"tensorboard": {}},
]


def _run(tmp_path: Path, cfg: RunConfig, extra_env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    """The recipe as a subprocess, with the environment the agent gives it (launcher.training_env)."""
    config = cfg.dump(tmp_path / "RUN.json")
    with (tmp_path / "train.log").open("wb") as log:
        return subprocess.run([sys.executable, "-m", "trainer_worker.train", "--config", str(config)],
                              stdout=log, stderr=subprocess.STDOUT, env=training_env(extra_env),
                              timeout=600, check=False)


@pytest.fixture(scope="module")
def tracked_job(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path,
                chat_data: Path) -> dict[str, Any]:
    """One tiny SFT job reporting to all three trackers (W&B offline, MLflow on a local SQLite store)."""
    tmp = tmp_path_factory.mktemp("tracked")
    spec = {"method": "TRAINING_METHOD_SFT", "hyperparameters": {**FAST_HYPERPARAMETERS, "logging_steps": 2},
            "evaluation": {"enabled": False}, "integrations": INTEGRATIONS}
    cfg = make_run_config(tmp, tiny_model, chat_data, spec)
    mlflow_uri = f"sqlite:///{(tmp / 'mlflow.db').absolute()}"  # an operator's default: any store
    env = trackers.child_env(cfg.job_spec(), cfg.job_id, cfg.output_dir, tmp / "work",
                             {"WANDB_API_KEY": SECRET}, mlflow_default_uri=mlflow_uri)
    (tmp / "work").mkdir()
    env["WANDB_MODE"] = "offline"  # what a worker with WANDB_MODE=offline in its environment passes on
    done = _run(tmp, cfg, env)
    events = read_events(cfg.events_file)
    log = (tmp / "train.log").read_text(errors="replace")
    assert done.returncode == 0, log[-4000:]
    losses = {e["step"]: e["loss"] for e in events  # the job's own metric points (MetricsService)
              if e["type"] == "metric" and e["kind"] == "train" and e["loss"] is not None}
    return {"tmp": tmp, "cfg": cfg, "events": events, "log": log, "mlflow_uri": mlflow_uri, "losses": losses}


@pytest.mark.slow
def test_wandb_offline_run_holds_the_logged_loss(tracked_job: dict[str, Any]) -> None:
    runs = list((tracked_job["tmp"] / "work" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    run = runs[0]
    assert run.name.endswith(tracked_job["cfg"].job_id)  # the job's id is the run's: attempts resume it
    summary = json.loads(_wandb_inspect(run, "--summary"))
    assert (summary["project"], summary["name"], summary["tags"]) == ("tf-test", "tiny-run", ["ci", "tiny"])
    assert summary["state"] == "finished" and summary["exit_code"] == 0
    records = [json.loads(line) for line in _wandb_inspect(run).splitlines() if line.strip()]
    history = [r["history"]["item"] for r in records if r.get("type") == "history"]
    logged = {int(row["train/global_step"]): row["train/loss"] for row in history if "train/loss" in row}
    ours = tracked_job["losses"]
    common = sorted(set(logged) & set(ours))
    assert len(common) >= 2, (logged, ours)
    for step in common:  # the same numbers the job's own metrics hold
        assert logged[step] == pytest.approx(ours[step], rel=1e-4)
    assert summary["summary"]["train/loss"] == pytest.approx(logged[max(logged)], rel=1e-6)
    everything = "".join(p.read_text(errors="replace") for p in run.rglob("*") if p.is_file()
                         and p.suffix != ".wandb") + _wandb_inspect(run)
    assert SECRET not in everything


def _wandb_inspect(run: Path, *flags: str) -> str:
    """An offline run's records as JSON, through W&B's own reader (`wandb leet inspect --json`)."""
    wandb_cli = Path(sys.executable).with_name("wandb")
    done = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", *flags, str(run)],
                          capture_output=True, text=True, timeout=120, check=True)
    return done.stdout


@pytest.mark.slow
def test_mlflow_run_holds_the_logged_loss(tracked_job: dict[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracked_job["mlflow_uri"])
    experiment = client.get_experiment_by_name("tf-tiny")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tiny-mlflow"
    assert run.info.status == "FINISHED"
    assert run.data.tags["tuneforge.job_id"] == tracked_job["cfg"].job_id
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    ours = tracked_job["losses"]
    common = sorted(set(history) & set(ours))
    assert len(common) >= 2, (history, ours)
    for step in common:
        assert history[step] == pytest.approx(ours[step], rel=1e-4)
    assert SECRET not in json.dumps(run.data.params) + json.dumps(run.data.tags)


@pytest.mark.slow
def test_tensorboard_event_files_hold_the_logged_loss(tracked_job: dict[str, Any]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = tracked_job["cfg"].output_dir / trackers.TENSORBOARD_DIR
    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    assert "train/loss" in accumulator.Tags()["scalars"], accumulator.Tags()
    logged = {e.step: e.value for e in accumulator.Scalars("train/loss")}
    ours = tracked_job["losses"]
    common = sorted(set(logged) & set(ours))
    assert len(common) >= 2, (logged, ours)
    for step in common:
        assert logged[step] == pytest.approx(ours[step], rel=1e-4)


@pytest.mark.slow
def test_job_log_names_the_trackers_and_never_the_key(tracked_job: dict[str, Any]) -> None:
    lines = [e["message"] for e in tracked_job["events"] if e["type"] == "log"]
    assert any("Weights & Biases run" in line and "offline" in line for line in lines), lines
    assert any("MLflow run" in line for line in lines), lines
    assert SECRET not in tracked_job["log"]
    assert all(SECRET not in line for line in lines)


@pytest.mark.slow
def test_wandb_online_without_a_key_fails_dependency_error(tmp_path: Path, tiny_model: Path,
                                                           chat_data: Path) -> None:
    spec = {"method": "TRAINING_METHOD_SFT", "hyperparameters": {**FAST_HYPERPARAMETERS, "max_steps": 2},
            "evaluation": {"enabled": False}, "integrations": [{"wandb": {"project": "tf-test"}}]}
    cfg = make_run_config(tmp_path, tiny_model, chat_data, spec)
    (tmp_path / "work").mkdir()
    env = trackers.child_env(cfg.job_spec(), cfg.job_id, cfg.output_dir, tmp_path / "work", {})
    # Online, no key, and a server that is not there: the run cannot start, and the job says so at once.
    env.update({"WANDB_MODE": "online", "WANDB_BASE_URL": "http://127.0.0.1:9", "HOME": str(tmp_path),
                "WANDB_INIT_TIMEOUT": "20"})
    done = _run(tmp_path, cfg, env)
    errors = [e for e in read_events(cfg.events_file) if e["type"] == "error"]
    assert done.returncode == 1
    assert errors and errors[0]["reason"] == "DEPENDENCY_ERROR", errors
    assert "Weights & Biases did not start" in errors[0]["message"]
    assert not [e for e in read_events(cfg.events_file) if e["type"] == "metric" and e.get("step", 0) > 0]


def test_missing_tracker_package_is_dependency_error_naming_it() -> None:
    spec = job_pb2.JobSpec()
    spec.integrations.add().mlflow.SetInParent()
    spec.integrations.add().tensorboard.SetInParent()
    with pytest.raises(TrainingError) as caught:
        trackers.check_installed(spec, available=lambda name: name != "mlflow")
    assert caught.value.reason.value == "DEPENDENCY_ERROR"
    assert "MLflow" in caught.value.message and "TensorBoard" not in caught.value.message


def test_child_env_carries_only_the_jobs_own_secrets(tmp_path: Path) -> None:
    spec = job_pb2.JobSpec()
    spec.integrations.add().wandb.project = "p"
    spec.integrations.add().mlflow.tracking_uri = "https://mlflow.example.com"
    env = trackers.child_env(spec, "job_x", tmp_path / "out", tmp_path, {
        "WANDB_API_KEY": "k1", "MLFLOW_TRACKING_TOKEN": "t1", "AWS_SECRET_ACCESS_KEY": "nope"})
    assert env["WANDB_API_KEY"] == "k1" and env["MLFLOW_TRACKING_TOKEN"] == "t1"
    assert "AWS_SECRET_ACCESS_KEY" not in env
    assert trackers.report_to(spec) == ["wandb", "mlflow"]
    assert trackers.report_to(job_pb2.JobSpec()) == "none"
    said = trackers.describe(spec, {"WANDB_API_KEY": "k1"})
    assert "k1" not in said and "project p" in said and "https://mlflow.example.com" in said


def test_the_log_line_shows_no_credentials_of_a_tracking_uri() -> None:
    spec = job_pb2.JobSpec()
    spec.integrations.add().mlflow.SetInParent()
    said = trackers.describe(spec, {}, "https://user:pw@ml.example.com:5000/api?token=abc")
    assert "https://ml.example.com:5000/api" in said and "pw" not in said and "abc" not in said
    assert trackers.shown_uri("sqlite:////tmp/m.db") == "sqlite:////tmp/m.db"
