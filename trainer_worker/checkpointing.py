"""Checkpoints in object storage and resuming from them.

Seam between the recipes and storage. Recipes add :func:`callbacks` to their trainer and pass
:func:`resume_checkpoint` to ``trainer.train(resume_from_checkpoint=...)``.
"""

from __future__ import annotations

from typing import Any

from trainer_worker.events import EventSink
from trainer_worker.run_config import RunConfig


def callbacks(cfg: RunConfig, sink: EventSink) -> list[Any]:
    """Trainer callbacks that copy each completed checkpoint to object storage."""
    return []


def resume_checkpoint(cfg: RunConfig) -> str | None:
    """A local folder holding the job's last complete checkpoint, or None to start from step 0."""
    return None
