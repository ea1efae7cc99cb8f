"""Server keys generated once in the data dir (page-token signing, import-credential sealing).

A key file is created with mode 0600 through a private temporary file and a hard link, which fails if
another process got there first: several service processes starting on one data dir all end up reading
the same key.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path


def load_or_create_key(path: Path, make: Callable[[], bytes]) -> str:
    """The key stored at `path`, written from `make()` (mode 0600) if the file does not exist yet."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, make())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path.read_text().strip()
