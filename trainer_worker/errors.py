"""Why a training run failed, in the vocabulary of ``tuneforge.v1.ErrorReason``.

Recipes raise :class:`TrainingError` with a reason; ``trainer_worker.train`` maps any other exception to a
reason in one place (:func:`classify`), so the agent never parses message text. In the agent, a
:class:`Transient` failure hands the job back for another delivery; anything else fails it at once
(:func:`is_retryable`).
"""

from __future__ import annotations

from tuneforge_core.reasons import Reason


class TrainingError(Exception):
    """A failure whose reason the recipe already knows; ``message`` is a plain sentence for the user."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason: Reason = reason
        self.message = message


class Transient(Exception):
    """An infrastructure failure the job is not to blame for (storage or NATS unreachable): the job goes back
    to the queue and another delivery retries it."""


def is_retryable(exc: BaseException) -> bool:
    """Whether a failure inside the agent is worth another delivery.

    Only infrastructure is: a Transient, or the NATS connection or network failing under us. Everything
    else (a bug of ours, input that slipped past CreateJob) would fail the same way on every worker, so the
    job fails at once with a reason instead of being retried until it is WORKER_LOST.
    """
    import nats.errors  # the training process never needs NATS

    return isinstance(exc, Transient | nats.errors.Error | ConnectionError | TimeoutError)


class Cancelled(BaseException):
    """Training stopped because SIGTERM arrived or the parent (the agent) went away.

    A BaseException, like KeyboardInterrupt: the signal handler raises it wherever setup happens to be, often
    inside a library's import, and a library's ``except Exception`` must not swallow it (it did, and the
    stop then waited for the whole setup)."""


# Exception class names (matched without importing their libraries) that say the model is not there.
MODEL_MISSING = frozenset({"RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"})
OUT_OF_MEMORY_ADVICE = (
    "Lower batch_size (raise gradient_accumulation_steps to keep the effective batch), shorten "
    "max_seq_length, turn on gradient_checkpointing, use QLoRA, or choose a GPU with more memory."
)


def classify(exc: BaseException) -> Reason:
    """Map an unexpected exception to a reason without importing torch."""
    if isinstance(exc, TrainingError):
        return exc.reason
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return Reason.OUT_OF_MEMORY
    if isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower():
        return Reason.OUT_OF_MEMORY
    if isinstance(exc, ImportError):
        return Reason.DEPENDENCY_ERROR
    if type(exc).__name__ in MODEL_MISSING:
        return Reason.MODEL_NOT_FOUND
    return Reason.TRAINING_FAILED


def describe(exc: BaseException) -> tuple[Reason, str]:
    """The reason and a plain sentence for the job's error field: what happened and what to change."""
    reason = classify(exc)
    if isinstance(exc, TrainingError):
        return reason, exc.message
    if reason == Reason.OUT_OF_MEMORY:
        where = "host" if isinstance(exc, MemoryError) else "GPU"
        return reason, f"Training ran out of {where} memory. {OUT_OF_MEMORY_ADVICE}"
    if reason == Reason.DEPENDENCY_ERROR:
        return reason, f"A library the training needs is missing or broken on the worker: {exc}"
    if reason == Reason.MODEL_NOT_FOUND:
        return reason, f"The base model could not be found: {exc}"
    return reason, f"Training failed: {type(exc).__name__}: {exc}"
