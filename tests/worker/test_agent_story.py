"""The job's story through the real agent: one tiny run with validation data and early stopping tells its
phases, an ordered timeline, tokens trained, the kept step and early stop, and stores its training log."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf.json_format import ParseDict
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import job_pb2, metrics_pb2

from tests.worker.test_agent import Platform, platform  # noqa: F401  (the fixture)
from trainer_worker.story import TRAINING_LOG
from trainer_worker.tiny import write_synthetic_chat_dataset
from tuneforge_core import nats as kit_nats
from tuneforge_core import subjects
from tuneforge_core.ids import new_id
from tuneforge_core.spec import resolve_spec

U = events_pb2.WorkerUpdateKind
E = job_pb2.JobEventType
P = job_pb2.JobPhase
# 64 rows of 8: 8 steps an epoch, an evaluation (and a checkpoint) every 4. An improvement must beat 0.5, so
# early stopping ends training long before its 48 steps (the loss cannot keep falling by 0.5 every 4 steps).
HYPERPARAMETERS = {"epochs": 6, "batch_size": 8, "learning_rate": 1e-2, "logging_steps": 4, "warmup_steps": 0,
                   "eval_steps": 4, "early_stopping": {"enabled": True, "patience": 1, "min_delta": 0.5}}


async def _assign(on: Platform, job_id: str, tmp_path: Path) -> None:
    train = write_synthetic_chat_dataset(tmp_path / "story-train.jsonl", 64)
    validation = write_synthetic_chat_dataset(tmp_path / "story-validation.jsonl", 16, seed=1)
    on.store.put_file("datasets/acme/ds_story/train.jsonl", train)
    on.store.put_file("datasets/acme/ds_story/validation.jsonl", validation)
    spec = {"base_model": on.store.uri("jobs/acme/job_base/merged"), "method": "TRAINING_METHOD_SFT",
            "hyperparameters": HYPERPARAMETERS}
    assignment = events_pb2.JobAssignment(
        event_id=new_id("evt"), job_id=job_id, organization="acme",
        spec=resolve_spec(ParseDict(spec, job_pb2.JobSpec()), require_dataset=False),
        train_uri=on.store.uri("datasets/acme/ds_story/train.jsonl"),
        validation_uri=on.store.uri("datasets/acme/ds_story/validation.jsonl"),
        output_prefix=on.store.uri(f"jobs/acme/{job_id}"),
    )
    hardware = assignment.spec.hardware
    subject = subjects.work_jobs(hardware.gpu_type, hardware.gpu_count)
    await kit_nats.publish(on.js, subject, assignment, assignment.event_id)


@pytest.mark.slow
async def test_a_run_tells_its_story(platform: Platform, tmp_path: Path) -> None:  # noqa: F811
    await _assign(platform, "job_story", tmp_path)
    platform.start_agent("w1")
    await platform.events.wait_for("job_story", "SUCCEEDED", within_s=120)
    updates = [u for u in platform.events.updates if u.job_id == "job_story"]

    # Phases: downloading while preparing, training once running, uploading before the outputs go up.
    phases = [(U.Name(u.kind).removeprefix("WORKER_UPDATE_KIND_"), P.Name(u.phase).removeprefix("JOB_PHASE_"))
              for u in updates]
    assert phases[:2] == [("PREPARING", "DOWNLOADING"), ("RUNNING", "TRAINING")], phases
    assert ("PROGRESS", "UPLOADING") in phases and phases.index(("PROGRESS", "UPLOADING")) == len(phases) - 2

    # The timeline, in order, each event once, with a time, the attempt and a sentence.
    events = [e for u in updates for e in u.events]
    kinds = [E.Name(e.type).removeprefix("JOB_EVENT_TYPE_") for e in events]
    assert kinds[:3] == ["DATA_DOWNLOADED", "MODEL_DOWNLOADED", "TRAINING_STARTED"], kinds
    # The last checkpoint's upload may end after training did; the outputs go up last.
    assert kinds[-1] == "UPLOADING" and kinds.count("EARLY_STOPPED") == 1, kinds
    assert kinds.index("EARLY_STOPPED") > max(i for i, k in enumerate(kinds) if k == "EPOCH_COMPLETED")
    assert {"EPOCH_COMPLETED", "CHECKPOINT_SAVED"} <= set(kinds) and "RESTARTED" not in kinds
    assert all(e.attempt == 1 and e.message and e.time.seconds for e in events)
    times = [e.time.ToNanoseconds() for e in events if e.type != E.JOB_EVENT_TYPE_CHECKPOINT_SAVED]
    assert times == sorted(times)
    data, model = events[0], events[1]
    assert data.size_bytes > 0 and model.size_bytes > 0 and model.HasField("duration")
    epochs = [e for e in events if e.type == E.JOB_EVENT_TYPE_EPOCH_COMPLETED]
    assert [e.epoch for e in epochs] == [float(n) for n in range(1, len(epochs) + 1)]
    assert all(e.step == 8 * e.epoch and "eval_loss" in e.metrics for e in epochs)
    checkpoints = [e for e in events if e.type == E.JOB_EVENT_TYPE_CHECKPOINT_SAVED]
    assert checkpoints and all(e.size_bytes > 0 and "eval_loss" in e.metrics for e in checkpoints)
    uploading = events[-1]
    assert uploading.size_bytes > 0 and uploading.HasField("duration")

    # Early stopping, the kept step and the final metrics of the kept model.
    done = platform.events.update("job_story", U.WORKER_UPDATE_KIND_SUCCEEDED)
    stop = done.output.early_stop
    stopped = next(e for e in events if e.type == E.JOB_EVENT_TYPE_EARLY_STOPPED)
    assert 0 < stop.best_step <= stop.stopped_step < 48 and stop.patience == 1 and stop.metric == "eval_loss"
    assert stopped.step == stop.stopped_step and stopped.metrics["best_step"] == stop.best_step
    assert "did not improve by more than 0.5" in stop.reason
    assert done.output.kept_step == stop.best_step
    evals = {p.step: p.eval_loss for p in platform.events.points if p.kind == metrics_pb2.METRIC_KIND_EVAL}
    assert done.output.final_metrics["eval_loss"] == pytest.approx(evals[stop.best_step])
    assert stop.best_value == pytest.approx(evals[stop.best_step])

    # Tokens trained: in progress updates and, all of them, in the result.
    progress = [u for u in updates if u.kind == U.WORKER_UPDATE_KIND_PROGRESS]
    assert any(u.tokens_trained > 0 for u in progress)
    assert done.tokens_trained == int(done.output.final_metrics["num_input_tokens_seen"]) > 0

    # The training log: every line of the attempt, in order, "<ISO time> <LEVEL> <message>".
    key = f"jobs/acme/job_story/{TRAINING_LOG}"
    await platform.pending_work()  # acked after the log is stored
    lines = platform.store.get_bytes(key).decode().splitlines()
    entries = [e for e in platform.events.entries if e.job_id == "job_story"]
    assert len([line for line in lines if not line.startswith("    ")]) == len(entries)
    first = lines[0].split(" ", 2)
    assert first[0].endswith("Z") and first[1] == "INFO" and first[2].startswith("Worker w1 claimed the job")
    assert lines[-1].endswith("Training succeeded.")
