"""Seeded train/validation/test splits: pure functions, no I/O.

`assign_splits` streams: it decides each example's split in file order with O(1) memory (sequential
random sampling), so a file of millions of examples never needs an index list in memory. Every example
lands in exactly one split, the split sizes are exactly `split_counts`, and the same seed and the same
number of examples always give the same assignment (Python's Mersenne Twister seeded with an int is
stable across versions and platforms).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

from services.datasets.domain import SPLIT_KINDS, SplitConfig, SplitPlan
from tuneforge_core.errors import Violations

DEFAULT_FRACTIONS: tuple[float, float, float] = (0.8, 0.15, 0.05)
# With a separate validation dataset: nothing is split off for validation.
EXTERNAL_VALIDATION_FRACTIONS: tuple[float, float, float] = (0.95, 0.0, 0.05)
# Unset seed: a fixed one, so uploading the same file twice gives the same split.
DEFAULT_SEED = 0
SUM_TOLERANCE = 1e-6
MAX_SEED = 2 ** 64 - 1


def resolve_split(config: SplitConfig, violations: Violations, field_prefix: str = "split", *,
                  defaults: tuple[float, float, float] = DEFAULT_FRACTIONS) -> SplitPlan:
    """Fills defaults and checks the fractions, adding a violation per bad field to `violations`."""
    given = (config.train_fraction, config.validation_fraction, config.test_fraction)
    fractions = tuple(d if f is None else f for f, d in zip(given, defaults, strict=True))
    in_range = True
    for kind, value in zip(SPLIT_KINDS, fractions, strict=True):
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            violations.add(f"{field_prefix}.{kind.value}_fraction", f"must be between 0 and 1, got {value}")
            in_range = False
    if in_range and fractions[0] <= 0.0:
        violations.add(f"{field_prefix}.train_fraction", "must be greater than 0")
    total = sum(fractions)
    if in_range and abs(total - 1.0) > SUM_TOLERANCE:
        parts = " + ".join(f"{kind.value} {value:g}{' (default)' if g is None else ''}"
                           for kind, value, g in zip(SPLIT_KINDS, fractions, given, strict=True))
        violations.add(field_prefix, f"the fractions must sum to 1, but {parts} = {total:g}; unset "
                       f"fractions default to {' / '.join(f'{d:g}' for d in defaults)}, so set all three")
    seed = DEFAULT_SEED if config.seed is None else config.seed
    if not 0 <= seed <= MAX_SEED:
        violations.add(f"{field_prefix}.seed", "must be an unsigned 64-bit integer")
    return SplitPlan(fractions=(fractions[0], fractions[1], fractions[2]), seed=seed)


def split_counts(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """Split sizes adding up to n: largest remainder, then one example for every non-zero fraction that
    would otherwise get none, taken from the split furthest above its share, as long as there are
    enough examples."""
    if n <= 0:
        return (0, 0, 0)
    total = sum(fractions)
    exact = [n * f / total for f in fractions]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(3), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    wanted = [i for i in range(3) if fractions[i] > 0]
    if n >= len(wanted):
        for i in wanted:
            if counts[i] == 0:
                # From the split furthest above its exact share that can spare one.
                donor = max((j for j in range(3) if counts[j] > 1),
                            key=lambda j: (counts[j] - exact[j], counts[j]))
                counts[donor] -= 1
                counts[i] += 1
    return (counts[0], counts[1], counts[2])


def assign_splits(counts: tuple[int, int, int], seed: int) -> Iterator[int]:
    """For each of sum(counts) examples in order, the index of its split (0 train, 1 validation, 2 test).

    Each example goes to split k with probability remaining_k / remaining, which draws uniformly among
    all assignments with exactly these sizes.
    """
    rng = random.Random(seed)
    remaining = list(counts)
    left = sum(remaining)
    while left:
        r = rng.randrange(left)
        k = 0 if r < remaining[0] else 1 if r < remaining[0] + remaining[1] else 2
        remaining[k] -= 1
        left -= 1
        yield k
