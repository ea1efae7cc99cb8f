"""Experiment trackers a job reports to (JobSpec.integrations): Weights & Biases, MLflow, TensorBoard.

Two halves. The agent (which never imports torch, nor the trackers) builds the training process's
environment with `child_env`: each tracker's settings, and the job's own secrets (W&B API key, MLflow
token) that only the worker holding the job receives (`trainer_worker.agent` asks the jobs service for
them). The training process inherits none of the worker's own credentials (`trainer_worker.launcher`), so a
job logs with its own key or, for W&B, offline where the workers run WANDB_MODE=offline.

The recipe then starts the runs itself before the first step (`TrackerRuns.start`, main rank only): a
tracker that is not installed or cannot start (a bad key, an unreachable server) fails the job at once with
DEPENDENCY_ERROR naming it, rather than the job training unobserved. The Trainer's own callbacks
(TrainingArguments.report_to) log to those runs; `TrackerRuns.finish` closes them. TensorBoard's event
files go to ``<output_dir>/tensorboard``, uploaded with the job's outputs (GetJobArtifacts lists them).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tuneforge.v1 import job_pb2

from trainer_worker.errors import TrainingError
from tuneforge_core.reasons import Reason

# The TrainingArguments.report_to name and the package of each tracker, by Integration field.
PACKAGES = {"wandb": "wandb", "mlflow": "mlflow", "tensorboard": "tensorboard"}
LABELS = {"wandb": "Weights & Biases", "mlflow": "MLflow", "tensorboard": "TensorBoard"}
# Where TensorBoard's event files go under the attempt's output dir, and under the job's output prefix.
TENSORBOARD_DIR = "tensorboard"
DEFAULT_MLFLOW_EXPERIMENT = "tuneforge"
# The secrets a job may carry, by (tracker, field): the variable each one becomes in the training process.
SECRET_ENV = {("wandb", "api_key"): "WANDB_API_KEY", ("mlflow", "token"): "MLFLOW_TRACKING_TOKEN"}
# How long a tracker may take to start before the job fails (W&B's own default is 90 s; MLflow retries
# for minutes by default).
START_TIMEOUT_S = 60


def kinds(spec: job_pb2.JobSpec) -> list[str]:
    """The trackers the spec asks for, in its order ("wandb", "mlflow", "tensorboard")."""
    return [k for k in (i.WhichOneof("integration") for i in spec.integrations) if k is not None]


def report_to(spec: job_pb2.JobSpec) -> list[str] | str:
    """TrainingArguments.report_to: the trackers, or "none" (never the Trainer's "all installed")."""
    return kinds(spec) or "none"


def find(spec: job_pb2.JobSpec, kind: str) -> job_pb2.Integration | None:
    return next((i for i in spec.integrations if i.WhichOneof("integration") == kind), None)


def describe(spec: job_pb2.JobSpec, secrets: Mapping[str, str], mlflow_default_uri: str = "") -> str:
    """A sentence for the job's log: which trackers, where. No secret ever appears in it."""
    parts = []
    for integration in spec.integrations:
        kind = integration.WhichOneof("integration")
        if kind == "wandb":
            w = integration.wandb
            where = f"{w.entity}/{w.project}" if w.entity else w.project
            key = ", with the job's API key" if secrets.get("WANDB_API_KEY") else ""
            parts.append(f"Weights & Biases (project {where}{key})")
        elif kind == "mlflow":
            m = integration.mlflow
            token = ", with the job's token" if secrets.get("MLFLOW_TRACKING_TOKEN") else ""
            parts.append(f"MLflow (experiment {experiment_name(m)} at "
                         f"{shown_uri(m.tracking_uri or mlflow_default_uri)}{token})")
        elif kind == "tensorboard":
            parts.append(f"TensorBoard (event files in the job's artifacts under {TENSORBOARD_DIR}/)")
    return "Reporting to " + ", ".join(parts) + "." if parts else ""


def child_env(spec: job_pb2.JobSpec, job_id: str, output_dir: Path, work_dir: Path,
              secrets: Mapping[str, str], mlflow_default_uri: str = "") -> dict[str, str]:
    """The training process's tracker variables. `secrets`: the job's own, by SECRET_ENV variable name."""
    env: dict[str, str] = {}
    wandb = find(spec, "wandb")
    if wandb is not None:
        w = wandb.wandb
        env.update({"WANDB_PROJECT": w.project, "WANDB_DIR": str(work_dir), "WANDB_LOG_MODEL": "false",
                    "WANDB_WATCH": "false", "WANDB_SILENT": "true",
                    "WANDB_INIT_TIMEOUT": str(START_TIMEOUT_S)})
        if w.entity:
            env["WANDB_ENTITY"] = w.entity
        if w.base_url:
            env["WANDB_BASE_URL"] = w.base_url
    mlflow = find(spec, "mlflow")
    if mlflow is not None:
        m = mlflow.mlflow
        env.update({"MLFLOW_TRACKING_URI": m.tracking_uri or mlflow_default_uri,
                    "MLFLOW_EXPERIMENT_NAME": m.experiment_name or DEFAULT_MLFLOW_EXPERIMENT,
                    "HF_MLFLOW_LOG_ARTIFACTS": "false", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"})
    if find(spec, "tensorboard") is not None:
        env["TENSORBOARD_LOGGING_DIR"] = str(output_dir / TENSORBOARD_DIR)
    env.update({k: v for k, v in secrets.items() if v and k in SECRET_ENV.values()})
    return env


def check_installed(spec: job_pb2.JobSpec, available: Callable[[str], bool] | None = None) -> None:
    """DEPENDENCY_ERROR naming each tracker the spec asks for whose package this worker lacks."""
    have = available or (lambda name: importlib.util.find_spec(name) is not None)
    missing = [k for k in kinds(spec) if not have(PACKAGES[k])]
    if missing:
        raise TrainingError(Reason.DEPENDENCY_ERROR, "This worker cannot report to " + ", ".join(
            f"{LABELS[k]} (spec.integrations: the {PACKAGES[k]} package is not installed)" for k in missing)
            + "; install the worker's `train` extra.")


class TrackerRuns:
    """The runs of one attempt, started before training on the main rank and closed after it."""

    def __init__(self, spec: job_pb2.JobSpec, job_id: str, attempt: int, env: Mapping[str, str]) -> None:
        self.spec, self.job_id, self.attempt, self.env = spec, job_id, attempt, env
        self._wandb: Any = None
        self._mlflow: Any = None

    def start(self) -> list[str]:
        """Starts the W&B and MLflow runs (TensorBoard needs none); returns what started, for the log."""
        check_installed(self.spec)
        started = []
        wandb = find(self.spec, "wandb")
        if wandb is not None:
            started.append(self._start_wandb(wandb.wandb))
        mlflow = find(self.spec, "mlflow")
        if mlflow is not None:
            started.append(self._start_mlflow(mlflow.mlflow))
        return started

    def _start_wandb(self, w: job_pb2.WandbIntegration) -> str:
        import wandb

        try:
            # The job's id is the run's: a later attempt of the job resumes the same run.
            run = wandb.init(project=w.project, entity=w.entity or None, name=w.name or self.job_id,
                             tags=list(w.tags) or None, id=self.job_id, resume="allow",
                             dir=self.env.get("WANDB_DIR"),
                             config={"tuneforge_job_id": self.job_id, "tuneforge_attempt": self.attempt},
                             settings=wandb.Settings(init_timeout=START_TIMEOUT_S, silent=True))
        except Exception as exc:
            raise TrainingError(Reason.DEPENDENCY_ERROR, "Weights & Biases did not start (spec.integrations "
                                f"wandb, project {w.project}): {self._said(exc)}") from None
        self._wandb = wandb
        mode = "offline" if run.settings.mode in ("offline", "dryrun") else "online"
        return f"Weights & Biases run {run.id} ({mode}, project {w.project})"

    def _start_mlflow(self, m: job_pb2.MlflowIntegration) -> str:
        import mlflow

        uri = self.env.get("MLFLOW_TRACKING_URI", "")
        if not uri:
            raise TrainingError(Reason.DEPENDENCY_ERROR, "MLflow has no tracking server: "
                                "spec.integrations mlflow.tracking_uri is empty and this worker sets no "
                                "TUNEFORGE_MLFLOW_TRACKING_URI.")
        try:
            mlflow.set_tracking_uri(uri)
            experiment = mlflow.set_experiment(experiment_name(m))
            run = mlflow.start_run(run_name=m.run_name or self.job_id, tags={
                "tuneforge.job_id": self.job_id, "tuneforge.attempt": str(self.attempt)})
        except Exception as exc:
            raise TrainingError(Reason.DEPENDENCY_ERROR, "MLflow did not start (spec.integrations mlflow, "
                                f"experiment {experiment_name(m)}): {self._said(exc)}") from None
        self._mlflow = mlflow
        return f"MLflow run {run.info.run_id} (experiment {experiment.name})"

    def _said(self, exc: BaseException) -> str:
        """The error's first line with the job's secrets and the tracking URI's user info blanked out."""
        text = _first_line(exc)
        uri = self.env.get("MLFLOW_TRACKING_URI", "")
        secrets = [self.env.get(v, "") for v in SECRET_ENV.values()]
        secrets += [p for p in (urlsplit(uri).username, urlsplit(uri).password) if p] if uri else []
        for secret in secrets:
            if secret:
                text = text.replace(secret, "***")
        return text

    def finish(self, succeeded: bool) -> None:
        """Closes the runs (flushes W&B's files and MLflow's pending metrics); never raises."""
        if self._wandb is not None:
            try:
                self._wandb.finish(exit_code=0 if succeeded else 1)
            except Exception:  # the job's outcome is already decided
                pass
            self._wandb = None
        if self._mlflow is not None:
            try:
                self._mlflow.end_run(status="FINISHED" if succeeded else "FAILED")
            except Exception:
                pass
            self._mlflow = None


def shown_uri(uri: str) -> str:
    """A tracking URI fit for the job's log: no user info, query or fragment (an operator's default may
    carry credentials)."""
    if not uri:
        return "no tracking URI"
    parts = urlsplit(uri)
    if not (parts.username or parts.password or parts.query or parts.fragment):
        return uri
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def experiment_name(m: job_pb2.MlflowIntegration) -> str:
    return m.experiment_name or DEFAULT_MLFLOW_EXPERIMENT


def _first_line(exc: BaseException) -> str:
    """The error's first line, cut short (tracker errors can be long, and never echo a key)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]
