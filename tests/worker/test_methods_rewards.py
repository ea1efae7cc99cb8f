"""GRPO's built-in graders and the user-code switch: pure functions, no model."""

from __future__ import annotations

import pytest
from tuneforge.v1 import job_pb2

from trainer_worker.errors import TrainingError
from trainer_worker.recipes import rewards

CHAT = [[{"role": "assistant", "content": ' {"a": 1} '}], [{"role": "assistant", "content": "Paris"}]]


def test_exact_match_trims_and_compares_with_the_answer_column() -> None:
    assert rewards.exact_match(["  Paris\n", "Lyon", "42"], answer=["Paris", "Paris", 42]) == [1.0, 0.0, 1.0]
    assert rewards.exact_match(CHAT, answer=["x", "Paris"]) == [0.0, 1.0]


def test_json_regex_and_length_graders() -> None:
    assert rewards.json_valid(CHAT) == [1.0, 0.0]
    assert rewards.json_valid(["[1, 2]", "{'a': 1}", ""]) == [1.0, 0.0, 0.0]
    assert rewards.regex(r"^\d+ plus \d+ is \d+\.$")(["1 plus 2 is 3.", "three"]) == [1.0, 0.0]
    closeness = rewards.length(10)
    assert closeness(["x" * 10, "x" * 5, "x" * 15, "x" * 30, ""]) == [1.0, 0.5, 0.5, 0.0, 0.0]


def _grpo(*kinds: int, **fields: object) -> job_pb2.GrpoConfig:
    return job_pb2.GrpoConfig(reward_functions=list(kinds), **fields)


def test_build_names_each_grader_and_checks_the_columns_it_needs() -> None:
    grpo = _grpo(job_pb2.REWARD_FUNCTION_EXACT_MATCH, job_pb2.REWARD_FUNCTION_LENGTH, target_length=5)
    functions = rewards.build(grpo, ["prompt", "answer"])
    assert [f.__name__ for f in functions] == ["exact_match", "length_closeness"]
    with pytest.raises(TrainingError, match="'answer' column") as info:
        rewards.build(grpo, ["prompt"])
    assert info.value.reason == "BAD_TRAINING_DATA"


SOURCE = "def reward(prompts, completions, **columns):\n    return [len(c) for c in completions]\n"


def test_user_code_runs_only_where_the_worker_allows_it(monkeypatch: pytest.MonkeyPatch) -> None:
    grpo = _grpo(job_pb2.REWARD_FUNCTION_USER_CODE, reward_code=SOURCE)
    monkeypatch.delenv(rewards.ALLOW_USER_CODE_ENV, raising=False)
    with pytest.raises(TrainingError, match="does not run user reward code"):
        rewards.build(grpo, ["prompt"])

    monkeypatch.setenv(rewards.ALLOW_USER_CODE_ENV, "true")
    (function,) = rewards.build(grpo, ["prompt"])
    assert function(prompts=["p", "q"], completions=["ab", "abc"], trainer_state=None) == [2.0, 3.0]
    with pytest.raises(TrainingError, match="must define a function named `reward`"):
        rewards.user_code("def score(prompts, completions):\n    return []\n")
    with pytest.raises(TrainingError, match="failed to load"):
        rewards.user_code("raise RuntimeError('boom')\n")
