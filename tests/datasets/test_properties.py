"""Property-based tests (hypothesis) of the splitter and the format detector."""

from __future__ import annotations

import io
import json
import math
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.datasets import validation
from services.datasets.checkers import CHECKERS
from services.datasets.detection import classify, detect
from services.datasets.domain import DatasetFormat, SplitConfig
from services.datasets.fast_chat import fast_chat
from services.datasets.splitting import assign_splits, resolve_split, split_counts
from tuneforge_core.errors import Violations

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def fractions(draw: st.DrawFn) -> tuple[float, float, float]:
    """Three fractions in [0, 1] summing to 1 with a positive train share."""
    a = draw(st.integers(1, 1000))
    b = draw(st.integers(0, 1000 - a))
    return a / 1000, b / 1000, (1000 - a - b) / 1000


@FAST
@given(n=st.integers(0, 3000), fr=fractions(), seed=st.integers(0, 2**64 - 1))
def test_splits_are_exact_complete_disjoint_and_deterministic(
    n: int, fr: tuple[float, float, float], seed: int
) -> None:
    counts = split_counts(n, fr)
    assert sum(counts) == n and all(c >= 0 for c in counts)
    wanted = [i for i in range(3) if fr[i] > 0]
    if n >= len(wanted):
        assert all(counts[i] >= 1 for i in wanted)
    assert all(counts[i] == 0 for i in range(3) if fr[i] == 0)
    assert all(abs(counts[i] - n * fr[i]) <= 2 for i in range(3))
    assignment = list(assign_splits(counts, seed))
    # Every example in exactly one split, with exactly the planned sizes, the same for the same seed.
    assert len(assignment) == n and Counter(assignment) == Counter({k: c for k, c in enumerate(counts) if c})
    assert assignment == list(assign_splits(counts, seed))


@FAST
@given(
    values=st.tuples(*[st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True))] * 3),
    seed=st.one_of(st.none(), st.integers(-5, 2**65)),
)
def test_split_config_is_accepted_only_when_valid(
    values: tuple[float | None, float | None, float | None], seed: int | None
) -> None:
    v = Violations()
    plan = resolve_split(SplitConfig(*values, seed=seed), v)
    if not v:
        assert all(0.0 <= f <= 1.0 for f in plan.fractions) and plan.fractions[0] > 0
        assert math.isclose(sum(plan.fractions), 1.0, abs_tol=1e-6)
        assert 0 <= plan.seed < 2**64
    else:
        assert all(item.field.startswith("split") and item.description for item in v.items)


TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=20).filter(
    lambda s: bool(s.strip())
)
EXTRA_KEYS = st.dictionaries(st.sampled_from(["id", "meta", "source", "score"]), st.integers(), max_size=2)


def _chat(draw: st.DrawFn) -> list[dict[str, str]]:
    turns = draw(st.integers(1, 3))
    messages = [{"role": "system", "content": draw(TEXT)}] if draw(st.booleans()) else []
    for _ in range(turns):
        messages += [{"role": "user", "content": draw(TEXT)}, {"role": "assistant", "content": draw(TEXT)}]
    return messages


@st.composite
def rows(draw: st.DrawFn) -> tuple[DatasetFormat, dict[str, Any]]:
    """A valid row of a random format, with extra keys that belong to no format."""
    fmt = draw(st.sampled_from(list(CHECKERS)))
    messages = _chat(draw)
    prompt, answer, other = messages[:-1], messages[-1:], [{"role": "assistant", "content": draw(TEXT) + "!"}]
    row: dict[str, Any] = {
        DatasetFormat.OPENAI_CHAT: lambda: {"messages": messages},
        DatasetFormat.SHAREGPT: lambda: {
            "conversations": [
                {
                    "from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]),
                    "value": m["content"],
                }
                for m in messages
            ]
        },
        DatasetFormat.ALPACA: lambda: {
            "instruction": draw(TEXT),
            "input": draw(st.just("") | TEXT),
            "output": draw(TEXT),
        },
        DatasetFormat.TEXT: lambda: {"text": draw(TEXT)},
        DatasetFormat.PROMPT_COMPLETION: lambda: {"prompt": draw(TEXT), "completion": draw(TEXT)},
        DatasetFormat.KTO: lambda: {"prompt": prompt, "completion": answer, "label": draw(st.booleans())},
        DatasetFormat.PREFERENCE: lambda: {"prompt": prompt, "chosen": answer, "rejected": other},
        DatasetFormat.OPENAI_PREFERENCE: lambda: {
            "input": {"messages": prompt},
            "preferred_output": answer,
            "non_preferred_output": other,
        },
        DatasetFormat.PROMPT_ONLY: lambda: {"prompt": draw(TEXT)},
    }[fmt]()
    extra = {} if fmt is DatasetFormat.PROMPT_ONLY else draw(EXTRA_KEYS)
    return fmt, {**extra, **row}


@FAST
@given(row=rows())
def test_the_detector_recognizes_every_valid_row(row: tuple[DatasetFormat, dict[str, Any]]) -> None:
    fmt, obj = row
    assert classify(obj) is fmt


@FAST
@given(data=st.lists(rows(), min_size=1, max_size=12))
def test_detection_follows_the_majority(data: list[tuple[DatasetFormat, dict[str, Any]]]) -> None:
    votes = Counter(fmt for fmt, _ in data)
    top = max(votes.values())
    assert votes[detect(obj for _, obj in data)] == top


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(row=rows(), copies=st.integers(1, 3))
def test_valid_rows_validate_and_normalizing_twice_changes_nothing(
    row: tuple[DatasetFormat, dict[str, Any]], copies: int
) -> None:
    fmt, obj = row
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.jsonl"
        path.write_text((json.dumps(obj) + "\n") * copies)
        out = io.BytesIO()
        report = validation.validate_file(path, min_examples=1, normalized_out=out)
        assert report.format is fmt and report.error_count == 0, report.issues
        again = Path(tmp) / "n.jsonl"
        again.write_bytes(out.getvalue())
        canonical = {
            DatasetFormat.SHAREGPT: DatasetFormat.OPENAI_CHAT,
            DatasetFormat.ALPACA: DatasetFormat.OPENAI_CHAT,
            DatasetFormat.OPENAI_PREFERENCE: DatasetFormat.PREFERENCE,
        }.get(fmt, fmt)
        out2 = io.BytesIO()
        report2 = validation.validate_file(again, format=canonical, min_examples=1, normalized_out=out2)
        assert report2.error_count == 0 and out2.getvalue() == out.getvalue()


@st.composite
def chat_messages(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A valid conversation, half the time with one field of one message changed to a value that may or
    may not be valid (a role, blank content, a weight that is not 0 or 1, a wrong type)."""
    messages: list[dict[str, Any]] = _chat(draw)
    if draw(st.booleans()):
        message = draw(st.sampled_from(messages))
        key = draw(st.sampled_from(["role", "content", "weight"]))
        message[key] = draw(
            st.sampled_from(["system", "user", "assistant", "tool", "", "  ", 0, 1, 1.0, 2, True, None])
        )
    return messages


@settings(max_examples=300, deadline=None)
@given(
    messages=chat_messages(), extra=st.dictionaries(st.sampled_from(["id", "tools"]), st.just([]), max_size=1)
)
def test_the_fast_path_agrees_with_the_checker(messages: list[dict[str, Any]], extra: dict[str, Any]) -> None:
    """A line the fast path accepts has no issue at all in the full checker and the same normalized line;
    anything else is left to the checker."""
    obj = {"messages": messages, **extra}
    fast = fast_chat(json.dumps(obj).encode())
    found: list[str] = []
    example = CHECKERS[DatasetFormat.OPENAI_CHAT].check(obj, lambda code, *a, **k: found.append(code))
    if fast is not None:
        assert found == [] and example is not None
        assert validation.normalized_line(fast.record) == validation.normalized_line(example.record)
        assert (fast.messages, fast.characters, fast.target) == (
            example.messages,
            example.characters,
            example.target,
        )
    elif not extra and found == [] and example is not None:
        # Only weights written as 1.0 may leave the fast path for a clean line.
        assert any(isinstance(m.get("weight"), float) for m in messages)
