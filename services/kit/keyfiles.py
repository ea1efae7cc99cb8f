"""Server keys generated once in the data dir (page-token signing, import-credential sealing, the service
token).

Every generated key lives in `<data_dir>/secrets/` (mode 0700; each file 0600), a folder of its own: never
beside the sealed objects a key opens (object storage is `<data_dir>/objects` or a bucket), so a copy of
the objects alone opens nothing. A key file left by an older version at the top of the data dir is moved
there on first use.

A key file is created through a private temporary file and a hard link, which fails if another process got
there first: several service processes starting on one data dir all end up reading the same key.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path

SECRETS_DIR = "secrets"


def secret_file(data_dir: Path, name: str) -> Path:
    """Where the generated key `name` of this data dir lives (its folder created private, an older
    version's file at the top of the data dir moved in)."""
    folder = data_dir / SECRETS_DIR
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    path = folder / name
    legacy = data_dir / name
    if legacy.is_file() and not path.exists():
        with contextlib.suppress(FileNotFoundError, FileExistsError):
            os.link(legacy, path)
        legacy.unlink(missing_ok=True)
    return path


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
