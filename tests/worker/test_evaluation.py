"""The evaluation after training: base vs tuned on the test split, in the training process, on the tiny model.

SFT learns the synthetic task well enough in a few seconds that its tuned loss is below the base's; DPO,
KTO and GRPO report their own metrics; a disabled evaluation, a missing test split and a failing
evaluation never fail the job. The spec's EvaluationConfig is resolved and range-checked at CreateJob.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from tuneforge.events.v1 import events_pb2
from tuneforge.v1 import evaluation_pb2, job_pb2

from tests.worker.helpers import FAST_HYPERPARAMETERS, make_run_config, read_events
from tests.worker.test_agent import Platform, platform  # noqa: F401 (the fixture)
from trainer_worker import evaluation, evaluation_report
from trainer_worker.events import EventSink
from trainer_worker.run_config import RunConfig
from trainer_worker.stop import StopSignal
from trainer_worker.tiny import write_synthetic_dataset
from trainer_worker.train import run
from tuneforge_core import nats as kit_nats
from tuneforge_core import subjects
from tuneforge_core.errors import InvalidArgument
from tuneforge_core.ids import new_id
from tuneforge_core.spec import resolve_spec

pytestmark = pytest.mark.slow

SHORT = {**FAST_HYPERPARAMETERS, "max_seq_length": 64}
SMALL_EVALUATION = {"max_examples": 16, "num_samples": 2, "max_new_tokens": 12}


def _train(tmp_path: Path, cfg: RunConfig, stop: StopSignal | None = None) -> list[dict[str, Any]]:
    sink = EventSink(cfg.events_file)
    try:
        code = run(cfg, sink, stop or StopSignal())
    finally:
        sink.close()
    events = read_events(cfg.events_file)
    assert code == 0, events[-3:]
    assert events[-1]["type"] == "result"
    return events


def _report(events: list[dict[str, Any]]) -> evaluation_pb2.EvaluationReport:
    return json_format.ParseDict(events[-1]["evaluation"], evaluation_pb2.EvaluationReport())


def _config(
    tmp_path: Path, tiny_model: Path, method: str, family: str, extra: dict[str, Any], *, test: bool = True
) -> RunConfig:
    train = write_synthetic_dataset(tmp_path / "train.jsonl", extra.pop("rows", 64), family=family)
    spec = {
        "method": f"TRAINING_METHOD_{method}",
        "lora": {"rank": 8},
        "evaluation": SMALL_EVALUATION,
        **extra,
    }
    cfg = make_run_config(tmp_path, tiny_model, train, spec)
    if test:
        cfg.test_file = write_synthetic_dataset(tmp_path / "test.jsonl", 24, seed=7, family=family)
    return cfg


def test_sft_tuned_loss_is_below_the_base_loss_with_samples(tmp_path: Path, tiny_model: Path) -> None:
    cfg = _config(tmp_path, tiny_model, "SFT", "chat", {"rows": 96, "hyperparameters": SHORT})
    events = _train(tmp_path, cfg)
    report = _report(events)
    assert report.status == evaluation_pb2.EVALUATION_STATUS_SUCCEEDED, report.message
    assert report.split == "test" and report.example_count == 16 and report.primary_metric == "loss"
    base, tuned = report.base_metrics, report.tuned_metrics
    assert tuned["loss"] < base["loss"] and report.improved
    assert tuned["perplexity"] == pytest.approx(2.718281828 ** tuned["loss"], rel=1e-6)
    assert len(report.samples) == 2
    sample = report.samples[0]
    assert (
        sample.prompt.startswith("What is") and sample.reference and sample.base_answer != sample.tuned_answer
    )
    assert "<|im_end|>" not in sample.tuned_answer
    assert report.start_time.ToNanoseconds() <= report.end_time.ToNanoseconds()
    # The phase and the timeline around it, with the metrics of the primary metric.
    phases = [e["phase"] for e in events if e["type"] == "phase"]
    assert "evaluating" in phases
    timeline = {e["kind"]: e for e in events if e["type"] == "timeline"}
    completed = timeline["EVALUATION_COMPLETED"]
    assert "EVALUATION_STARTED" in timeline and completed["duration_s"] > 0
    assert completed["metrics"] == {"base_loss": base["loss"], "tuned_loss": tuned["loss"]}


def test_dpo_reports_reward_accuracy_and_margin(tmp_path: Path, tiny_model: Path) -> None:
    hp = {**SHORT, "epochs": 1, "learning_rate": 5e-3}
    cfg = _config(tmp_path, tiny_model, "DPO", "preference", {"hyperparameters": hp})
    report = _report(_train(tmp_path, cfg))
    assert report.status == evaluation_pb2.EVALUATION_STATUS_SUCCEEDED, report.message
    assert report.primary_metric == "reward_accuracy" and report.example_count == 16
    assert dict(report.base_metrics) == {"reward_accuracy": 0.5, "reward_margin": 0.0}
    assert 0.0 <= report.tuned_metrics["reward_accuracy"] <= 1.0
    assert report.tuned_metrics["reward_margin"] != 0.0
    assert report.improved == (report.tuned_metrics["reward_accuracy"] > 0.5)
    assert len(report.samples) == 2 and " is " in report.samples[0].reference  # the chosen answer


def test_kto_reports_reward_accuracy(tmp_path: Path, tiny_model: Path) -> None:
    hp = {**SHORT, "max_steps": 3, "batch_size": 4}
    cfg = _config(tmp_path, tiny_model, "KTO", "kto", {"hyperparameters": hp})
    report = _report(_train(tmp_path, cfg))
    assert report.status == evaluation_pb2.EVALUATION_STATUS_SUCCEEDED, report.message
    assert report.primary_metric == "reward_accuracy" and report.example_count == 16
    assert set(report.tuned_metrics) == {"reward_accuracy", "reward_margin"}
    assert len(report.samples) == 2  # references: the completion of desirable rows, empty otherwise


def test_grpo_reports_mean_reward(tmp_path: Path, tiny_model: Path) -> None:
    hp = {**SHORT, "max_steps": 2, "batch_size": 4, "logging_steps": 1}
    grpo = {
        "num_generations": 4,
        "max_completion_length": 8,
        "reward_functions": ["REWARD_FUNCTION_EXACT_MATCH", "REWARD_FUNCTION_LENGTH"],
        "target_length": 16,
    }
    cfg = _config(
        tmp_path, tiny_model, "GRPO", "prompt-only", {"rows": 16, "hyperparameters": hp, "grpo": grpo}
    )
    report = _report(_train(tmp_path, cfg))
    assert report.status == evaluation_pb2.EVALUATION_STATUS_SUCCEEDED, report.message
    assert report.primary_metric == "mean_reward"
    for metrics in (report.base_metrics, report.tuned_metrics):
        assert {"mean_reward", "reward_exact_match", "reward_length_closeness"} <= set(metrics)
        assert metrics["mean_reward"] == pytest.approx(
            metrics["reward_exact_match"] + metrics["reward_length_closeness"]
        )
    assert report.improved == (report.tuned_metrics["mean_reward"] > report.base_metrics["mean_reward"])
    assert report.samples[0].reference  # the exact-match answer of the row


def _quick(tmp_path: Path, tiny_model: Path, evaluation_settings: dict[str, Any], *, test: bool) -> RunConfig:
    hp = {**SHORT, "max_steps": 1}
    cfg = _config(tmp_path, tiny_model, "SFT", "chat", {"rows": 16, "hyperparameters": hp}, test=test)
    spec = cfg.job_spec()
    spec.evaluation.MergeFrom(json_format.ParseDict(evaluation_settings, job_pb2.EvaluationConfig()))
    cfg.spec = RunConfig.spec_to_dict(spec)
    return cfg


def test_disabled_evaluation_is_skipped(tmp_path: Path, tiny_model: Path) -> None:
    cfg = _quick(tmp_path, tiny_model, {"enabled": False}, test=True)
    report = _report(_train(tmp_path, cfg))
    assert report.status == evaluation_pb2.EVALUATION_STATUS_SKIPPED
    assert report.message == "evaluation disabled (spec.evaluation.enabled=false)"


def test_a_dataset_without_a_test_split_is_skipped(tmp_path: Path, tiny_model: Path) -> None:
    events = _train(tmp_path, _quick(tmp_path, tiny_model, {}, test=False))
    report = _report(events)
    assert report.status == evaluation_pb2.EVALUATION_STATUS_SKIPPED
    assert report.message == "the dataset has no test split"
    assert not [e for e in events if e["type"] == "phase" and e["phase"] == "evaluating"]


def test_a_failing_evaluation_is_reported_and_the_job_still_succeeds(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: evaluation.Evaluation, model: Any, data: Any) -> float:
        raise RuntimeError("the scorer broke")

    monkeypatch.setattr(evaluation.Evaluation, "_token_loss", broken)
    events = _train(tmp_path, _quick(tmp_path, tiny_model, {}, test=True))
    report = _report(events)
    assert report.status == evaluation_pb2.EVALUATION_STATUS_FAILED
    assert report.message == "The evaluation failed (RuntimeError: the scorer broke)."
    assert events[-1]["adapter_dir"]
    completed = [e for e in events if e["type"] == "timeline" and e["kind"] == "EVALUATION_COMPLETED"]
    assert completed and completed[0]["message"] == report.message


def test_a_stop_during_the_evaluation_cancels(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stop = StopSignal()
    original = evaluation.Evaluation._token_loss

    def stopping(self: evaluation.Evaluation, model: Any, data: Any) -> float:
        stop.request("SIGTERM")
        return original(self, model, data)

    monkeypatch.setattr(evaluation.Evaluation, "_token_loss", stopping)
    cfg = _quick(tmp_path, tiny_model, {}, test=True)
    sink = EventSink(cfg.events_file)
    try:
        assert run(cfg, sink, stop) == 143
    finally:
        sink.close()
    events = read_events(cfg.events_file)
    assert events[-1] == {**events[-1], "type": "state", "state": "cancelled"}


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"max_examples": 0}, "spec.evaluation.max_examples"),
        ({"max_examples": 10001}, "spec.evaluation.max_examples"),
        ({"num_samples": 21}, "spec.evaluation.num_samples"),
        ({"max_new_tokens": 0}, "spec.evaluation.max_new_tokens"),
        ({"max_new_tokens": 2049}, "spec.evaluation.max_new_tokens"),
    ],
)
def test_evaluation_settings_out_of_range_name_the_field(settings: dict[str, Any], field: str) -> None:
    spec = job_pb2.JobSpec(base_model="org/model", dataset="ds")
    spec.evaluation.MergeFrom(json_format.ParseDict(settings, job_pb2.EvaluationConfig()))
    with pytest.raises(InvalidArgument) as info:
        resolve_spec(spec)
    assert [v.field for v in info.value.violations] == [field]


def test_evaluation_defaults_are_resolved() -> None:
    resolved = resolve_spec(job_pb2.JobSpec(base_model="org/model", dataset="ds")).evaluation
    assert (resolved.enabled, resolved.max_examples, resolved.num_samples, resolved.max_new_tokens) == (
        True,
        200,
        3,
        128,
    )
    off = job_pb2.JobSpec(base_model="org/model", dataset="ds")
    off.evaluation.enabled = False
    off.evaluation.num_samples = 0
    resolved = resolve_spec(off).evaluation
    assert (resolved.enabled, resolved.num_samples, resolved.max_examples) == (False, 0, 200)


def test_the_agent_reads_a_missing_or_unreadable_report() -> None:
    missing = evaluation_report.from_result(None)
    assert missing.status == evaluation_pb2.EVALUATION_STATUS_SKIPPED and missing.message
    bad = evaluation_report.from_result({"exampleCount": "many"})
    assert bad.status == evaluation_pb2.EVALUATION_STATUS_FAILED
    good = evaluation_report.to_dict(evaluation_report.skipped("why"))
    assert evaluation_report.from_result(good).message == "why"
    assert b'"status": "EVALUATION_STATUS_SKIPPED"' in evaluation_report.to_json(missing)


async def test_the_agent_sends_the_report_with_succeeded_and_stores_it(platform: Platform) -> None:  # noqa: F811
    test = write_synthetic_dataset(platform.tmp_path / "test.jsonl", 8, seed=7)
    platform.store.put_file("datasets/acme/ds_1/test.jsonl", test)
    spec = {
        "base_model": platform.store.uri("jobs/acme/job_base/merged"),
        "hyperparameters": {**SHORT, "max_steps": 2},
        "evaluation": SMALL_EVALUATION,
    }
    assignment = events_pb2.JobAssignment(
        event_id=new_id("evt"),
        job_id="job_eval",
        organization="acme",
        spec=resolve_spec(json_format.ParseDict(spec, job_pb2.JobSpec()), require_dataset=False),
        train_uri=platform.store.uri("datasets/acme/ds_1/train.jsonl"),
        test_uri=platform.store.uri("datasets/acme/ds_1/test.jsonl"),
        output_prefix=platform.store.uri("jobs/acme/job_eval"),
    )
    await kit_nats.publish(platform.js, subjects.work_jobs("", 0), assignment, assignment.event_id)
    platform.start_agent("w1")
    await platform.events.wait_for("job_eval", "SUCCEEDED", within_s=90)

    done = platform.events.update("job_eval", events_pb2.WORKER_UPDATE_KIND_SUCCEEDED)
    assert done.evaluation.status == evaluation_pb2.EVALUATION_STATUS_SUCCEEDED, done.evaluation.message
    assert done.evaluation.example_count == 8 and len(done.evaluation.samples) == 2
    stored = platform.store.get_bytes(f"jobs/acme/job_eval/{evaluation_report.OBJECT_NAME}")
    assert json_format.Parse(stored, evaluation_pb2.EvaluationReport()) == done.evaluation
