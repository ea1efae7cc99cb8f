"""Built-in GRPO graders, and user reward code where a deployment explicitly allows it.

Each grader is a TRL reward function: it gets the batch's prompts and completions (strings, or message lists
for conversational prompts) plus every extra dataset column as a keyword list, and returns one float per
completion. TRL logs each one's mean under ``rewards/<name>``. This module imports no torch.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from typing import Any

from tuneforge.v1 import job_pb2

from trainer_worker.errors import TrainingError
from tuneforge_core.reasons import Reason

RewardFunc = Callable[..., list[float]]

#: The worker setting that lets GrpoConfig.reward_code run inside the training process.
ALLOW_USER_CODE_ENV = "TUNEFORGE_WORKER_ALLOW_USER_REWARD_CODE"


def user_code_allowed() -> bool:
    return os.environ.get(ALLOW_USER_CODE_ENV, "false").strip().lower() in ("1", "true", "yes", "on")


def text(completion: str | list[dict[str, Any]]) -> str:
    """The completion's text: the string itself, or the content of a conversational completion."""
    if isinstance(completion, str):
        return completion
    return "".join(str(message.get("content") or "") for message in completion)


def exact_match(completions: list[Any], answer: list[Any], **_: Any) -> list[float]:
    """1 when the completion equals the row's ``answer`` after trimming whitespace."""
    return [float(text(c).strip() == str(a).strip()) for c, a in zip(completions, answer, strict=True)]


def json_valid(completions: list[Any], **_: Any) -> list[float]:
    """1 when the completion parses as JSON."""
    scores = []
    for completion in completions:
        try:
            json.loads(text(completion))
        except ValueError:
            scores.append(0.0)
        else:
            scores.append(1.0)
    return scores


def regex(pattern: str) -> RewardFunc:
    """1 when ``pattern`` is found in the completion."""
    compiled = re.compile(pattern)

    def regex_match(completions: list[Any], **_: Any) -> list[float]:
        return [float(compiled.search(text(c)) is not None) for c in completions]

    return regex_match


def length(target: int) -> RewardFunc:
    """1 at ``target`` characters, falling linearly to 0 at 0 or 2 x target."""

    def length_closeness(completions: list[Any], **_: Any) -> list[float]:
        return [max(0.0, 1.0 - abs(len(text(c)) - target) / target) for c in completions]

    return length_closeness


def user_code(source: str) -> RewardFunc:
    """The ``reward`` function defined by ``source``; runs user code, so only where the worker allows it."""
    if not user_code_allowed():
        raise TrainingError(
            Reason.TRAINING_FAILED,
            f"This worker does not run user reward code ({ALLOW_USER_CODE_ENV} is off).",
        )
    namespace: dict[str, Any] = {"__name__": "tuneforge_user_reward"}
    try:
        exec(compile(source, "<reward_code>", "exec"), namespace)
    except Exception as exc:
        raise TrainingError(Reason.TRAINING_FAILED, f"The reward code failed to load: {exc!r}") from exc
    function = namespace.get("reward")
    if not callable(function):
        raise TrainingError(Reason.TRAINING_FAILED, "The reward code must define a function named `reward`.")

    def user_reward(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:
        scores = function(prompts, completions, **columns)
        return [float(score) for score in scores]

    return user_reward


def build(grpo: job_pb2.GrpoConfig, columns: list[str], reward_model: Any = None) -> list[Any]:
    """The reward functions the spec names; ``columns`` are the dataset's, to check what graders need.
    REWARD_FUNCTION_REWARD_MODEL is ``reward_model`` itself (the recipe loads it): TRL scores each prompt +
    completion with a sequence-classification model placed among the functions."""
    functions: list[Any] = []
    for kind in grpo.reward_functions:
        if kind == job_pb2.REWARD_FUNCTION_EXACT_MATCH:
            if "answer" not in columns:
                raise TrainingError(
                    Reason.BAD_TRAINING_DATA,
                    "The exact-match reward needs an 'answer' column in every prompt row.",
                )
            functions.append(exact_match)
        elif kind == job_pb2.REWARD_FUNCTION_REGEX:
            functions.append(regex(grpo.reward_regex))
        elif kind == job_pb2.REWARD_FUNCTION_JSON_VALID:
            functions.append(json_valid)
        elif kind == job_pb2.REWARD_FUNCTION_LENGTH:
            functions.append(length(grpo.target_length))
        elif kind == job_pb2.REWARD_FUNCTION_USER_CODE:
            functions.append(user_code(grpo.reward_code))
        elif kind == job_pb2.REWARD_FUNCTION_REWARD_MODEL:
            if reward_model is None:
                raise TrainingError(
                    Reason.TRAINING_FAILED, "The reward-model reward needs spec.grpo.reward_model."
                )
            functions.append(reward_model)
        else:
            raise TrainingError(Reason.TRAINING_FAILED, f"Unknown reward function {kind}.")
    if not functions:
        raise TrainingError(Reason.TRAINING_FAILED, "GRPO needs at least one reward function.")
    return functions
