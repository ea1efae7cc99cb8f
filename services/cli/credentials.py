"""Where the CLI finds its API key: TUNEFORGE_API_KEY, else the admin key `tuneforge up` keeps in its data
dir (TUNEFORGE_DATA_DIR, default .tuneforge) for the default organization."""

from __future__ import annotations

import os
from pathlib import Path

from services.platform.supervisor import ADMIN_KEY_FILE

DEFAULT_DATA_DIR = Path(".tuneforge")


def admin_key_path(data_dir: Path | None = None) -> Path:
    base = data_dir or Path(os.environ.get("TUNEFORGE_DATA_DIR") or DEFAULT_DATA_DIR)
    return base / ADMIN_KEY_FILE


def read_admin_key(data_dir: Path | None = None) -> str:
    """The admin key `tuneforge up` wrote in `data_dir`, or "" when there is none (or it is unreadable)."""
    try:
        return admin_key_path(data_dir).read_text().strip()
    except OSError:
        return ""


def api_key() -> str:
    """The key the CLI sends: TUNEFORGE_API_KEY, else the local platform's admin key, else ""."""
    return os.environ.get("TUNEFORGE_API_KEY", "").strip() or read_admin_key()
