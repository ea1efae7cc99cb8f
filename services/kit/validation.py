"""Checks shared by every service's request validation."""

from __future__ import annotations

import re

from tuneforge_core.errors import Violations

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}\Z")
# What an id looks like (tuneforge_core.ids: a prefix, '_', 26 Crockford base32 characters). A request names
# a resource by id or by name, ids first: a name of this shape could make an id stand for another resource
# (a job naming a deleted dataset's id would train on whatever dataset took that id as its name).
ID_LIKE_RE = re.compile(r"^[A-Za-z]+_[0-9A-Za-z]{26}\Z")
ID_LIKE_NAME = "must not look like an id (letters, '_', then 26 letters or digits): a name and an id are " \
    "looked up in one place"


# Control characters, but for tab, line feed and carriage return (C0, DEL and C1). A terminal obeys them
# when it prints the text (an ESC sequence clears the screen, moves the cursor, sets the window title), so
# free text one caller writes and another reads with the CLI must not hold them.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_LINE_BREAK_RE = re.compile(r"[\t\n\r]")


def check_text(v: Violations, value: str, field: str, *, max_chars: int, one_line: bool = False) -> None:
    """Free text (a description, a file name): at most `max_chars` characters, no control characters (with
    `one_line`, not even tabs or line breaks). The violation names the first one found and where."""
    if len(value) > max_chars:
        v.add(field, f"must be at most {max_chars} characters")
        return
    found = _CONTROL_RE.search(value) or (_LINE_BREAK_RE.search(value) if one_line else None)
    if found is not None:
        allowed = "" if one_line else " other than tab and line breaks"
        v.add(field, f"must not contain control characters{allowed} (U+{ord(found.group()):04X} at character "
              f"{found.start() + 1})")


def check_organization(v: Violations, value: str, field: str = "organization") -> None:
    if not value:
        v.add(field, "is required (every resource belongs to an organization)")
    elif not NAME_RE.match(value):
        v.add(field, "must be 1-63 characters of a-z, 0-9, '.', '_' or '-', starting with a letter or digit")


def check_name(v: Violations, value: str, field: str = "name", *, required: bool = True) -> None:
    if not value:
        if required:
            v.add(field, "is required")
    elif not NAME_RE.match(value):
        v.add(field, "must be 1-63 characters of a-z, 0-9, '.', '_' or '-', starting with a letter or digit")
    elif ID_LIKE_RE.match(value):
        v.add(field, ID_LIKE_NAME)


def check_request_id(v: Violations, value: str, field: str = "request_id") -> None:
    if len(value) > 128:
        v.add(field, "must be at most 128 characters")
