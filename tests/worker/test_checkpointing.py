"""Checkpoints in object storage: only marked ones count, the newest N are kept, resume is safetensors-only.

Run against both real stores: the local folder and S3 (seaweedfs), since marker-last only works if every
store lists and deletes the way the code assumes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.kit.test_storage import s3_endpoint, store  # noqa: F401  (the real local and S3 stores)
from tests.worker.helpers import make_run_config
from trainer_worker.checkpointing import COMPLETE, CheckpointStore, resume_checkpoint, resume_dir
from trainer_worker.errors import TrainingError
from tuneforge_core.storage import LocalObjectStore, ObjectStore


def _checkpoint(root: Path, step: int) -> Path:
    directory = root / f"checkpoint-{step}"
    (directory / "global_step").mkdir(parents=True)
    (directory / "adapter_model.safetensors").write_bytes(f"weights {step}".encode())
    (directory / "global_step" / "optim.pt").write_bytes(b"state")
    return directory


def test_only_marked_checkpoints_count_and_the_newest_are_kept(
    store: ObjectStore,  # noqa: F811
    tmp_path: Path,
) -> None:
    checkpoints = CheckpointStore(store, "jobs/acme/job_1")
    for step in (10, 20, 30):
        checkpoints.upload(step, _checkpoint(tmp_path / "local", step), keep=2)
    # A worker died halfway through uploading step 40: files, but no marker.
    store.put_bytes("jobs/acme/job_1/checkpoints/checkpoint-40/adapter_model.safetensors", b"half")
    assert checkpoints.steps() == ([20, 30], [40])

    out = tmp_path / "attempt-2" / "out"
    assert checkpoints.download_latest(out) == 30
    restored = resume_dir(out) / "checkpoint-30"
    assert (restored / "adapter_model.safetensors").read_bytes() == b"weights 30"
    assert (restored / "global_step" / "optim.pt").exists() and (restored / COMPLETE).exists()

    # The next complete upload prunes to two and drops the stale half-upload below it.
    checkpoints.upload(50, _checkpoint(tmp_path / "local", 50), keep=2)
    assert checkpoints.steps() == ([30, 50], [])
    assert not store.list_keys("jobs/acme/job_1/checkpoints/checkpoint-20/")


def test_pruning_keeps_the_best_checkpoint_beside_the_newest(tmp_path: Path) -> None:
    """With early stopping the run loads its best checkpoint at the end, so pruning must not drop it."""
    checkpoints = CheckpointStore(LocalObjectStore(tmp_path / "objects"), "jobs/acme/job_1")
    for step in (10, 20, 30, 40):
        checkpoints.upload(step, _checkpoint(tmp_path / "local", step), keep=2, protect=10)
    assert checkpoints.steps() == ([10, 30, 40], [])
    checkpoints.upload(50, _checkpoint(tmp_path / "local", 50), keep=2, protect=40)
    assert checkpoints.steps() == ([40, 50], [])


def test_no_checkpoint_means_step_zero(tmp_path: Path) -> None:
    checkpoints = CheckpointStore(LocalObjectStore(tmp_path / "objects"), "jobs/acme/job_1")
    assert checkpoints.download_latest(tmp_path / "out") is None
    cfg = make_run_config(tmp_path, "model", tmp_path / "train.jsonl")
    assert resume_checkpoint(cfg) is None


def test_resume_uses_the_newest_marked_checkpoint_and_refuses_pickles(tmp_path: Path) -> None:
    cfg = make_run_config(tmp_path, "model", tmp_path / "train.jsonl")
    root = resume_dir(cfg.output_dir)
    for step in (5, 15):
        (_checkpoint(root, step) / COMPLETE).write_text(str(step))
    _checkpoint(root, 25)  # unmarked: never used
    assert resume_checkpoint(cfg) == str(root / "checkpoint-15")

    (root / "checkpoint-15" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(TrainingError, match=r"pickled weights .*pytorch_model\.bin"):
        resume_checkpoint(cfg)
