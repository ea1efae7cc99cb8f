"""Reading the normalized split files: the family of each row, and the families a method trains on.

The datasets service writes every split in ONE shape per family (see the table in the trainer_worker README).
The worker tells the family from the keys of each row rather than trusting a label passed along with the
file, so a split that does not fit the method fails on the first bad line with a message naming it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainer_worker.errors import TrainingError
from tuneforge_core.reasons import Reason

CHAT = "chat"
PROMPT_COMPLETION = "prompt/completion"
TEXT = "text"
PREFERENCE = "preference"
KTO = "KTO"
PROMPT_ONLY = "prompt-only"

# The keys that name each family, in the order they are tested (the most specific first).
FAMILY_KEYS: dict[str, tuple[str, ...]] = {
    CHAT: ("messages",),
    PREFERENCE: ("prompt", "chosen", "rejected"),
    KTO: ("prompt", "completion", "label"),
    PROMPT_COMPLETION: ("prompt", "completion"),
    TEXT: ("text",),
    PROMPT_ONLY: ("prompt",),
}


def family_of(row: dict[str, Any]) -> str | None:
    """The family whose keys the row has, or None."""
    for family, keys in FAMILY_KEYS.items():
        if all(key in row for key in keys):
            return family
    return None


def describe(families: tuple[str, ...]) -> str:
    """ "'messages', 'prompt'+'completion' or 'text'": what a user must put in each row."""
    names = ["+".join(f"'{k}'" for k in FAMILY_KEYS[f]) for f in families]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def read_rows(path: Path, accepted: tuple[str, ...], method: str) -> tuple[list[dict[str, Any]], str]:
    """All rows of ``path`` and their one family; the first line that does not fit is an error."""
    rows: list[dict[str, Any]] = []
    found: str | None = None
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
            family = family_of(row) if isinstance(row, dict) else None
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
