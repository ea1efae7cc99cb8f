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
