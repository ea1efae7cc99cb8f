"""What the training process says about itself: failure reasons with advice, resource use, logs by level,
and only the main rank speaking."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from tuneforge.v1 import estimation_pb2

from tests.worker.helpers import make_run_config, read_events
from trainer_worker.errors import TrainingError, classify, describe
from trainer_worker.events import EventLogHandler, EventSink
from trainer_worker.run_config import RunConfig
from trainer_worker.sysmetrics import PEAK_GPU_MEMORY, PEAK_RSS, SystemSampler, peak_metrics
from trainer_worker.train import memory_estimate, with_run_metrics


def test_out_of_gpu_memory_says_what_to_change() -> None:
    reason, message = describe(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert reason == "OUT_OF_MEMORY"
    for advice in ("batch_size", "gradient_accumulation_steps", "gradient_checkpointing", "QLoRA"):
        assert advice in message
    assert describe(MemoryError())[1].startswith("Training ran out of host memory.")


def test_out_of_memory_message_carries_the_estimate(tmp_path: Path) -> None:
    """The estimate the job was admitted with (JobAssignment.admission_estimate, carried in RUN.json), by
    term; nothing when the job was admitted unchecked."""
    gib = 2**30
    fit = estimation_pb2.HardwareFit(
        gpu_type="nvidia-t4",
        gpu_count=1,
        fits=True,
        memory_per_gpu=estimation_pb2.MemoryBreakdown(
            total=int(12.5 * gib), weights=6 * gib, activations=3 * gib, logits=gib, optimizer_states=gib
        ),
    )
    cfg = make_run_config(tmp_path, "/models/x", tmp_path / "train.jsonl")
    admitted = cfg.model_copy(update={"admission_estimate": RunConfig.fit_to_dict(fit)})
    admitted = RunConfig.load(admitted.dump(tmp_path / "RUN.json"))  # as the training process reads it
    message = memory_estimate(admitted)
    assert message.startswith("Estimated need: 12.5 GiB per GPU on 1 x nvidia-t4"), message
    assert "weights 6.0" in message and "activations 3.0" in message and "optimizer states 1.0" in message
    assert memory_estimate(cfg) == ""  # admitted unchecked: nothing to say, and never a failure of its own
    broken = cfg.model_copy(update={"admission_estimate": {"memory_per_gpu": "not a message"}})
    assert memory_estimate(broken) == ""


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (ModuleNotFoundError("No module named 'bitsandbytes'"), "DEPENDENCY_ERROR"),
        (
            RuntimeError(
                "DefaultCPUAllocator: can't allocate memory: you tried to allocate ... out of memory"
            ),
            "OUT_OF_MEMORY",
        ),
        (TrainingError("BAD_TRAINING_DATA", "train.jsonl line 3 is not JSON."), "BAD_TRAINING_DATA"),
        (TrainingError("LOSS_DIVERGED", "The loss became NaN by step 4."), "LOSS_DIVERGED"),
        (ValueError("something else"), "TRAINING_FAILED"),
    ],
)
def test_every_failure_gets_a_stable_reason(exc: BaseException, reason: str) -> None:
    assert classify(exc) == reason


def test_a_missing_hub_model_is_model_not_found() -> None:
    import httpx2
    from huggingface_hub.errors import RepositoryNotFoundError

    request = httpx2.Request("GET", "https://huggingface.co/api/models/acme/nope")
    exc = RepositoryNotFoundError("404 acme/nope", response=httpx2.Response(404, request=request))
    assert describe(exc) == ("MODEL_NOT_FOUND", "The base model could not be found: 404 acme/nope")


def test_train_points_carry_a_system_point_and_peaks_reach_the_final_metrics(tmp_path: Path) -> None:
    sink = EventSink(tmp_path / "events.jsonl", sampler=SystemSampler())
    sink.metric("train", 5, loss=1.0)
    sink.metric("eval", 5, eval_loss=1.1)
    sink.close()
    _, system, evaluation = read_events(tmp_path / "events.jsonl")
    assert (system["kind"], system["step"]) == ("system", 5) and evaluation["kind"] == "eval"
    assert system["memory_bytes"] > 10e6 and system["cpu_percent"] >= 0
    assert system["gpu_utilization"] is None  # no GPU here: no made-up zeros

    final = with_run_metrics({"num_input_tokens_seen": 1000.0, "train_runtime": 4.0, "train_loss": 1.0})
    assert final["train_tokens_per_second"] == 250.0
    assert final[PEAK_RSS] >= system["memory_bytes"] * 0.5 and PEAK_GPU_MEMORY not in final
    assert set(peak_metrics()) == {PEAK_RSS}


def test_only_the_main_rank_reports_but_every_rank_says_who_it_is(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    main, peer = EventSink(path), EventSink(path, main=False, rank=1)
    for sink in (main, peer):
        sink.rank(rank=0 if sink is main else 1, pid=1)
        sink.log("Loading the model.")
        sink.metric("train", 1, loss=2.0)
        sink.result(tmp_path / "adapter", None, {})
    peer.error("TRAINING_FAILED", "lost the connection to rank 0")
    types = [(e["type"], e.get("rank")) for e in read_events(path)]
    assert types == [
        ("rank", 0),
        ("log", None),
        ("metric", None),
        ("result", None),
        ("rank", 1),
        ("error", 1),
    ]


def test_library_warnings_reach_the_job_log_with_their_level(tmp_path: Path) -> None:
    sink = EventSink(tmp_path / "events.jsonl")
    handler = EventLogHandler(sink)
    logger = logging.getLogger("transformers.test_forwarding")
    logger.addHandler(handler)
    try:
        logger.info("chatter")  # below WARNING: stays out of the job log
        logger.warning("mtime may not be reliable")
        logger.critical("giving up")
    finally:
        logger.removeHandler(handler)
    logs = [(e["level"], e["message"]) for e in read_events(tmp_path / "events.jsonl")]
    assert logs == [
        ("warning", "transformers.test_forwarding: mtime may not be reliable"),
        ("critical", "transformers.test_forwarding: giving up"),
    ]
