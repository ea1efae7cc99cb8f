"""Reading the normalized split files: the family of each row (tuneforge_core.compat holds the families and
which ones each method trains on).

The datasets service writes every split in ONE shape per family (see the table in the trainer_worker README).
The worker tells the family from the keys of each row rather than trusting a label passed along with the
file, so a split that does not fit the method fails on the first bad line with a message naming it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainer_worker.errors import TrainingError
from tuneforge_core.compat import FAMILY_KEYS, Family, family_of_row
from tuneforge_core.reasons import Reason


def describe(families: tuple[Family, ...]) -> str:
    """ "'messages', 'prompt'+'completion' or 'text'": what a user must put in each row."""
    names = ["+".join(f"'{k}'" for k in FAMILY_KEYS[f]) for f in families]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def read_rows(
    path: Path, accepted: tuple[Family, ...], method: str
) -> tuple[list[dict[str, Any]], Family]:
    """All rows of ``path`` and their one family; the first line that does not fit is an error."""
    rows: list[dict[str, Any]] = []
    found: Family | None = None
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TrainingError(
                    Reason.BAD_TRAINING_DATA, f"{path.name} line {number} is not JSON: {exc}."
                ) from exc
            family = family_of_row(row) if isinstance(row, dict) else None
            if family is None:
                raise TrainingError(
                    Reason.BAD_TRAINING_DATA, f"{path.name} line {number} has none of {describe(accepted)}."
                )
            if family not in accepted:
                raise TrainingError(
                    Reason.BAD_TRAINING_DATA,
                    f"{path.name} line {number} is {family} data; {method} trains on rows with "
                    f"{describe(accepted)}.",
                )
            if found is not None and family != found:
                raise TrainingError(
                    Reason.BAD_TRAINING_DATA,
                    f"{path.name} line {number} is {family} data; earlier lines are {found}.",
                )
            found = family
            rows.append(row)
    if found is None:
        raise TrainingError(Reason.BAD_TRAINING_DATA, f"{path.name} holds no examples.")
    return rows, found
