"""Why a training run failed, in the vocabulary of ``tuneforge.v1.ErrorReason``.

Recipes raise :class:`TrainingError` with a reason; ``trainer_worker.train`` maps any other exception to a
reason in one place (:func:`classify`), so the agent never parses message text.
"""

from __future__ import annotations

from typing import Literal

Reason = Literal[
    "OUT_OF_MEMORY",
    "MODEL_NOT_FOUND",
    "BAD_TRAINING_DATA",
    "LOSS_DIVERGED",
    "DEPENDENCY_ERROR",
    "TRAINING_FAILED",
]


class TrainingError(Exception):
    """A failure whose reason the recipe already knows; ``message`` is a plain sentence for the user."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason: Reason = reason
        self.message = message


class Cancelled(Exception):
    """Training stopped because SIGTERM arrived or the parent (the agent) went away."""


def classify(exc: BaseException) -> Reason:
    """Map an unexpected exception to a reason without importing torch."""
    if isinstance(exc, TrainingError):
        return exc.reason
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return "OUT_OF_MEMORY"
    if isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower():
        return "OUT_OF_MEMORY"
    if isinstance(exc, ImportError):
        return "DEPENDENCY_ERROR"
    return "TRAINING_FAILED"
