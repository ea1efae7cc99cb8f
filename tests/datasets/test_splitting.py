"""The splitter: deterministic, disjoint, complete, exact sizes, and every ratio error named."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.datasets.domain import SplitConfig, SplitPlan
from services.datasets.splitting import assign_splits, resolve_split, split_counts
from tuneforge_core.errors import InvalidArgument, Violations


def _resolve(config: SplitConfig) -> tuple[SplitPlan, list[str]]:
    violations = Violations()
    plan = resolve_split(config, violations)
    return plan, [f.field for f in violations.items]


def test_defaults() -> None:
    plan, errors = _resolve(SplitConfig())
    assert errors == [] and plan == SplitPlan((0.8, 0.15, 0.05), 0)
    assert split_counts(200, plan.fractions) == (160, 30, 10)


@pytest.mark.parametrize(("config", "fields"), [
    (SplitConfig(1.2, -0.1, -0.1), ["split.train_fraction", "split.validation_fraction",
                                    "split.test_fraction"]),
    (SplitConfig(float("nan"), 0.15, 0.05), ["split.train_fraction"]),
    (SplitConfig(0.0, 0.5, 0.5), ["split.train_fraction"]),
    (SplitConfig(0.9), ["split"]),
    (SplitConfig(0.5, 0.3, 0.1), ["split"]),
    (SplitConfig(seed=-1), ["split.seed"]),
])
def test_ratio_errors_name_the_field(config: SplitConfig, fields: list[str]) -> None:
    assert _resolve(config)[1] == fields


def test_sum_tolerance_and_message() -> None:
    assert _resolve(SplitConfig(0.7, 0.2, 0.1 + 5e-7))[1] == []
    violations = Violations()
    resolve_split(SplitConfig(0.9), violations, "metadata.split")
    with pytest.raises(InvalidArgument) as caught:
        violations.raise_if_any("invalid split")
    assert "train 0.9 + validation 0.15 (default) + test 0.05 (default) = 1.1" in caught.value.message


def test_same_seed_same_assignment_other_seed_other_assignment() -> None:
    counts = split_counts(1000, (0.8, 0.15, 0.05))
    first = list(assign_splits(counts, 42))
    assert first == list(assign_splits(counts, 42))
    assert first != list(assign_splits(counts, 43))


def test_assignment_is_pinned() -> None:
    """Stored datasets are re-split from their seed: the assignment must not drift between Python
    versions or refactorings."""
    assert "".join(map(str, assign_splits((3, 2, 1), 0))) == "110020"
    assert "".join(map(str, assign_splits((10, 6, 4), 12345))) == "10110010010212200002"


def test_assignment_is_complete_with_exact_sizes_and_shuffled() -> None:
    counts = split_counts(1000, (0.8, 0.15, 0.05))
    assignment = list(assign_splits(counts, 7))
    assert len(assignment) == 1000
    assert Counter(assignment) == {0: 800, 1: 150, 2: 50}
    assert assignment[:150] != [0] * 150  # not a prefix cut


@pytest.mark.parametrize(("n", "fractions", "expected"), [
    (10, (0.8, 0.15, 0.05), (8, 1, 1)),  # 1.5 and 0.5 would round to 2 and 0: test still gets one
    (3, (0.8, 0.15, 0.05), (1, 1, 1)),
    (2, (0.8, 0.15, 0.05), (2, 0, 0)),  # not enough for all three: train keeps them
    (5, (1.0, 0.0, 0.0), (5, 0, 0)),
    (7, (0.5, 0.5, 0.0), (4, 3, 0)),
    (0, (0.8, 0.15, 0.05), (0, 0, 0)),
])
def test_counts(n: int, fractions: tuple[float, float, float], expected: tuple[int, int, int]) -> None:
    assert split_counts(n, fractions) == expected


@given(n=st.integers(0, 5000), a=st.floats(0.01, 1), b=st.floats(0, 1), c=st.floats(0, 1))
def test_counts_properties(n: int, a: float, b: float, c: float) -> None:
    total = a + b + c
    fractions = (a / total, b / total, c / total)
    counts = split_counts(n, fractions)
    assert sum(counts) == n and min(counts) >= 0
    non_zero = [i for i, f in enumerate(fractions) if f > 0]
    if n >= len(non_zero):
        assert all(counts[i] >= 1 for i in non_zero)
    for i, f in enumerate(fractions):
        if f == 0:
            assert counts[i] == 0
        else:
            assert abs(counts[i] - n * f) <= 2
