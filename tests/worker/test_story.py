"""The job's story: the training loop's timeline events and kept step (recipes/story.py), the agent's phase,
timeline, tokens and training log (story.py), and the artifacts that list the log and evaluation report.

Unit tests here; a real tiny run through the agent is in test_agent_story.py.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from transformers import EarlyStoppingCallback, TrainerControl, TrainerState
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import artifact_pb2, job_pb2, metrics_pb2

from services.jobs.artifacts import ArtifactCatalog
from services.jobs.downloads import DownloadSigner
from tests.worker.helpers import read_events
from trainer_worker.events import (
    EarlyStopInfo,
    EventSink,
    MetricEvent,
    PhaseEvent,
    ProgressEvent,
    ResultEvent,
    StateEvent,
    TimelineEvent,
)
from trainer_worker.recipes.story import StoryCallback
from trainer_worker.reporting import timestamp
from trainer_worker.story import TRAINING_LOG, AttemptStory, fill_output, log_line, store_training_log
from tuneforge_core.storage import LocalObjectStore

U = events_pb2.WorkerUpdateKind
E = job_pb2.JobEventType


def _args(**overrides: Any) -> Any:
    return SimpleNamespace(**{"eval_strategy": "epoch", "num_train_epochs": 2, "load_best_model_at_end": True,
                              "metric_for_best_model": "eval_loss", **overrides})


def _state(step: int, epoch: float, history: list[dict[str, Any]] | None = None,
           **fields: Any) -> TrainerState:
    state = TrainerState()
    state.global_step, state.epoch, state.max_steps = step, epoch, 20
    state.log_history = history or []
    for name, value in fields.items():
        setattr(state, name, value)
    return state


def _timeline(path: Path) -> list[dict[str, Any]]:
    return [e for e in read_events(path) if e["type"] == "timeline"]


def test_training_started_and_each_epoch_with_the_evaluation_that_follows_it(tmp_path: Path) -> None:
    sink = EventSink(tmp_path / "events.jsonl")
    story, control = StoryCallback(sink), TrainerControl()
    story.on_train_begin(_args(), _state(0, 0.0), control)
    # The Trainer evaluates right after on_epoch_end: the event waits for it.
    story.on_epoch_end(_args(), _state(5, 1.0), control)
    assert [e["kind"] for e in _timeline(tmp_path / "events.jsonl")] == ["TRAINING_STARTED"]
    story.on_evaluate(_args(), _state(5, 1.0), control, metrics={"eval_loss": 1.25, "epoch": 1.0})
    # Without an evaluation at an epoch's end (eval steps elsewhere) it goes out at the next step.
    story.on_epoch_end(_args(eval_strategy="steps"), _state(10, 2.0), control)
    story.on_step_begin(_args(), _state(10, 2.0), control)
    story.on_train_end(_args(), _state(10, 2.0), control)

    started, first, second = _timeline(tmp_path / "events.jsonl")
    assert started["kind"] == "TRAINING_STARTED" and "20 steps" in started["message"]
    assert (first["kind"], first["step"], first["epoch"], first["metrics"]) == (
        "EPOCH_COMPLETED", 5, 1.0, {"eval_loss": 1.25})
    assert "eval_loss 1.2500" in first["message"]
    assert (second["step"], second.get("metrics", {})) == (10, {})
    assert story.early_stop is None


def test_early_stopping_is_told_and_the_kept_step_is_the_best_with_its_evaluation(tmp_path: Path) -> None:
    sink = EventSink(tmp_path / "events.jsonl")
    early = EarlyStoppingCallback(2, 0.01)
    early.early_stopping_patience_counter = 2  # ran out of patience
    story = StoryCallback(sink, early)
    history = [{"loss": 2.0, "step": 4}, {"eval_loss": 1.5, "eval_mean_token_accuracy": 0.3, "step": 4},
               {"eval_loss": 1.2, "step": 8}, {"eval_loss": 1.3, "step": 12}, {"eval_loss": 1.4, "step": 16}]
    state = _state(16, 1.6, history, best_global_step=8, best_metric=1.2)
    story.on_train_end(_args(), state, TrainerControl())

    (event,) = _timeline(tmp_path / "events.jsonl")
    assert (event["kind"], event["step"]) == ("EARLY_STOPPED", 16)
    assert event["metrics"] == {"best_step": 8.0, "best_eval_loss": 1.2}
    assert story.early_stop == EarlyStopInfo(
        stopped_step=16, best_step=8, metric="eval_loss", best_value=1.2, patience=2,
        reason="eval_loss did not improve by more than 0.01 for 2 evaluations after step 8 (best 1.2000)")
    assert "eval_loss did not improve" in event["message"]

    metrics = {"eval_loss": 1.4, "eval_mean_token_accuracy": 0.5, "train_loss": 1.9}
    assert story.conclude(state, _args(), metrics) == 8
    assert metrics == {"eval_loss": 1.2, "train_loss": 1.9}  # the kept step's evaluation, not the last


def test_no_early_stop_when_training_ran_to_its_end_and_the_last_step_is_kept(tmp_path: Path) -> None:
    early = EarlyStoppingCallback(1)
    early.early_stopping_patience_counter = 1  # patience ran out on the very last evaluation
    story = StoryCallback(EventSink(tmp_path / "events.jsonl"), early)
    state = _state(20, 2.0, [{"eval_loss": 1.0, "step": 20}], best_global_step=10, best_metric=0.9)
    story.on_train_end(_args(), state, TrainerControl())
    assert story.early_stop is None and _timeline(tmp_path / "events.jsonl") == []
    metrics = {"eval_loss": 5.0}
    assert story.conclude(state, _args(load_best_model_at_end=False), metrics) == 20
    assert metrics == {"eval_loss": 1.0}


def test_the_attempt_story_goes_out_in_order_with_phase_and_tokens() -> None:
    story = AttemptStory(2, "w1")
    update = events_pb2.WorkerJobUpdate(kind=U.WORKER_UPDATE_KIND_PREPARING)
    story.fill(update)
    assert update.phase == job_pb2.JOB_PHASE_DOWNLOADING and not update.events and not story.has_news

    story.downloaded("DATA_DOWNLOADED", "the data", 2048, 0.5)
    story.model_ready("hub/model", "/nonexistent/hub/model", 0.0)
    story.restarted(40)  # first among the attempt's events: the delivery began before the downloads
    story.observe(StateEvent(state="running"))
    story.observe(TimelineEvent(kind="TRAINING_STARTED", message="Training started.", step=40, time=1.0))
    story.observe(MetricEvent(kind="eval", step=50, eval_loss=1.5, values={"rewards/margins": 0.2}))
    story.observe(ProgressEvent(step=50, total_steps=100, tokens_trained=12345))
    story.checkpoint_saved(50, 4096, "file:///o/checkpoint-50")
    assert story.has_news and story.phase_changed

    update = events_pb2.WorkerJobUpdate(kind=U.WORKER_UPDATE_KIND_PROGRESS)
    story.fill(update)
    kinds = [E.Name(e.type).removeprefix("JOB_EVENT_TYPE_") for e in update.events]
    assert kinds == ["RESTARTED", "DATA_DOWNLOADED", "MODEL_DOWNLOADED", "TRAINING_STARTED",
                     "CHECKPOINT_SAVED"]
    restarted, data, _, _, checkpoint = update.events
    assert (restarted.step, restarted.worker_id, restarted.attempt) == (40, "w1", 2)
    assert (data.size_bytes, data.duration.ToNanoseconds()) == (2048, 500_000_000)
    assert data.message == "Fetched the data."  # its size and time are the event's fields, not repeated
    assert checkpoint.step == 50 and checkpoint.size_bytes == 4096
    assert dict(checkpoint.metrics) == {"eval_loss": 1.5, "eval_rewards/margins": 0.2}
    assert update.phase == job_pb2.JOB_PHASE_TRAINING and update.tokens_trained == 12345
    assert all(e.message and e.time.seconds for e in update.events)

    story.observe(PhaseEvent(phase="evaluating"))
    assert story.phase_changed
    final = events_pb2.WorkerJobUpdate(kind=U.WORKER_UPDATE_KIND_FAILED)
    story.uploaded(10, 1.0, ["file:///o/adapter"])
    story.fill(final)
    assert [e.type for e in final.events] == [E.JOB_EVENT_TYPE_UPLOADING]
    assert final.phase == job_pb2.JOB_PHASE_UNSPECIFIED and final.tokens_trained == 0  # not a phase update


def test_the_timeline_says_each_size_and_time_once_in_binary_units(tmp_path: Path) -> None:
    """As `tuneforge jobs events` shows the story's events: the message, then the event's size (KiB, MiB,
    GiB: powers of 1024) and duration, once."""
    from services.cli.timeline import event_text

    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"\0" * 812_082)
    story = AttemptStory(1, "w1")
    story.downloaded("DATA_DOWNLOADED", "the data", 37_395, 0.04)
    story.downloaded("DATA_DOWNLOADED", "the data", 0, 0.0)
    story.model_ready("acme/tiny", str(model), 1.5)
    story.checkpoint_saved(50, 3 * 1024**2, "file:///o/checkpoint-50")
    story.uploaded(3 * 1024**3 + 512 * 1024**2, 61.3, ["file:///o/adapter", "file:///o/merged"])
    update = events_pb2.WorkerJobUpdate(kind=U.WORKER_UPDATE_KIND_PROGRESS)
    story.fill(update)
    assert [event_text(e) for e in update.events] == [
        "Fetched the data. (36.5 KiB, 0.0 s)",  # 37,395 bytes: 36.5 KiB (37.4 kB)
        "Fetched the data. (0.0 s)",
        "The base model acme/tiny is ready. (793.0 KiB, 1.5 s)",  # 812,082 bytes
        "Stored the checkpoint of step 50 at file:///o/checkpoint-50. (step 50, 3.0 MiB)",
        "Stored the outputs: file:///o/adapter, file:///o/merged. (3.5 GiB, 61.3 s)",
    ]


def test_the_result_fills_kept_step_and_early_stop() -> None:
    output = job_pb2.JobOutput()
    result = ResultEvent(adapter_dir="/a", kept_step=8, tokens_trained=99, early_stop=EarlyStopInfo(
        stopped_step=16, best_step=8, metric="eval_loss", best_value=1.2, patience=2, reason="why"))
    fill_output(output, result)
    assert output.kept_step == 8
    stop = output.early_stop
    assert (stop.stopped_step, stop.best_step, stop.reason) == (16, 8, "why")
    plain = job_pb2.JobOutput()
    fill_output(plain, ResultEvent(adapter_dir="/a", kept_step=20))
    assert plain.kept_step == 20 and not plain.HasField("early_stop")


def test_the_training_log_keeps_every_attempt(tmp_path: Path) -> None:
    entry = metrics_pb2.LogEntry(time=timestamp(1_700_000_000.5), level=metrics_pb2.LOG_LEVEL_WARNING,
                                 message="first line\nsecond line\n")
    assert log_line(entry) == "2023-11-14T22:13:20.500Z WARNING first line\n    second line"
    store = LocalObjectStore(tmp_path / "objects")
    store_training_log(store, "jobs/acme/job_1", ["a1", "a2"])
    uri = store_training_log(store, "jobs/acme/job_1/", ["b1"])
    assert uri.endswith(f"jobs/acme/job_1/{TRAINING_LOG}")
    assert store.get_bytes(f"jobs/acme/job_1/{TRAINING_LOG}") == b"a1\na2\nb1\n"


def test_the_log_is_listed_in_any_state_and_the_evaluation_once_succeeded(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    catalog = ArtifactCatalog(store, default_ttl_s=60, signer=DownloadSigner([b"k" * 32]))
    catalog.base_url = "http://127.0.0.1:1"
    store.put_bytes(f"jobs/acme/job_1/{TRAINING_LOG}", b"line\n")
    store.put_bytes("jobs/acme/job_1/evaluation/evaluation.json", b"{}")
    running = job_pb2.Job(id="job_1", organization="acme", state=job_pb2.JOB_STATE_RUNNING)
    (log_artifact,) = catalog._list(running, set(), 60)
    assert (log_artifact.kind, log_artifact.name, log_artifact.size_bytes) == (
        artifact_pb2.ARTIFACT_KIND_TRAINING_LOG, "logs", 5)
    assert [f.path for f in log_artifact.files] == ["training.log"]
    done = job_pb2.Job(id="job_1", organization="acme", state=job_pb2.JOB_STATE_SUCCEEDED)
    listed = {a.name: a for a in catalog._list(done, set(), 60)}
    assert listed["evaluation"].kind == artifact_pb2.ARTIFACT_KIND_EVALUATION_REPORT
    assert [f.path for f in listed["evaluation"].files] == ["evaluation.json"]
    only = catalog._list(done, {artifact_pb2.ARTIFACT_KIND_EVALUATION_REPORT}, 60)
    assert [a.name for a in only] == ["evaluation"]
